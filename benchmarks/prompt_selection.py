"""SPPO with and without critic-guided prompt selection (``prompt_selection``) on one LLM task, side by side: same
YAML, model, seeds, machine, prompts per iteration and training wall-clock budget.

    python benchmarks/prompt_selection.py tuned_examples/arith_tiny_sppo.yaml --seeds 0 1 2 --minutes 10 \
        --out benchmarks/results/prompt_selection_arith_tiny
    python benchmarks/prompt_selection.py tuned_examples/smollm2_rg_sppo.yaml --seeds 0 1 --minutes 12 \
        --eval-every-s 120 --out benchmarks/results/prompt_selection_smollm2

Each run goes through ``harness.run_seed`` in a process of its own (held-out avg@k and pass@k of exact answers at the
training temperature, and the critic's held-out calibration, evaluations left out of the training time). Writes, per
variant: the final held-out accuracy (mean and range over seeds), the training seconds and generated tokens each seed
needed to reach the no-selection run's final accuracy (the mean over its seeds), the critic's scoring seconds per
iteration and their share of the iteration, the mean p (1 - p) of the scored pool and of the prompts posed, and the
spread of p in the pool (selection has nothing to choose from when every prompt has about the same p), to
``<out>.{md,csv,png}``; runs go to ``<out>_runs.jsonl`` as they finish, and a rerun skips them. Every run records the
load average before and after it and is marked when something else loaded the machine.
"""

import warnings
from pathlib import Path

import numpy as np

import harness
from harness import reach

BASELINE = "SPPO"


def variants(pool: int, floor: float) -> dict:
    return {BASELINE: {}, f"SPPO + selection (pool {pool}, floor {floor:g})": {
        "prompt_selection": {"pool": pool, "floor": floor}}}


def main():
    p = harness.parser(__doc__, out="benchmarks/results/prompt_selection")
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--floor", type=float, default=0.05)
    args = p.parse_args()
    harness.run_variants(args, variants(args.pool, args.floor), write)


def write(runs: list, args, out: Path) -> None:
    with warnings.catch_warnings():  # (means of NaN columns: a metric a variant does not have, e.g. AUROC undefined)
        warnings.simplefilter("ignore", RuntimeWarning)
        _write(runs, args, out)


def _write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    pass_key = key.replace("avg@", "pass@")
    calibration = ("critic/heldout_brier", "critic/heldout_auroc")
    harness.write_curves_csv(out, runs, "variant", ["seed", "iteration", "train_s", "tokens", key, pass_key,
                                                    *calibration])
    base = [r["curve"][-1][key] for r in runs if r["label"] == BASELINE]
    target = float(np.mean(base)) if base else np.nan
    fmt = harness.mean_range
    per_seed = lambda xs: " / ".join("never" if np.isnan(x) else f"{x:,.0f}" for x in xs)  # noqa: E731
    lines = [f"# {Path(args.yaml).name}: SPPO with and without critic-guided prompt selection, held-out {key}", "",
             *harness.provenance(),
             f"Exact answers only. Same prompts per iteration; {args.minutes:g} min of training per run (evaluations "
             f"not counted). Target = SPPO's final {key} without selection, the mean over its seeds ({target:.3f}). "
             f"Mean (min-max) over seeds. p = the critic's predicted solve rate of a prompt; p (1 - p) of the scored "
             f"pool and of the prompts posed (selection works when the second is larger); scoring = the critic's "
             f"pass over the pool, per iteration.", "",
             f"| variant | seeds | {key} before | {key} after | {pass_key} after | iterations | generated tokens | "
             f"training s to reach the target | tokens to reach it | scoring s/iter | scoring share | pool p(1-p) | "
             f"posed p(1-p) | pool p std | held-out Brier / AUROC after |", "|---" * 15 + "|"]
    for label in harness.labels(runs):
        sel = [r for r in runs if r["label"] == label]
        reached_s = [reach(r["curve"], key, target, "train_s") for r in sel]
        reached_tokens = [reach(r["curve"], key, target, "tokens") for r in sel]
        mean = lambda name: np.nanmean([r.get(name, np.nan) for r in sel])  # noqa: E731
        last = lambda name: np.nanmean([r["curve"][-1].get(name, np.nan) for r in sel])  # noqa: E731
        lines.append(
            f"| {label} | {len(sel)} | {fmt([r['curve'][0][key] for r in sel])} | "
            f"{fmt([r['curve'][-1][key] for r in sel])} | {fmt([r['curve'][-1].get(pass_key, np.nan) for r in sel])} | "
            f"{fmt([r['iterations'] for r in sel]).replace('.000', '')} | "
            f"{np.mean([r['curve'][-1]['tokens'] for r in sel]):,.0f} | {per_seed(reached_s)} | "
            f"{per_seed(reached_tokens)} | {mean('scoring_s'):.3f} | {mean('scoring_s') / mean('iter_s'):.1%} | "
            f"{mean('pool_outcome_variance'):.3f} | {mean('selected_outcome_variance'):.3f} | "
            f"{mean('pool_p_std'):.3f} | "
            f"{last(calibration[0]):.3f} / {last(calibration[1]):.3f} |".replace("nan", "-"))
    lines += harness.under_load(runs)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    harness.plot_curves(out, runs, [key], target=target, title=Path(args.yaml).stem, grid=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
