"""Watching a run: SPPO's metrics as Prometheus series (Ray dashboard), console progress, training curves.

- ``export_metrics``: an RLlib ``on_train_result`` callback (``SPPOConfig`` installs it) setting one
  ``ray.util.metrics.Gauge`` per SPPO metric. The name is the console name made Prometheus-safe,
  ``rollout/tokens_per_s`` -> ``sppo_rollout_tokens_per_s`` (``@`` -> ``_at_``); tags: ``experiment``,
  ``trial`` and ``source``, the result group it came from (``algorithm``, ``env_runners``,
  ``learners/default_policy``, ``evaluation/env_runners``). Ray's metrics agent exports them prefixed ``ray_``.
- ``Progress``: a Tune callback printing one line per result (at most every ``interval_s``).
- ``plot_curves``: a finished trial's return and held-out accuracy vs iteration and env steps, as a PNG.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import sys
import time

from ray import tune
from ray.tune.utils import flatten_dict
from ray.util.metrics import Gauge

#: Console namespaces SPPO logs into (plus RLlib's episode_return_mean, the outcome mean).
NAMESPACES = ("policy", "critic", "rollout", "timing_s", "accuracy")
_GROUP = re.compile(r"^(evaluation/env_runners|env_runners|learners/[^/]+)/(.+)$")
_GAUGES: dict[str, Gauge] = {}

RETURN = "env_runners/episode_return_mean"
ACCURACY = "evaluation/env_runners/accuracy/"
TOKENS_PER_S = "env_runners/rollout/tokens_per_s"
ENV_STEPS = "num_env_steps_sampled_lifetime"
#: Stop keys that grow steadily with time: an ETA can be read from them.
PROGRESS_KEYS = ("training_iteration", "time_total_s", ENV_STEPS, f"env_runners/{ENV_STEPS}")


def _label(key: str) -> str:
    """The console name of a result key: ``evaluation/env_runners/accuracy/avg@4`` -> ``accuracy/avg@4``."""
    return key.split("env_runners/")[-1]


def prometheus_name(console_name: str) -> str:
    return "sppo_" + re.sub(r"[^a-zA-Z0-9_]", "_", console_name.replace("@", "_at_"))


def export_metrics(algorithm, result: dict, **kwargs) -> None:
    """``on_train_result``: this iteration's SPPO metrics into Ray's metrics agent (dashboard, Prometheus)."""
    info = algorithm._trial_info
    tags = {"experiment": info.experiment_name if info else "default", "trial": algorithm.trial_name}
    for key, value in flatten_dict(result, delimiter="/").items():
        match = _GROUP.match(key)
        source, name = match.groups() if match else ("algorithm", key)
        if name.split("/")[0] not in NAMESPACES and name != "episode_return_mean":
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        metric = prometheus_name(name)
        if metric not in _GAUGES:
            _GAUGES[metric] = Gauge(metric, f"SPPO {name}", tag_keys=("experiment", "trial", "source"))
        _GAUGES[metric].set(float(value), tags={**tags, "source": source})


class Progress(tune.Callback):
    """One console line per trial result, at most every ``interval_s``: iteration, return, held-out accuracy,
    rollout tokens/s and, when the stop has an iteration, time or env-step limit, the time left."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._last = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        now = time.monotonic()
        if now - self._last.get(trial.trial_id, -math.inf) < self.interval_s:
            return
        self._last[trial.trial_id] = now
        flat = flatten_dict(result, delimiter="/")
        it, stop = flat["training_iteration"], trial.stopping_criterion
        parts = [f"iter {it}" + (f"/{stop['training_iteration']}" if "training_iteration" in stop else "")]
        parts += [f"return {flat[RETURN]:.4g}"] if RETURN in flat else []
        parts += [f"{_label(k)} {v:.3f}" for k, v in sorted(flat.items()) if k.startswith(ACCURACY)]
        parts += [f"tokens/s {flat[TOKENS_PER_S]:.0f}"] if TOKENS_PER_S in flat else []
        elapsed = flat["time_total_s"]
        etas = [elapsed * (stop[k] - flat[k]) / flat[k] for k in PROGRESS_KEYS if k in stop and flat.get(k)]
        parts += [f"ETA {datetime.timedelta(seconds=round(max(0.0, min(etas))))}"] if etas else []
        print(f"rllib: {trial} " + " | ".join(parts), file=sys.stderr, flush=True)


def plot_curves(result) -> str | None:
    """``curves.png`` in the trial's folder: return (and held-out accuracy) vs iteration and vs env steps."""
    from matplotlib.figure import Figure  # no pyplot: Agg, no global state

    df = result.metrics_dataframe
    if df is None or not {RETURN, ENV_STEPS} <= set(df):
        return None
    metrics = [RETURN] + sorted(c for c in df if c.startswith(ACCURACY))
    fig = Figure(figsize=(5 * len(metrics), 6.5), layout="tight")
    axes = fig.subplots(2, len(metrics), squeeze=False)
    for col, metric in enumerate(metrics):
        data = df[["training_iteration", ENV_STEPS, metric]].dropna()
        for ax, x in zip(axes[:, col], ("training_iteration", ENV_STEPS)):
            ax.plot(data[x], data[metric], marker=".")
            ax.set(xlabel=x, ylabel=_label(metric))
            ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(result.path))
    path = os.path.join(result.path, "curves.png")
    fig.savefig(path, dpi=100)
    return path
