"""The DeepSpeed learner for real, on CPU (gloo): ZeRO-2 and ZeRO-3, with and without CPU offload, on a tiny Llama
the test builds; compared with the torch learner on the same episodes; two learners as one ZeRO group."""

import copy
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.llm.connectors import TokenBatch
from rllib_sppo.sppo_learner import NONFINITE_SKIPPED, NONFINITE_STREAK
from rllib_sppo.torch.deepspeed_learner import MissingExtraError, import_deepspeed
from rllib_sppo.torch.llm_rl_module import SPPOLLMModule

pytest.importorskip("deepspeed")

TEXT = gym.spaces.Text(64)
MODULE = DEFAULT_MODULE_ID


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tiny576(tmp_path_factory):
    """MLP weights of 192 x 576 = 110,592 elements: above ZeRO-3's persistence threshold, so they are partitioned."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny576"), seed=0, intermediate_size=576)


def policy_weights(learner_group) -> dict:
    """The learners' policy (the inference-only state, gathered from ZeRO partitions), by name."""
    return learner_group.get_state(components="learner/rl_module", inference_only=True)[
        "learner"]["rl_module"][MODULE]


def make_episodes(tiny, reward=None):
    """8 one-step episodes (prompt, response, outcome 1 or 0, or ``reward``) as the LLM EnvRunner returns them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    eps = []
    for i in range(8):
        prompt, response = f"Q: {i}+{i + 3}?\nA: ", f"\\boxed{{{2 * i + 3 - i % 2}}}"
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        eps.append(SingleAgentEpisode(
            observations=[prompt, prompt], actions=[response], rewards=[float(i % 2 == 0) if reward is None else reward],
            terminated=True, infos=[{}, {"data_source": "arithmetic"}], len_lookback_buffer=0,
            extra_model_outputs={"prompt_ids": [np.array(p)], "response_ids": [np.array(r)],
                                 "engine_logp": [np.zeros(len(r), np.float32)]}))
    return eps


@pytest.fixture(scope="module")
def episodes(tiny):
    return make_episodes(tiny)


def config(tiny, deepspeed=None, **training):
    return (SPPOConfig().llm(policy=tiny, engine="transformers")
            .training(**{"lr": 5e-4, "critic_lr": 2e-3,  # not AdamW's default (1e-3): RLlib must set them
                         "grad_clip": 0.5, "train_batch_size_per_learner": 8, "minibatch_size": 4,
                         "deepspeed": deepspeed, **training})
            .debugging(seed=0))


def build_learner(tiny, deepspeed=None, **training):
    return config(tiny, deepspeed, **training).build_learner(env=None, spaces={MODULE: (TEXT, TEXT)})


def update(learner, episodes, epochs=2):
    """4 optimizer steps (8 episodes, minibatches of 4, 2 epochs)."""
    return learner.update(episodes=episodes, num_epochs=epochs, minibatch_size=4, shuffle_batch_per_epoch=False)


def weights(learner):
    """A copy of the learner's module weights (RLlib's state may be views of the live tensors)."""
    return copy.deepcopy(learner.get_state(components="rl_module")["rl_module"][MODULE])


@pytest.fixture(scope="module")
def torch_run(tiny, episodes):
    learner = build_learner(tiny)
    initial = weights(learner)
    update(learner, episodes)
    return initial, weights(learner)


def relative_error(got, expected, initial):
    """max over the tensors the update moved of |got - expected| / |expected - initial|."""
    moved = [k for k in expected if np.linalg.norm(expected[k] - initial[k]) > 1e-3]
    assert len(moved) > 0.9 * len(expected)
    return max(np.linalg.norm(got[k] - expected[k]) / np.linalg.norm(expected[k] - initial[k]) for k in moved)


@pytest.mark.parametrize("ds, budget", [
    ({"zero_stage": 2}, None), ({"zero_stage": 3}, None), ({"zero_stage": 2, "offload_optimizer": True}, None),
    ({"zero_stage": 3, "offload_optimizer": True, "offload_param": True}, None),
    ({"zero_stage": 2}, 44), ({"zero_stage": 3}, 44)],
    ids=["zero2", "zero3", "zero2-offload-opt", "zero3-offload-opt-param", "zero2-micro-batches", "zero3-micro-batches"])
def test_updates_equal_the_torch_learner(tiny, episodes, torch_run, ds, budget):
    """Also with micro-batches (a 44-token budget: two of the 21-token episodes each, so two micro-batches per
    minibatch of 4, accumulated by DeepSpeed into one step) against the torch learner's unsplit minibatches."""
    initial, expected = torch_run
    learner = build_learner(tiny, ds, max_tokens_per_micro_batch=budget)
    assert len(learner.module[MODULE].micro_batches(_token_batch(learner, episodes[:4]))) == (2 if budget else 1)
    assert type(learner).__name__ == "SPPODeepSpeedLearner"
    start = weights(learner)  # gathered whole under ZeRO-3
    assert start.keys() == initial.keys() and all(np.array_equal(start[k], initial[k]) for k in initial)
    results = update(learner, episodes)
    error = relative_error(weights(learner), expected, initial)
    print(ds, "relative distance to the torch learner's weights:", error)
    assert error < 1e-3  # float32 summation order only (measured: ZeRO-2 8e-6, ZeRO-3 4e-5 to 6e-5)
    assert results[MODULE]["gradients_policy_global_norm"] > 0.5  # clipped to grad_clip (0.5) by DeepSpeed
    assert results[NONFINITE_SKIPPED] == 0


def _token_batch(learner, episodes):
    return TokenBatch()(rl_module=learner.module, episodes=episodes, batch={})[MODULE]


@pytest.mark.parametrize("stage", [2, 3])
def test_state_round_trips_and_nonfinite_updates_are_skipped(tiny, episodes, tmp_path, stage):
    from transformers import AutoModelForCausalLM

    first = build_learner(tiny, {"zero_stage": stage})
    update(first, episodes, epochs=1)
    state, path = copy.deepcopy(first.get_state()), first.save_to_path(tmp_path / "learner")  # live tensors
    update(first, episodes, epochs=1)
    expected = weights(first)
    # The Hugging Face folder the module writes holds the whole (gathered) policy.
    hf = AutoModelForCausalLM.from_pretrained(next((tmp_path / "learner").rglob("hf_policy")))
    saved = state["rl_module"][MODULE]
    assert all(np.array_equal(p.detach().numpy(), saved[f"policy.{n}"]) for n, p in hf.named_parameters())
    # Restored (weights, fp32 master weights, AdamW moments and step), a learner continues like the first one.
    for restore in (lambda learner: learner.restore_from_path(path), lambda learner: learner.set_state(state)):
        second = build_learner(tiny, {"zero_stage": stage})
        restore(second)
        assert all(np.array_equal(weights(second)[k], saved[k]) for k in saved)
        update(second, episodes, epochs=1)
        assert relative_error(weights(second), expected, saved) < 1e-5
    # A non-finite loss (NaN rewards) skips the step, counted, and leaves the weights (and optimizer) as they were.
    before = weights(second)
    results = second.update(episodes=make_episodes(tiny, reward=float("nan")), num_epochs=1, minibatch_size=8)
    assert results[NONFINITE_SKIPPED] == 1 and results[NONFINITE_STREAK] == 1
    assert all(np.array_equal(weights(second)[k], before[k]) for k in before)
    for learner in (first, second):
        update(learner, episodes, epochs=1)
    assert relative_error(weights(second), weights(first), expected) < 1e-5


@pytest.mark.system
def test_two_learners_form_one_zero3_group_and_checkpoint_every_partition(tiny576, episodes, tmp_path, ray_session):
    from transformers import AutoModelForCausalLM

    def group(num_learners):  # per learner: its half of the 8 episodes, minibatches of 2 (one learner: 8 and 4)
        n = max(num_learners, 1)
        return (config(tiny576, {"zero_stage": 3}, train_batch_size_per_learner=8 // n, minibatch_size=4 // n)
                .learners(num_learners=num_learners, num_cpus_per_learner=0.5)
                .build_learner_group(env=None, spaces={MODULE: (TEXT, TEXT)}))

    def group_update(learners, epochs=1):
        learners.update(episodes=episodes, num_epochs=epochs, minibatch_size=4 // max(len(learners), 1),
                        shuffle_batch_per_epoch=False)

    def group_weights(learners):
        return copy.deepcopy(learners.get_state(components="learner/rl_module")["learner"]["rl_module"][MODULE])

    one = group(0)
    initial = group_weights(one)
    group_update(one, epochs=2)
    two = group(2)
    assert type(two).__name__ == "DeepSpeedLearnerGroup"
    local_sizes = [r.get() for r in two.foreach_learner(
        lambda learner: [p.numel() for p in learner.module[MODULE].unwrapped().parameters()])]
    assert all(0 in sizes for sizes in local_sizes)  # each learner holds partitions, not whole tensors
    group_update(two, epochs=2)
    assert relative_error(group_weights(two), group_weights(one), initial) < 1e-3  # measured 4e-5

    # A checkpoint holds both learners' optimizer partitions: restored, the group continues exactly as before.
    two.save_to_path(tmp_path / "group")
    saved = group_weights(two)
    group_update(two)
    expected = group_weights(two)
    two.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(next((tmp_path / "group").rglob("hf_policy")))
    assert all(np.array_equal(p.detach().numpy(), saved[f"policy.{n}"]) for n, p in hf.named_parameters())
    again = group(2)
    again.restore_from_path(tmp_path / "group")
    assert all(np.array_equal(group_weights(again)[k], saved[k]) for k in saved)
    group_update(again)
    assert relative_error(group_weights(again), expected, saved) < 1e-5  # measured 0
    again.shutdown()
    with pytest.raises(ValueError, match="ZeRO partitions of 2 learner.*this run has 1: resume with num_learners=2"):
        one.restore_from_path(tmp_path / "group")


@pytest.mark.system
def test_two_zero3_learners_gather_the_policy_for_a_sync_a_bucket_at_a_time(tiny576, ray_session):
    """The weights for remote EnvRunners under ZeRO-3: every learner gathers one bucket at a time (the others stay
    partitioned), only the first reads them, and the buckets hold the whole policy, as gathered at once."""
    two = (config(tiny576, {"zero_stage": 3}, train_batch_size_per_learner=4, minibatch_size=2)
           .learners(num_learners=2, num_cpus_per_learner=0.5)
           .build_learner_group(env=None, spaces={MODULE: (TEXT, TEXT)}))

    def read(learner):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        params = [p for p in learner.module[MODULE].unwrapped().parameters() if not p.ds_persist]
        (shapes, parts), got, most = learner.policy_buckets(64 * 1024), {}, 0
        for bucket in parts:
            most = max(most, sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE))
            got.update({name: tensor.clone().numpy() for name, tensor in bucket})
        return shapes, got, most, sum(p.ds_numel for p in params)

    (shapes, first, most, total), (_, second, _, _) = [r.get() for r in two.foreach_learner(read)]
    whole = policy_weights(two)
    two.shutdown()
    assert second == {} and list(first) == [name for bucket in shapes for name, _, _ in bucket] == list(whole)
    assert all(np.array_equal(first[name], whole[name]) for name in whole)
    assert len(shapes) > 3 and 0 < most <= 192 * 576 < total  # one MLP matrix (a bucket of its own) at a time


@pytest.mark.system
@pytest.mark.parametrize("weight_sync", ["collective", "object_store"])
def test_two_zero3_learners_sync_a_remote_env_runner(tiny, ray_session, weight_sync):
    """Two ZeRO-3 learners and a remote LLM EnvRunner: after each update the runner's engine holds the learners'
    policy (the sampling log-probs equal the learner's), over the collective or through the object store."""
    algo = (config(tiny, {"zero_stage": 3}, max_response_tokens=12, weight_sync=weight_sync)
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 100, "heldout_size": 0,
                                                           "chat_template_model": tiny})
            .env_runners(num_env_runners=1, num_envs_per_env_runner=8, num_cpus_per_env_runner=0.5)
            .learners(num_learners=2, num_cpus_per_learner=0.25)
            .build_algo())
    assert algo.config.resolved_weight_sync == weight_sync
    results = [algo.train() for _ in range(2)]
    synced = policy_weights(algo.learner_group)
    [engine] = algo.env_runner_group.foreach_env_runner(
        lambda runner: {f"policy.{k}": v.numpy() for k, v in runner._engine.model.state_dict().items()},
        local_env_runner=False)
    algo.stop()
    assert results[-1]["learners"][MODULE]["rollout/engine_logp_gap"] < 1e-3
    assert engine.keys() == synced.keys() and all(np.array_equal(engine[k], synced[k]) for k in synced)


def test_bfloat16_trains_with_fp32_master_weights(tiny, episodes):
    """DeepSpeed's bf16 mode: the engines cast the networks to bfloat16 and keep fp32 master weights (the torch
    learner's mixed precision is tested in test_reference_scale.py)."""
    from deepspeed.utils import safe_get_full_fp32_param

    bf16 = RLModuleSpec(module_class=SPPOLLMModule, model_config={"policy": tiny, "dtype": "bfloat16"})
    learner = config(tiny, {"zero_stage": 3}).rl_module(rl_module_spec=bf16).build_learner(
        env=None, spaces={MODULE: (TEXT, TEXT)})
    initial = weights(learner)
    results = update(learner, episodes)
    got = weights(learner)
    assert results[NONFINITE_SKIPPED] == 0 and all(v.dtype == torch.bfloat16 for v in got.values())
    assert max((got[k].float() - initial[k].float()).abs().max() for k in got) > 1e-3
    param = next(learner.module[MODULE].policy.parameters())
    assert safe_get_full_fp32_param(param).dtype == torch.float32  # fp32 masters
    with pytest.raises(ValueError, match="float16 would need loss scaling"):
        config(tiny, {"zero_stage": 2}).rl_module(rl_module_spec=RLModuleSpec(
            module_class=SPPOLLMModule, model_config={"policy": tiny, "dtype": "float16"})).build_learner(
            env=None, spaces={MODULE: (TEXT, TEXT)})


@pytest.mark.system
def test_two_zero3_offload_learners_train_sync_the_env_runner_and_checkpoint(tiny, ray_session, tmp_path):
    """... and choose the prompts: the critic, partitioned across the two learners, scores the candidates."""
    from transformers import AutoModelForCausalLM

    from rllib_sppo.llm.critic import critic_logits

    algo = (config(tiny, {"zero_stage": 3, "offload_optimizer": True, "offload_param": True},
                   max_response_tokens=12, prompt_selection={"pool": 2})
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 100, "heldout_size": 0,
                                                           "chat_template_model": tiny})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
            .learners(num_learners=2, num_cpus_per_learner=0.5)  # two learner actors: one ZeRO group
            .build_algo())

    initial = policy_weights(algo.learner_group)
    results = [algo.train() for _ in range(2)]
    learner = results[-1]["learners"][MODULE]
    assert np.isfinite(learner["policy/loss"]) and learner["policy/approx_kl"] != 0.0
    # 16 prompts per batch (8 per learner), 32 candidates: 16 wait
    assert results[-1]["timing_s"]["prompt_scoring"] > 0 and results[-1]["env_runners"]["rollout/prompts_deferred"] == 16
    # The scores the ZeRO-3 group gives are the gathered critic's.
    texts = algo.env_runner.env.splits["train"].texts[:6]
    module = SPPOLLMModule(observation_space=TEXT, action_space=TEXT, model_config={"policy": tiny})
    module.load_state_dict({k: torch.as_tensor(v) for k, v in algo.learner_group.get_state(
        components="learner/rl_module")["learner"]["rl_module"][MODULE].items()})
    assert np.allclose(critic_logits(algo.learner_group, texts), module.prompt_values(texts).numpy(), atol=1e-5)
    # The engine sampled the second batch with the weights the learner had after the first update.
    assert learner["rollout/engine_logp_gap"] < 1e-3
    synced = policy_weights(algo.learner_group)
    engine = {f"policy.{k}": v.numpy() for k, v in algo.env_runner._engine.model.state_dict().items()}
    assert engine.keys() == synced.keys()  # the policy only: the critic stays on the learner
    assert all(np.array_equal(engine[k], synced[k]) for k in synced)
    assert max(np.abs(synced[k] - initial[k]).max() for k in synced) > 1e-3
    algo.save_to_path(tmp_path / "ckpt")
    algo.stop()
    hf = AutoModelForCausalLM.from_pretrained(next((tmp_path / "ckpt").rglob("hf_policy")))
    assert all(np.array_equal(p.detach().numpy(), synced[f"policy.{n}"]) for n, p in hf.named_parameters())


@pytest.mark.parametrize("ds, message", [
    ({"zero_stage": 1}, "zero_stage=1: set 2 .* or 3"),
    ({"zero_stage": 2, "offload_param": True}, "offload_param=True needs zero_stage 3"),
    ({"zero_stage": 3, "offload": True}, r"unknown key\(s\) \['offload'\]; its keys are zero_stage"),
    ({"offload_optimizer": "yes"}, "offload_optimizer must be True or False"),
    ("zero3", "deepspeed must be a dict"),
])
def test_deepspeed_config_says_how_to_fix(tiny, ds, message):
    with pytest.raises(ValueError, match=message):
        config(tiny, ds).validate()


def test_deepspeed_refuses_the_mlp_module(tiny):
    with pytest.raises(ValueError, match="SPPOMLPModule is not one. Classic-control networks are small"):
        SPPOConfig().environment("OutcomeCartPole-v1").training(deepspeed={"zero_stage": 2}).validate()
    config(tiny, {"zero_stage": 3}).learners(num_learners=2).validate()
    assert config(tiny, {}).get_default_learner_class().__name__ == "SPPODeepSpeedLearner"
    assert config(tiny).get_default_learner_class().__name__ == "SPPOTorchLearner"


def test_without_deepspeed_installed_asking_for_it_says_what_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    for ask in (config(tiny, {"zero_stage": 2}).validate, import_deepspeed):
        with pytest.raises(ImportError, match=r"pip install 'rllib-sppo\[deepspeed\]'") as error:
            ask()
        assert isinstance(error.value, MissingExtraError)  # also a ValueError: the CLI reports it in one line
