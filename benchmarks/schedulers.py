"""ASHA and PBT against the grid they search (#26, item 2), on the CPU flagship.

    python benchmarks/schedulers.py tuned_examples/arith_tiny_sppo_asha.yaml --seeds 0 1 2 --lock /tmp/rllib_sppo_cpu.lock

Three sweeps per seed, each ``rllib train file`` in a fresh process (the same path a user runs), the same seed in all:

- grid: the ASHA example's lr x critic_lr grid (8 trials) without its scheduler, every trial to the end (300 it.);
- ASHA: the example as it is (trials in the worse half of a rung stopped at 40, 80 and 160 iterations);
- PBT: ``--pbt``'s example (4 trials x 600 iterations, about the grid's compute; lr mutated through checkpoints).

For each: trial-seconds (every iteration of every trial, its evaluations included; a PBT trial that continued from
another's checkpoint counts only its own iterations) and trial-iterations, the sweep's wall-clock, the machine's speed
probe (``harness.machine``), and the best held-out avg@k it finds (the highest last evaluation of a trial: the trial a
user would pick). The goal (#26): ASHA finds the grid's best accuracy for at most 40% of the grid's trial-seconds (of
its trial-iterations where the two sweeps ran on machines of different speed); PBT's best against the grid's at about
the same trial-seconds. ASHA is also replayed on each grid's curves (``asha_replay``: Tune's cutoff rule, one trial at
a time) in the grid's order and in every order of its trials: with one trial at a time, ASHA stops a trial only where
it falls behind those before it, so what it saves depends on the order the trials come in.

Each sweep's record goes to ``<out>_runs.jsonl`` as it finishes (a rerun skips it; a sweep cut short is rerun from its
start); its YAML, Tune folder and console log to ``<out>_sweeps/``; the table to ``<out>.md``. ``--config`` and
``--stop`` override every sweep (a smoke test: ``--stop '{"training_iteration": 4}' --config
'{"evaluation_interval": 2}'``); ``--minutes`` and ``--eval-every`` do not apply (the YAMLs' stop and
``evaluation_interval`` rule). The Tune folders (checkpoints: ~0.8 GB a sweep) stay out of git. The grid took 107 min
on 2 idle cores (2026-12-07); ASHA in the grid's order about 80% of that (its replay), PBT about as long as the grid.
"""

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

import harness

REPO = Path(__file__).resolve().parents[1]
SWEEPS = ("grid", "ASHA", "PBT")
#: ASHA's goal: the grid's best accuracy for at most this fraction of the grid's trial-seconds.
GOAL = 0.4


def sweep_specs(asha_yaml: str, pbt_yaml: str) -> dict:
    """{label: {experiment name: experiment}}: the grid (the ASHA example without its scheduler), ASHA, PBT."""
    from rllib_sppo.experiments import load_experiments

    (name, asha), = load_experiments(asha_yaml).items()
    grid = {k: v for k, v in asha.items() if k != "scheduler"}
    return {"grid": {f"{name}-grid": grid}, "ASHA": {name: asha}, "PBT": load_experiments(pbt_yaml)}


def trial_record(rows: list[dict], key: str) -> dict:
    """One trial from the rows of its ``result.json``: its learning rates over time, iterations, seconds (the sum of
    its own iterations' ``time_this_iter_s``) and held-out curve ``[iteration, seconds so far, value]`` at the
    iterations it evaluated (iteration 0: the evaluation before training)."""
    from ray.tune.utils import flatten_dict

    from rllib_sppo.monitoring import ACCURACY, BEFORE_TRAINING, evaluated_at

    seconds, curve, lrs = 0.0, [], []
    for row in rows:
        seconds += row["time_this_iter_s"]
        it, config = row["training_iteration"], row["config"]
        lrs += [] if lrs and lrs[-1] == config["lr"] else [config["lr"]]
        metrics = flatten_dict({k: v for k, v in row.items() if k != "config"}, delimiter="/")
        before = metrics.get(f"{BEFORE_TRAINING}/{key}")
        if before is not None and not curve:
            curve.append([0, 0.0, before])
        value = metrics.get(ACCURACY + key.removeprefix("accuracy/"))
        if value is not None and evaluated_at(it, config):
            curve.append([it, seconds, value])
    return {"lr": lrs, "critic_lr": rows[0]["config"]["critic_lr"], "iterations": rows[-1]["training_iteration"],
            "trial_s": seconds, "trial_iterations": len(rows), "curve": curve}


def sweep_record(trials: list[dict]) -> dict:
    """A sweep's totals: trial-seconds and trial-iterations (each trial's own), and its best trial by the last
    held-out evaluation (``best``, its value)."""
    measured = [t for t in trials if t["curve"]]
    best = max(measured, key=lambda t: t["curve"][-1][2]) if measured else None
    return {"trial_s": sum(t["trial_s"] for t in trials), "trials": len(trials),
            "trial_iterations": sum(t["trial_iterations"] for t in trials),
            "best": best["curve"][-1][2] if best else np.nan,
            "best_trial": {k: best[k] for k in ("lr", "critic_lr", "iterations")} if best else None}


def last_evaluation(curve: list, upto: int) -> float:
    """A trial's held-out value as reported at iteration ``upto``: its last evaluation up to it."""
    return [v for it, _, v in curve if it <= upto][-1]


def asha_replay(trials: list[dict], asha: dict, order) -> tuple[int, float]:
    """Tune's ASHA (one bracket: rungs at ``grace_period`` x ``reduction_factor``^k iterations below ``max_t``; a trial
    whose held-out value at a rung is below the (1 - 1/rf) percentile of the values recorded there before it is
    stopped) replayed on a grid's trials started one at a time in ``order``: the trial-iterations it spends and the
    best last evaluation it keeps. Exact for a deterministic run where every rung is an evaluated iteration: a trial
    that ASHA lets go on trains as the grid's did, and its value at a rung is the grid's (the last evaluation up to
    it, as RLlib repeats it between evaluations)."""
    rf, grace, max_t = asha["reduction_factor"], asha["grace_period"], asha["max_t"]
    rungs = {grace * rf**k: [] for k in range(int(math.log(max_t / grace) / math.log(rf)) + 1)}
    spent, kept = 0, []
    for i in order:
        curve, stop = trials[i]["curve"], trials[i]["iterations"]
        for rung, recorded in rungs.items():
            if rung >= stop:
                break
            value = last_evaluation(curve, rung)
            cutoff = np.percentile(recorded, (1 - 1 / rf) * 100) if recorded else None
            recorded.append(value)
            if cutoff is not None and value < cutoff:
                stop = rung
                break
        spent += stop
        kept.append(last_evaluation(curve, stop))
    return spent, max(kept)


def replay_lines(runs: list[dict], asha: dict) -> list[str]:
    """ASHA replayed on each grid run's trials in the grid's order and in every order of its trials (one at a time:
    with a trial at a time, ASHA saves only where later trials fall behind earlier ones, so the order decides)."""
    lines = []
    for g in (r for r in runs if r["label"] == "grid"):
        trials, total = g["trial_list"], g["trial_iterations"]
        every = np.array([asha_replay(trials, asha, o) for o in itertools.permutations(range(len(trials)))])
        spent, best = every[0]  # the first order itertools gives is the grid's own
        share, found = every[:, 0] / total, every[:, 1] == g["best"]
        lines.append(f"\nASHA replayed on the grid's curves, seed {g['seed']} (Tune's cutoff rule, one trial at a "
                     f"time): in the grid's order {spent / total:.0%} of its trial-iterations, best {best:.3f}; over all "
                     f"{len(every):,} orders of its {len(trials)} trials, {np.median(share):.0%} at the median "
                     f"({share.min():.0%}-{share.max():.0%}), the grid's best kept in {found.mean():.0%} of them, the "
                     f"goal met in {(found & (share <= GOAL)).mean():.0%}.")
    return lines


def read_trials(folder: Path, key: str) -> list[dict]:
    """Every trial of a Tune experiment folder, from its ``result.json``."""
    trials = []
    for path in sorted(folder.glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(trial_record(rows, key))
    return trials


def run_sweep(label: str, spec: dict, seed: int, args, where: Path) -> dict:
    """Runs one sweep with ``rllib train file`` in a process of its own; its record."""
    (name, exp), = spec.items()
    key = f"accuracy/avg@{exp['config'].get('eval_samples_per_prompt', 1)}"
    storage, yaml_path = where / f"{label}_seed{seed}", where / f"{label}.yaml"
    log = where / f"{label}_seed{seed}.log"
    shutil.rmtree(storage, ignore_errors=True)  # a sweep cut short starts again
    yaml_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [sys.executable, "-m", "rllib_sppo.cli", "train", "file", str(yaml_path), "--storage-path",
               str(storage), "--config", json.dumps({**json.loads(args.config), "seed": seed})]
    command += ["--stop", args.stop] if args.stop else []
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{label} seed {seed} failed (exit {done.returncode}); its console: {log}")
    trials = read_trials(storage / name, key)
    return {"label": label, "seed": seed, "key": key, "wall_s": time.perf_counter() - start, **sweep_record(trials),
            "trial_list": trials}


def table(runs: list[dict]) -> list[str]:
    """Markdown rows: per sweep and seed, trial-seconds and trial-iterations, their fractions of the grid's (same
    seed), the machine's probe, the best held-out accuracy and its trial; then ASHA's goal per seed, in trial-seconds
    where the two sweeps ran on machines of one speed (``harness.same_machine``), else in trial-iterations (a session
    here may land on a machine twice as fast as the last)."""
    grid = {r["seed"]: r for r in runs if r["label"] == "grid"}
    share = lambda r, k: r[k] / grid[r["seed"]][k] if r["seed"] in grid and k in r else np.nan  # noqa: E731
    lines = ["| sweep | seed | trials | trial-seconds | of the grid's | trial-iterations | of the grid's | "
             "wall-clock s | machine probe s | best held-out | its trial (lr, critic_lr, iterations) |",
             "|---" * 11 + "|"]
    for r in sorted(runs, key=lambda r: (r["seed"], SWEEPS.index(r["label"]))):
        t = r["best_trial"] or {}
        lines.append(f"| {r['label']} | {r['seed']} | {r['trials']} | {r['trial_s']:.0f} | {share(r, 'trial_s'):.0%} "
                     f"| {r.get('trial_iterations', '-')} | {share(r, 'trial_iterations'):.0%} | {r['wall_s']:.0f} | "
                     f"{r['machine']['probe_s'] if 'machine' in r else '-'} | {r['best']:.3f} | {t.get('lr')}, "
                     f"{t.get('critic_lr')}, {t.get('iterations')} |")
    for r in (r for r in runs if r["label"] == "ASHA" and r["seed"] in grid):
        g = grid[r["seed"]]
        cost, unit = ("trial_s", "trial-seconds") if harness.same_machine(r, g) else (
            "trial_iterations", "trial-iterations (the two sweeps ran on machines of different speed)")
        met = share(r, cost) <= GOAL and r["best"] >= g["best"]
        lines.append(f"\nASHA, seed {r['seed']}: {share(r, cost):.0%} of the grid's {unit}, best "
                     f"{r['best']:.3f} against the grid's {g['best']:.3f}: goal (<= {GOAL:.0%}, the same best) "
                     f"{'met' if met else 'not met'}.")
    return lines


def write(runs: list, asha: dict, out: Path) -> None:
    """The table, ASHA's goal and its replay on the grids (``asha``: the ASHA example's scheduler block)."""
    key = runs[0]["key"]
    text = [f"# Schedulers against the grid: held-out {key}", "", *harness.provenance(), *table(runs),
            *replay_lines(runs, asha), *harness.under_load(runs)]
    Path(f"{out}.md").write_text("\n".join(text) + "\n")


def main(argv=None):
    p = harness.parser(__doc__, out="benchmarks/results/schedulers_arith_tiny")
    p.add_argument("--pbt", default="tuned_examples/arith_tiny_sppo_pbt.yaml", help="the PBT example")
    p.add_argument("--stop", help="JSON stop criteria for every sweep, overriding the YAMLs' (a smoke test's)")
    p.add_argument("--only", nargs="+", choices=SWEEPS, default=list(SWEEPS), help="run only these sweeps")
    args = p.parse_args(argv)
    out = harness.out_stem(args)
    where = Path(f"{out}_sweeps")
    where.mkdir(exist_ok=True)
    specs = sweep_specs(args.yaml, args.pbt)
    runs = harness.load_runs(out)
    asha = next(iter(specs["ASHA"].values()))["scheduler"]  # for the replay
    done = {(r["label"], r["seed"]) for r in runs}
    for seed in args.seeds:  # every sweep of a seed before the next seed
        for label in (s for s in SWEEPS if s in args.only and (s, seed) not in done):
            with harness.machine_lock(args.lock):
                load_before = harness.settled_load()
                run = {"machine": harness.machine(), **run_sweep(label, specs[label], seed, args, where)}
            run |= {"load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
            runs.append(run)
            with Path(f"{out}_runs.jsonl").open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(label, seed, f"{run['trial_s']:.0f} trial-s, best {run['best']:.3f}", flush=True)
            write(runs, asha, out)


if __name__ == "__main__":
    main()
