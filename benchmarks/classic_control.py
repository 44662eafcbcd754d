"""SPPO vs RLlib PPO on classic control under outcome rewards, each tuned the same way.

    python benchmarks/classic_control.py --jobs 2

Per task (``tuned_examples/<task>_sppo.yaml`` and ``<task>_ppo.yaml``: the same outcome env, target, env-step budget
and envs per EnvRunner; the same separate [64, 64] tanh policy and value networks, batch, minibatch and epochs; PPO at
gamma 1):
1. Tuning: each algorithm on the same shape of grid, 3 policy learning rates (a factor of about 3 apart on the ladder
   1e-4, 3e-4, 1e-3, 3e-3, ..., centred on its YAML's ``lr``) x 2 values of its second knob (SPPO: the critic's
   learning rate, ``--critic-lrs``; PPO: GAE lambda, ``--lambdas``), each setting on the tuning seeds. Settings rank by
   seeds reaching the target, then mean env steps to it (a miss counts as the budget), then mean final outcome. When
   an algorithm's best learning rate is at the edge of its grid, its grid moves one step that way (runs kept) and the
   new settings run, until the best is inside it or it has moved ``--max-moves`` times (the table says so).
2. Reporting: each algorithm's pick on the reported seeds (not the tuning seeds).
A run stops when the mean outcome of its last 100 completed training episodes reaches the target, or at the budget;
its curve is that window's mean after every iteration. Both algorithms keep their authors' other defaults: SPPO the
reference's (clip 0.2 both ways, dual clip 3, grad-norm clip 1, no KL, raw advantages), RLlib PPO its own (clip 0.3,
adaptive KL penalty from 0.2 towards 0.01, no grad clip, standardised advantages, value loss clipped at 10).

Every run is its own process with one torch thread, ``--jobs`` at a time. Runs go to ``<out>_runs.jsonl`` as they
finish and a rerun of the command skips them (a benchmark cut short keeps what it measured, and resumes); the table,
CSV and plot (``<out>.{md,csv,png}``) are rewritten after every run. Env steps and outcomes do not depend on the
machine's load; wall times do (each run records the load average before and after it).
"""

import argparse
import csv
import json
import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from harness import exit_with, provenance

TASKS = ("cartpole", "mountaincar", "pendulum", "lunarlander", "hopper", "acrobot")
KNOBS = {"SPPO": "critic_lr", "PPO": "lambda"}  # each algorithm's second knob
TARGET, BUDGET = "env_runners/episode_return_mean", "num_env_steps_sampled_lifetime"  # the YAMLs' stop keys
WINDOW = 100  # completed training episodes the target is judged on


def ladder(i: int) -> float:
    """The i-th learning rate of 1e-4, 3e-4, 1e-3, 3e-3, ... (i = -6: 1e-3; neighbours a factor of about 3 apart)."""
    return float(f"{(1, 3)[i % 2]}e{i // 2}")


def rung(lr: float, where: str) -> int:
    i = round(2 * math.log10(lr))
    if ladder(i) != lr:
        raise SystemExit(f"{where}: lr {lr:g} is not on the 1-3-10 ladder the tuning grid walks (e.g. 1e-3, 3e-3); "
                         f"set it to {ladder(i):g}")
    return i


def experiment(task: str, algo: str) -> dict:
    from rllib_sppo.experiments import load_experiments

    path = f"tuned_examples/{task}_{algo.lower()}.yaml"
    (_, exp), = load_experiments(path).items()
    return {**exp, "yaml": path}


def shared(task: str, cap: int | None = None) -> dict:
    """What both algorithms' runs on ``task`` share, from its two YAMLs (which must agree): the target, the env-step
    budget (at most ``cap``) and the envs per EnvRunner. Every run records them, and only runs with the YAMLs'
    current values count (older runs stay in the log)."""
    both = {}
    for algo in KNOBS:
        exp = experiment(task, algo)
        both[algo] = {"target": float(exp["stop"][TARGET]), "budget": min(int(exp["stop"][BUDGET]), cap or math.inf),
                      "envs": exp["config"].get("num_envs_per_env_runner", 1)}
    if both["SPPO"] != both["PPO"]:
        raise SystemExit(f"{task}: its SPPO and PPO YAMLs differ in their stop or envs per runner ({both['SPPO']} vs "
                         f"{both['PPO']}); give both the same target, env-step budget and num_envs_per_env_runner")
    return both["SPPO"]


def setup_of(run: dict) -> dict:
    """A run's (or job's) part of ``shared``; runs logged before ``envs`` was recorded had one env."""
    return {"target": run["target"], "budget": run["budget"], "envs": run.get("envs", 1)}


# --- one run ------------------------------------------------------------------------------------------------------


def outcomes_callback():
    """An RLlib callback logging every completed training episode's outcome (its return: outcome envs pay it once,
    at the end) as a list per iteration, under ``env_runners/episode_outcomes``."""
    from ray.rllib.callbacks.callbacks import RLlibCallback

    class EpisodeOutcomes(RLlibCallback):
        def on_episode_end(self, *, episode, metrics_logger=None, **kwargs):
            metrics_logger.log_value("episode_outcomes", episode.get_return(), reduce="item_series")

    return EpisodeOutcomes


def run(job: dict) -> dict:
    """One training run to the target (on the window of the last ``WINDOW`` completed episodes) or the budget."""
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)  # its own Ray
    from rllib_sppo.experiments import build_config, resolve_algorithm

    exp = experiment(job["task"], job["algo"])
    config = build_config(resolve_algorithm(exp["run"], exp["yaml"]), exp["env"],
                          {**exp["config"], **job["setting"], "seed": job["seed"]}, exp["yaml"])
    load_before, start = os.getloadavg()[0], time.perf_counter()
    algo = config.callbacks(outcomes_callback()).build_algo()
    outcomes, curve = [], []
    while True:
        runners = algo.train()["env_runners"]
        outcomes += list(runners.get("episode_outcomes", []))
        steps, window = int(runners[BUDGET]), float(np.mean(outcomes[-WINDOW:])) if outcomes else math.nan
        curve.append((steps, window))
        reached = len(outcomes) >= WINDOW and window >= job["target"]
        if reached or steps >= job["budget"]:
            break
    algo.stop()
    return {**job, "steps": steps, "reached": reached, "final": window, "episodes": len(outcomes),
            "wall_s": round(time.perf_counter() - start, 1), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2), "curve": curve}


def run_with_retries(job: dict, tries: int = 3) -> dict:
    """``run``, again after a failure to start (a Ray that timed out starting on a loaded machine, say)."""
    for attempt in range(tries):
        try:
            return run(job)
        except Exception as e:  # noqa: BLE001  (reported once the tries are spent)
            if attempt == tries - 1:
                raise
            print(f"retrying {name(job)} after: {e}", flush=True)
            time.sleep(30)


def _die_with_parent():
    """A run's process ends when the benchmark that started it is gone (a spawned process would outlive it)."""
    threading.Thread(target=exit_with, args=(os.getppid(),), daemon=True).start()


# --- the protocol: which runs, which pick --------------------------------------------------------------------------


def key(job: dict) -> str:
    return json.dumps([job["task"], job["algo"], job["setting"], job["seed"], *setup_of(job).values()],
                      sort_keys=True)


def name(job: dict) -> str:
    return f"{job['task']} {job['algo']} {setting_text(job['setting'])} seed {job['seed']}"


def setting_text(setting: dict) -> str:
    return ", ".join(f"{k} {setting[k]:g}" for k in sorted(setting, key=lambda k: k != "lr"))  # lr first


def score(runs: list, budget: int) -> tuple:
    """A setting's rank over its runs (lower is better): seeds reaching the target, mean env steps (a miss counts as
    the budget), mean final outcome."""
    return (-sum(r["reached"] for r in runs), float(np.mean([r["steps"] if r["reached"] else budget for r in runs])),
            -float(np.mean([r["final"] for r in runs])))


def tuning(rows: list, task: str, algo: str, args) -> dict:
    """The algorithm's tuning on ``task`` as far as ``rows`` go: its grid (after the moves so far), the runs that grid
    still needs (``todo``), and once it has none, the ``pick`` and whether its learning rate is inside the grid."""
    setup = shared(task, args.max_env_steps)
    exp = experiment(task, algo)
    knob = KNOBS[algo]
    values = args.critic_lrs if algo == "SPPO" else args.lambdas
    by_key = {key(r): r for r in rows}
    centre = rung(exp["config"]["lr"], exp["yaml"])
    for moves in range(args.max_moves + 1):
        lrs = [ladder(centre + d) for d in (-1, 0, 1)]
        settings = [{"lr": lr, knob: v} for lr in lrs for v in values]
        jobs = [{"task": task, "algo": algo, "phase": "tune", "setting": s, "seed": seed, **setup}
                for s in settings for seed in args.tune_seeds]
        todo = [j for j in jobs if key(j) not in by_key]
        if todo:
            return {"lrs": lrs, "todo": todo}
        pick = min(settings, key=lambda s: score([by_key[key(j)] for j in jobs if j["setting"] == s],
                                                 setup["budget"]))
        inside = lrs[0] < pick["lr"] < lrs[-1]
        if inside or moves == args.max_moves:
            return {"lrs": lrs, "todo": [], "pick": pick, "inside": inside, "moves": moves}
        centre += 1 if pick["lr"] == lrs[-1] else -1


def plan(rows: list, args) -> list[dict]:
    """The runs to do next, in order, given the runs done: each task's tuning grids, then each pick on the reported
    seeds. A pure function of the runs done, so a rerun of the command resumes where it stopped."""
    by_key = {key(r) for r in rows}
    todo = []
    for task in args.tasks:
        setup = shared(task, args.max_env_steps)
        for algo in KNOBS:
            t = tuning(rows, task, algo, args)
            todo += t["todo"]
            if "pick" in t:
                todo += [j for j in ({"task": task, "algo": algo, "phase": "report", "setting": t["pick"],
                                      "seed": seed, **setup} for seed in args.seeds)
                         if key(j) not in by_key]
    return todo


# --- the command ---------------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[100, 101], help="seeds the pick is made on")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds the pick is reported on")
    p.add_argument("--critic-lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="SPPO's second knob")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.95, 1.0], help="PPO's second knob (gamma 1)")
    p.add_argument("--max-moves", type=int, default=2, help="how far a grid may move to get its best inside")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one process (and one torch thread) each")
    p.add_argument("--max-env-steps", type=int, help="cap every budget (a smoke test: give it its own --out)")
    p.add_argument("--out", default="benchmarks/results/classic_control", help="output path stem")
    args = p.parse_args(argv)
    if set(args.tune_seeds) & set(args.seeds):
        p.error(f"seeds {sorted(set(args.tune_seeds) & set(args.seeds))} are both tuning and reported seeds; the pick "
                f"is reported on seeds it was not made on")
    return args


def main():
    args = parse()
    runs = Path(f"{args.out}_runs.jsonl")
    runs.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in runs.read_text().splitlines()] if runs.exists() else []
    print(f"{len(rows)} runs already in {runs}; {len(plan(rows, args))} to do now (more once grids are ranked)",
          flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1,
                             initializer=_die_with_parent) as pool:
        running = {}
        while True:
            for job in plan(rows, args):
                if len(running) < args.jobs and key(job) not in running:
                    running[key(job)] = pool.submit(run_with_retries, {**job, "jobs": args.jobs})
            if not running:
                break
            done, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for k in [k for k, f in running.items() if f in done]:
                row = running.pop(k).result()
                with runs.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                print(row["phase"], name(row), row["steps"], "reached" if row["reached"] else "budget",
                      f"{row['final']:.3f}", f"{row['wall_s']:.0f} s", flush=True)
                write(rows, args)


# --- tables and plot -----------------------------------------------------------------------------------------------


def median_range(values, fmt: str) -> str:
    return f"{np.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})" if values else "–"


def write(rows: list, args) -> None:
    with open(f"{args.out}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "algo", "phase", "setting", "seed", "env_steps", "reached", "final_outcome", "episodes",
                    "target", "budget", "envs", "wall_s", "load_before", "load_after", "jobs"])
        for r in sorted(rows, key=key):
            w.writerow([r["task"], r["algo"], r["phase"], setting_text(r["setting"]), r["seed"], r["steps"],
                        r["reached"], f"{r['final']:.3f}", r["episodes"], *setup_of(r).values(), r["wall_s"],
                        r["load_before"], r["load_after"], r["jobs"]])
    loads = [x for r in rows for x in (r["load_before"], r["load_after"])]
    lines = ["# Classic control: SPPO vs RLlib PPO on outcome rewards, each tuned the same way", "", *provenance(),
             f"Tuning seeds {args.tune_seeds}, reported seeds {args.seeds}; targets judged on the mean outcome of the "
             f"last {WINDOW} completed training episodes; protocol: `benchmarks/classic_control.py`'s docstring. "
             f"Load average over all runs {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores, up to "
             f"{max(r['jobs'] for r in rows)} runs at a time: wall times are for planning, not comparison.", "",
             "| task (target, budget, envs per runner) | algorithm | pick (on the tuning seeds) | reached | env steps "
             "to the target, median (range) | final outcome, median (range) | tuning runs | wall s per run |",
             "|---|---|---|---|---|---|---|---|"]
    grids = ["", "## Tuning grids", "",
             "Per setting, on the tuning seeds: seeds reaching the target, mean env steps (a miss counts as the "
             "budget), mean final outcome. **Bold**: the pick.", ""]
    setups = {task: shared(task, args.max_env_steps) for task in dict.fromkeys(r["task"] for r in rows)}
    for task, setup in setups.items():  # (runs to another target or budget, or with other envs, are not this table's)
        target, budget = setup["target"], setup["budget"]
        for algo in KNOBS:
            t = tuning(rows, task, algo, args)
            mine = [r for r in rows if (r["task"], r["algo"]) == (task, algo) and setup_of(r) == setup]
            tuned, reported = ([r for r in mine if r["phase"] == phase] for phase in ("tune", "report"))
            if not tuned:
                continue
            where = ("" if "pick" not in t else " (inside the grid)" if t["inside"] else
                     f" (**at the grid's edge** after {t['moves']} moves)")
            pick = setting_text(t["pick"]) + where if "pick" in t else "tuning"
            reached = [r for r in reported if r["reached"]]
            lines.append(
                f"| {task} ({target:g}, {budget:,}, {setup['envs']}) | {algo} | {pick} | "
                f"{len(reached)}/{len(reported)} | "
                f"{median_range([r['steps'] for r in reached], ',.0f')} | "
                f"{median_range([r['final'] for r in reported], '.3f')} | {len(tuned)} | "
                f"{np.mean([r['wall_s'] for r in tuned + reported]):.0f} |")
            settings = sorted(dict.fromkeys(json.dumps(r["setting"], sort_keys=True) for r in tuned),
                              key=lambda s: (json.loads(s)["lr"], json.loads(s)[KNOBS[algo]]))
            grids += [f"**{task}, {algo}** (grid lrs {', '.join(f'{lr:g}' for lr in t['lrs'])}):", "",
                      "| setting | reached | mean env steps | mean final outcome |", "|---|---|---|---|"]
            for s in map(json.loads, settings):
                runs = [r for r in tuned if r["setting"] == s]
                reach, steps, final = score(runs, budget)
                b = "**" if s == t.get("pick") else ""
                grids.append(f"| {b}{setting_text(s)}{b} | {-reach}/{len(runs)} | {steps:,.0f} | {-final:.3f} |")
            grids.append("")
    Path(f"{args.out}.md").write_text("\n".join(lines + grids))
    plot([r for r in rows if setup_of(r) == setups[r["task"]]], args.out)


def plot(rows: list, out: str) -> None:
    """One panel per task: the reported runs' outcome (mean of the last 100 episodes) against env steps."""
    from matplotlib.figure import Figure

    reported = [r for r in rows if r["phase"] == "report"]
    tasks = list(dict.fromkeys(r["task"] for r in reported))
    if not tasks:
        return
    fig = Figure(figsize=(4 * len(tasks), 3.5), layout="tight")
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks):
        for i, algo in enumerate(KNOBS):
            for j, r in enumerate(r for r in reported if (r["task"], r["algo"]) == (task, algo)):
                steps, window = zip(*r["curve"])
                ax.plot(steps, window, color=f"C{i}", alpha=0.8,
                        label=f"{algo} ({setting_text(r['setting'])})" if j == 0 else None)
        ax.axhline(next(r["target"] for r in reported if r["task"] == task), color="grey", lw=0.5)
        ax.set(title=task, xlabel="env steps", ylabel=f"outcome (mean of the last {WINDOW} episodes)")
        ax.legend(fontsize=6)
    fig.savefig(f"{out}.png", dpi=100)


if __name__ == "__main__":
    main()
