"""SPPO (N=1) vs GRPO (N=8) vs RLOO (N=8) vs token-level PPO (N=1) on one LLM task, side by side in one invocation:
same YAML, model, seeds, machine, prompts per iteration and training wall-clock budget.

    python benchmarks/llm_compare.py tuned_examples/arith_tiny_sppo.yaml --seeds 0 --minutes 10

Each estimator runs through ``llm_curve.run_seed`` (held-out avg@k at the training temperature, evaluations left out
of the training time). Writes held-out accuracy against training wall-clock and against generated tokens, and the
training time each needs to reach GRPO's final accuracy, to ``benchmarks/results/llm_compare.{md,csv,png}``.
"""

import argparse
import csv
from pathlib import Path

import numpy as np

from llm_curve import run_seed
from provenance import provenance

OUT = Path("benchmarks/results/llm_compare")


def variants(batch: int, minibatch: int, n: int) -> dict:
    """The compared estimators; group estimators draw n samples of each of the same prompts."""
    group = {"samples_per_prompt": n, "train_batch_size_per_learner": batch * n, "minibatch_size": minibatch * n}
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
    p.add_argument("--n", type=int, default=8, help="samples per prompt of GRPO and RLOO")
    args = p.parse_args()
    from rllib_sppo.cli import load_experiments

    (_, exp), = load_experiments(args.yaml).items()
    cfg = exp["config"]
    runs = []
    for label, overrides in variants(cfg["train_batch_size_per_learner"], cfg["minibatch_size"], args.n).items():
        for seed in args.seeds:
            runs.append({"label": label, **run_seed(args.yaml, seed, args.minutes, args.eval_every, overrides)})
            print(label, seed, runs[-1]["curve"][-1], flush=True)
            write(runs, args)  # after every run: a long benchmark cut short keeps what it measured


def time_to_reach(curve: list, key: str, target: float) -> float:
    return next((c["train_s"] for c in curve if c[key] >= target), np.nan)


def write(runs: list, args) -> None:
    import matplotlib

    key = runs[0]["key"]
    with open(f"{OUT}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["estimator", "seed", "iteration", "train_s", "tokens", key])
        w.writeheader()
        for r in runs:
            w.writerows({"estimator": r["label"], **c} for c in r["curve"])
    grpo = [r["curve"][-1][key] for r in runs if r["label"].startswith("GRPO")]
    target = float(np.mean(grpo)) if grpo else np.nan
    lines = [f"# {Path(args.yaml).name}: SPPO vs GRPO vs RLOO vs token-level PPO, held-out {key}", "",
             *provenance(),
             f"Same prompts per iteration for all; {args.minutes:g} min of training each (evaluations not counted). "
             f"Target = GRPO's final accuracy ({target:.3f}).", "",
             "| estimator | seed | before | after | iterations | generated tokens | training s | s to reach GRPO's final |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        first, last = r["curve"][0], r["curve"][-1]
        lines.append(f"| {r['label']} | {r['seed']} | {first[key]:.3f} | {last[key]:.3f} | {r['iterations']} | "
                     f"{last['tokens']:,} | {last['train_s']:.0f} | {time_to_reach(r['curve'], key, target):.0f} |")
    Path(f"{OUT}.md").write_text("\n".join(lines) + "\n")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        for ax, x in zip(axes, ("train_s", "tokens")):
            ax.plot([c[x] for c in r["curve"]], [c[key] for c in r["curve"]], marker="o",
                    label=f"{r['label']} s{r['seed']}")
    axes[0].set_xlabel("training wall-clock (s)")
    axes[1].set_xlabel("generated response tokens")
    axes[0].set_ylabel(f"held-out {key}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{OUT}.png", dpi=100)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
