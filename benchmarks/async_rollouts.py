"""Asynchronous (one-step-off-policy) against synchronous rollouts on an LLM tuned example, same wall-clock budget.

    python benchmarks/async_rollouts.py tuned_examples/smollm2_rg_sppo.yaml --seeds 0 1 --minutes 12 \
        --out benchmarks/results/async_rollouts_smollm2

Both modes run the example with one remote EnvRunner (its engine in its own process) and the learner in the driver,
through ``harness.run_seed``: the synchronous run samples, updates, then syncs; the asynchronous one
(``async_rollouts: true``, ``tis_cap: 2.0``) samples the next batch while the learner updates on this one, with the
weights one update behind. Per mode and seed: iterations done in the budget, the mean iteration seconds (sample +
update + sync phases), held-out ``accuracy/avg@k`` (exact answers, k = ``eval_samples_per_prompt``, at the training
temperature) before training and after the budget (evaluations not counted in it), the overlap fraction (seconds the
update and the sampling of the next batch ran at once, over the iteration's seconds) and the policy lag. On 2 cores the
two processes share the cores, which limits the overlap; the fraction says what a machine with the cores (or a GPU)
for both would save. Runs go to ``<out>_runs.jsonl`` as they finish (a rerun skips them); the table to ``<out>.md``.
"""

from pathlib import Path

import numpy as np

import harness

MODES = {"synchronous": {"num_env_runners": 1},
         "asynchronous": {"num_env_runners": 1, "async_rollouts": True, "tis_cap": 2.0}}


def main():
    args = harness.parser(__doc__, seeds=(0, 1), minutes=12.0, out="benchmarks/results/async_rollouts").parse_args()
    # Evaluated before training and after the budget only (an evaluation waits for the batch in flight).
    harness.run_variants(args, MODES, write, eval_every=10**9)


def write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    lines = [f"# {Path(args.yaml).name}: asynchronous vs synchronous rollouts, {args.minutes:g} min of training each",
             "", *harness.provenance(("ray", "torch", "vllm")),
             f"One remote EnvRunner in both modes; held-out {key} of exact answers before and after the budget "
             "(evaluations not counted in it). Overlap fraction: seconds the update and the sampling of the next "
             "batch ran at once, over the iteration's seconds; policy lag: updates the sampling weights were behind.",
             "", f"| mode | seed | iterations | iteration s | {key} before | {key} after | overlap fraction | "
             "policy lag | load avg before / after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['seed']} | {r['iterations']} | {r['iter_s']:.1f} | "
                     f"{r['curve'][0][key]:.3f} | {r['curve'][-1][key]:.3f} | {r['overlap_fraction']:.2f} | "
                     f"{r['policy_lag']:.2f} | {r['load_before']} / {r['load_after']} |")
    lines += ["", "| mode | seeds | iterations | iteration s | gain in " + key + " (points) |", "|---|---|---|---|---|"]
    for mode in dict.fromkeys(r["label"] for r in runs):
        sel = [r for r in runs if r["label"] == mode]
        gains = [100 * (r["curve"][-1][key] - r["curve"][0][key]) for r in sel]
        lines.append(f"| {mode} | {len(sel)} | {np.mean([r['iterations'] for r in sel]):.1f} | "
                     f"{np.mean([r['iter_s'] for r in sel]):.1f} | {np.mean(gains):+.1f} "
                     f"({min(gains):+.1f} to {max(gains):+.1f}) |")
    lines += harness.under_load(runs)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
