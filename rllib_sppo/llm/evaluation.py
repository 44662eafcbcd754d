"""Held-out evaluation for LLM runs, plugged in as RLlib's ``custom_evaluation_function``.

Config: ``evaluation_interval: N`` and
``custom_evaluation_function: rllib_sppo.llm.evaluation.heldout_accuracy``; the env_config
needs ``heldout_size > 0``. Reports ``evaluation/env_runners/accuracy/avg@k`` (share of
samples that are fully correct, reward 1.0) and ``.../accuracy/pass@k`` (share of problems
with at least one), and ``.../reward/avg@k`` (the mean reward, partial credit included),
with k = ``eval_samples_per_prompt``, sampled at the training temperature.
"""

from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EVALUATION_RESULTS
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger


def heldout_accuracy(algo, eval_env_runner_group):
    group = algo.env_runner_group
    k = algo.config.eval_samples_per_prompt
    if group.num_remote_workers() == 0:
        result = group.local_env_runner.evaluate_heldout(k)
    else:
        result = group.foreach_env_runner(lambda r: r.evaluate_heldout(k), local_env_runner=False,
                                          remote_worker_ids=group.healthy_worker_ids()[:1])[0]
    runner_metrics = MetricsLogger()
    runner_metrics.log_dict(result, window=1)
    algo.metrics.aggregate([runner_metrics.reduce()], key=(EVALUATION_RESULTS, ENV_RUNNER_RESULTS))
    steps = result["problems"] * k
    return result, steps, steps
