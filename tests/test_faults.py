"""Process faults for real: a killed EnvRunner is restarted, a killed driver resumes from its checkpoint, a resumed
run equals an uninterrupted one, and a checkpoint cut short is refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.cli import main
from rllib_sppo.sppo import MANIFEST_FILE


def small_config(**env_runners):
    return (SPPOConfig().environment("OutcomeCartPole-v1")
            .training(lr=1e-3, critic_lr=1e-3, train_batch_size_per_learner=300, minibatch_size=100, num_epochs=2,
                      shuffle_batch_per_epoch=True)
            .rl_module(model_config={"pi_hiddens": [16], "vf_hiddens": [8]})
            .env_runners(**{"num_env_runners": 0, **env_runners}).debugging(seed=0))


def weights(algo):
    state = algo.learner_group.get_state(components="learner/rl_module")["learner"]["rl_module"]["default_policy"]
    return {k: np.asarray(v) for k, v in state.items()}


def test_killed_env_runner_is_restarted_and_training_goes_on(ray_session):
    config = small_config(num_env_runners=1)
    assert config.restart_failed_env_runners and config.max_num_env_runner_restarts > 0  # RLlib's defaults
    algo = config.build_algo()
    steps = [algo.train()["env_runners"]["num_env_steps_sampled_lifetime"]]
    pids = lambda: algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)  # noqa
    [pid] = pids()
    os.kill(pid, signal.SIGKILL)
    # Iterations go on while Ray restarts the actor (their samples come back empty), then sampling resumes.
    results = []
    while len(results) < 30 and steps[-1] < steps[0] + 2 * 300:  # two batches from the restarted runner
        results.append(algo.train())
        steps.append(results[-1]["env_runners"]["num_env_steps_sampled_lifetime"])
    assert [r["training_iteration"] for r in results] == list(range(2, len(results) + 2))
    assert steps[-1] >= steps[0] + 2 * 300, steps
    assert results[-1]["fault_tolerance"] == {"num_healthy_workers": 1, "num_remote_worker_restarts": 1,
                                              "num_env_runners_dropped_lifetime": 0}
    assert pids() != [pid]
    algo.stop()


def test_resume_reproduces_the_uninterrupted_run(ray_session, tmp_path):
    """2 + 2 iterations straight == 2, save, restore into a fresh Algorithm, 2 more: bit for bit (one process)."""
    from ray.rllib.algorithms.algorithm import Algorithm

    algo = small_config().build_algo()
    for _ in range(2):
        algo.train()
    path = algo.save_to_path(str(tmp_path / "ckpt"))
    straight = [algo.train() for _ in range(2)][-1]
    expected = weights(algo)
    algo.stop()
    resumed = Algorithm.from_checkpoint(path)
    result = [resumed.train() for _ in range(2)][-1]
    after = weights(resumed)
    resumed.stop()
    assert result["training_iteration"] == straight["training_iteration"] == 4
    assert (result["env_runners"]["num_env_steps_sampled_lifetime"]
            == straight["env_runners"]["num_env_steps_sampled_lifetime"])
    assert all(np.array_equal(expected[k], after[k]) for k in expected)


def test_checkpoint_cut_short_is_refused(ray_session, tmp_path):
    """Every prefix of the checkpoint's files (what a crash while writing or copying leaves) is refused."""
    algo = small_config().build_algo()
    algo.train()
    full = algo.save_to_path(str(tmp_path / "full"))
    before = weights(algo)
    files = sorted(os.path.relpath(os.path.join(d, f), full) for d, _, fs in os.walk(full) for f in fs)
    assert MANIFEST_FILE in files

    def copy(name, keep, truncate=None):
        dst = tmp_path / name
        for rel in keep:
            os.makedirs(os.path.dirname(dst / rel), exist_ok=True)
            shutil.copy(os.path.join(full, rel), dst / rel)
        if truncate:
            with open(dst / truncate, "r+b") as f:
                f.truncate(os.path.getsize(dst / truncate) // 2)
        return str(dst)

    module = "learner_group/learner/rl_module/default_policy/module_state.pkl"
    partial = {
        "no_manifest": copy("a", [f for f in files if f != MANIFEST_FILE]),  # crashed before the manifest
        "no_weights": copy("b", [f for f in files if f != module]),  # manifest copied before the weights
        "half_weights": copy("c", files, truncate=module),  # crashed inside a file
    }
    for name, path in partial.items():
        with pytest.raises(ValueError, match="not a complete SPPO checkpoint"):
            algo.restore_from_path(path)
    out = subprocess.run([sys.executable, "-m", "rllib_sppo.cli", "evaluate", partial["no_weights"]],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "is not a complete SPPO checkpoint: 1 file(s) missing" in out.stderr
    algo.restore_from_path(copy("d", files))  # a complete copy restores
    after = weights(algo)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    algo.stop()


def write_experiment(tmp_path, stop_iteration):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(f"""
        resume-me:
          run: SPPO
          env: OutcomeCartPole-v1
          stop: {{training_iteration: {stop_iteration}}}
          storage_path: {tmp_path / "results"}
          checkpoint_config: {{checkpoint_frequency: 1, num_to_keep: 2}}
          max_failures: 1
          config:
            seed: 0
            lr: 0.001
            train_batch_size_per_learner: 200
            minibatch_size: 100
            min_time_s_per_iteration: 2
            model_config: {{pi_hiddens: [16], vf_hiddens: [8]}}
    """))
    return str(path)


def snapshot_iteration(experiment_dir) -> int:
    """The iteration recorded in Tune's latest experiment snapshot (what a resume starts from), 0 if none yet."""
    for name in os.listdir(experiment_dir) if os.path.isdir(experiment_dir) else []:
        if name.startswith("experiment_state"):
            try:
                with open(os.path.join(experiment_dir, name)) as f:
                    trial = json.load(f)["trial_data"][0][1]
                return json.loads(trial)["last_result"].get("training_iteration") or 0
            except (ValueError, IndexError, KeyError):
                return 0  # being written
    return 0


def read_results(experiment_dir):
    [trial] = [d for d in os.listdir(experiment_dir) if d.startswith("SPPO_")]
    with open(os.path.join(experiment_dir, trial, "result.json")) as f:
        return [json.loads(line) for line in f], os.path.join(experiment_dir, trial)


def test_killed_driver_resumes_from_its_last_checkpoint(tmp_path):
    path = write_experiment(tmp_path, stop_iteration=6)
    experiment = tmp_path / "results" / "resume-me"
    cli = [sys.executable, "-m", "rllib_sppo.cli", "train", "file", path]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cli, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while snapshot_iteration(experiment) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything in its process group
    first.wait()
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    before, trial_dir = read_results(experiment)
    assert 2 <= before[-1]["training_iteration"] < 6
    checkpoints_before = sorted(d for d in os.listdir(trial_dir) if d.startswith("checkpoint_"))
    assert checkpoints_before

    resumed = subprocess.run(cli + ["--resume"], capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["training_iteration"] == 6
    after, _ = read_results(experiment)
    assert after[:len(before)] == before  # nothing written before the kill is lost
    first_resumed = after[len(before)]
    assert first_resumed["iterations_since_restore"] == 1
    assert first_resumed["training_iteration"] > 1  # continued from a checkpoint, not from scratch
    assert after[-1]["training_iteration"] == 6
    assert after[-1]["iterations_since_restore"] == 6 - first_resumed["training_iteration"] + 1
    assert (after[-1]["env_runners"]["num_env_steps_sampled_lifetime"]
            > first_resumed["env_runners"]["num_env_steps_sampled_lifetime"])
    # checkpoint_frequency 1, num_to_keep 2: the last two iterations' checkpoints remain, each complete.
    checkpoints = sorted(d for d in os.listdir(trial_dir) if d.startswith("checkpoint_"))
    assert len(checkpoints) == 2 and summary["checkpoint"].endswith(checkpoints[-1])
    assert all(os.path.exists(os.path.join(trial_dir, c, MANIFEST_FILE)) for c in checkpoints)


def trial_processes(session: int) -> list[int]:
    """Pids of the Tune trial actors (process title ``ray::SPPO...``) started under ``session``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::SPPO") and os.getsid(int(pid)) == session:
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_killed_trial_process_restarts_from_its_checkpoint(tmp_path):
    """With num_env_runners=0 the EnvRunner lives in the trial's process: YAML ``max_failures`` brings it back."""
    path = write_experiment(tmp_path, stop_iteration=5)
    experiment = tmp_path / "results" / "resume-me"
    run = subprocess.Popen([sys.executable, "-m", "rllib_sppo.cli", "train", "file", path], start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while not list(experiment.glob("*/checkpoint_000001/" + MANIFEST_FILE)) and time.time() < deadline:
        time.sleep(0.2)
    [pid] = trial_processes(run.pid)
    os.kill(pid, signal.SIGKILL)
    out, _ = run.communicate(timeout=180)
    assert run.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["training_iteration"] == 5
    results, _ = read_results(experiment)
    restarts = [r for r in results if r["iterations_since_restore"] == 1 and r["training_iteration"] > 1]
    assert restarts, [(r["training_iteration"], r["iterations_since_restore"]) for r in results]
    assert results[-1]["training_iteration"] == 5


def test_resume_without_an_earlier_run_is_a_usage_error(tmp_path, capsys):
    path = write_experiment(tmp_path, stop_iteration=1)
    assert main(["train", "file", path, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing to resume: no experiment 'resume-me'" in err and len(err.splitlines()) == 1
