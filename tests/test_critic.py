"""The critic as an instrument: prompt selection by its prediction, its calibration on the held-out split, and a
smaller critic. Real module, runner, Ray and engine where a user runs them for real."""

import math
from collections import Counter

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from rllib_sppo import SPPOConfig
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.llm.critic import score_prompt_candidates
from rllib_sppo.llm.evaluation import heldout_report
from rllib_sppo.llm.sampler import EpochSampler, PromptPool
from rllib_sppo.private_api import local_learner
from rllib_sppo.torch.llm_rl_module import SPPOLLMModule
from test_core import HELDOUT_P, HELDOUT_SOLVED
from test_llm import llm_config

TEXT = gym.spaces.Text(64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


def logit(p):
    return math.log(p / (1 - p))


def variance(z):
    p = 1 / (1 + math.exp(-z))
    return p * (1 - p)


def test_the_pool_poses_prompts_in_proportion_to_outcome_variance_plus_floor():
    """Two prompts, both in the pool every round: the critic is unsure of one (p = 0.5: weight 0.25 + 0.05) and sure
    of the other (p = 0.99: 0.0099 + 0.05). Each round poses one, the first with chance 0.30 / 0.3599."""
    pool = PromptPool(EpochSampler(2, seed=0), pool=2, floor=0.05, seed=0)
    known = {0: 0.0, 1: logit(0.99)}
    posed = Counter()
    for _ in range(2000):
        candidates = pool.candidates(1)
        assert sorted(candidates) == [0, 1]
        pool.score(candidates, [known[i] for i in candidates])
        posed.update(pool.take(1))
    assert posed[0] / 2000 == pytest.approx(0.30 / (0.30 + 0.0099 + 0.05), abs=0.03)
    assert posed[1] > 0  # the floor: the prompt the critic is sure about is still posed
    metrics = pool.metrics()
    assert metrics["rollout/selected_outcome_variance"] > metrics["rollout/pool_outcome_variance"]


def test_the_pool_loses_no_prompt_and_the_floor_keeps_every_prompt_reachable():
    """40 prompts: the critic is unsure of 20 (p = 0.5) and sure of 20 (p = 1 - 1e-5: weight ~ the floor alone).
    5 posed per round from 20 candidates: the unsure ones go first, the sure ones wait in the pool and are all posed
    in time; at every round what was drawn from the sampler is exactly what was posed plus what waits."""
    class Recorded(EpochSampler):
        drawn = []

        def draw(self, k):
            self.drawn = self.drawn + super().draw(k)
            return self.drawn[-k:]

    sampler = Recorded(40, seed=1)
    pool = PromptPool(sampler, pool=4, floor=0.05, seed=1)
    known = {i: 0.0 if i < 20 else logit(1 - 1e-5) for i in range(40)}
    posed, first_rounds = [], []
    for round_ in range(60):
        candidates = pool.candidates(5)
        assert len(candidates) == len(set(candidates)) == 20
        pool.score(candidates, [known[i] for i in candidates])
        taken = pool.take(5)
        assert set(taken) <= set(candidates) and not set(taken) & set(pool.pending)
        posed += taken
        # Nothing lost: every prompt drawn was posed or waits; none posed more often than drawn (one drawn again
        # while it waits is not added twice).
        assert set(sampler.drawn) == set(posed) | set(pool.pending)
        assert not Counter(posed) - Counter(sampler.drawn)
        if round_ < 2:
            first_rounds += taken
    assert set(posed) == set(range(40))  # every prompt reachable
    assert sum(i < 20 for i in first_rounds) >= 8  # of the first 10 posed, mostly the unsure ones
    waited = pool.metrics()
    assert waited["rollout/prompts_deferred"] == 15 and waited["rollout/deferred_rounds_max"] >= 1
    # Each prompt is posed once per time it enters the pool: never more often than the epochs drawn (plus one).
    assert max(Counter(posed).values()) <= sampler.epoch + 1


def test_the_pool_resumes_where_it_was():
    def run(pool, rounds):
        out = []
        for _ in range(rounds):
            candidates = pool.candidates(3)
            pool.score(candidates, [0.3 * (i % 7) - 1 for i in candidates])
            out.append(pool.take(3))
        return out

    sampler = EpochSampler(30, seed=2)
    pool = PromptPool(sampler, pool=3, floor=0.05, seed=[2, 0])
    run(pool, 4)
    state = {"sampler": sampler.get_state(), "pool": pool.get_state()}
    straight = run(pool, 5)
    resumed_sampler = EpochSampler(30, seed=2)
    resumed_sampler.set_state(state["sampler"])
    resumed = PromptPool(resumed_sampler, pool=3, floor=0.05, seed=[2, 0])
    resumed.set_state(state["pool"])
    assert run(resumed, 5) == straight


@pytest.mark.parametrize("selection, message", [
    ("yes", "prompt_selection must be a dict such as"),
    ({"pool": 4, "temperature": 1}, r"unknown key\(s\) \['temperature'\]"),
    ({"pool": 1}, "pool=1: candidates scored per prompt posed, an int >= 2"),
    ({"pool": 2.5}, "pool=2.5"),
    ({"weight": "variance"}, r"unknown key\(s\) \['weight'\]; its keys are pool and floor"),
    ({"floor": 0}, "floor=0 must be a number > 0: it keeps every prompt reachable"),
])
def test_prompt_selection_config_says_how_to_fix(tiny, selection, message):
    with pytest.raises(ValueError, match=message):
        llm_config(tiny, "transformers", prompt_selection=selection).validate()


def test_prompt_selection_needs_the_critic_of_the_prompt_and_the_llm_runner(tiny):
    llm_config(tiny, "transformers", prompt_selection={}).validate()  # the defaults
    with pytest.raises(ValueError, match="prompt_selection scores prompts with SPPO's critic.*'grpo'"):
        llm_config(tiny, "transformers", prompt_selection={}, advantage_estimator="grpo",
                   samples_per_prompt=4).validate()
    with pytest.raises(ValueError, match="critic_loss='mse' has none"):
        llm_config(tiny, "transformers", prompt_selection={}, critic_loss="mse").validate()
    with pytest.raises(ValueError, match="set env_runner_cls to rllib_sppo.llm.runner.LLMEnvRunner"):
        SPPOConfig().environment("OutcomeCartPole-v1").training(prompt_selection={"pool": 2}).validate()


def set_value_head(module, texts, seed=0):
    """A value head set by hand: a random direction, scaled so that the logits of ``texts`` have mean 0 and std 3
    (p from ~0.01 to ~0.99)."""
    with torch.no_grad():
        module.value_head.weight.copy_(torch.randn(module.value_head.weight.shape,
                                                   generator=torch.Generator().manual_seed(seed)))
        module.value_head.weight.mul_(3.0 / module.prompt_values(texts).std())
        module.value_head.bias.fill_(float(-module.prompt_values(texts).mean()))


@pytest.mark.parametrize("remote", [0, pytest.param(1, marks=pytest.mark.system)])
def test_selection_poses_the_prompts_the_critic_is_unsure_of(tiny, ray_session, remote):
    """A critic set by hand; its logit of every training prompt is read first (the known outputs). The runner's
    candidates (pool x the prompts of one sample) are scored by the learner, and the prompts posed have a higher mean
    p (1 - p) than the candidates they were chosen from. Locally and on a remote EnvRunner."""
    algo = (llm_config(tiny, "transformers", prompt_selection={"pool": 4, "floor": 0.01}, max_response_tokens=2,
                       train_batch_size_per_learner=8, minibatch_size=8, critic_lr=1e-9)
            .env_runners(num_env_runners=remote, num_envs_per_env_runner=8, num_cpus_per_env_runner=0.5)
            .evaluation(evaluation_interval=None).build_algo())
    group = algo.env_runner_group
    runner_call = ((lambda fn: group.foreach_env_runner(fn, local_env_runner=False)[0]) if remote
                   else (lambda fn: fn(algo.env_runner)))
    texts = runner_call(lambda r: r.env.splits["train"].texts)
    module = local_learner(algo.learner_group).module[DEFAULT_MODULE_ID].unwrapped()
    set_value_head(module, texts)
    known = dict(zip(texts, module.prompt_values(texts).tolist()))
    candidates = runner_call(lambda r: r.prompt_candidates())  # what the driver's scoring will find
    assert len(candidates["indices"]) == 32
    score_prompt_candidates(group, algo.learner_group)
    posed = [e.get_observations(0) for e in runner_call(lambda r: r.sample())]
    assert len(posed) == 8 and set(posed) <= set(candidates["texts"])
    pool_variance = np.mean([variance(known[t]) for t in candidates["texts"]])
    assert np.mean([variance(known[t]) for t in posed]) > pool_variance + 0.02
    metrics = {k: float(v) for k, v in runner_call(lambda r: r.get_metrics()).items() if k.startswith("rollout/")}
    assert metrics["rollout/pool_outcome_variance"] == pytest.approx(pool_variance, rel=1e-4)
    assert metrics["rollout/prompts_deferred"] == 24 and metrics["rollout/prompts_unscored"] == 0
    # In training: the scoring's seconds, beside the other phases.
    result = algo.train()
    algo.stop()
    assert result["timing_s"]["prompt_scoring"] > 0
    runners = result["env_runners"]
    assert runners["rollout/selected_outcome_variance"] > runners["rollout/pool_outcome_variance"]


def test_heldout_report_has_the_critics_calibration():
    """The made-up held-out set of test_core, through the evaluation's report: p = sigmoid(logit)."""
    samples = {"texts": [f"q{i}" for i in range(5)], "rewards": HELDOUT_SOLVED.numpy() * 1.0,
               "parsed": [True] * 20}
    report = heldout_report(samples, [logit(p) for p in HELDOUT_P.tolist()])
    assert report["accuracy/avg@4"] == 8 / 20 and report["accuracy/pass@4"] == 3 / 5
    assert report["critic/heldout_brier"] == pytest.approx((0.0025 + 0.2644 + 0.2824 + 0.0225 + 0.4624) / 5)
    assert report["critic/heldout_ece"] == pytest.approx((0.05 + 3 * abs(0.66 - 1 / 3) + 0.15) / 5)
    assert report["critic/heldout_auroc"] == pytest.approx(0.75)
    assert report["critic/heldout_spearman"] == pytest.approx(6 / math.sqrt(85.5))
    bins = {b["bin"]: b for b in report["reliability"]}
    assert len(bins) == 10 and bins[0] == {"bin": 0, "problems": 0, "p_mean": None, "solve_rate": None}
    assert bins[6]["problems"] == 3 and bins[6]["p_mean"] == pytest.approx(0.66)
    assert "critic/heldout_brier" not in heldout_report(samples)  # no critic, no calibration


def test_a_critic_of_the_first_layers(tiny):
    """critic_layers=2: the critic is the policy's embeddings, first 2 of its 4 layers and final norm, pretrained."""
    module = SPPOLLMModule(observation_space=TEXT, action_space=TEXT,
                           model_config={"policy": tiny, "critic_layers": 2})
    assert len(module.critic.layers) == 2 and len(module.policy.model.layers) == 4
    policy = dict(module.policy.model.named_parameters())
    critic = dict(module.critic.named_parameters())
    assert critic.keys() < policy.keys() and all(torch.equal(critic[k], policy[k]) for k in critic)
    n_critic = sum(p.numel() for p in module.critic_parameters())
    assert n_critic < 0.6 * sum(p.numel() for p in module.policy_parameters())
    with pytest.raises(ValueError, match="critic_layers=5: the critic's backbone .* has 4 layers; pick an int from 1"):
        SPPOLLMModule(observation_space=TEXT, action_space=TEXT, model_config={"policy": tiny, "critic_layers": 5})
    with pytest.raises(ValueError, match="'grpo' has no critic, so model_config's critic and critic_layers"):
        (llm_config(tiny, "transformers", advantage_estimator="grpo", samples_per_prompt=4)
         .rl_module(model_config={"critic_layers": 2}).validate())
