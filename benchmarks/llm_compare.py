"""SPPO (N=1) vs GRPO (N=8) vs RLOO (N=8) vs token-level PPO (N=1, as verl runs it) on one LLM task, side by side in
one invocation: same YAML, model, seeds, machine, prompts per iteration and training wall-clock budget.

    python benchmarks/llm_compare.py tuned_examples/arith_tiny_sppo.yaml --seeds 0 1 2 --minutes 10

Each run goes through ``harness.run_seed`` in a process of its own (held-out avg@k and pass@k of exact answers at the
training temperature, evaluations left out of the training time). Critic-free estimators build and run no critic.
Every run records the load average before and after it and is marked when something else loaded the machine. Writes, per
estimator, the final held-out accuracy (mean and range over seeds), the training seconds and generated tokens each
seed needed to reach GRPO's final accuracy (the mean over its seeds), and the SPPO : GRPO ratio per seed, to
``benchmarks/results/<out>.{md,csv,png}``; runs go to ``<out>_runs.jsonl`` as they finish, and a rerun skips them.
"""

from pathlib import Path

import numpy as np

import harness
from harness import reach


def main():
    p = harness.parser(__doc__, out="benchmarks/results/llm_compare")
    p.add_argument("--n", type=int, default=8, help="samples per prompt of GRPO and RLOO")
    args = p.parse_args()
    from rllib_sppo.experiments import load_experiments

    (_, exp), = load_experiments(args.yaml).items()
    cfg = exp["config"]
    harness.run_variants(args, harness.estimators(cfg["train_batch_size_per_learner"], cfg["minibatch_size"], args.n),
                         write)


def write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    pass_key = key.replace("avg@", "pass@")
    harness.write_curves_csv(out, runs, "estimator", ["seed", "iteration", "train_s", "tokens", key, pass_key])
    grpo = [r["curve"][-1][key] for r in runs if r["label"].startswith("GRPO")]
    target = float(np.mean(grpo)) if grpo else np.nan
    fmt = harness.mean_range
    its = lambda v: f"{np.mean(v):.0f} ({min(v)}-{max(v)})"  # noqa: E731
    lines = [f"# {Path(args.yaml).name}: SPPO vs GRPO vs RLOO vs token-level PPO, held-out {key} and {pass_key}", "",
             *harness.provenance(),
             f"Exact answers only (a sample counts when the verifier says it is fully right). Same prompts per "
             f"iteration for all; {args.minutes:g} min of training per run (evaluations not counted). Target = GRPO's "
             f"final {key}, the mean over its seeds ({target:.3f}). Mean (min-max) over seeds.", "",
             f"| estimator | seeds | {key} before | {key} after | {pass_key} after | iterations | generated tokens | "
             "training s to reach the target | tokens to reach it |", "|---|---|---|---|---|---|---|---|---|"]
    for label in harness.labels(runs):
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
    lines += harness.under_load(runs)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    harness.plot_curves(out, runs, [key], target=target)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
