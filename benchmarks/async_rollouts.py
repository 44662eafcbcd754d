"""Asynchronous (one-step-off-policy) against synchronous rollouts on an LLM tuned example, same wall-clock budget.

    python benchmarks/async_rollouts.py tuned_examples/smollm2_rg_sppo.yaml --seeds 0 1 --minutes 12 \
        --out benchmarks/results/async_rollouts_smollm2

Both modes run the example with one remote EnvRunner (its engine in its own process) and the learner in the driver,
through ``llm_curve.run_seed``: the synchronous run samples, updates, then syncs; the asynchronous one
(``async_rollouts: true``, ``tis_cap: 2.0``) samples the next batch while the learner updates on this one, with the
weights one update behind. Per mode and seed: iterations done in the budget, the mean iteration seconds (sample +
update + sync phases), held-out ``accuracy/avg@k`` (exact answers, k = ``eval_samples_per_prompt``, at the training
temperature) before training and after the budget (evaluations not counted in it), the overlap fraction (seconds the
update and the sampling of the next batch ran at once, over the iteration's seconds) and the policy lag. On 2 cores the
two processes share the cores, which limits the overlap; the fraction says what a machine with the cores (or a GPU)
for both would save. Runs go to ``<out>_runs.jsonl`` as they finish (a rerun skips them); the table to ``<out>.md``.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np

from llm_curve import run_in_own_process
from provenance import BUSY, provenance, settled_load, under_load

MODES = {"synchronous": {"num_env_runners": 1},
         "asynchronous": {"num_env_runners": 1, "async_rollouts": True, "tis_cap": 2.0}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--minutes", type=float, default=12.0, help="training wall-clock per mode and seed")
    p.add_argument("--config", default="{}", help="JSON config overrides for both modes (e.g. smaller batches)")
    p.add_argument("--out", default="benchmarks/results/async_rollouts", help="output path stem")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(f"{out}_runs.jsonl")
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["mode"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for mode, overrides in MODES.items():
            if (mode, seed) in done:
                continue
            load_before = settled_load(BUSY)
            # Evaluated before training and after the budget only (an evaluation waits for the batch in flight).
            run = run_in_own_process(args.yaml, seed, args.minutes, 10**9, {**json.loads(args.config), **overrides})
            run |= {"mode": mode, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
            runs.append(run)
            with log.open("a") as f:
                f.write(json.dumps(run) + "\n")
            write(runs, args, out)


def write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    lines = [f"# {Path(args.yaml).name}: asynchronous vs synchronous rollouts, {args.minutes:g} min of training each",
             "", *provenance(("ray", "torch", "vllm")),
             f"One remote EnvRunner in both modes; held-out {key} of exact answers before and after the budget "
             "(evaluations not counted in it). Overlap fraction: seconds the update and the sampling of the next "
             "batch ran at once, over the iteration's seconds; policy lag: updates the sampling weights were behind.",
             "", f"| mode | seed | iterations | iteration s | {key} before | {key} after | overlap fraction | "
             "policy lag | load avg before / after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['mode']} | {r['seed']} | {r['iterations']} | {r['iter_s']:.1f} | "
                     f"{r['curve'][0][key]:.3f} | {r['curve'][-1][key]:.3f} | {r['overlap_fraction']:.2f} | "
                     f"{r['policy_lag']:.2f} | {r['load_before']} / {r['load_after']} |")
    lines += ["", "| mode | seeds | iterations | iteration s | gain in " + key + " (points) |", "|---|---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in runs):
        sel = [r for r in runs if r["mode"] == mode]
        gains = [100 * (r["curve"][-1][key] - r["curve"][0][key]) for r in sel]
        lines.append(f"| {mode} | {len(sel)} | {np.mean([r['iterations'] for r in sel]):.1f} | "
                     f"{np.mean([r['iter_s'] for r in sel]):.1f} | {np.mean(gains):+.1f} "
                     f"({min(gains):+.1f} to {max(gains):+.1f}) |")
    lines += under_load(runs, name=lambda r: f"{r['mode']} seed {r['seed']}")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
