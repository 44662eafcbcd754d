"""The `rllib` command: YAML runs through Tune, and bad input gives one line and exit code 2."""

import json
import re
import subprocess
import sys

import pytest

from rllib_sppo.cli import main



@pytest.mark.parametrize("text, message", [
    ("a: [1, 2\n", "malformed YAML"),
    ("x:\n  run: NoSuchAlgo\n  env: CartPole-v1\n", "unknown algorithm 'NoSuchAlgo'"),
    ("x:\n  run: SPPO\n  env: CartPol-v1\n", "unknown env 'CartPol-v1' (did you mean 'CartPole-v1'?)"),
    ("x:\n  run: SPPO\n  env: CartPole-v1\n  config: {critic_lrr: 0.1}\n", "unknown config key 'critic_lrr'"),
    ("x:\n  run: SPPO\n  env: CartPole-v1\n  config: {minibatch_size: 512, train_batch_size_per_learner: 256}\n",
     "minibatch_size (512) is larger than train_batch_size_per_learner (256)"),
    ("x:\n  run: SPPO\n  env: CartPole-v1\n  config: {env_runner_cls: no.such.Runner}\n", "cannot import 'no.such.Runner'"),
    ("x:\n  env: CartPole-v1\n", "needs 'run'"),
    ("x:\n  run: SPPO\n  stopp: {}\n", "unknown key(s) ['stopp']"),
    ("x:\n  run: PPOO\n  env: CartPole-v1\n", "unknown algorithm 'PPOO' (did you mean 'PPO'?)"),
    ("x:\n  run: SPPO\n  env: no_such_module:Foo-v0\n", "cannot import module 'no_such_module'"),
    ("x:\n  run: SPPO\n  env: envs:CartPol-v1\n", "unknown env 'envs:CartPol-v1' (did you mean 'envs:CartPole-v1'?)"),
    ("x:\n  run: SPPO\n  env: no_such.module.Env\n",
     "env='no_such.module.Env': cannot import 'no_such.module.Env'"),
    ("x:\n  run: SPPO\n  env: Acrobot-v1\n  config: {env_config: {outcome: sucess}}\n",
     "env_config outcome must be 'success' or {return_range: [low, high]} with low < high, got 'sucess'"),
    ("x:\n  run: SPPO\n  env: Acrobot-v1\n  config: {env_config: {outcome: {return_range: [0, -500]}}}\n",
     "got {'return_range': [0, -500]}"),
    ("x:\n  run: SPPO\n  env: OutcomeCartPole-v1\n  config: {env_config: {outcome: success}}\n",
     "OutcomeCartPole-v1 already pays its own outcome; to choose one, use env: CartPole-v1"),
])
def test_bad_yaml_is_one_line_and_exit_2(yaml_file, tmp_path, capsys, text, message):
    path = yaml_file(text)
    assert main(["train", "file", path]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and path in err, err
    assert len(err.splitlines()) == 1


#: Bad input of each kind the console script refuses, and what its error line says (cases for a fresh process).
CONSOLE_ERRORS = [
    (None, "cannot read"),
    ("a: [1, 2\n", "malformed YAML"),
    ("x:\n  run: NoSuchAlgo\n  env: CartPole-v1\n", "unknown algorithm"),
    ("x:\n  run: PPO\n  env: CartPole-v1\n  config: {lrr: 0.1}\n", "unknown config key 'lrr'"),
    ("x:\n  run: SPPO\n  env: CartPole-v1\n  config: {minibatch_size: 512, train_batch_size_per_learner: 256}\n",
     "invalid config"),
]


@pytest.mark.system
def test_console_script_prints_nothing_before_the_error(yaml_file, tmp_path):
    """A fresh process per kind of bad input, as a user runs it (all started at once): the error line is all of
    stderr (no warning, notice or traceback)."""
    paths = [yaml_file(text, f"{i}.yaml") if text is not None else str(tmp_path / "none.yaml")
             for i, (text, _) in enumerate(CONSOLE_ERRORS)]
    runs = [subprocess.Popen([sys.executable, "-m", "rllib_sppo.cli", "train", "file", path], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for path in paths]
    for run, (_, message) in zip(runs, CONSOLE_ERRORS):
        out, err = run.communicate(timeout=300)
        assert run.returncode == 2, (message, err)
        assert err.startswith("rllib: error: ") and message in err, (message, err)
        assert len(err.splitlines()) == 1, err
        assert out == ""


@pytest.mark.system
def test_any_gymnasium_env_from_yaml_alone(tmp_path, capsys, ray_session):
    """tuned_examples/frozenlake_sppo.yaml: a plain gymnasium id (a Discrete observation) under env_config.outcome,
    sampled by a remote EnvRunner, through the console script in a fresh process; its console has nothing but
    progress, the summary and Ray's own start line; the checkpoint evaluates (in this process) on the same outcome."""
    from rllib_sppo.monitoring import KNOWN_NOISE

    storage = tmp_path / "results"
    out = subprocess.run(
        [sys.executable, "-m", "rllib_sppo.cli", "train", "file", "tuned_examples/frozenlake_sppo.yaml",
         "--stop", '{"training_iteration": 2}', "--storage-path", str(storage),
         "--config", '{"num_env_runners": 1, "train_batch_size_per_learner": 500, "minibatch_size": 250}'],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["env"] == "FrozenLake-v1" and summary["training_iteration"] == 2 and summary["env_steps"] >= 1000
    assert 0.0 <= summary["episode_return_mean"] <= 1.0
    err = out.stderr
    for _, pattern in KNOWN_NOISE:
        assert not re.search(pattern, err, re.M), pattern
    assert "Warning" not in err and "WARN" not in err, err
    checkpoint = summary["best_checkpoint"]
    assert f"rllib: evaluate it: rllib evaluate {checkpoint}\n" in err
    assert f"rllib: curves: {summary['curves']}" in err and "rllib: done: frozenlake-sppo (SPPO on FrozenLake-v1)" in err
    assert main(["evaluate", checkpoint, "--episodes", "20"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["episodes"] == 20 and 0.0 <= report["raw_return_mean"] <= 1.0
    # The return_range [0, 1] outcome of each episode is its return: 1 at the goal, else 0.
    assert report["episode_return_mean"] == pytest.approx(report["raw_return_mean"])


@pytest.mark.system
def test_failed_trial_is_one_line_naming_the_cause_and_exit_1(yaml_file, tmp_path, capsys, ray_session):
    path = yaml_file("""
        too-long:
          run: SPPO
          env: ray.rllib.examples.envs.classes.simple_corridor.SimpleCorridor
          stop: {training_iteration: 1}
          config: {env_config: {corridor_length: 1000}}
    """)
    assert main(["train", "file", path, "--storage-path", str(tmp_path / "results")]) == 1
    out, err = capsys.readouterr()
    [line] = [line for line in err.splitlines() if line.startswith("rllib: trial ")]
    assert re.fullmatch(r"rllib: trial SPPO_\S+ failed: AssertionError: The maximum `corridor_length` allowed is 999! "
                        rf"\(traceback in {tmp_path}/results/too-long/SPPO_\S+/error\.txt\)", line), line
    assert out == ""  # no summary for a failed trial


@pytest.mark.system
def test_yaml_runs_through_tune_and_evaluates(yaml_file, tmp_path, capsys):
    path = yaml_file("""
        tiny-cartpole:
          run: SPPO
          env: OutcomeCartPole-v1
          stop: {training_iteration: 2}
          config:
            seed: 0
            lr: 0.001
            train_batch_size_per_learner: 500
            minibatch_size: 250
            model_config: {pi_hiddens: [16], vf_hiddens: [8]}
    """)
    assert main(["train", "file", path, "--storage-path", str(tmp_path / "results")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["training_iteration"] == 2 and summary["env_steps"] >= 1000
    assert 0.0 < summary["episode_return_mean"] <= 1.0
    assert main(["evaluate", summary["checkpoint"], "--episodes", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["episodes"] == 3
    # The outcome is steps / 500, so it matches the raw CartPole return exactly.
    assert report["episode_return_mean"] == pytest.approx(report["raw_return_mean"] / 500)


@pytest.mark.system
def test_config_flag_overrides_the_yaml(yaml_file, tmp_path, capsys):
    path = yaml_file("""
        tiny-cartpole:
          run: SPPO
          env: OutcomeCartPole-v1
          stop: {training_iteration: 5}
          config: {train_batch_size_per_learner: 1000, minibatch_size: 500, model_config: {pi_hiddens: [8]}}
    """)
    assert main(["train", "file", path, "--config", '{"train_batch_size_per_learner": 200, "minibatch_size": 100}',
                 "--stop", '{"training_iteration": 1}', "--storage-path", str(tmp_path / "results")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["training_iteration"] == 1 and 200 <= summary["env_steps"] < 1000  # the flag's batch, not the file's


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("tuned_examples/*.yaml")))
def test_every_tuned_example_builds_a_valid_config(path):
    from rllib_sppo.cli import _search_keys
    from rllib_sppo.experiments import build_config, load_experiments, resolve_algorithm

    for name, exp in load_experiments(path).items():
        cfg = exp.get("config")
        for keys in _search_keys(cfg):  # a sweep: check its first grid point
            parent = cfg
            for key in keys[:-1]:
                parent = parent[key]
            parent[keys[-1]] = parent[keys[-1]]["grid_search"][0]
        config = build_config(resolve_algorithm(exp["run"], path), exp.get("env"), cfg, path)
        config.validate()
        assert exp["stop"], f"{path}: a tuned example needs a stop criterion"


@pytest.mark.system
def test_train_from_flags(tmp_path, capsys):
    argv = ["train", "--algo", "SPPO", "--env", "OutcomeCartPole-v1", "--stop", '{"training_iteration": 1}',
            "--config", '{"train_batch_size_per_learner": 300, "minibatch_size": 100, "lr": 0.001}',
            "--storage-path", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["algo"] == "SPPO" and summary["training_iteration"] == 1 and summary["env_steps"] >= 300
    assert main(argv[:-4] + ["--config", "{not json"]) == 2


@pytest.mark.system
def test_wandb_logs_offline_with_the_console_metric_names(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    argv = ["train", "--algo", "SPPO", "--env", "OutcomeCartPole-v1", "--stop", '{"training_iteration": 1}',
            "--config", '{"train_batch_size_per_learner": 300, "minibatch_size": 100}',
            "--storage-path", str(tmp_path / "results"), "--wandb", "sppo-test"]
    assert main(argv) == 0
    assert "wandb logs offline" in capsys.readouterr().err
    runs = list((tmp_path / "results").glob("*/wandb/offline-run-*"))  # inside the experiment's own folder
    assert len(runs) == 1
    records = next(runs[0].glob("*.wandb")).read_bytes()  # wandb's own log of the run, synced later
    for name in (b"env_runners/episode_return_mean", b"timing_s/sample", b"policy/clipfrac"):
        assert name in records, name
