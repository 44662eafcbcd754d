"""Several Ray nodes for real (``ray.cluster_utils.Cluster``: a raylet per node on this machine): an LLM SPPO run with
its learner on the head node and two LLM EnvRunners pinned to two other nodes by a custom resource, one runner's node
removed mid-run and a node with the resource added; the same for classic control; ``ray job submit -- rllib train
file X.yaml`` against the cluster; and a trial the cluster cannot hold refused before it starts."""

import json
import re
import socket
import subprocess
import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.rllib.core import DEFAULT_MODULE_ID

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.cli import main
from test_faults import wait_for

RUNNER = "sppo_runner"  # one per runner node: each of the two EnvRunners lands on a node of its own
LEARNER = "sppo_learner"  # the head node's: a trial's main process (and its learner) asks for it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head node (the driver and its learner) and two nodes with one ``sppo_runner`` each; this module's Ray."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {LEARNER: 1}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port()})
    nodes = [cluster.add_node(num_cpus=1, resources={RUNNER: 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the session's Ray again, for later modules


def runners(algo) -> dict:
    """{runner index: (node id, place in the data or None)} of the healthy remote EnvRunners."""
    return dict(algo.env_runner_group.foreach_env_runner(
        lambda r: (r.worker_index, (ray.get_runtime_context().get_node_id(),
                                    r.sampler.get_state() if hasattr(r, "sampler") else None)),
        local_env_runner=False))


def remove_and_replace(cluster, nodes: list, node_id: str):
    """Removes the runner node ``node_id`` (its raylet and every process on it) and adds a node with the same
    resource, as an autoscaler would; returns the new node."""
    [node] = [n for n in nodes if n.node_id == node_id]
    cluster.remove_node(node)
    nodes.remove(node)
    nodes.append(cluster.add_node(num_cpus=1, resources={RUNNER: 1}))
    return nodes[-1]


def wait_until_jobs_are_accepted(address: str, deadline_s: float = 300) -> None:
    """Waits until the cluster's job server has a dashboard agent to run a job's driver (on a loaded machine the
    head's agent registers after the dashboard answers; a submission before that is refused with HTTP 500)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client, deadline = JobSubmissionClient(address), time.monotonic() + deadline_s
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    wait_for(lambda: client.get_job_status(job) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED},
             deadline - time.monotonic(), f"end of the probe job {job}")
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)


def train_until_restored(algo, index: int, deadline_s: float = 300) -> list:
    """Trains until RLlib has restarted runner ``index`` on a node that has the resource and it is healthy again."""
    results, deadline = [], time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        results.append(algo.train())
        ft = results[-1]["fault_tolerance"]
        if ft["num_remote_worker_restarts"] >= 1 and ft["num_healthy_workers"] == 2 and index in runners(algo):
            return results
    raise AssertionError(f"runner {index} not back within {deadline_s} s: {results[-1]['fault_tolerance']}")


@pytest.mark.system
def test_llm_runners_on_their_own_nodes_survive_the_loss_of_one(cluster, tmp_path):
    from rllib_sppo.llm.assets import build_tiny_llama

    cluster, nodes = cluster
    tiny = build_tiny_llama(tmp_path / "tiny", seed=0)
    algo = (SPPOConfig().llm(policy=tiny, engine="transformers")
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 200, "heldout_size": 4,
                                                           "chat_template_model": tiny})
            .env_runners(num_env_runners=2, num_envs_per_env_runner=8, num_cpus_per_env_runner=1,
                         custom_resources_per_env_runner={RUNNER: 1})
            .training(lr=1e-3, critic_lr=1e-3, train_batch_size_per_learner=16, minibatch_size=8,
                      max_response_tokens=4)
            .debugging(seed=0).build_algo())
    head = ray.get_runtime_context().get_node_id()  # the driver's node: the learner (num_learners=0) is here
    assert head == cluster.head_node.node_id
    gaps = []
    for it in range(2):
        result = algo.train()
        gaps.append(result["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"])
        placed = runners(algo)
        assert {node for node, _ in placed.values()} == {n.node_id for n in nodes}  # one runner on each runner node
        assert {i: place for i, (_, place) in placed.items()} == {1: {"epoch": 0, "pos": 8 * (it + 1)},
                                                                 2: {"epoch": 0, "pos": 8 * (it + 1)}}  # both sampled
    saved = placed[2][1]
    new = remove_and_replace(cluster, nodes, placed[2][0])
    results = train_until_restored(algo, 2)
    node, place = runners(algo)[2]
    assert node == new.node_id  # back, on the node that has the resource
    assert place["epoch"] == 0 and place["pos"] in (saved["pos"], saved["pos"] + 8)  # its own place, not its start
    results.append(algo.train())
    gaps += [r["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"] for r in results]
    assert runners(algo)[2][1]["pos"] > place["pos"]  # it samples again
    # After each sync the engines generate with the learner's weights: the log-probs agree with the learner's.
    assert max(gaps) < 1e-3, gaps
    assert results[-1]["training_iteration"] == 2 + len(results)  # the run went on to its stop
    algo.stop()


@pytest.mark.system
def test_classic_control_runners_on_their_own_nodes_survive_the_loss_of_one(cluster):
    cluster, nodes = cluster
    algo = (SPPOConfig().environment("OutcomeCartPole-v1")
            .env_runners(num_env_runners=2, num_cpus_per_env_runner=1, custom_resources_per_env_runner={RUNNER: 1})
            .training(lr=1e-3, train_batch_size_per_learner=200, minibatch_size=100)
            .rl_module(model_config={"pi_hiddens": [8], "vf_hiddens": [8]}).debugging(seed=0).build_algo())

    def weights_agree():
        learner = algo.learner_group.get_state(components="learner/rl_module", inference_only=True)[
            "learner"]["rl_module"][DEFAULT_MODULE_ID]
        states = algo.env_runner_group.foreach_env_runner(lambda r: r.module.get_state(inference_only=True),
                                                          local_env_runner=False)
        return len(states) == 2 and all(np.array_equal(np.asarray(s[k]), np.asarray(v))
                                        for s in states for k, v in learner.items())

    result = algo.train()
    placed = runners(algo)
    assert {node for node, _ in placed.values()} == {n.node_id for n in nodes} and weights_agree()
    steps = result["env_runners"]["num_env_steps_sampled_lifetime"]
    new = remove_and_replace(cluster, nodes, placed[2][0])
    results = train_until_restored(algo, 2)
    assert runners(algo)[2][0] == new.node_id and weights_agree()
    assert results[-1]["env_runners"]["num_env_steps_sampled_lifetime"] > steps
    algo.stop()


CLASSIC_YAML = """\
cartpole-on-a-cluster:
  run: SPPO
  env: OutcomeCartPole-v1
  stop: {training_iteration: 2}
  config:
    num_env_runners: 2
    num_cpus_per_env_runner: 1
    custom_resources_per_env_runner: {sppo_runner: 1}  # on the nodes that have one each
    num_cpus_for_main_process: 1
    custom_resources_for_main_process: {sppo_learner: 1}  # on the head node: the trial and its learner
    train_batch_size_per_learner: 200
    minibatch_size: 100
    model_config: {pi_hiddens: [8], vf_hiddens: [8]}
"""


@pytest.mark.system
def test_ray_job_submit_runs_rllib_train_on_the_cluster(cluster, tmp_path):
    """The docs' command against the local cluster: the job's driver is `rllib train` on the head node; the trial's
    process holds the head's sppo_learner, its two EnvRunners a sppo_runner each."""
    cluster, _ = cluster
    path = tmp_path / "cartpole.yaml"
    path.write_text(CLASSIC_YAML)
    wait_until_jobs_are_accepted(f"http://{cluster.webui_url}")
    run = subprocess.run(["ray", "job", "submit", "--address", f"http://{cluster.webui_url}", "--", "rllib", "train",
                          "file", str(path), "--storage-path", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    summary = json.loads(re.findall(r"^\{.*\}$", run.stdout, re.M)[-1])
    assert summary["experiment"] == "cartpole-on-a-cluster" and summary["training_iteration"] == 2
    assert re.search(r"Job 'raysubmit_\w+' succeeded", run.stdout), run.stdout[-2000:]


@pytest.mark.system
def test_a_runner_no_single_node_can_hold_is_refused_naming_the_node_limit(cluster, tmp_path, capsys):
    """4 CPUs and 2 sppo_runner in all, as the cluster has (the main process 1 CPU, RLlib's least with a local
    learner), but each EnvRunner asks for 1.5 CPUs beside its sppo_runner and the nodes with a sppo_runner have 1 CPU
    each."""
    path = tmp_path / "too-big.yaml"
    path.write_text(CLASSIC_YAML.replace("num_cpus_per_env_runner: 1", "num_cpus_per_env_runner: 1.5"))
    assert main(["train", "file", str(path), "--storage-path", str(tmp_path / "results")]) == 2
    assert capsys.readouterr().err == (
        f"rllib: error: {path}: a trial asks for {{CPU: 1.5, sppo_runner: 1}} for one EnvRunner and no node has that "
        "much (at most 1 CPU on a node with the rest); lower num_cpus_per_env_runner\n")
    assert not (tmp_path / "results").exists()
