"""Held-out accuracy before and during training of an LLM tuned example, for several seeds.

    python benchmarks/llm_curve.py tuned_examples/arith_tiny_sppo.yaml --seeds 0 1 2 --minutes 10

Evaluates (avg@k at the training temperature, the example's held-out split) before any update, then trains for the
given wall-clock minutes (evaluations not counted), evaluating every ``--eval-every`` iterations and at the end, each
seed in a process of its own (``harness.run_seed``). Writes ``<out>.csv`` (the curve), ``<out>.md`` (the summary
table) and ``<out>.png``; runs go to ``<out>_runs.jsonl`` (with the answers to the first held-out problems at the last
evaluation, to be read), and a rerun skips them.
"""

from pathlib import Path

import numpy as np

import harness


def main():
    args = harness.parser(__doc__, seeds=(0, 1, 2)).parse_args()
    harness.run_variants(args, {Path(args.yaml).stem: {}}, write)


def write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    harness.write_curves_csv(out, runs, "label", list(runs[0]["curve"][0]))
    rows = [(r["seed"], r["curve"][0][key], r["curve"][-1][key], r["iterations"], r["curve"][-1]["train_s"],
             r["tokens_per_s"], r["engine_sync_s"], r["iter_s"]) for r in runs]
    gains = [(b - a) * 100 for _, a, b, *_ in rows]
    lines = [f"# {Path(args.yaml).name}: held-out {key}, before and after {args.minutes:g} min of training", "",
             *harness.provenance(),
             "| seed | before | after | gain (points) | iterations | train s | rollout tokens/s | "
             "weight sync s/iter | iteration s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {a:.3f} | {b:.3f} | {g:+.1f} | {n} | {t:.0f} | {tps:.0f} | {sync:.3f} | {its:.2f} |"
              for (s, a, b, n, t, tps, sync, its), g in zip(rows, gains)]
    lines += ["", f"Mean gain {np.mean(gains):+.1f} points (min {min(gains):+.1f}) over {len(rows)} seeds."]
    lines += harness.under_load(runs)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    harness.plot_curves(out, runs, [key], xs=("train_s",), title=Path(args.yaml).stem)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
