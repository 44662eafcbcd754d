"""A critic smaller than the policy against the policy-sized one, on one LLM task: the critic's calibration on the
held-out split, the accuracy curve and the learner's memory, in one table.

    python benchmarks/small_critic.py tuned_examples/smollm2_rg_sppo.yaml --seeds 0 1 --minutes 12 --eval-every 5 \
        --layers 2 --out benchmarks/results/small_critic_smollm2
    python benchmarks/small_critic.py tuned_examples/arith_tiny_sppo.yaml --seeds 0 1 2 --minutes 10 \
        --layers 1 --out benchmarks/results/small_critic_arith_tiny

Variants: the example's critic (a copy of the policy's model) and ``llm: {critic_layers: N}``: the policy's
embeddings, first N transformer layers and final norm with their pretrained weights, and a new value head (the
layers are cut from the policy's checkpoint, nothing is trained beforehand). Each run goes through
``harness.run_seed`` in a process of its own (for a clean peak resident set): held-out avg@k of exact answers and
the critic's held-out Brier score, ECE, AUROC and Spearman correlation, before training and every ``--eval-every``
iterations, for ``--minutes`` of training. Memory: the learner's state at fp32 (parameters, gradients and AdamW's
two moments: 16 bytes a parameter) of the policy and of the critic, and the process's peak resident set (with
``num_env_runners: 0`` the learner, vLLM and the rest of the trial share it). Writes ``<out>.{md,csv,png}``;
runs go to ``<out>_runs.jsonl`` as they finish, and a rerun skips them.
"""

import warnings
from pathlib import Path

import numpy as np

import harness

CALIBRATION = ("brier", "ece", "auroc", "spearman")
BYTES_PER_PARAM = 16  # fp32 parameter, gradient and AdamW's two moments


def variants(exp_config: dict, layers: int) -> dict:
    """The example's critic, and its first ``layers`` layers (the example configures its LLM with ``llm:``)."""
    return {"critic = policy": {},
            f"critic = policy's first {layers} layers": {"llm": {**exp_config["llm"], "critic_layers": layers}}}


def main():
    p = harness.parser(__doc__, out="benchmarks/results/small_critic")
    p.add_argument("--layers", type=int, default=2, help="transformer layers of the small critic")
    args = p.parse_args()
    from rllib_sppo.experiments import load_experiments

    (_, exp), = load_experiments(args.yaml).items()
    harness.run_variants(args, variants(exp["config"], args.layers), write)


def write(runs: list, args, out: Path) -> None:
    with warnings.catch_warnings():  # (means of NaN entries: e.g. AUROC undefined when no problem is solved)
        warnings.simplefilter("ignore", RuntimeWarning)
        _write(runs, args, out)


def _write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    cal = [f"critic/heldout_{m}" for m in CALIBRATION]
    harness.write_curves_csv(out, runs, "critic", ["seed", "iteration", "train_s", "tokens", key, *cal])
    fmt = harness.mean_range
    at = lambda sel, i: " / ".join(f"{np.nanmean([r['curve'][i].get(c, np.nan) for r in sel]):.3f}"  # noqa: E731
                                   for c in cal)
    lines = [f"# {Path(args.yaml).name}: a critic of the policy's first {args.layers} layers vs the policy-sized "
             f"critic", "", *harness.provenance(),
             f"Held-out {key} of exact answers; the critic's held-out calibration (Brier / ECE / AUROC of p for "
             f"\"solved at least once\" / Spearman of p with the solve rate, mean over seeds) before training and "
             f"after {args.minutes:g} min of it (evaluations not counted). Learner state: fp32 parameters, gradients "
             f"and AdamW moments ({BYTES_PER_PARAM} B a parameter). Peak RSS: the whole trial process (learner and "
             f"vLLM). Mean (min-max) over seeds.", "",
             f"| critic | seeds | critic params (M) | learner state MB (policy + critic) | peak RSS GB | "
             f"{key} before | "
             f"{key} after | calibration before | calibration after | update s/iter | iterations |",
             "|---" * 11 + "|"]
    for label in harness.labels(runs):
        sel = [r for r in runs if r["label"] == label]
        critic, policy = np.mean([r["critic_params"] for r in sel]), np.mean([r["policy_params"] for r in sel])
        lines.append(
            f"| {label} | {len(sel)} | {critic / 1e6:.1f} | {(policy + critic) * BYTES_PER_PARAM / 2**20:,.0f} "
            f"({policy * BYTES_PER_PARAM / 2**20:,.0f} + {critic * BYTES_PER_PARAM / 2**20:,.0f}) | "
            f"{fmt([r['peak_rss_gb'] for r in sel])} | {fmt([r['curve'][0][key] for r in sel])} | "
            f"{fmt([r['curve'][-1][key] for r in sel])} | {at(sel, 0)} | {at(sel, -1)} | "
            f"{np.mean([r['update_s'] for r in sel]):.2f} | {fmt([r['iterations'] for r in sel]).replace('.000', '')} |"
            .replace("nan", "-"))
    lines += harness.under_load(runs)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    harness.plot_curves(out, runs, [key, cal[0], cal[2]], xs=("train_s",), title=Path(args.yaml).stem, grid=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
