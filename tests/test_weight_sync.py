"""Weight sync from the learner to the LLM EnvRunners, for real (RLlib, Ray actors, the engines): the learner's own
tensors for a local runner, bounded chunks in the training dtype for remote ones, a stuck runner named within its
timeout, and an engine that sleeps while the learner updates."""

import os
import re
import signal
import time

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.private_api import local_learner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


def config(tiny, dtype="float32", **training):
    return (SPPOConfig().llm(policy=tiny, engine="transformers", dtype=dtype)
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 200,
                                                           "chat_template_model": tiny})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
            .training(**{"lr": 1e-3, "critic_lr": 1e-3, "train_batch_size_per_learner": 8, "minibatch_size": 8,
                         "max_response_tokens": 8, **training})
            .debugging(seed=0))


def test_a_local_runner_is_handed_the_learners_own_tensors(tiny, ray_session):
    algo = config(tiny).build_algo()
    algo.train()
    runner, learner = algo.env_runner, local_learner(algo.learner_group)
    received = []
    update_weights = runner._engine.update_weights
    runner._engine.update_weights = lambda named: update_weights(received.append(list(named)) or received[-1])
    algo.train()  # sample, update, sync
    [named] = received
    params = dict(learner.module[DEFAULT_MODULE_ID].unwrapped().policy.named_parameters(remove_duplicate=False))
    assert len(named) == len(params)
    for name, tensor in named:  # the parameters themselves: same storage, same dtype, no numpy in between
        assert tensor.data_ptr() == params[name].data_ptr() and tensor.dtype == params[name].dtype
    algo.stop()


@pytest.mark.system
def test_remote_runners_receive_bounded_chunks_in_the_training_dtype(tiny, ray_session):
    """A bf16 policy (fp32 masters on the learner) reaches a remote runner in bf16, half the fp32 bytes, in chunks
    of at most 0.25 MB (the 1.8M-parameter tiny Llama: ~15 chunks)."""
    algo = (config(tiny, dtype="bfloat16", weight_sync_chunk_mb=0.25)
            .env_runners(num_env_runners=1, num_cpus_per_env_runner=0.5).build_algo())
    learner = local_learner(algo.learner_group)
    chunks, _ = learner.weight_chunks(int(0.25 * 2**20))
    import ray

    sizes = [sum(t.numel() * t.element_size() for t in ray.get(c).values()) for c in chunks]
    dtypes = {t.dtype for c in chunks for t in ray.get(c).values()}
    policy = learner.module[DEFAULT_MODULE_ID].unwrapped().policy
    fp32_bytes = sum(p.numel() * 4 for p in policy.state_dict().values())  # the tied LM head under its name too
    assert dtypes == {torch.bfloat16} and len(chunks) > 5
    assert max(sizes) <= 0.25 * 2**20 or max(sizes) == max(p.numel() * 2 for p in policy.parameters())
    assert sum(sizes) == fp32_bytes // 2
    results = [algo.train() for _ in range(2)]
    runners = results[-1]["env_runners"]
    assert runners["rollout/weight_sync_bytes"] == fp32_bytes // 2 and runners["rollout/weight_sync_gb_per_s"] > 0
    # The engine generates with the learner's weights (bf16 on both sides): the log-prob gap is bf16 rounding only.
    assert results[-1]["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"] < 0.05
    algo.stop()


@pytest.mark.system
@pytest.mark.parametrize("restart,weight_sync", [(True, "collective"), (False, "collective"), (True, "object_store")])
def test_a_stuck_runner_is_named_within_the_sync_timeout_and_restarted(tiny, ray_session, caplog, restart,
                                                                        weight_sync):
    """A runner that does not load the weights in time is named in an error and killed, and RLlib restarts it; with
    RLlib's restarts off (restart_failed_env_runners=False) the sync raises a TimeoutError naming it. Either way the
    weights travel (a stuck receiver stalls the collective's sender too, up to the same timeout)."""
    import logging

    algo = (config(tiny, weight_sync_timeout_s=3.0, weight_sync=weight_sync)
            .env_runners(num_env_runners=1, num_cpus_per_env_runner=0.5)
            .fault_tolerance(restart_failed_env_runners=restart).build_algo())
    algo.train()
    [pid] = algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
    os.kill(pid, signal.SIGSTOP)  # the runner's process stops answering, as a runner stuck in its engine
    named = r"weight sync: EnvRunner\(s\) \[1\] did not load the new policy weights within weight_sync_timeout_s=3 s"
    start = time.monotonic()
    try:
        if restart:
            with caplog.at_level(logging.ERROR, logger="rllib_sppo.rollouts"):
                algo.rollouts.sync_weights()
            assert re.search(named + r".*Restarting it", caplog.text), caplog.text
            assert algo.env_runner_group.healthy_worker_ids() == []  # killed; RLlib brings it back next iteration
        else:
            with pytest.raises(TimeoutError, match=named + ".*Set restart_failed_env_runners=True"):
                algo.rollouts.sync_weights()
        assert time.monotonic() - start < 30
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # killed for the restart
            pass
    if restart:
        back_by = time.monotonic() + 300  # RLlib probes the restarted runner before each iteration
        while not algo.env_runner_group.healthy_worker_ids() and time.monotonic() < back_by:
            algo.train()
        assert algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False) != [pid]
    algo.stop()


def test_a_weight_group_broadcasts_every_tensor_bit_for_bit():
    """The collective's wire format on its own (gloo, members in threads): every tensor arrives under its name,
    dtype and shape, bit for bit, in buckets of at most max_bytes (a larger tensor alone), with the sender's meta."""
    import threading

    from rllib_sppo.llm.weight_group import WeightGroup, buckets, layout, open_store

    torch.manual_seed(0)
    named = [("a", torch.randn(3, 5)), ("b", torch.randn(100).to(torch.bfloat16)), ("c", torch.arange(7)),
             ("big", torch.randn(1000)), ("d", torch.randn(2, 2, dtype=torch.float64))]
    assert [[n for n, _ in b] for b in buckets(named, 1024)] == [["a", "b", "c"], ["big"], ["d"]]
    store, received = open_store("127.0.0.1", 30), {}

    def member(rank):
        meta, pairs = WeightGroup("127.0.0.1", store.port, rank, 3, "cpu", 30).receive()
        received[rank] = meta, [(name, tensor.clone()) for name, tensor in pairs]

    threads = [threading.Thread(target=member, args=(rank,)) for rank in (1, 2)]
    for thread in threads:
        thread.start()
    parts = buckets(named, 1024)
    sent = WeightGroup("127.0.0.1", store.port, 0, 3, "cpu", 30).send(layout(parts), iter(parts), seq_no=7)
    for thread in threads:
        thread.join(timeout=60)
    assert sent >= sum(t.numel() * t.element_size() for _, t in named)
    for meta, pairs in received.values():
        assert meta == {"seq_no": 7} and [name for name, _ in pairs] == [name for name, _ in named]
        for (_, got), (_, want) in zip(pairs, named):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert len(received) == 2


@pytest.mark.system
def test_remote_runners_get_the_weights_over_the_collective_and_a_restarted_one_rejoins(tiny, ray_session):
    """weight_sync="collective" (the default here), two remote runners: they load the learner's weights (the engine's
    log-probs equal the learner's), over the group, not the object store. A runner killed mid-run is restarted by
    RLlib and the group formed again with its new process, which then generates with the learner's weights too."""
    algo = config(tiny).env_runners(num_env_runners=2, num_cpus_per_env_runner=0.5).build_algo()
    assert algo.config.resolved_weight_sync == "collective"
    loaded_through_object_store = []
    publish = algo.rollouts.weights.publish
    algo.rollouts.weights.publish = lambda *a: loaded_through_object_store.append(1) or publish(*a)
    for _ in range(2):
        result = algo.train()
        assert result["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"] < 1e-3
    assert algo.rollouts.collective.members == (1, 2) and not loaded_through_object_store
    policy = local_learner(algo.learner_group).module[DEFAULT_MODULE_ID].unwrapped().policy
    fp32_bytes = sum(p.numel() * 4 for p in policy.state_dict().values())
    assert result["env_runners"]["rollout/weight_sync_bytes"] == fp32_bytes
    pids = dict(algo.env_runner_group.foreach_env_runner(lambda r: (r.worker_index, os.getpid()),
                                                         local_env_runner=False))
    os.kill(pids[2], signal.SIGKILL)
    back_by = time.monotonic() + 300
    while time.monotonic() < back_by:
        result = algo.train()
        now = dict(algo.env_runner_group.foreach_env_runner(lambda r: (r.worker_index, os.getpid()),
                                                            local_env_runner=False))
        if set(now) == {1, 2} and now[2] != pids[2] and algo.rollouts.collective.members == (1, 2):
            break
    assert now[2] != pids[2] and now[1] == pids[1] and algo.rollouts.collective.members == (1, 2)
    results = [algo.train() for _ in range(2)]  # both runners sample with the weights they got over the new group
    assert all(r["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"] < 1e-3 for r in results)
    assert not loaded_through_object_store
    algo.stop()


def test_weight_sync_is_validated_and_resolved(tiny):
    assert config(tiny).resolved_weight_sync == "collective"
    assert config(tiny, weight_sync="object_store").resolved_weight_sync == "object_store"
    assert config(tiny, async_rollouts=True).resolved_weight_sync == "object_store"
    assert config(tiny, deepspeed={"zero_stage": 3}).resolved_weight_sync == "collective"  # (a bucket gathered at a time)
    with pytest.raises(ValueError, match=r"weight_sync='nccl'; choose one of \('collective', 'object_store'\)"):
        config(tiny, weight_sync="nccl").validate()
    with pytest.raises(ValueError, match="weight_sync='collective' works with synchronous rollouts"):
        (config(tiny, weight_sync="collective", async_rollouts=True, tis_cap=2.0)
         .env_runners(num_env_runners=1).validate())


def test_the_engine_sleeps_through_the_update_and_wakes_with_the_new_weights(tiny, ray_session):
    """engine_sleep_level 2 with the transformers engine on CPU: after sampling the engine's weights are freed (no
    parameter holds memory during the update), the sync wakes it with the new weights, and it samples with them."""
    algo = config(tiny, engine_sleep_level=2).build_algo()
    runner = algo.env_runner
    for _ in range(3):
        result = algo.train()
        assert result["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"] < 1e-3
    runner.sample()
    assert runner._asleep and all(p.numel() == 0 for p in runner._engine.model.parameters())
    algo.rollouts.sync_weights()
    assert not runner._asleep and all(p.numel() > 0 for p in runner._engine.model.parameters())
    algo.stop()


def test_the_cuda_cache_is_emptied_before_the_engine_wakes(tiny, ray_session, monkeypatch):
    """Beside the learner on a GPU, the blocks torch's allocator caches for the learner go back to the GPU before the
    engine takes its memory back. (This CPU machine has no CUDA: torch.cuda's two calls are stood in for.)"""
    algo = config(tiny, engine_sleep_level=2).build_algo()
    algo.train()
    runner = algo.env_runner
    runner.sample()
    assert runner._asleep
    policy = local_learner(algo.learner_group).module[DEFAULT_MODULE_ID].unwrapped().policy
    named = [(name, p.detach().clone()) for name, p in policy.named_parameters(remove_duplicate=False)]
    calls, wake_up = [], runner._engine.wake_up
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(runner._engine, "wake_up", lambda: calls.append("wake_up") or wake_up())
    runner._load_weights(iter(named))
    assert calls == ["empty_cache", "wake_up"] and not runner._asleep
    algo.stop()


def test_vllm_sleep_on_a_cpu_machine_is_refused_with_the_reason(tiny):
    from rllib_sppo.llm.engines import make_engine

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: vLLM's sleep mode is available")
    with pytest.raises(ValueError, match="vLLM's sleep mode frees GPU memory and needs a CUDA GPU"):
        make_engine("vllm", tiny, sleep_level=2)


def test_sleep_level_and_gpu_share_are_validated(tiny):
    with pytest.raises(ValueError, match="engine_sleep_level=3"):
        config(tiny, engine_sleep_level=3).validate()
    with pytest.raises(ValueError, match="set the config key gpu_memory_utilization"):
        config(tiny, engine_kwargs={"gpu_memory_utilization": 0.5}).validate()
