"""The logic that makes the reference scale (1.5B-7B, 8k-token answers, bf16) fit, tested on CPU with a tiny Llama:
micro-batches that change nothing but memory, log-probs without a [B, L, vocabulary] tensor, and bf16 compute over
fp32 master weights."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from rllib_sppo import SPPOConfig
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.llm.connectors import TokenBatch
from rllib_sppo.torch.llm_rl_module import PolicyModel, SPPOLLMModule

TEXT = gym.spaces.Text(64)
MODULE = DEFAULT_MODULE_ID


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


def uneven_episodes(tiny, n=8, seed=0):
    """n one-step episodes with prompts of 4-13 and responses of 1-24 tokens, outcome 1 for every third; the engine's
    log-probs are drawn in [-7, -2] (around the tiny model's, so that some importance ratios exceed a cap of 2)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    rng, engine_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    eps = []
    for i in range(n):
        prompt = "Q: " + "".join(rng.choice(list("0123456789+"), size=1 + i % 10))
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = [int(t) for t in rng.integers(4, len(tok) - 1, size=1 + (7 * i) % 24)]
        eps.append(SingleAgentEpisode(
            observations=[prompt, prompt], actions=[tok.decode(r)], rewards=[float(i % 3 == 0)], terminated=True,
            infos=[{}, {"data_source": "arithmetic"}], len_lookback_buffer=0,
            extra_model_outputs={"prompt_ids": [np.array(p)], "response_ids": [np.array(r)],
                                 "engine_logp": [engine_rng.uniform(-7, -2, len(r)).astype(np.float32)]}))
    return eps


def build(tiny, dtype="float32", **training):
    return (SPPOConfig().llm(policy=tiny, dtype=dtype)
            .training(**{"lr": 1e-3, "critic_lr": 1e-3, "train_batch_size_per_learner": 8, "minibatch_size": 8,
                         **training})
            .debugging(seed=0)
            .build_learner(env=None, spaces={MODULE: (TEXT, TEXT)}))


def minibatch_gradient(learner, episodes) -> tuple[dict, dict]:
    """The gradient of one update on all ``episodes`` as one minibatch (read just before the optimizer step), and the
    update's results."""
    grads = {}

    def step():
        grads.update({name: p.grad.clone() for name, p in learner.module[MODULE].named_parameters()
                      if p.grad is not None})

    learner._step = step
    results = learner.update(episodes=episodes, num_epochs=1, minibatch_size=len(episodes))
    return grads, results


def test_gradients_are_freed_after_the_optimizer_step_and_adamw_is_fused_on_cuda_only(tiny):
    """No gradient is held after an update (through sampling, where the engine needs the memory); AdamW runs fused
    when its parameters are on a GPU, unfused on the CPU (the same numbers as before)."""
    learner = build(tiny)
    learner.update(episodes=uneven_episodes(tiny), num_epochs=1, minibatch_size=4)
    params = list(learner.module[MODULE].parameters())
    assert params and all(p.grad is None for p in params)
    for _, optimizer in learner.get_optimizers_for_module(MODULE):
        assert bool(optimizer.defaults["fused"]) == torch.cuda.is_available() == params[0].is_cuda


@pytest.mark.parametrize("coeff", [0.0, 0.01])
def test_the_entropy_has_a_graph_only_when_it_is_in_the_loss(tiny, coeff):
    """entropy_coeff 0 (the reference's): the entropy is a diagnostic, computed without a graph (no softmax over the
    vocabulary kept or recomputed for it); with a coefficient it is differentiated, and the update uses it."""
    learner = build(tiny, entropy_coeff=coeff)
    module = learner.module[MODULE].unwrapped()
    batch = TokenBatch()(rl_module=learner.module, episodes=uneven_episodes(tiny), batch={})[MODULE]
    out = module.forward_train(batch)
    assert out["logp"].requires_grad and out["entropy"].requires_grad == bool(coeff)
    assert float(out["entropy"].detach().sum()) > 0


@pytest.mark.parametrize("estimator, mode, tis_cap", [
    ("sppo", "token-mean", None), ("sppo", "seq-mean-token-mean", None), ("sppo", "seq-mean-token-sum", None),
    ("ppo", "token-mean", None), ("sppo", "token-mean", 2.0), ("sppo", "seq-mean-token-mean", 2.0)])
def test_micro_batched_gradient_equals_the_unsplit_minibatch(tiny, estimator, mode, tis_cap):
    """Rows of 6-36 tokens under a 48-token budget: 5 micro-batches of 1-5 rows; each loss term of a micro-batch is
    normalised by its minibatch's count, so the accumulated gradient is the minibatch's, in every aggregation mode
    (token-mean: the minibatch's tokens, not each micro-batch's), truncated importance weights included."""
    eps = uneven_episodes(tiny)
    settings = {"advantage_estimator": estimator, "loss_agg_mode": mode, "tis_cap": tis_cap}
    if estimator == "ppo":
        settings["critic_init"] = 0.3  # an mse critic with something to learn
    whole = build(tiny, **settings)
    split = build(tiny, max_tokens_per_micro_batch=48, **settings)
    head = torch.randn(1, whole.module[MODULE].unwrapped().value_head.weight.shape[1],
                       generator=torch.Generator().manual_seed(0)) * 0.1
    for learner in (whole, split):  # a non-zero value head: the critic's backbone gets a gradient to compare
        learner.module[MODULE].unwrapped().value_head.weight.data.copy_(head)
    batch = TokenBatch()(rl_module=split.module, episodes=eps, batch={})[MODULE]
    parts = split.module[MODULE].micro_batches(batch)
    assert len(parts) == 5 and sorted(len(rows) for rows, _ in parts) == [1, 1, 1, 2, 3]
    assert all(micro["input_ids"].numel() <= 48 or len(rows) == 1 for rows, micro in parts)  # trimmed to budget
    (expected, _), (got, results) = minibatch_gradient(whole, eps), minibatch_gradient(split, eps)
    assert expected.keys() == got.keys() and len(expected) > 30
    for network in ("policy.", "critic."):  # each network on its own (the policy's would dominate a global norm)
        keys = [k for k in expected if k.startswith(network)]
        assert keys and all(expected[k].norm() > 0 for k in keys), network  # every parameter has a gradient
        flat = lambda g: torch.cat([g[k].flatten() for k in keys])  # noqa: E731
        error = float((flat(got) - flat(expected)).norm() / flat(expected).norm())
        assert error < 1e-5, (network, error)
    # Wrong normalisation (each micro-batch's own token count) would be far off: the control this test can fail on.
    assert (split.module[MODULE].action_mask(batch).sum() / parts[0][1]["response_mask"].sum()) > 2
    if tis_cap is not None:  # some tokens capped, some not: the weights vary within the minibatch
        ratio = torch.exp(batch["old_logp"] - batch["engine_logp"])[batch["response_mask"] == 1]
        assert 0.05 < (ratio > tis_cap).float().mean() < 0.95
        stats = results[MODULE]
        assert float(stats["rollout/is_ratio_max"]) == pytest.approx(float(ratio.max()), rel=1e-5)
        capped = float((ratio > tis_cap).float().mean())
        assert float(stats["rollout/is_capped_frac"]) == pytest.approx(capped, rel=1e-5)


def test_log_probs_from_the_lm_head_on_response_positions_equal_the_full_log_softmax(tiny):
    """Chunks of 5 positions, the head recomputed in backward: the same log-probs, entropies and gradients as the
    full [B, L, V] log-softmax; no saved tensor has the vocabulary on more than a chunk's positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    eps = uneven_episodes(tiny)
    module = SPPOLLMModule(observation_space=TEXT, action_space=TEXT, model_config={"policy": tiny})
    batch = TokenBatch()(rl_module={MODULE: module}, episodes=eps, batch={})[MODULE]
    ids, attn, scored = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    vocab, temperature = model.config.vocab_size, 0.6

    full = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature, -1)
    expected_logp = full.gather(-1, ids[:, 1:, None]).squeeze(-1) * scored
    expected_entropy = -(full.exp() * full).sum(-1) * scored
    (expected_logp.sum() + expected_entropy.sum()).backward()
    expected_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(tuple(t.shape)), t)[1], lambda t: t):
        logp, entropy = PolicyModel(model, temperature, chunk=5, dtype=torch.float32)(ids, attn, scored)
    assert torch.allclose(logp, expected_logp, atol=1e-5) and torch.allclose(entropy, expected_entropy, atol=1e-4)
    assert (logp[scored == 0] == 0).all()
    (logp.sum() + entropy.sum()).backward()
    for n, p in model.named_parameters():
        assert (p.grad - expected_grad[n]).norm() <= 1e-5 * expected_grad[n].norm(), n
    vocab_rows = [int(np.prod(shape)) // vocab for shape in saved if shape and shape[-1] == vocab]
    assert max(vocab_rows, default=0) <= 5  # at most one chunk's logits kept for backward


def test_activation_memory_is_flat_in_the_minibatch_size(tiny):
    """At a fixed micro-batch budget, the tensors the largest micro-batch keeps for backward do not grow with the
    minibatch: 8 and 32 episodes of the same lengths keep the same peak."""

    def peak_saved_bytes(n):
        learner = build(tiny, max_tokens_per_micro_batch=48, train_batch_size_per_learner=n, minibatch_size=n)
        eps = uneven_episodes(tiny, n=n)
        peaks, current = [], []
        forward_train = learner.module[MODULE].forward_train

        def measured(batch, **kwargs):  # each micro-batch's forward: the bytes autograd saves for its backward
            current.clear()
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: (current.append(t.numel() * t.element_size()), t)[1], lambda t: t):
                out = forward_train(batch, **kwargs)
            peaks.append(sum(current))
            return out

        learner.module[MODULE].forward_train = measured
        learner.update(episodes=eps, num_epochs=1, minibatch_size=n)
        return max(peaks), len(peaks)

    (small, n_small), (large, n_large) = peak_saved_bytes(8), peak_saved_bytes(32)
    assert n_large > 3 * n_small  # 4x the rows: more micro-batches, not bigger ones
    assert large <= 1.05 * small, (small, large)


@pytest.mark.parametrize("kind, hidden, intermediate, heads, kv_heads", [
    ("llama", 192, 512, 6, 6), ("qwen2", 256, 1024, 8, 2), ("qwen2", 256, 2048, 8, 2)])
def test_activation_bytes_of_the_memory_rule_of_thumb(kind, hidden, intermediate, heads, kv_heads):
    """docs/scale.md's activations (rllib_sppo.llm.memory): under bf16 autocast the residual stream, which gradient
    checkpointing keeps at every layer, stays fp32 (4 bytes a hidden unit, not 2), and a layer's saved activations
    (what its recomputation holds) are about 36 x hidden + 8 x intermediate bytes a token."""
    from transformers import AutoConfig, AutoModel

    from rllib_sppo.llm.memory import activation_bytes

    config = AutoConfig.for_model(kind, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=100)
    model = AutoModel.from_config(config, attn_implementation="sdpa")

    def saved_bytes(tokens):
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: (saved.setdefault((t.data_ptr(), t.shape, t.dtype), t.numel() * t.element_size()), t)[1],
                lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=torch.randint(0, 100, (2, tokens)), use_cache=False, output_hidden_states=True)
        assert {h.dtype for h in out.hidden_states} == {torch.float32}  # the residual stream
        return sum(saved.values())

    per_token_layer = (saved_bytes(128) - saved_bytes(64)) / (2 * 64) / 2  # (weights' bf16 copies cancel out)
    assert per_token_layer == pytest.approx(36 * hidden + 8 * intermediate, rel=0.1)
    kept = 2 * hidden * 4 * 1000  # 2 layers' fp32 inputs for 1000 tokens
    assert activation_bytes(config, 1000, chunk=1) == kept + (36 * hidden + 8 * intermediate) * 1000 + 5 * 4 * 100


def test_bf16_compute_over_fp32_master_weights_moves_weights_at_lr_1e_6(tiny):
    """model_config dtype bfloat16 with the torch learner: the parameters stay fp32 (master weights) and the forward
    runs under bf16 autocast. One AdamW step at lr 1e-6 moves each weight by lr (g / (|g| + eps) + weight_decay x w),
    which is below half of bf16's spacing at almost every weight (a bf16 weight would round back to itself); the fp32
    masters move by exactly that amount."""
    lr, wd = 1e-6, 0.01
    learner = build(tiny, dtype="bfloat16", lr=lr, critic_lr=lr, weight_decay=wd, critic_weight_decay=wd)
    module = learner.module[MODULE].unwrapped()
    head = torch.randn(module.value_head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    module.value_head.weight.data.copy_(head)  # (a zero head would leave the critic's backbone without a gradient)
    start = {k: p.detach().clone() for k, p in module.named_parameters()}
    grads, apply_gradients = {}, learner.apply_gradients

    def apply_and_keep(gradients):  # the (clipped) gradients the step uses
        apply_gradients(gradients)
        grads.update({name: p.grad.detach().clone() for name, p in module.named_parameters()})

    learner.apply_gradients = apply_and_keep
    learner.update(episodes=uneven_episodes(tiny), num_epochs=1, minibatch_size=8)  # one optimizer step
    assert grads
    lost_in_bf16 = total = 0
    for name, p in module.named_parameters():
        assert p.dtype == torch.float32, name
        w0, g = start[name].double(), grads[name].double()
        expected = -lr * (wd * w0 + g / (g.abs() + 1e-8))  # AdamW's first step: m_hat / sqrt(v_hat) = g / |g|
        moved = p.detach().double() - w0
        ulp = torch.finfo(torch.float32).eps * w0.abs()  # fp32 rounding of the new weight
        assert ((moved - expected).abs() <= ulp + 1e-3 * lr).float().mean() > 0.999, name
        w0_bf16 = start[name].bfloat16()
        lost = (w0_bf16.double() + expected).bfloat16() == w0_bf16  # what a pure-bf16 weight would have kept
        lost_in_bf16, total = lost_in_bf16 + int(lost.sum()), total + lost.numel()
    assert lost_in_bf16 > 0.95 * total  # the fp32 masters are what made the update happen


def test_float16_is_refused_with_the_fix(tiny):
    config = SPPOConfig().rl_module(rl_module_spec=RLModuleSpec(module_class=SPPOLLMModule,
                                                                model_config={"policy": tiny, "dtype": "float16"}))
    with pytest.raises(ValueError, match="dtype='float16' would need loss scaling.*use 'bfloat16'"):
        config.validate()


@pytest.mark.system
@pytest.mark.parametrize("cpus", [1, 2])
def test_rllib_train_gives_torch_the_cores_the_trial_holds(tiny_llm_experiment, tmp_path, cpus):
    """Under `rllib train` the algorithm runs in Tune's trial actor; its torch (learner, old log-probs, an in-process
    engine) uses the CPUs the trial holds, num_cpus_for_main_process, not Ray's one-thread default."""
    import json

    from rllib_sppo.cli import main

    path = tiny_llm_experiment(f"threads{cpus}", num_cpus_for_main_process=cpus)
    assert main(["train", "file", path, "--storage-path", str(tmp_path), "--stop", '{"training_iteration": 1}']) == 0
    results = [json.loads(line) for f in tmp_path.rglob("result.json") for line in f.read_text().splitlines()]
    assert results and all(r["torch_threads"] == cpus for r in results)
