"""SPPO (N=1) vs GRPO (N=8) vs RLOO (N=8) vs token-level PPO (N=1, as verl runs it) on one LLM task, side by side in
one invocation: same YAML, model, seeds, machine, prompts per iteration and training wall-clock budget.

    python benchmarks/llm_compare.py tuned_examples/arith_tiny_sppo.yaml --seeds 0 1 2 --minutes 10

Each run goes through ``llm_curve.run_seed`` in a process of its own (held-out avg@k and pass@k of exact answers at
the training temperature, evaluations left out of the training time). Critic-free estimators build and run no critic.
Every run records the load average before and after it and is marked when something else loaded the machine. Writes, per
estimator, the final held-out accuracy (mean and range over seeds), the training seconds and generated tokens each
seed needed to reach GRPO's final accuracy (the mean over its seeds), and the SPPO : GRPO ratio per seed, to
``benchmarks/results/<out>.{md,csv,png}``; runs go to ``<out>_runs.jsonl`` as they finish, and a rerun skips them.
"""

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np

from llm_curve import run_in_own_process
from provenance import BUSY, provenance, settled_load, under_load



def variants(batch: int, minibatch: int, n: int) -> dict:
    """The compared estimators; group estimators draw n samples of each of the same prompts."""
    group = {"samples_per_prompt": n, "train_batch_size_per_learner": batch * n, "minibatch_size": minibatch * n,
             "critic_init": None}
    return {"SPPO (N=1)": {"advantage_estimator": "sppo"},
            f"GRPO (N={n})": {"advantage_estimator": "grpo", **group},
            f"RLOO (N={n})": {"advantage_estimator": "rloo", **group},
            "token-level PPO (N=1)": {"advantage_estimator": "ppo"}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock per estimator and seed")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-every-s", type=float, help="evaluate every this many training seconds instead")
    p.add_argument("--n", type=int, default=8, help="samples per prompt of GRPO and RLOO")
    p.add_argument("--out", default="benchmarks/results/llm_compare", help="output path stem")
    args = p.parse_args()
    from rllib_sppo.cli import load_experiments

    (_, exp), = load_experiments(args.yaml).items()
    cfg = exp["config"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(f"{out}_runs.jsonl")
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["label"], r["seed"]) for r in runs}
    compared = variants(cfg["train_batch_size_per_learner"], cfg["minibatch_size"], args.n)
    for seed in args.seeds:  # every estimator on a seed before the next seed: a run cut short compares like with like
        for label, overrides in compared.items():
            if (label, seed) in done:
                continue
            load_before = settled_load(BUSY)
            run = run_in_own_process(args.yaml, seed, args.minutes, args.eval_every, overrides, args.eval_every_s)
            run |= {"label": label, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
            runs.append(run)
            with log.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(label, seed, run["curve"][-1], flush=True)
            write(runs, args, out)


def reach(curve: list, key: str, target: float, x: str) -> float:
    """The first ``x`` (training seconds or tokens) at which ``key`` reached ``target``; nan if never."""
    return next((c[x] for c in curve if c[key] >= target), np.nan)


def write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    pass_key = key.replace("avg@", "pass@")
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["estimator", "seed", "iteration", "train_s", "tokens", key, pass_key],
                           extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerows({"estimator": r["label"], **c} for c in r["curve"])
    labels = list(dict.fromkeys(r["label"] for r in runs))
    grpo = [r["curve"][-1][key] for r in runs if r["label"].startswith("GRPO")]
    target = float(np.mean(grpo)) if grpo else np.nan
    fmt = lambda v: f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if len(v) else "-"  # noqa: E731
    its = lambda v: f"{np.mean(v):.0f} ({min(v)}-{max(v)})"  # noqa: E731
    lines = [f"# {Path(args.yaml).name}: SPPO vs GRPO vs RLOO vs token-level PPO, held-out {key} and {pass_key}", "",
             *provenance(),
             f"Exact answers only (a sample counts when the verifier says it is fully right). Same prompts per "
             f"iteration for all; {args.minutes:g} min of training per run (evaluations not counted). Target = GRPO's "
             f"final {key}, the mean over its seeds ({target:.3f}). Mean (min-max) over seeds.", "",
             f"| estimator | seeds | {key} before | {key} after | {pass_key} after | iterations | generated tokens | "
             "training s to reach the target | tokens to reach it |", "|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        sel = [r for r in runs if r["label"] == label]
        reached_s = [reach(r["curve"], key, target, "train_s") for r in sel]
        reached_tokens = [reach(r["curve"], key, target, "tokens") for r in sel]
        per_seed = lambda xs: " / ".join("never" if np.isnan(x) else f"{x:,.0f}" for x in xs)  # noqa: E731
        first, last = [r["curve"][0] for r in sel], [r["curve"][-1] for r in sel]
        lines.append(
            f"| {label} | {len(sel)} | {fmt([c[key] for c in first])} | {fmt([c[key] for c in last])} "
            f"| {fmt([c.get(pass_key, np.nan) for c in last])} | {its([r['iterations'] for r in sel])} "
            f"| {np.mean([c['tokens'] for c in last]):,.0f} | {per_seed(reached_s)} | {per_seed(reached_tokens)} |")
    sppo = {r["seed"]: r for r in runs if r["label"].startswith("SPPO")}
    for x, what in (("train_s", "in {:.1f}x fewer training seconds"),
                    ("tokens", "with {:.1f}x fewer generated tokens")):
        ratios = [reach(g["curve"], key, target, x) / reach(sppo[g["seed"]]["curve"], key, target, x)
                  for g in runs if g["label"].startswith("GRPO") and g["seed"] in sppo]
        ratios = [r for r in ratios if np.isfinite(r)]
        if ratios:
            lines += ["", f"SPPO reaches GRPO's final {key} {what.format(np.mean(ratios))} than GRPO (per seed "
                          f"{', '.join(f'{r:.1f}x' for r in ratios)}; range {min(ratios):.1f}-{max(ratios):.1f}x)."]
    lines += under_load(runs)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="tight")
    axes = fig.subplots(1, 2)
    for i, label in enumerate(labels):
        for j, r in enumerate(r for r in runs if r["label"] == label):
            for ax, x in zip(axes, ("train_s", "tokens")):
                ax.plot([c[x] for c in r["curve"]], [c[key] for c in r["curve"]], marker=".", color=f"C{i}",
                        alpha=0.8, label=label if j == 0 else None)
    for ax in axes:
        ax.axhline(target, color="grey", lw=0.5)
        ax.set_ylabel(f"held-out {key}")
    axes[0].set_xlabel("training wall-clock (s)")
    axes[1].set_xlabel("generated response tokens")
    axes[1].legend(fontsize=7)
    fig.savefig(f"{out}.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
