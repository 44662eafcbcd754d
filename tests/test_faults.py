"""Process faults for real: a killed EnvRunner is restarted, a killed driver resumes from its newest intact checkpoint,
a resumed run equals an uninterrupted one, and a checkpoint cut short or corrupted is refused."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.cli import main
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.checkpoints import MANIFEST_FILE, IncompleteCheckpointError, check_checkpoint


def small_config(**env_runners):
    return (SPPOConfig().environment("OutcomeCartPole-v1")
            .training(lr=1e-3, critic_lr=1e-3, train_batch_size_per_learner=300, minibatch_size=100, num_epochs=2,
                      shuffle_batch_per_epoch=True)
            .rl_module(model_config={"pi_hiddens": [16], "vf_hiddens": [8]})
            .env_runners(**{"num_env_runners": 0, **env_runners}).debugging(seed=0))


def weights(algo):
    state = algo.learner_group.get_state(components="learner/rl_module")["learner"]["rl_module"]["default_policy"]
    return {k: np.asarray(v) for k, v in state.items()}


@pytest.mark.system
def test_killed_env_runner_is_restarted_and_training_goes_on(ray_session):
    config = small_config(num_env_runners=1)
    assert config.restart_failed_env_runners and config.max_num_env_runner_restarts > 0  # RLlib's defaults
    algo = config.build_algo()
    steps = [algo.train()["env_runners"]["num_env_steps_sampled_lifetime"]]
    pids = lambda: algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)  # noqa
    [pid] = pids()
    os.kill(pid, signal.SIGKILL)
    # Iterations go on while Ray restarts the actor (their samples come back empty), then sampling resumes.
    results, back_by = [], time.monotonic() + 300  # (minutes on a loaded machine)
    while time.monotonic() < back_by and steps[-1] < steps[0] + 2 * 300:  # two batches from the restarted runner
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


@pytest.mark.system
def test_checkpoint_cut_short_is_refused(ray_session, tmp_path):
    """Every prefix of the checkpoint's files (what a crash while writing or copying leaves) is refused."""
    algo = small_config().build_algo()
    algo.train()
    full = algo.save_to_path(str(tmp_path / "full"))
    before = weights(algo)
    files = sorted(os.path.relpath(os.path.join(d, f), full) for d, _, fs in os.walk(full) for f in fs)
    assert MANIFEST_FILE in files

    def copy(name, keep, truncate=None, garble=None):
        dst = tmp_path / name
        for rel in keep:
            os.makedirs(os.path.dirname(dst / rel), exist_ok=True)
            shutil.copy(os.path.join(full, rel), dst / rel)
        if truncate:
            with open(dst / truncate, "r+b") as f:
                f.truncate(os.path.getsize(dst / truncate) // 2)
        if garble:
            corrupt(dst / garble)
        return str(dst)

    module = MODULE_STATE
    partial = {
        "no_manifest": copy("a", [f for f in files if f != MANIFEST_FILE]),  # crashed before the manifest
        "no_weights": copy("b", [f for f in files if f != module]),  # manifest copied before the weights
        "half_weights": copy("c", files, truncate=module),  # crashed inside a file
    }
    for name, path in partial.items():
        with pytest.raises(ValueError, match="not a complete SPPO checkpoint"):
            algo.restore_from_path(path)
    with pytest.raises(ValueError, match="1 file.s. changed since it was written .CRC-32., e.g. learner_group/"):
        algo.restore_from_path(copy("e", files, garble=module))  # corrupted later: same size, other bytes
    out = subprocess.run([sys.executable, "-m", "rllib_sppo.cli", "evaluate", partial["no_weights"]],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "is not a complete SPPO checkpoint: 1 file(s) missing" in out.stderr
    algo.restore_from_path(copy("d", files))  # a complete copy restores
    after = weights(algo)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    algo.stop()


MODULE_STATE = "learner_group/learner/rl_module/default_policy/module_state.pkl"


def corrupt(path) -> None:
    """Overwrites the middle of a file with other bytes (its size unchanged), as a disk or copy error would."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


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


@pytest.mark.system
def test_killed_driver_resumes_from_its_newest_intact_checkpoint(tmp_path):
    """The driver killed with everything in its process group, after Tune has registered a second checkpoint; then
    every checkpoint but the oldest is corrupted on disk. `--resume` continues the experiment: Tune restores the trial's
    last registered checkpoint, SPPO refuses it (CRC-32) and restores the newest intact earlier one, naming both; no
    result written before the kill is lost, and the run reaches its stop. (Which checkpoint Tune registered last is up
    to its scheduler; that all but the oldest are corrupt makes the outcome the same either way.)"""
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
    oldest, *later = sorted(c for c in Path(trial_dir).glob("checkpoint_*") if intact(c))
    assert later  # (one being copied at the kill may be incomplete: it is refused anyway)
    for checkpoint in later:
        corrupt(checkpoint / MODULE_STATE)

    resumed = subprocess.run(cli + ["--resume"], capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["training_iteration"] == 6
    refused = re.search(r"(\S+) is not a complete SPPO checkpoint: 1 file\(s\) changed since it was written \(CRC-32\), "
                        r"e\.g\. learner_group/learner/rl_module/default_policy/module_state\.pkl; restoring the newest "
                        r"intact earlier checkpoint, (\S+), instead\.", resumed.stderr)
    assert refused, resumed.stderr[-3000:]
    assert refused.group(1) in map(str, later) and refused.group(2) == str(oldest)
    after, _ = read_results(experiment)
    assert after[:len(before)] == before  # nothing written before the kill is lost
    first_resumed = after[len(before)]
    assert first_resumed["iterations_since_restore"] == 1
    # continued from the oldest checkpoint (checkpoint_N holds iteration N + 1), not from scratch
    assert first_resumed["training_iteration"] == int(oldest.name.split("_")[1]) + 2 > 1
    assert after[-1]["training_iteration"] == 6
    assert after[-1]["iterations_since_restore"] == 6 - first_resumed["training_iteration"] + 1
    assert (after[-1]["env_runners"]["num_env_steps_sampled_lifetime"]
            > first_resumed["env_runners"]["num_env_steps_sampled_lifetime"])
    # checkpoint_frequency 1, num_to_keep 2: the last two iterations' checkpoints remain, each complete.
    checkpoints = sorted(d for d in os.listdir(trial_dir) if d.startswith("checkpoint_"))
    assert len(checkpoints) == 2 and summary["checkpoint"].endswith(checkpoints[-1])
    assert all(os.path.exists(os.path.join(trial_dir, c, MANIFEST_FILE)) for c in checkpoints)


def intact(checkpoint) -> bool:
    """Whether the package's own check accepts ``checkpoint`` (its manifest written last, every file there)."""
    try:
        check_checkpoint(checkpoint)
        return True
    except IncompleteCheckpointError:
        return False


def wait_for(condition, seconds: float, what: str) -> None:
    """Polls ``condition()`` until it holds; fails naming ``what`` if it does not within ``seconds``."""
    by = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < by, f"no {what} within {seconds} s"
        time.sleep(0.1)


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


def test_resume_without_an_earlier_run_is_a_usage_error(tmp_path, capsys):
    path = write_experiment(tmp_path, stop_iteration=1)
    assert main(["train", "file", path, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing to resume: no experiment 'resume-me'" in err and len(err.splitlines()) == 1


# A full disk: RLIMIT_FSIZE makes the kernel refuse writes past a size in one process (EFBIG, "File too large"), for
# real and without root or a mount. A checkpoint of a policy with a 512x512 layer has files of ~1 MB, past a 256 KB
# limit; Ray's own log files stay below it in a short run.
BIG_POLICY = {"pi_hiddens": [512, 512], "vf_hiddens": [8]}
FSIZE_LIMIT = 256 * 1024


@pytest.mark.system
def test_a_checkpoint_that_cannot_be_written_is_an_error_and_leaves_the_previous_one(ray_session, tmp_path):
    """save_to_path under a file-size limit: an error naming the checkpoint and the cause, nothing of it left on
    disk, and the checkpoint written before it restores."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, resource
        import envs
        from rllib_sppo import SPPOConfig
        from rllib_sppo.checkpoints import CheckpointWriteError
        algo = (SPPOConfig().environment("OutcomeCartPole-v1").training(train_batch_size_per_learner=200,
                minibatch_size=100).rl_module(model_config={BIG_POLICY!r}).debugging(seed=0).build_algo())
        algo.train()
        algo.save_to_path({str(tmp_path / "good")!r})
        algo.train()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, hard))  # the disk is full from here on
        try:
            algo.save_to_path({str(tmp_path / "full")!r})
        except CheckpointWriteError as e:
            print(json.dumps(str(e)))
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        algo.stop()
    """)], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-3000:]
    error = json.loads(out.stdout.strip().splitlines()[-1])
    assert re.fullmatch(f"checkpoint {tmp_path / 'full'} could not be written \\(.*File too large.*\\); what was "
                        f"written of it is removed", error), error
    assert not (tmp_path / "full").exists()
    from ray.rllib.algorithms.algorithm import Algorithm

    restored = Algorithm.from_checkpoint(str(tmp_path / "good"))
    assert restored.iteration == 1
    restored.stop()


@pytest.mark.system
def test_a_full_disk_under_tune_stops_the_trial_naming_the_checkpoint_and_the_previous_one(tmp_path):
    """The trial's process can write no file past 256 KB from its second checkpoint on: the trial stops with one
    line naming the failed checkpoint, the cause and the previous checkpoint, which holds its manifest and restores;
    no partial checkpoint is left in storage."""
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(f"""
        full-disk:
          run: SPPO
          env: OutcomeCartPole-v1
          stop: {{training_iteration: 8}}
          storage_path: {tmp_path / "results"}
          checkpoint_config: {{checkpoint_frequency: 1, num_to_keep: 3}}
          config:
            seed: 0
            train_batch_size_per_learner: 200
            minibatch_size: 100
            min_time_s_per_iteration: 1
            model_config: {BIG_POLICY}
    """))
    experiment = tmp_path / "results" / "full-disk"
    run = subprocess.Popen([sys.executable, "-m", "rllib_sppo.cli", "train", "file", str(path)], start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The first checkpoint complete in storage (Tune copies its files in no fixed order: the manifest may land first).
    wait_for(lambda: any(map(intact, experiment.glob("*/checkpoint_000000"))), 240, "intact first checkpoint")
    [pid] = trial_processes(run.pid)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]))
    try:
        out, err = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        raise
    assert run.returncode == 1, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("rllib: trial ") and " failed: " in line]
    [trial] = experiment.glob("SPPO_*")
    kept = sorted(trial.glob("checkpoint_*"))
    assert kept and all(map(intact, kept))  # nothing partial in storage
    # The limit stops the next checkpoint's write in the trial's folder or its copy to storage, whichever was under
    # way: either way the error names it, the cause and the previous checkpoint, and what was written is removed.
    assert re.search(r"CheckpointWriteError: the checkpoint of iteration \d+ could not be written(: checkpoint \S+ "
                     r"could not be written \(.*File too large.*\); what was written of it is removed| to \S+: .*File "
                     r"too large.*; what was copied of it is removed)\. Training stops; the previous checkpoint (\S+) "
                     r"is intact and restores", line), line
    previous = re.search(r"the previous checkpoint (\S+) is intact", line).group(1)
    assert previous == str(kept[-1])
    listed = subprocess.run([sys.executable, "-m", "rllib_sppo.cli", "evaluate", previous, "--episodes", "2"],
                            capture_output=True, text=True, timeout=240)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert json.loads(listed.stdout.strip().splitlines()[-1])["episodes"] == 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


def llm_config(tiny, size: int, engine: str = "transformers", **env_runners):
    """An LLM run on ``size - 4`` training prompts, 16 per iteration (rounds of 8)."""
    return (SPPOConfig().llm(policy=tiny, engine=engine)
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": size, "heldout_size": 4,
                                                           "chat_template_model": tiny})
            .env_runners(**{"num_env_runners": 0, "num_envs_per_env_runner": 8, **env_runners})
            .training(lr=1e-3, critic_lr=1e-3, train_batch_size_per_learner=16, minibatch_size=8,
                      max_response_tokens=4)
            .debugging(seed=0))


def test_a_run_resumed_at_an_epoch_boundary_trains_on_into_the_next_epoch(tiny, ray_session, tmp_path):
    """16 training prompts, 16 per iteration: the checkpoint after iteration 1 falls exactly at the end of the first
    epoch. The restored run samples and updates (16 steps trained per iteration), drawing whole new epochs (a resume
    there that trains zero steps is a known failure of epoch-based data loaders)."""
    from ray.rllib.algorithms.algorithm import Algorithm

    algo = llm_config(tiny, size=20).build_algo()
    algo.train()
    sampler = algo.env_runner.sampler
    assert (sampler.epoch, sampler.pos, len(sampler._order)) == (0, 16, 16)  # the end of the first epoch
    path = algo.save_to_path(str(tmp_path / "ckpt"))
    before = weights(algo)
    algo.stop()
    resumed = Algorithm.from_checkpoint(path)
    results = [resumed.train() for _ in range(2)]
    for result in results:
        assert result["env_runners"]["num_env_steps_sampled"] == 16
        assert result["learners"]["default_policy"]["num_module_steps_trained"] == 16
    sampler = resumed.env_runner.sampler
    assert (sampler.epoch, sampler.pos) == (2, 16) and results[-1]["training_iteration"] == 3  # two whole epochs more
    after = weights(resumed)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # and the policy was updated
    resumed.stop()


@pytest.mark.system
def test_remote_runners_resume_their_own_places_in_the_data(tiny, ray_session, tmp_path):
    """Two remote EnvRunners, each drawing its own shard of the epoch: the checkpoint holds each one's place (RLlib's
    state holds only the local runner's, which never samples), and a restored run gives each its own back, so it
    goes on drawing what the uninterrupted run draws."""
    from ray.rllib.algorithms.algorithm import Algorithm

    def places(algo):
        return dict(algo.env_runner_group.foreach_env_runner(lambda r: (r.worker_index, r.sampler.get_state()),
                                                             local_env_runner=False))

    algo = llm_config(tiny, size=40, num_env_runners=2, num_cpus_per_env_runner=0.5).build_algo()
    algo.train()  # each runner draws 8 of its 18 prompts
    path, saved = algo.save_to_path(str(tmp_path / "ckpt")), places(algo)
    algo.train()
    straight = places(algo)
    algo.stop()
    assert saved == {1: {"epoch": 0, "pos": 8}, 2: {"epoch": 0, "pos": 8}}
    resumed = Algorithm.from_checkpoint(path)
    assert places(resumed) == saved
    resumed.train()
    assert places(resumed) == straight == {1: {"epoch": 0, "pos": 16}, 2: {"epoch": 0, "pos": 16}}
    resumed.stop()


@pytest.mark.system
def test_a_runner_that_died_between_calls_is_restored_before_it_samples(tiny, ray_session, caplog):
    """A remote EnvRunner killed while idle, its vLLM engine with it: Ray restarts its process (a new engine) before the
    next call, so RLlib sees no failure. Before it samples, it gets back its place in the data and the learner's
    weights: the run draws on from where it had got to (not from the start of its shard) with the current policy (not
    the one it started with): the new engine's log-probs are the learner's."""
    import logging

    import ray
    from ray.rllib.core import DEFAULT_MODULE_ID

    from rllib_sppo.private_api import remote_env_runner_actor

    algo = llm_config(tiny, size=40, engine="vllm", num_env_runners=1, num_cpus_per_env_runner=0.5).build_algo()
    for _ in range(2):
        algo.train()
    pid = lambda: algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)  # noqa
    place = lambda: algo.env_runner_group.foreach_env_runner(lambda r: r.sampler.get_state(), local_env_runner=False)  # noqa
    assert place() == [{"epoch": 0, "pos": 32}]
    [before] = pid()
    os.kill(before, signal.SIGKILL)
    actor, _ = remote_env_runner_actor(algo.env_runner_group, 1)
    back_by = time.monotonic() + 300
    while time.monotonic() < back_by:  # Ray restarts it (a new process) while nothing asks RLlib
        try:
            ray.get(actor.ping.remote())
            break
        except ray.exceptions.RayError:  # (not yet restarted)
            time.sleep(0.5)
    with caplog.at_level(logging.WARNING, logger="rllib_sppo.rollouts"):
        result = algo.train()
    assert "EnvRunner(s) [1] were restarted by Ray after their process died" in caplog.text
    assert pid() != [before] and result["fault_tolerance"]["num_remote_worker_restarts"] == 1  # counted by SPPO
    assert result["env_runners"]["num_env_steps_sampled"] == 16
    assert result["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"] < 1e-3
    assert place() == [{"epoch": 1, "pos": 12}]  # 36 training prompts: 32 drawn, then 4 + 12 of the next epoch
    algo.stop()
