"""A trial the cluster can never hold is refused before Tune waits on it: one line naming what it asks, what the
cluster has and the keys to change, exit code 2, nothing written; on an autoscaling cluster, a warning instead."""

import logging
import re
import subprocess
from pathlib import Path

import pytest

from rllib_sppo.cli import main
from rllib_sppo.monitoring import KEPT_LINES

REPO = Path(__file__).resolve().parents[1]



def test_rllib_ppo_defaults_on_two_cpus_are_refused(ray_session, tmp_path, capsys):
    """The issue's command: RLlib PPO's defaults (a main process and 2 EnvRunners, a CPU each) on the session's 2-CPU
    Ray."""
    assert main(["train", "--algo", "PPO", "--env", "FrozenLake-v1", "--stop", '{"training_iteration": 1}',
                 "--storage-path", str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err == (
        "rllib: error: command line: a trial asks for 3 CPU (the main process 1, 2 EnvRunners 1 each) but the cluster "
        "has 2 CPU; lower num_cpus_for_main_process, num_env_runners or num_cpus_per_env_runner\n")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("config, message", [
    ("{lr: {grid_search: [0.001, 0.01]}, num_env_runners: {grid_search: [0, 3]}}",  # one grid point too big
     "a trial asks for 4 CPU (the main process 1, 3 EnvRunners 1 each) but the cluster has 2 CPU; lower "
     "num_cpus_for_main_process, num_env_runners or num_cpus_per_env_runner"),
    ("{num_env_runners: 1, custom_resources_per_env_runner: {runner_node: 1}}",  # a resource no node has
     "a trial asks for 1 runner_node (1 EnvRunner 1 each) but the cluster has 0 runner_node; lower num_env_runners or "
     "custom_resources_per_env_runner"),
    ("{num_gpus_per_learner: 1}",
     "a trial asks for 1 GPU (the main process 1) but the cluster has 0 GPU; lower num_gpus_per_learner"),
])
def test_a_yaml_the_cluster_cannot_hold_is_one_line_and_exit_2(yaml_file, ray_session, tmp_path, capsys, config, message):
    path = yaml_file(f"""\
        x:
          run: SPPO
          env: OutcomeCartPole-v1
          stop: {{training_iteration: 1}}
          config: {config}
        """)
    assert main(["train", "file", path, "--storage-path", str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err == f"rllib: error: {path}: {message}\n"
    assert not (tmp_path / "results").exists()


def test_on_an_autoscaling_cluster_the_trial_waits_with_a_warning(ray_session, tmp_path, monkeypatch, caplog):
    """Tune's test for an autoscaling cluster (the cluster launcher's bootstrap config in the home folder): more nodes
    may come, so the check warns and lets the trial wait."""
    from rllib_sppo import SPPO
    from rllib_sppo.cluster import check_resources
    from rllib_sppo.experiments import build_config

    config = build_config(SPPO, "OutcomeCartPole-v1", {"num_env_runners": 3}, "x.yaml")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ray_bootstrap_config.yaml").write_text("cluster_name: test\n")
    with caplog.at_level(logging.WARNING, logger="rllib_sppo.cluster"):
        check_resources(SPPO, config, False, "x.yaml")
    assert caplog.messages == ["a trial asks for 4 CPU (the main process 1, 3 EnvRunners 1 each) but the cluster has "
                               "2 CPU for now; it waits for the autoscaler to add nodes"]


@pytest.mark.system
def test_the_console_command_exits_2_before_starting_a_trial(tmp_path):
    """`rllib train` as a user types it, starting its own Ray on all of this machine's CPUs: asking for one EnvRunner
    more than there are CPUs is refused at once (Tune would wait forever). (Run from the repository, like the other
    console tests: where the package is installed editable from another path, that is where it imports from.)"""
    import os

    cpus = len(os.sched_getaffinity(0))
    run = subprocess.run(["rllib", "train", "--algo", "PPO", "--env", "FrozenLake-v1", "--stop",
                          '{"training_iteration": 1}', "--config", f'{{"num_env_runners": {cpus}}}', "--storage-path",
                          str(tmp_path / "results")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 2, run.stderr[-2000:]
    *before, error = run.stderr.splitlines()
    assert re.fullmatch(rf"rllib: error: command line: a trial asks for {cpus + 1} CPU \(the main process 1, {cpus} "
                        rf"EnvRunners? 1 each\) but the cluster has \d+ CPU; lower num_cpus_for_main_process, "
                        rf"num_env_runners or num_cpus_per_env_runner", error), run.stderr[-2000:]
    # Before it only Ray's start line (where its dashboard is), no trial, no Tune waiting.
    assert all(any(re.search(pattern, line) for pattern, _ in KEPT_LINES) for line in before), before
