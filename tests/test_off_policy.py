"""Off-policy rollouts for real (RLlib, Ray actors, the transformers engine): truncated importance sampling of an
engine that generates with other weights than the learner's, and one-step-off-policy (asynchronous) rollouts on a
remote EnvRunner, their weights one update behind, their checkpoint and resume."""

import copy
import itertools
import time

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from transformers import AutoModelForCausalLM

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.llm.connectors import TokenBatch
from rllib_sppo.llm.runner import LLMEnvRunner
from rllib_sppo.private_api import local_learner
from rllib_sppo.torch import sppo_torch_learner

MODULE = DEFAULT_MODULE_ID


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


def config(tiny, runners=0, **training):
    return (SPPOConfig().llm(policy=tiny)
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 200,
                                                           "chat_template_model": tiny})
            .env_runners(num_env_runners=runners, num_envs_per_env_runner=8,
                         num_cpus_per_env_runner=0.5)
            .training(**{"lr": 1e-3, "critic_lr": 1e-3, "train_batch_size_per_learner": 8, "minibatch_size": 8,
                         "max_response_tokens": 8, "rollout_engine": "transformers", **training})
            .debugging(seed=0))


def response_logp(model, batch, temperature=0.6):
    """log pi(token) at the temperature on the batch's response positions [B, L-1] (0 elsewhere), one full forward."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, batch["input_ids"][:, 1:, None])
    return logp.squeeze(-1) * batch["response_mask"]


def spy(monkeypatch, owner, name, calls):
    """Records the arguments of each call to ``owner.name`` (which still runs)."""
    real = getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)


def test_tis_weighs_a_perturbed_engines_tokens_by_the_capped_ratio(tiny, ray_session, monkeypatch):
    """The engine generates with weights the learner does not have (noise added to its copy): the learner's old
    log-probs differ from the engine's, and each token's policy loss is weighed by min(pi_learner / pi_engine, cap),
    computed here from the two models themselves."""
    cap = 1.5
    algo = config(tiny, tis_cap=cap).build_algo()
    engine = algo.env_runner.engine.model
    torch.manual_seed(0)
    with torch.no_grad():
        for p in engine.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    perturbed, learner = copy.deepcopy(engine), AutoModelForCausalLM.from_pretrained(tiny)
    losses, batches = [], []
    spy(monkeypatch, sppo_torch_learner, "ppo_clip_loss", losses)
    spy(monkeypatch, TokenBatch, "__call__", batches)
    result = algo.train()["learners"][MODULE]
    algo.stop()
    [(args, kwargs)] = losses  # one minibatch, one micro-batch
    batch = batches[0][1]["batch"][MODULE]
    mask = batch["response_mask"]
    ratio = torch.exp(response_logp(learner, batch) - response_logp(perturbed, batch))[mask == 1]
    assert ratio.std() > 0.05 and 0 < (ratio > cap).float().mean() < 0.5  # ratios != 1, some capped
    assert torch.allclose(kwargs["weights"][mask == 1], ratio.clamp(max=cap), rtol=1e-4)
    assert (kwargs["weights"][mask == 0] == 0).all()
    assert result["rollout/is_ratio_max"] == pytest.approx(float(ratio.max()), rel=1e-4)
    assert result["rollout/is_ratio_min"] == pytest.approx(float(ratio.min()), rel=1e-4)
    assert result["rollout/is_ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-4)
    assert result["rollout/is_capped_frac"] == pytest.approx(float((ratio > cap).float().mean()), rel=1e-4)


def gated_runner(gate):
    """An LLM EnvRunner that samples its batch n (n >= 2) only once the learner's update n - 1 has started (files in
    ``gate``); ``gate_updates`` makes each update end only once the runner's next batch has started. Together: every
    batch after the first is sampled while an update runs, on any machine load (left alone, a fast sample could end
    before the update it should overlap has begun). A class made here is sent to the runner's process whole."""
    class GatedRunner(LLMEnvRunner):
        batches = 0

        def sample(self, **kwargs):
            self.batches += 1
            (gate / f"sample_{self.batches}").touch()
            if self.batches > 1:
                self.wait_for_file(gate / f"update_{self.batches - 1}")
            return super().sample(**kwargs)

        @staticmethod
        def wait_for_file(path, seconds: float = 300) -> None:
            by = time.monotonic() + seconds
            while not path.exists():
                assert time.monotonic() < by, f"{path.name} did not appear within {seconds} s"
                time.sleep(0.01)

    return GatedRunner


def gate_updates(algo, gate, monkeypatch) -> None:
    update, started = algo.learner_group.update, itertools.count(1)

    def gated(**kwargs):
        n = next(started)
        (gate / f"update_{n}").touch()
        result = update(**kwargs)
        algo.config.env_runner_cls.wait_for_file(gate / f"sample_{n + 1}")
        return result

    monkeypatch.setattr(algo.learner_group, "update", gated)


@pytest.mark.system
def test_async_rollouts_sample_each_batch_with_the_weights_one_update_behind(tiny, ray_session, monkeypatch,
                                                                             tmp_path):
    """One remote EnvRunner, async: iteration t (from 1) trains on a batch sampled with the weights of update t-2
    (the first two with the initial ones), while the runner samples the next. The fingerprint: the engine's log-probs
    of each batch are those of the learner's policy after update t-2, not after t-1. The runner and the updates are
    gated so that each batch is sampled during an update, as the design intends, whatever the machine's load."""
    algo = config(tiny, runners=1, async_rollouts=True, tis_cap=2.0).env_runners(
        env_runner_cls=gated_runner(tmp_path)).build_algo()
    gate_updates(algo, tmp_path, monkeypatch)
    learner = local_learner(algo.learner_group)
    policies = [copy.deepcopy(learner.module[MODULE].unwrapped().policy)]  # after update 0, 1, 2, ...
    batches = []
    spy(monkeypatch, TokenBatch, "__call__", batches)
    results = []
    for _ in range(4):
        results.append(algo.train())
        policies.append(copy.deepcopy(learner.module[MODULE].unwrapped().policy))
    algo.stop()
    for t, (result, call) in enumerate(zip(results, batches), start=1):
        behind = max(t - 2, 0)
        assert result["env_runners"]["weights_seq_no"] == behind
        assert result["learners"][MODULE]["weights_seq_no"] == t
        assert result["async_rollouts"]["policy_lag"] == (t - 1) - behind
        batch = call[1]["batch"][MODULE]
        mask = batch["response_mask"] == 1
        gap = lambda i: float((response_logp(policies[i], batch) - batch["engine_logp"])[mask].abs().max())  # noqa
        assert gap(behind) < 1e-4
        stats = result["learners"][MODULE]
        weights = [dict(policies[i].named_parameters())["model.embed_tokens.weight"] for i in (t - 1, t)]
        assert not torch.equal(*weights)  # the learner keeps training
        if t == 1:  # sampled with the learner's own weights: importance ratios of 1
            assert abs(stats["rollout/is_ratio_min"] - 1) < 1e-3 and abs(stats["rollout/is_ratio_max"] - 1) < 1e-3
            continue
        # The learner's weights at this update are one step ahead of the engine's; the batch was sampled while the
        # learner updated on the one before.
        assert gap(t - 1) > 1e-3 and stats["rollout/is_ratio_min"] < 1 < stats["rollout/is_ratio_max"]
        assert result["async_rollouts"]["overlap_s"] > 0 and 0 < result["async_rollouts"]["overlap_fraction"] <= 1


def test_async_rollouts_are_refused_where_they_cannot_run(tiny):
    with pytest.raises(ValueError, match="with num_env_runners=0 the only EnvRunner samples in the learner's own "
                                         "process, so nothing can overlap"):
        config(tiny, async_rollouts=True, tis_cap=2.0).validate()
    with pytest.raises(ValueError, match="set tis_cap"):
        config(tiny, runners=1, async_rollouts=True).validate()
    with pytest.raises(ValueError, match="max_requests_in_flight_per_env_runner=2"):
        config(tiny, runners=1, async_rollouts=True, tis_cap=2.0).env_runners(
            max_requests_in_flight_per_env_runner=2).validate()
    with pytest.raises(ValueError, match="tis_cap=0.5 caps importance weights"):
        config(tiny, tis_cap=0.5).validate()
    with pytest.raises(ValueError, match="SPPOMLPModule samples with the learner's own network"):
        SPPOConfig().environment("OutcomeCartPole-v1").training(tis_cap=2.0).validate()
    with pytest.raises(ValueError, match="async_rollouts needs the LLM EnvRunner"):
        SPPOConfig().environment("OutcomeCartPole-v1").env_runners(num_env_runners=1).training(
            async_rollouts=True).validate()


@pytest.mark.system
def test_async_resume_samples_the_batch_in_flight_again(tiny, ray_session, tmp_path):
    """1 + 2 iterations straight and 1, save, restore, 2 draw the same prompts: the checkpoint, taken while the
    runner samples batch 2, holds its data position before batch 2, so the resumed run draws batch 2's prompts again
    (20 training prompts, 8 per batch: the epoch ends in batch 3)."""
    from ray.rllib.algorithms.algorithm import Algorithm

    def place(algo):  # the remote runner's epoch and position (after the batch it has in flight)
        [where] = algo.env_runner_group.foreach_env_runner(
            lambda r: (r.sampler.epoch, r.sampler.pos), local_env_runner=False)
        return where

    settings = (config(tiny, runners=1, async_rollouts=True, tis_cap=2.0)
                .environment(env_config={"source": "arithmetic", "size": 24, "heldout_size": 4,
                                         "chat_template_model": tiny}))
    algo = settings.build_algo()
    algo.train()
    path = algo.save_to_path(str(tmp_path / "ckpt"))
    straight = [(algo.train(), place(algo))[1] for _ in range(2)]
    algo.stop()
    resumed = Algorithm.from_checkpoint(path)
    assert place(resumed) == (0, 8)  # before batch 2: batch 1's 8 prompts drawn
    assert [(resumed.train(), place(resumed))[1] for _ in range(2)] == straight == [(1, 4), (1, 12)]
    resumed.stop()
