"""Held-out accuracy before and during training of an LLM tuned example, for several seeds.

    python benchmarks/llm_curve.py tuned_examples/arith_tiny_sppo.yaml --seeds 0 1 2 --minutes 10

Evaluates (avg@k at the training temperature, the example's held-out split) before any update,
then trains for the given wall-clock minutes (evaluations not counted), evaluating every
``--eval-every`` iterations and at the end, each seed in a process of its own. Writes ``<out>.csv`` (the curve),
``<out>.md`` (the summary table) and ``<out>.png``. A run's record (the benchmarks that build on ``run_seed`` keep
them in ``<out>_runs.jsonl``) holds the answers to the first held-out problems at the last evaluation, to be read.
"""

import argparse
import csv
import json
import multiprocessing
import os
import resource
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from provenance import provenance

#: What prompt selection logs per iteration (``rllib_sppo.llm.sampler.PromptPool.metrics``; NaN without selection).
SELECTION = ("pool_outcome_variance", "selected_outcome_variance", "pool_p_mean", "pool_p_std")
#: Held-out problems whose answers at the last evaluation a run's record keeps (``answers``).
ANSWERS_KEPT = 16


def run_in_own_process(*args) -> dict:
    """``run_seed(*args)`` in a new process of its own, with that process's peak resident set (``peak_rss_gb``): each
    run starts from nothing (no memory, engine or Ray state left by the run before it; GRPO on SmolLM2 after an SPPO
    run in the same process ran out of 24 GiB) and its peak is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measured_run, *args).result()


def _measured_run(*args) -> dict:
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    return {**run_seed(*args), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _exit_with(parent: int) -> None:
    """Ends this run's process when the benchmark that started it is gone (killed or stopped: a spawned process
    outlives its parent, and would go on loading the machine)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def run_seed(path: str, seed: int, minutes: float, eval_every: int, overrides: dict,
             eval_every_s: float | None = None) -> dict:
    """Trains ``minutes`` of training time (evaluations left out), evaluating the held-out split before training, every
    ``eval_every`` iterations or, with ``eval_every_s``, every that many training seconds instead (the same time
    resolution for estimators whose iterations take different times), and at the end."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from rllib_sppo.cli import build_config, load_experiments, resolve_algorithm
    from rllib_sppo.llm.evaluation import heldout_evaluation

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
                      "update_s": result["timing_s"]["update"],
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
    module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped() if algo.learner_group.is_local else None
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--config", default="{}", help="JSON config overrides")
    p.add_argument("--out", help="output path stem (default benchmarks/results/<yaml name>)")
    args = p.parse_args()
    out = Path(args.out or f"benchmarks/results/{Path(args.yaml).stem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:  # tables after every seed: a long benchmark cut short keeps what it measured
        runs.append(run_in_own_process(args.yaml, seed, args.minutes, args.eval_every, json.loads(args.config)))
        write(runs, args, out)


def write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(runs[0]["curve"][0]))
        w.writeheader()
        for r in runs:
            w.writerows(r["curve"])
    rows = [(r["seed"], r["curve"][0][key], r["curve"][-1][key], r["iterations"], r["curve"][-1]["train_s"],
             r["tokens_per_s"], r["engine_sync_s"], r["iter_s"]) for r in runs]
    gains = [(b - a) * 100 for _, a, b, *_ in rows]
    lines = [f"# {Path(args.yaml).name}: held-out {key}, before and after {args.minutes:g} min of training", "",
             *provenance(),
             "| seed | before | after | gain (points) | iterations | train s | rollout tokens/s | "
             "weight sync s/iter | iteration s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {a:.3f} | {b:.3f} | {g:+.1f} | {n} | {t:.0f} | {tps:.0f} | {sync:.3f} | {its:.2f} |"
              for (s, a, b, n, t, tps, sync, its), g in zip(rows, gains)]
    lines += ["", f"Mean gain {np.mean(gains):+.1f} points (min {min(gains):+.1f}) over {len(rows)} seeds."]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot([c["train_s"] for c in r["curve"]], [c[key] for c in r["curve"]], marker="o", label=f"seed {r['seed']}")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel(f"held-out {key}")
    ax.set_title(Path(args.yaml).stem)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=100)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
