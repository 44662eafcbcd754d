"""Held-out evaluation for LLM runs, plugged in as RLlib's ``custom_evaluation_function``.

Config: ``evaluation_interval: N`` and
``custom_evaluation_function: rllib_sppo.llm.evaluation.heldout_accuracy``; the env_config
needs ``heldout_size > 0``. Reports ``evaluation/env_runners/accuracy/avg@k`` (share of
samples that are fully correct, reward 1.0) and ``.../accuracy/pass@k`` (share of problems
with at least one), and ``.../reward/avg@k`` (the mean reward, partial credit included),
with k = ``eval_samples_per_prompt``, sampled at the training temperature.

With SPPO's critic (``SPPOConfig.prompt_critic``), also how well it predicts those outcomes
before generating: each held-out problem's p = sigmoid(critic logit), never trained on,
against its k outcomes: ``critic/heldout_brier``, ``critic/heldout_ece``,
``critic/heldout_auroc`` (of p for "solved at least once"), ``critic/heldout_spearman`` (p
against the solve rate), and the reliability diagram's bins as ``reliability/bin<b>/...``
(``monitoring.plot_reliability`` draws them at the end of ``rllib train``).
"""

from __future__ import annotations

import numpy as np
import torch
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EVALUATION_RESULTS
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from rllib_sppo.core import critic_calibration, reliability_bins
from rllib_sppo.llm.critic import critic_logits

#: The reliability diagram's bins in a result: ``reliability/bin<b>/{problems, p_mean, solve_rate}``.
RELIABILITY = "reliability"
RELIABILITY_FIELDS = ("problems", "p_mean", "solve_rate")


def heldout_report(samples: dict, logits=None) -> dict:
    """The held-out metrics of ``LLMEnvRunner.heldout_samples``' output; with the critic's ``logits`` of the same
    problems, its calibration too, and the reliability diagram under ``"reliability"``: ``[{"bin": b, "problems": n,
    "p_mean": ..., "solve_rate": ...}]`` for 10 equal-width bins of p (the means None in an empty bin)."""
    rewards = np.asarray(samples["rewards"], dtype=np.float64)
    k, solved = rewards.shape[1], rewards == 1.0
    report = {"problems": len(rewards), f"accuracy/avg@{k}": float(solved.mean()),
              f"accuracy/pass@{k}": float(solved.any(1).mean()), f"reward/avg@{k}": float(rewards.mean()),
              "rollout/parse_failure_rate": float(1.0 - np.mean(samples["parsed"]))}
    if logits is None:
        return report
    p, solved = torch.sigmoid(torch.as_tensor(logits, dtype=torch.float64)), torch.as_tensor(solved)
    report |= {f"critic/heldout_{name}": value for name, value in critic_calibration(p, solved).items()}
    count, p_mean, rate_mean = reliability_bins(p, solved.double().mean(1))
    report[RELIABILITY] = [{"bin": b, "problems": int(count[b]), "p_mean": float(p_mean[b]) if count[b] else None,
                            "solve_rate": float(rate_mean[b]) if count[b] else None} for b in range(len(count))]
    return report


def heldout_evaluation(algo) -> tuple[dict, dict]:
    """``heldout_report`` (with SPPO's critic, its calibration too) and the samples it was made from
    (``LLMEnvRunner.heldout_samples``: the prompts, completions and rewards), ``eval_samples_per_prompt`` a problem,
    from the algorithm's sampling runner (the local one, or the first healthy remote one)."""
    group, k = algo.env_runner_group, algo.config.eval_samples_per_prompt
    if group.num_remote_workers() == 0:
        samples = group.local_env_runner.heldout_samples(k)
    else:
        samples = group.foreach_env_runner(lambda r: r.heldout_samples(k), local_env_runner=False,
                                           remote_worker_ids=group.healthy_worker_ids()[:1])[0]
    logits = critic_logits(algo.learner_group, samples["texts"]) if algo.config.prompt_critic else None
    return heldout_report(samples, logits), samples


def heldout_accuracy(algo, eval_env_runner_group):
    result, _ = heldout_evaluation(algo)
    result |= {f"{RELIABILITY}/bin{b['bin']}/{name}": b[name] for b in result.pop(RELIABILITY, [])
               for name in RELIABILITY_FIELDS if b[name] is not None}  # (a bin's means only where it has problems)
    runner_metrics = MetricsLogger()
    runner_metrics.log_dict(result, window=1)
    algo.metrics.aggregate([runner_metrics.reduce()], key=(EVALUATION_RESULTS, ENV_RUNNER_RESULTS))
    steps = result["problems"] * algo.config.eval_samples_per_prompt
    return result, steps, steps
