"""Nothing hangs: a part that takes longer than its timeout becomes an error naming it, and a restart where RLlib or
Tune can restart it. Stalls are injected for real: a generation far longer than its timeout, a process stopped with
SIGSTOP (a remote EnvRunner, a remote learner), a sleeping block under the watchdog."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from ray.rllib.core import DEFAULT_MODULE_ID

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.checkpoints import MANIFEST_FILE
from rllib_sppo.config import TIMEOUT_KEYS
from rllib_sppo.watchdog import STUCK_EXIT_CODE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


def llm_config(tiny, **training):
    return (SPPOConfig().llm(policy=tiny, engine="transformers")
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 100, "heldout_size": 4,
                                                           "chat_template_model": tiny})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
            .training(**{"lr": 1e-3, "critic_lr": 1e-3, "train_batch_size_per_learner": 8, "minibatch_size": 8,
                         "max_response_tokens": 8, **training})
            .debugging(seed=0))


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.system
def test_the_watchdog_ends_a_stuck_process_naming_the_part():
    out = run_python("""
        import time
        from rllib_sppo.watchdog import deadline
        with deadline("a quick part", 5, "quick_timeout_s"):
            pass
        time.sleep(1)  # the finished part's timer is off: the process lives on
        print("after the quick part", flush=True)
        with deadline("the stuck part", 0.5, "stuck_timeout_s"):
            time.sleep(60)
        print("never")
    """)
    assert out.returncode == STUCK_EXIT_CODE, out.stderr[-2000:]
    assert out.stdout == "after the quick part\n"
    assert "stuck: the stuck part did not finish within stuck_timeout_s=0.5 s" in out.stderr
    assert 'File "<string>", line 9' in out.stderr  # the stuck thread's stack: the sleep under the deadline


@pytest.mark.system
def test_a_stuck_engine_call_ends_its_runner_process_naming_the_engine(tiny):
    """A generation far longer than a tiny generation_timeout_s (the random tiny Llama rarely stops before 200
    tokens): the runner's process ends, naming the runner and its engine call."""
    out = run_python(f"""
        import envs
        from rllib_sppo import SPPOConfig
        from rllib_sppo.llm.runner import LLMEnvRunner
        config = (SPPOConfig().llm(policy={tiny!r}, engine="transformers")
                  .environment("ReasoningBandit-v0", env_config={{"source": "arithmetic", "size": 40, "heldout_size": 4,
                                                                  "chat_template_model": {tiny!r}}})
                  .env_runners(num_envs_per_env_runner=8)
                  .training(max_response_tokens=200, generation_timeout_s=0.3))
        runner = LLMEnvRunner(config=config)
        runner.engine  # started outside the deadline
        runner.sample(num_episodes=8)
        print("sampled")
    """, timeout=300)
    assert out.returncode == STUCK_EXIT_CODE, out.stderr[-2000:]
    assert "sampled" not in out.stdout
    assert ("stuck: EnvRunner 0: the transformers engine generating 8 prompt(s) x 1 response(s) of up to 200 tokens "
            "did not finish within generation_timeout_s=0.3 s") in out.stderr


def runner_place(algo):
    [place] = algo.env_runner_group.foreach_env_runner(lambda r: r.sampler.get_state(), local_env_runner=False)
    return place


def sampled(result) -> bool:
    return (result["env_runners"].get("num_env_steps_sampled") or 0) > 0  # (NaN when nothing was sampled)


def train_until(algo, done, seconds: float = 300) -> list[dict]:
    """``algo.train()`` until ``done(result)`` (within ``seconds``: minutes on a loaded machine); the results."""
    results, by = [], time.monotonic() + seconds
    while not (results and done(results[-1])):
        assert time.monotonic() < by, f"not done within {seconds} s: {[r['training_iteration'] for r in results]}"
        results.append(algo.train())
    return results


@pytest.mark.system
def test_a_frozen_remote_runner_is_named_and_restarted_with_the_weights_and_its_place(tiny, ray_session, caplog):
    """A remote EnvRunner stopped (SIGSTOP) before sampling: its sample does not come back within sample_timeout_s
    (RLlib alone would drop it and ask again, forever), so it is named and restarted, once; the restarted runner
    samples with the learner's weights (not the ones it started with) from its own place in the data. (A runner starts
    its engine and reward workers when it is created, so 15 s bound a sample of 8 short answers even on a loaded
    machine.)"""
    algo = (llm_config(tiny).env_runners(num_env_runners=1, num_cpus_per_env_runner=0.5, sample_timeout_s=15)
            .fault_tolerance(env_runner_health_probe_timeout_s=3).build_algo())
    before = train_until(algo, lambda r: runner_place(algo) == {"epoch": 0, "pos": 16})[-1]
    [pid] = algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
    os.kill(pid, signal.SIGSTOP)
    with caplog.at_level(logging.ERROR, logger="rllib_sppo.rollouts"):
        stalled = algo.train()
    assert not sampled(stalled)
    assert ("sampling: EnvRunner(s) [1] returned no sample within sample_timeout_s=15 s and did not answer for "
            "env_runner_health_probe_timeout_s=3 s more") in caplog.text and "Restarting it" in caplog.text
    last = train_until(algo, sampled)[-1]  # RLlib brings the runner back (a new process), then it samples
    restarts = last["fault_tolerance"]["num_remote_worker_restarts"]
    assert restarts == before["fault_tolerance"]["num_remote_worker_restarts"] + 1
    assert algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False) != [pid]
    assert not psutil.pid_exists(pid)  # the frozen process was ended (Ray's ray.kill alone can leave it frozen)
    # Its first batch after the restart: sampled with the learner's weights, from where it had got to.
    assert last["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"] < 1e-3
    assert runner_place(algo) == {"epoch": 0, "pos": 24}
    algo.stop()


@pytest.mark.system
def test_a_frozen_remote_runner_with_async_rollouts_is_named_and_restarted(tiny, ray_session, caplog):
    """async_rollouts: a remote EnvRunner stopped (SIGSTOP) with its next batch in flight returns no batch within
    sample_timeout_s: it is named and restarted (RLlib alone would wait on it again every iteration), and the run
    trains on with the new runner, which is restarted once only."""
    algo = (llm_config(tiny, async_rollouts=True, tis_cap=2.0)
            .env_runners(num_env_runners=1, num_cpus_per_env_runner=0.5, sample_timeout_s=15)
            .fault_tolerance(env_runner_health_probe_timeout_s=3).build_algo())
    before = train_until(algo, sampled)[-1]
    [pid] = algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
    os.kill(pid, signal.SIGSTOP)
    with caplog.at_level(logging.ERROR, logger="rllib_sppo.rollouts"):  # (a batch finished before the stop comes first)
        train_until(algo, lambda r: "Restarting it" in caplog.text, seconds=120)
    assert "sampling: EnvRunner(s) [1] returned no batch within sample_timeout_s=15 s" in caplog.text
    results = train_until(algo, sampled)  # the new runner: its first batch, then every iteration
    results += [algo.train() for _ in range(3)]
    assert all(sampled(r) for r in results[-4:])
    restarts = results[-1]["fault_tolerance"]["num_remote_worker_restarts"]
    assert restarts == before["fault_tolerance"]["num_remote_worker_restarts"] + 1
    assert algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False) != [pid]
    assert not psutil.pid_exists(pid)  # the frozen process was ended (Ray's ray.kill alone can leave it frozen)
    algo.stop()


def learner_processes(session: int) -> list[int]:
    """Pids of the remote learner actors (Ray Train's workers: ``ray::_WrappedExecutable``) started under ``session``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::_WrappedExecutable") and os.getsid(int(pid)) == session:
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.mark.system
def test_a_stuck_learner_update_ends_the_trial_and_tune_restarts_it(tmp_path):
    """A remote learner stopped (SIGSTOP) mid-run: whichever call the trial makes into it next (the update, the
    weight fetch for the sync, the state for a checkpoint) does not finish within its timeout, the trial's process
    ends naming it, and Tune (max_failures) restarts the trial from its checkpoint with a new learner; the run reaches
    its stop."""
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(f"""
        stuck-learner:
          run: SPPO
          env: OutcomeCartPole-v1
          stop: {{training_iteration: 5}}
          storage_path: {tmp_path / "results"}
          checkpoint_config: {{checkpoint_frequency: 1, num_to_keep: 2}}
          max_failures: 1
          config:
            seed: 0
            num_learners: 1
            num_cpus_per_learner: 0.5
            learner_update_timeout_s: 10
            weight_sync_timeout_s: 10
            train_batch_size_per_learner: 200
            minibatch_size: 100
            model_config: {{pi_hiddens: [16], vf_hiddens: [8]}}
    """))
    experiment = tmp_path / "results" / "stuck-learner"
    # The run's own Ray directory (short: Ray's socket paths must fit 107 characters), to read the trial process's
    # own log: Ray's log monitor forwards a worker's lines to the console after the fact, and the console of one CI
    # run lacked the last lines of the process the deadline ended (its log file is where the process wrote them).
    ray_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    run = subprocess.Popen([sys.executable, "-m", "rllib_sppo.cli", "train", "file", str(path)], start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "RAY_TMPDIR": ray_dir})
    deadline = time.time() + 600  # bounds, not durations: about 20 s and 40 s on an idle machine
    while not list(experiment.glob("*/checkpoint_000001/" + MANIFEST_FILE)) and time.time() < deadline:
        time.sleep(0.2)
    assert list(experiment.glob("*/checkpoint_000001/" + MANIFEST_FILE)), "no checkpoint to restart from"
    [pid] = learner_processes(run.pid)  # stopped wherever the trial is: an update, a weight sync or a checkpoint
    os.kill(pid, signal.SIGSTOP)
    try:
        out, err = run.communicate(timeout=900)
        worker_logs = "".join(f.read_text(errors="replace")
                              for f in Path(ray_dir).glob("ray/session_*/logs/**/worker-*.err"))
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        raise
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert run.returncode == 0, err[-3000:]
    assert re.search(r"stuck: (the learner update|the weight sync \(the policy's weights from the learner\(s\)\)|"
                     r"reading the algorithm's state \(.*?\)) did not finish within \w+_timeout_s=10 s",
                     err + worker_logs), err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["training_iteration"] == 5
    [trial] = experiment.glob("SPPO_*")
    results = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    assert any(r["iterations_since_restore"] == 1 and r["training_iteration"] > 1 for r in results)


@pytest.mark.system
def test_a_stopped_learner_ends_a_checkpoint_naming_the_learners_state():
    """A checkpoint reads the learners' state: a remote learner stopped (SIGSTOP) ends the process within
    learner_update_timeout_s, naming what it was reading, instead of a checkpoint that never comes."""
    out = run_python("""
        import os, signal, tempfile
        import envs
        from rllib_sppo import SPPOConfig
        algo = (SPPOConfig().environment("OutcomeCartPole-v1").learners(num_learners=1, num_cpus_per_learner=0.5)
                .training(train_batch_size_per_learner=100, minibatch_size=100, learner_update_timeout_s=3)
                .build_algo())
        algo.train()
        [pid] = algo.learner_group.foreach_learner(lambda learner: os.getpid())
        os.kill(pid.get(), signal.SIGSTOP)
        print("stopped", flush=True)
        algo.save_to_path(tempfile.mkdtemp())
        print("saved")
    """, timeout=180)
    assert out.returncode == STUCK_EXIT_CODE, out.stderr[-2000:]
    assert out.stdout.endswith("stopped\n")
    assert ("stuck: reading the algorithm's state (the learners' weights and optimizer states, for a checkpoint) did "
            "not finish within learner_update_timeout_s=3 s") in out.stderr


@pytest.mark.parametrize("key", TIMEOUT_KEYS)
def test_timeouts_are_validated(tiny, key):
    with pytest.raises(ValueError, match=f"{key}=0: give a number of seconds > 0"):
        llm_config(tiny).update_from_dict({key: 0}).validate()
    with pytest.raises(ValueError, match=f"{key}=None: give a number of seconds > 0"):
        llm_config(tiny).update_from_dict({key: None}).validate()


@pytest.mark.system
def test_a_learner_stuck_when_a_checkpoint_is_written_ends_the_process_naming_it(tmp_path):
    """RLlib writes the learners' part of a checkpoint through their own save_to_path, after get_state: a learner
    stopped just then is bounded like an update (learner_update_timeout_s), not a trial hung for good (seen under
    load in the Tune test above). Forced: the learner stops as the learner group starts writing its part."""
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        import envs
        from rllib_sppo import SPPOConfig
        algo = (SPPOConfig().environment("OutcomeCartPole-v1").learners(num_learners=1, num_cpus_per_learner=0.5)
                .training(train_batch_size_per_learner=200, minibatch_size=100, learner_update_timeout_s=10)
                .rl_module(model_config={{"pi_hiddens": [16], "vf_hiddens": [8]}})).build_algo()
        algo.train()
        [pid] = [r.get() for r in algo.learner_group.foreach_learner(lambda learner: os.getpid())]
        write = algo.learner_group.save_to_path

        def stop_then_write(*args, **kwargs):
            os.kill(pid, signal.SIGSTOP)
            return write(*args, **kwargs)

        algo.learner_group.save_to_path = stop_then_write
        try:
            algo.save_to_path({str(tmp_path / "checkpoint")!r})
        finally:
            os.kill(pid, signal.SIGCONT)
        print("saved")
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert run.returncode == STUCK_EXIT_CODE, run.stderr[-3000:]
    assert "stuck: reading the algorithm's state (the learners' weights and optimizer states, for a checkpoint) did " \
           "not finish within learner_update_timeout_s=10 s" in run.stderr
    assert "saved" not in run.stdout


def test_kill_process_ends_a_stopped_process_on_its_node_and_only_that_one(ray_session):
    """The end of a stuck runner: a stopped process is SIGKILLed through a task on its node; a process whose start
    time differs (its pid reused) is left alone."""
    from rllib_sppo.rollouts import kill_process

    node = ray_session.get_runtime_context().get_node_id()
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        os.kill(frozen.pid, signal.SIGSTOP)
        started = psutil.Process(frozen.pid).create_time()
        assert not kill_process((node, frozen.pid, started + 1), timeout_s=60)  # another process under that pid
        assert frozen.poll() is None
        assert kill_process((node, frozen.pid, started), timeout_s=60)
        assert frozen.wait(timeout=60) == -signal.SIGKILL
    finally:
        frozen.kill()
