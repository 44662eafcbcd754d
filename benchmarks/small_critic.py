"""A critic smaller than the policy against the policy-sized one, on one LLM task: the critic's calibration on the
held-out split, the accuracy curve and the learner's memory, in one table.

    python benchmarks/small_critic.py tuned_examples/smollm2_rg_sppo.yaml --seeds 0 1 --minutes 12 --eval-every 5 \
        --layers 2 --out benchmarks/results/small_critic_smollm2
    python benchmarks/small_critic.py tuned_examples/arith_tiny_sppo.yaml --seeds 0 1 2 --minutes 10 \
        --layers 1 --out benchmarks/results/small_critic_arith_tiny

Variants: the example's critic (a copy of the policy's model) and ``llm: {critic_layers: N}``: the policy's
embeddings, first N transformer layers and final norm with their pretrained weights, and a new value head (the
layers are cut from the policy's checkpoint, nothing is trained beforehand). Each run goes through
``llm_curve.run_seed`` in a process of its own (for a clean peak resident set): held-out avg@k of exact answers and
the critic's held-out Brier score, ECE, AUROC and Spearman correlation, before training and every ``--eval-every``
iterations, for ``--minutes`` of training. Memory: the learner's state at fp32 (parameters, gradients and AdamW's
two moments: 16 bytes a parameter) of the policy and of the critic, and the process's peak resident set (with
``num_env_runners: 0`` the learner, vLLM and the rest of the trial share it). Writes ``<out>.{md,csv,png}``;
runs go to ``<out>_runs.jsonl`` as they finish, and a rerun skips them.
"""

import argparse
import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np

from llm_curve import run_in_own_process
from provenance import BUSY, provenance, settled_load, under_load

CALIBRATION = ("brier", "ece", "auroc", "spearman")
BYTES_PER_PARAM = 16  # fp32 parameter, gradient and AdamW's two moments


def variants(exp_config: dict, layers: int) -> dict:
    """The example's critic, and its first ``layers`` layers (the example configures its LLM with ``llm:``)."""
    return {"critic = policy": {},
            f"critic = policy's first {layers} layers": {"llm": {**exp_config["llm"], "critic_layers": layers}}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock per variant and seed")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--layers", type=int, default=2, help="transformer layers of the small critic")
    p.add_argument("--config", default="{}", help="JSON config overrides for every run (e.g. a smoke test's)")
    p.add_argument("--out", default="benchmarks/results/small_critic", help="output path stem")
    args = p.parse_args()
    from rllib_sppo.cli import load_experiments

    (_, exp), = load_experiments(args.yaml).items()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(f"{out}_runs.jsonl")
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["label"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for label, overrides in variants(exp["config"], args.layers).items():
            if (label, seed) in done:
                continue
            load_before = settled_load(BUSY)
            run = run_in_own_process(args.yaml, seed, args.minutes, args.eval_every,
                                     {**json.loads(args.config), **overrides})
            run |= {"label": label, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
            runs.append(run)
            with log.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(label, seed, run["curve"][-1], flush=True)
            write(runs, args, out)


def write(runs: list, args, out: Path) -> None:
    with warnings.catch_warnings():  # (means of NaN entries: e.g. AUROC undefined when no problem is solved)
        warnings.simplefilter("ignore", RuntimeWarning)
        _write(runs, args, out)


def _write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    cal = [f"critic/heldout_{m}" for m in CALIBRATION]
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["critic", "seed", "iteration", "train_s", "tokens", key, *cal],
                           extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerows({"critic": r["label"], **c} for c in r["curve"])
    labels = list(dict.fromkeys(r["label"] for r in runs))
    fmt = lambda v: f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if len(v) else "-"  # noqa: E731
    at = lambda sel, i: " / ".join(f"{np.nanmean([r['curve'][i].get(c, np.nan) for r in sel]):.3f}"  # noqa: E731
                                   for c in cal)
    lines = [f"# {Path(args.yaml).name}: a critic of the policy's first {args.layers} layers vs the policy-sized "
             f"critic", "", *provenance(),
             f"Held-out {key} of exact answers; the critic's held-out calibration (Brier / ECE / AUROC of p for "
             f"\"solved at least once\" / Spearman of p with the solve rate, mean over seeds) before training and "
             f"after {args.minutes:g} min of it (evaluations not counted). Learner state: fp32 parameters, gradients "
             f"and AdamW moments ({BYTES_PER_PARAM} B a parameter). Peak RSS: the whole trial process (learner and "
             f"vLLM). Mean (min-max) over seeds.", "",
             f"| critic | seeds | critic params (M) | learner state MB (policy + critic) | peak RSS GB | "
             f"{key} before | "
             f"{key} after | calibration before | calibration after | update s/iter | iterations |",
             "|---" * 11 + "|"]
    for label in labels:
        sel = [r for r in runs if r["label"] == label]
        critic, policy = np.mean([r["critic_params"] for r in sel]), np.mean([r["policy_params"] for r in sel])
        lines.append(
            f"| {label} | {len(sel)} | {critic / 1e6:.1f} | {(policy + critic) * BYTES_PER_PARAM / 2**20:,.0f} "
            f"({policy * BYTES_PER_PARAM / 2**20:,.0f} + {critic * BYTES_PER_PARAM / 2**20:,.0f}) | "
            f"{fmt([r['peak_rss_gb'] for r in sel])} | {fmt([r['curve'][0][key] for r in sel])} | "
            f"{fmt([r['curve'][-1][key] for r in sel])} | {at(sel, 0)} | {at(sel, -1)} | "
            f"{np.mean([r['update_s'] for r in sel]):.2f} | {fmt([r['iterations'] for r in sel]).replace('.000', '')} |"
            .replace("nan", "-"))
    lines += under_load(runs)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), layout="tight")
    axes = fig.subplots(1, 3)
    for i, label in enumerate(labels):
        for j, r in enumerate(r for r in runs if r["label"] == label):
            for ax, metric in zip(axes, (key, cal[0], cal[2])):
                ax.plot([c["train_s"] for c in r["curve"]], [c.get(metric, np.nan) for c in r["curve"]], marker=".",
                        color=f"C{i}", alpha=0.8, label=label if j == 0 else None)
    for ax, metric in zip(axes, (key, cal[0], cal[2])):
        ax.set(xlabel="training wall-clock (s)", ylabel=f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(Path(args.yaml).stem)
    fig.savefig(f"{out}.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
