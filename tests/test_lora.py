"""LoRA policies for real (PEFT, RLlib, the transformers and vLLM engines): only the adapters train and reach the
engines, micro-batches and bf16 as with full fine-tuning, and the checkpoint's ``hf_policy/`` is an adapter folder
that transformers loads."""

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.private_api import local_learner
from test_reference_scale import TEXT, minibatch_gradient, uneven_episodes

MODULE = DEFAULT_MODULE_ID
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


def config(tiny, dtype="float32", lora=LORA, runners=0, engine="transformers", **training):
    return (SPPOConfig().llm(policy=tiny, dtype=dtype, **({"lora": lora} if lora else {}))
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 200,
                                                           "chat_template_model": tiny})
            .env_runners(num_env_runners=runners, num_envs_per_env_runner=8,
                         num_cpus_per_env_runner=0.5)
            .training(**{"lr": 1e-2, "critic_lr": 1e-3, "train_batch_size_per_learner": 8, "minibatch_size": 8,
                         "max_response_tokens": 8, "rollout_engine": engine, **training})
            .debugging(seed=0))


def adapters(module) -> dict:
    return {n: p for n, p in module.policy.named_parameters() if "lora_" in n}


def test_only_the_adapters_train_in_micro_batches_and_bf16(tiny):
    """The policy optimizer holds the adapters alone; an update in micro-batches moves them and leaves the base
    bit-identical; its gradient is the unsplit minibatch's; a bf16 run (fp32 masters) moves the adapters too."""
    eps = uneven_episodes(tiny)
    whole = config(tiny).build_learner(env=None, spaces={MODULE: (TEXT, TEXT)})
    split = config(tiny, max_tokens_per_micro_batch=48).build_learner(env=None, spaces={MODULE: (TEXT, TEXT)})
    module = split.module[MODULE].unwrapped()
    lora = adapters(module)
    assert len(lora) == 4 * 3 * 2  # 4 layers x 3 target modules x (A, B)
    [policy_optimizer] = [o for name, o in split.get_optimizers_for_module(MODULE) if name == "policy"]
    held = {id(p) for group in policy_optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in lora.values()}
    (expected, _), (got, _) = minibatch_gradient(whole, eps), minibatch_gradient(split, eps)
    policy_grads = [k for k in got if k.startswith("policy.")]
    assert policy_grads and all("lora_" in k for k in policy_grads)  # no gradient reaches the frozen base
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    assert float((flat(got) - flat(expected)).norm() / flat(expected).norm()) < 1e-5

    bf16 = config(tiny, dtype="bfloat16", max_tokens_per_micro_batch=48).build_learner(
        env=None, spaces={MODULE: (TEXT, TEXT)})
    module = bf16.module[MODULE].unwrapped()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    bf16.update(episodes=eps, num_epochs=1, minibatch_size=len(eps))
    after = dict(module.policy.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)  # fp32 masters
    assert all(torch.equal(after[n], before[n]) for n in before if "lora_" not in n)  # the base stays
    assert all(not torch.equal(after[n], before[n]) for n in before if "lora_B" in n)  # B (0 at the start) moves


def test_lora_syncs_only_the_adapters_to_a_local_vllm_engine(tiny, ray_session):
    """vLLM (its CPU build) serves the policy's adapters as a LoRA adapter: the local EnvRunner is handed the learner's
    own adapter tensors (no base weight), and the engine's log-probs match the learner's after every sync."""
    algo = config(tiny, engine="vllm").build_algo()
    learner_module = local_learner(algo.learner_group).module[MODULE].unwrapped()
    lora = adapters(learner_module)
    received = []
    results = [algo.train()]
    engine = algo.env_runner._engine
    update_weights = engine.update_weights
    engine.update_weights = lambda named: update_weights(received.append(list(named)) or received[-1])
    results += [algo.train() for _ in range(2)]
    algo.stop()
    by_name = {n.replace(".default", ""): p for n, p in lora.items()}
    for named in received:
        assert {name for name, _ in named} == set(by_name)
        assert all(t.data_ptr() == by_name[name].data_ptr() for name, t in named)
    assert results[-1]["env_runners"]["rollout/weight_sync_bytes"] == sum(p.numel() * 4 for p in lora.values())
    assert all(r["learners"][MODULE]["rollout/engine_logp_gap"] < 1e-3 for r in results)


@pytest.mark.system
def test_lora_reaches_a_remote_runner_in_bf16_chunks_and_checkpoints_an_adapter_folder(tiny, ray_session, tmp_path):
    from transformers import AutoModelForCausalLM

    algo = config(tiny, dtype="bfloat16", runners=1, weight_sync_chunk_mb=0.01).build_algo()
    module = local_learner(algo.learner_group).module[MODULE].unwrapped()
    results = [algo.train() for _ in range(3)]
    lora_bytes = sum(p.numel() * 2 for p in adapters(module).values())
    assert results[-1]["env_runners"]["rollout/weight_sync_bytes"] == lora_bytes
    assert all(r["learners"][MODULE]["rollout/engine_logp_gap"] < 0.05 for r in results)  # bf16 rounding only
    algo.save_to_path(str(tmp_path / "ckpt"))
    algo.stop()
    hf = next((tmp_path / "ckpt").rglob("hf_policy"))
    assert (hf / "adapter_config.json").exists() and not (hf / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(hf)  # the base (the policy folder) with the adapters
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        expected = module.policy(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=0.05)
        module.policy.disable_adapters()
        assert not torch.allclose(module.policy(input_ids=ids).logits, expected, atol=0.05)  # the adapters matter


def test_lora_settings_are_checked(tiny):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rank'\]"):
        config(tiny, lora={"rank": 4}).validate()
    with pytest.raises(ValueError, match="r=0: an integer rank"):
        config(tiny, lora={"r": 0}).validate()
    with pytest.raises(ValueError, match="use engine_sleep_level 1"):
        config(tiny, engine_sleep_level=2).validate()
    with pytest.raises(ValueError, match="DeepSpeed learner does not take LoRA policies"):
        config(tiny, deepspeed={"zero_stage": 2}).validate()
