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
    batch = TokenBatch()(rl_module=split.module, episodes=eps, batch={})[MODULE]
    parts = split.module[MODULE].micro_batches(batch)
    assert len(parts) == 5 and sorted(len(rows) for rows, _ in parts) == [1, 1, 1, 2, 3]
    assert all(micro["input_ids"].numel() <= 48 or len(rows) == 1 for rows, micro in parts)  # trimmed to budget
    (expected, _), (got, results) = minibatch_gradient(whole, eps), minibatch_gradient(split, eps)
    assert expected.keys() == got.keys() and len(expected) > 30
    assert any(k.startswith("critic.") for k in expected)  # the critic's gradient too
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    error = float((flat(got) - flat(expected)).norm() / flat(expected).norm())
    assert error < 1e-5, error
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


def test_bf16_compute_over_fp32_master_weights_moves_weights_at_lr_1e_6(tiny):
    """model_config dtype bfloat16 with the torch learner: the parameters stay fp32 (master weights) and the forward
    runs under bf16 autocast, so an update of 1e-6 is not lost (bf16 alone: 0.0200195 - 1e-6 rounds back to
    0.0200195). After 3 steps the bf16 run's weights have moved from the start and track the fp32 run's within bf16
    resolution."""
    assert torch.tensor(0.0200195, dtype=torch.bfloat16) - 1e-6 == torch.tensor(0.0200195, dtype=torch.bfloat16)
    eps = uneven_episodes(tiny)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        learner = build(tiny, dtype=dtype, lr=1e-6, critic_lr=1e-6, minibatch_size=4)
        start = {k: v.clone() for k, v in learner.module[MODULE].state_dict().items()}
        learner.update(episodes=eps, num_epochs=1, minibatch_size=4)  # 2 optimizer steps
        learner.update(episodes=eps, num_epochs=1, minibatch_size=4)  # 4
        runs[dtype] = (start, learner.module[MODULE].state_dict())
        assert all(v.dtype == torch.float32 for v in runs[dtype][1].values())
    start, fp32 = runs["float32"]
    _, bf16 = runs["bfloat16"]
    moved = [k for k in fp32 if (fp32[k] - start[k]).abs().max() > 1e-6]
    assert len(moved) > 0.9 * len(fp32)
    for k in moved:
        delta = (bf16[k] - start[k]).abs()
        assert delta.max() > 1e-6, k  # the bf16 run moved too
        resolution = torch.finfo(torch.bfloat16).eps * fp32[k].abs().clamp(min=1e-3)
        assert ((bf16[k] - fp32[k]).abs() <= resolution).float().mean() > 0.99, k


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
