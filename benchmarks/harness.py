"""The harness of the LLM benchmarks in this folder: the command-line shape, seeds, one fresh process per run, the
resume loop over ``<out>_runs.jsonl``, the load average around each run, provenance, and the writers (CSV of curves,
PNG of curves). A benchmark is then what it alone measures: its variants (config overrides per label) and its table.

    p = harness.parser(__doc__, out="benchmarks/results/x")
    args = p.parse_args()
    harness.run_variants(args, {"SPPO": {}, "GRPO (N=8)": {...}}, write)   # write(runs, args, out) after each run

A run (``run_seed``) trains one tuned example for ``--minutes`` of training time, evaluating the held-out split (avg@k
and pass@k of exact answers at the training temperature) before training and as it goes, evaluations left out of the
training time. Runs go to ``<out>_runs.jsonl`` as they finish, and a rerun of the same command skips them: a long
benchmark is run, stopped and resumed in pieces, and one cut short keeps what it measured.
"""

import argparse
import contextlib
import csv
import ctypes
import fcntl
import importlib
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

#: What prompt selection logs per iteration (``rllib_sppo.llm.sampler.PromptPool.metrics``; NaN without selection).
SELECTION = ("pool_outcome_variance", "selected_outcome_variance", "pool_p_mean", "pool_p_std")
#: Held-out problems whose answers at the last evaluation a run's record keeps (``answers``), to be read.
ANSWERS_KEPT = 16
#: A run is marked as taken under load when the 1-minute load average before it exceeds this (2 cores, idle: < 0.5).
BUSY = 1.0
#: Runs whose machine probes (``machine``) differ by more than this share ran on machines of different speed: one
#: machine's probes spread by up to 27% (0.319-0.404 s, three runs in a session), two machines' speeds by 2.3x.
SPEED = 0.5


def parser(doc: str, *, seeds=(0,), minutes: float = 10.0, out: str | None = None) -> argparse.ArgumentParser:
    """The arguments every LLM benchmark takes (a benchmark adds its own): the tuned example, seeds, the training
    minutes per run, how often to evaluate, config overrides for every run, and the output path stem."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("yaml", help="an LLM tuned example")
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    p.add_argument("--minutes", type=float, default=minutes, help="training wall-clock per run")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate every this many iterations")
    p.add_argument("--eval-every-s", type=float, help="evaluate every this many training seconds instead")
    p.add_argument("--config", default="{}", help="JSON config overrides for every run (e.g. a smoke test's)")
    p.add_argument("--out", default=out, help="output path stem (default benchmarks/results/<yaml name>)")
    p.add_argument("--lock", help="hold an exclusive lock on this file during each run (flock): other work on the "
                                  "machine that takes the same lock, e.g. `flock FILE pytest`, waits for the run to end")
    return p


def out_stem(args) -> Path:
    out = Path(args.out or f"benchmarks/results/{Path(args.yaml).stem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def load_runs(out: Path) -> list[dict]:
    log = Path(f"{out}_runs.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def estimators(batch: int, minibatch: int, n: int, only=None) -> dict:
    """The compared estimators (those of ``only``, by their ``advantage_estimator`` name, if given); group estimators
    draw n samples of each of the same prompts, with n times the batch and minibatch (the same prompts per
    iteration and per optimizer step)."""
    group = {"samples_per_prompt": n, "train_batch_size_per_learner": batch * n, "minibatch_size": minibatch * n,
             "critic_init": None}
    every = {"sppo": ("SPPO (N=1)", {"advantage_estimator": "sppo"}),
             "grpo": (f"GRPO (N={n})", {"advantage_estimator": "grpo", **group}),
             "rloo": (f"RLOO (N={n})", {"advantage_estimator": "rloo", **group}),
             "ppo": ("token-level PPO (N=1)", {"advantage_estimator": "ppo"})}
    return dict(every[name] for name in (only or every))


def run_variants(args, variants: dict, write, *, yaml: str | None = None, eval_every: int | None = None) -> list:
    """Every variant on every seed (all variants of a seed before the next seed: a benchmark cut short compares like
    with like), each run in a fresh process after the machine's load settled, its record (label, seed, load average
    before and after) appended to ``<out>_runs.jsonl``; runs already there are skipped. ``write(runs, args, out)``
    after each run."""
    out = out_stem(args)
    runs = load_runs(out)
    done = {(r["label"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for label, overrides in variants.items():
            if (label, seed) in done:
                continue
            with machine_lock(getattr(args, "lock", None)):
                load_before = settled_load(BUSY)
                run = run_in_own_process(yaml or args.yaml, seed, args.minutes, eval_every or args.eval_every,
                                         {**json.loads(args.config), **overrides}, args.eval_every_s)
            run |= {"label": label, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
            runs.append(run)
            with Path(f"{out}_runs.jsonl").open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(label, seed, run["curve"][-1], flush=True)
            write(runs, args, out)
    return runs


@contextlib.contextmanager
def machine_lock(path: str | None):
    """An exclusive ``flock`` on ``path`` while the block runs (nothing without a path)."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_in_own_process(*args) -> dict:
    """``run_seed(*args)`` in a new process of its own, with that process's peak resident set (``peak_rss_gb``): each
    run starts from nothing (no memory, engine or Ray state left by the run before it; GRPO on SmolLM2 after an SPPO
    run in the same process ran out of 24 GiB) and its peak is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measured_run, *args).result()


def _measured_run(*args) -> dict:
    threading.Thread(target=exit_with, args=(os.getppid(),), daemon=True).start()
    return {"machine": machine(), **run_seed(*args),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def machine(repeats: int = 5, pause_s: float = 2.0) -> dict:
    """What a run ran on: the CPU's model name and ``probe_s``, the seconds a fixed workload of small tensors takes
    (a 4-layer MLP of width 256, forward and backward on 64 rows, 300 times, torch's default threads; the fastest of
    ``repeats``, each after a pause of ``pause_s``: the least disturbed), the kind of work a tiny policy's iteration
    is. Sessions here land on machines of different speeds (the same tuning run took 5.3 s an iteration on one, 10.8
    on the next): runs compared in wall-clock must share a machine speed, and the probe says whether they did. The
    pauses spread the repeats over some 10 s, past the seconds in which the run before shuts its Ray down: taken at
    once, one machine's probes read 0.42 to 0.67 s within an hour (2026-12-07) while the runs' own iterations said it
    had not slowed."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(256, 256), torch.nn.Tanh())])
    x = torch.randn(64, 256)
    times = []
    for _ in range(repeats):
        time.sleep(pause_s)
        start = time.perf_counter()
        for _ in range(300):
            net(x).square().mean().backward()
        times.append(time.perf_counter() - start)
    return {"cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                         if line.startswith("model name")), platform.processor()),
            "probe_s": round(min(times), 3)}


def exit_with(parent: int) -> None:
    """Ends this run's process when the benchmark that started it is gone (killed or stopped: a spawned process
    outlives its parent, and would go on loading the machine)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def run_seed(path: str, seed: int, minutes: float, eval_every: int, overrides: dict,
             eval_every_s: float | None = None) -> dict:
    """Trains ``minutes`` of training time (evaluations left out), evaluating the held-out split before training, every
    ``eval_every`` iterations or, with ``eval_every_s``, every that many training seconds instead (the same time
    resolution for estimators whose iterations take different times), and at the end. The record: the curve, the
    mean per-iteration phase seconds and rollout figures, parameter counts and the answers of the last evaluation."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from rllib_sppo.experiments import build_config, load_experiments, resolve_algorithm
    from rllib_sppo.llm.evaluation import heldout_evaluation
    from rllib_sppo.private_api import local_learner

    (name, exp), = load_experiments(path).items()
    cfg = {**exp["config"], **overrides, "seed": seed, "evaluation_interval": None}
    algo = build_config(resolve_algorithm(exp["run"], path), exp["env"], cfg, path).build_algo()
    k = algo.config.eval_samples_per_prompt
    key = f"accuracy/avg@{k}"
    evaluating, last = {"s": 0.0}, {}

    def point(iteration: int, tokens: int) -> dict:  # an evaluation, its time left out of the training time
        train_s, t0 = time.perf_counter() - start - evaluating["s"], time.perf_counter()
        result, last["samples"] = heldout_evaluation(algo)
        evaluating["s"] += time.perf_counter() - t0
        return {"seed": seed, "iteration": iteration, "train_s": train_s, "tokens": tokens,
                **{k: v for k, v in result.items() if k.startswith(("accuracy/", "reward/", "critic/"))}}

    stats, start, it, tokens = [], time.perf_counter(), 0, 0
    curve = [point(0, 0)]
    while time.perf_counter() - start - evaluating["s"] < minutes * 60:
        result = algo.train()
        it += 1
        runners = result["env_runners"]
        overlap = result.get("async_rollouts", {})  # (async_rollouts only; a synchronous run overlaps nothing)
        stats.append({"tokens_per_s": runners["rollout/tokens_per_s"], "sync_s": result["timing_s"]["weight_sync"],
                      "engine_sync_s": runners.get("timing_s/weight_sync", np.nan),
                      "update_s": result["timing_s"]["update"], "sample_s": result["timing_s"]["sample"],
                      "generate_s": runners.get("timing_s/generate", np.nan),
                      "score_s": runners.get("timing_s/score", np.nan),
                      "scoring_s": result["timing_s"].get("prompt_scoring", 0.0),  # prompt selection's critic pass
                      "iter_s": sum(result["timing_s"].values()), "overlap_s": overlap.get("overlap_s", 0.0),
                      "overlap_fraction": overlap.get("overlap_fraction", 0.0),
                      "policy_lag": overlap.get("policy_lag", 0.0),
                      **{k: runners.get(f"rollout/{k}", np.nan) for k in SELECTION}})
        tokens = int(runners.get("rollout/response_tokens_lifetime", 0))  # generated in training so far
        train_s = time.perf_counter() - start - evaluating["s"]
        if (train_s - curve[-1]["train_s"] >= eval_every_s) if eval_every_s else it % eval_every == 0:
            curve.append(point(it, tokens))
    if curve[-1]["iteration"] != it:
        curve.append(point(it, tokens))
    learner = local_learner(algo.learner_group) if algo.learner_group.is_local else None
    module = learner.module[DEFAULT_MODULE_ID].unwrapped() if learner else None
    params = {f"{part}_params": sum(p.numel() for p in getattr(module, f"{part}_parameters")()) if module else np.nan
              for part in ("policy", "critic")}
    algo.stop()
    with warnings.catch_warnings():  # (a column all NaN: no prompt selection)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {k2: float(np.nanmean([s[k2] for s in stats])) for k2 in stats[0]}
    return {"seed": seed, "key": key, "curve": curve, "iterations": it, **params, **mean,
            "answers": answers(last["samples"], ANSWERS_KEPT)}


def answers(samples: dict, problems: int) -> list:
    """What the policy wrote at an evaluation, to be read: the first ``problems`` held-out prompts (their last 120
    characters: the chat template's head is the same for all), each with its k answers and their rewards."""
    return [{"prompt": text[-120:], "answers": list(group), "rewards": [float(r) for r in rewards]}
            for text, group, rewards in zip(samples["texts"][:problems], samples["completions"], samples["rewards"])]


def rss_mb(field: str) -> float:
    """A field of this process's /proc/self/status in MB: VmRSS (resident now) or VmHWM (its peak)."""
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak_rss(trim: bool = False) -> float:
    """Resets the process's peak resident set (VmHWM) to the current one, and returns the current one (MB). With
    ``trim``, memory freed before (a warm-up's activations) is handed back to the system first (glibc's
    ``malloc_trim``): the resident set is then what is live, not what the allocator kept."""
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


def token_episodes(n: int, prompt_len: int, response_len: int, vocab: int) -> list:
    """``n`` synthetic one-step LLM episodes of random prompt and response token ids (as the LLM EnvRunner writes
    them), rewards 1 for every third: what a learner's update reads, without an engine."""
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    rng = np.random.default_rng(0)
    return [SingleAgentEpisode(
        observations=["p", "p"], actions=["r"], rewards=[float(i % 3 == 0)], terminated=True,
        infos=[{}, {}], len_lookback_buffer=0,
        extra_model_outputs={"prompt_ids": [rng.integers(10, vocab, prompt_len)],
                             "response_ids": [rng.integers(10, vocab, response_len)],
                             "engine_logp": [np.zeros(response_len, np.float32)]}) for i in range(n)]


def provenance(packages=("ray", "torch")) -> list[str]:
    """Markdown lines (ending with a blank one) naming the command, package versions and machine."""
    import torch

    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in packages)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return [f"Command: `{' '.join(['python'] + sys.argv)}`  ",
            f"Versions: {versions}, python {platform.python_version()}; {platform.machine()}, "
            f"{subprocess.getoutput('nproc')} cores, {gpu}; {time.strftime('%Y-%m-%d')}", ""]


def probe(run: dict) -> str:
    """A run's machine probe in seconds (its ``machine`` record), "-" for a run recorded before the probe existed."""
    return f"{run['machine']['probe_s']:.2f}" if "machine" in run else "-"


def same_machine(*runs: dict) -> bool:
    """Whether the runs' machine probes (their ``machine`` records) are within ``SPEED`` of each other: whether their
    seconds compare. Runs recorded before the probe existed have none and are not told apart."""
    probes = [r["machine"]["probe_s"] for r in runs if "machine" in r]
    return not probes or max(probes) <= (1 + SPEED) * min(probes)


def settled_load(busy: float = BUSY, max_wait_s: float = 150.0) -> float:
    """The 1-minute load average once it is below ``busy``, waiting at most ``max_wait_s``: a run that follows another
    of the same benchmark would otherwise record that run's own decaying load (about 3 on 2 cores, a minute to fall
    below 1) as load from elsewhere. What it returns above ``busy`` is other work on the machine."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] > busy and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def under_load(runs: list, name=lambda r: f"{r['label']} seed {r['seed']}") -> list[str]:
    """The results-table line naming the runs taken under load (load average above ``BUSY`` before the run)."""
    busy = [f"{name(r)} (load {r['load_before']} before, {r['load_after']} after)" for r in runs
            if r["load_before"] > BUSY]
    return ["", f"Runs taken under load (1-minute load average above {BUSY} before the run; 2 cores): "
                f"{', '.join(busy) if busy else 'none'}."]


def labels(runs: list) -> list[str]:
    """The runs' labels in the order they first ran."""
    return list(dict.fromkeys(r["label"] for r in runs))


def mean_range(values) -> str:
    """"mean (min-max)" of a list of numbers; "-" for none."""
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) else "-"


def reach(curve: list, key: str, target: float, x: str) -> float:
    """The first ``x`` (training seconds or tokens) at which ``key`` reached ``target``; nan if never."""
    return next((c[x] for c in curve if c[key] >= target), np.nan)


def write_curves_csv(out: Path, runs: list, label_column: str, columns: list[str]) -> None:
    """Every run's curve, one row per evaluation: its label (under ``label_column``) and ``columns``."""
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[label_column, *columns], extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerows({label_column: r["label"], **c} for c in r["curve"])


def plot_curves(out: Path, runs: list, metrics: list[str], xs=("train_s", "tokens"), target: float | None = None,
                title: str | None = None, grid: bool = False) -> None:
    """One panel per (metric, x) pair, each run a line coloured by its label; ``target`` a grey line."""
    from matplotlib.figure import Figure

    names = {"train_s": "training wall-clock (s)", "tokens": "generated response tokens"}
    panels = [(m, x) for m in metrics for x in xs]
    fig = Figure(figsize=(5.5 * len(panels), 4), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for i, label in enumerate(labels(runs)):
        for j, r in enumerate(r for r in runs if r["label"] == label):
            for ax, (metric, x) in zip(axes, panels):
                ax.plot([c[x] for c in r["curve"]], [c.get(metric, np.nan) for c in r["curve"]], marker=".",
                        color=f"C{i}", alpha=0.8, label=label if j == 0 else None)
    for ax, (metric, x) in zip(axes, panels):
        if target is not None:
            ax.axhline(target, color="grey", lw=0.5)
        ax.set_xlabel(names.get(x, x))
        ax.set_ylabel(f"held-out {metric}")
        if grid:
            ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.savefig(f"{out}.png", dpi=100)
