"""SPPO vs RLlib PPO on classic control under outcome rewards, each tuned with the same learning-rate sweep.

    python benchmarks/classic_control.py --seeds 0 1 2 --jobs 2

For every task, seed and setting runs the task's tuned examples on the same outcome reward, to the same stop (the
YAML's target mean outcome, or its env-step cap, whichever comes first):
- SPPO (``tuned_examples/<task>_sppo.yaml``) at each ``--lrs`` (the critic keeps the YAML's ``critic_lr``);
- RLlib PPO (``<task>_ppo.yaml``: gamma 1.0, the same network sizes, batch, minibatch and epochs as SPPO) at each
  ``--lrs`` x ``--lambdas``;
- for CartPole, RLlib PPO on the dense reward with its authors' upstream settings (``cartpole_ppo_dense.yaml``),
  the reference point.
Each algorithm's best setting per task (most seeds reaching the target, then fewest env steps, counting a miss as
the cap, then the highest final outcome) is reported over the same seeds. Caps are env steps, so a run's outcome
does not depend on the machine's load; wall times do, and each run records the load average before and after it.
Runs go to ``benchmarks/results/classic_control_runs.jsonl`` as they finish, and a rerun skips the ones already
there (a long benchmark cut short keeps what it measured); tables and plot are rewritten after every run:
``benchmarks/results/classic_control.{md,csv,png}``. Each run is its own process with one torch thread.
"""

import argparse
import csv
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from harness import provenance

OUT = Path("benchmarks/results/classic_control")
RUNS = Path(f"{OUT}_runs.jsonl")
TARGET = "env_runners/episode_return_mean"
STEPS = "num_env_steps_sampled_lifetime"
DENSE = {"cartpole": ("tuned_examples/cartpole_ppo_dense.yaml", 500.0)}  # YAML, return that maps to outcome 1


def run(job: dict) -> dict:
    """One training run to its stop; in its own process (one torch thread)."""
    import torch

    torch.set_num_threads(1)
    from rllib_sppo.experiments import build_config, load_experiments, resolve_algorithm

    (_, exp), = load_experiments(job["yaml"]).items()
    stop = dict(exp["stop"])
    load_before = os.getloadavg()[0]
    algo = build_config(resolve_algorithm(exp["run"], job["yaml"]), exp["env"],
                        {**exp["config"], **job["setting"], "seed": job["seed"]}, job["yaml"]).build_algo()
    start, curve = time.perf_counter(), []
    while True:
        result = algo.train()
        steps = result["env_runners"][STEPS]
        ret = result["env_runners"].get("episode_return_mean", np.nan)
        curve.append((int(steps), float(ret)))
        done = [k for k, v in stop.items() if _metric(result, k) >= v]
        if done:
            break
    algo.stop()
    return {**job, "steps": int(steps), "wall_s": round(time.perf_counter() - start, 1), "return": float(ret),
            "target": stop[TARGET], "cap": stop[STEPS], "reached": done[0] == TARGET,
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2), "curve": curve}


def run_with_retries(job: dict, tries: int = 3) -> dict:
    """``run``, again after a failure to start (a Ray that timed out starting on a loaded machine, say)."""
    for attempt in range(tries):
        try:
            return run(job)
        except Exception as e:  # noqa: BLE001  (reported once the tries are spent)
            if attempt == tries - 1:
                raise
            print(f"retrying {job['task']} {job['algo']} {job['setting']} seed {job['seed']} after: {e}", flush=True)
            time.sleep(30)


def _metric(result: dict, key: str) -> float:
    value = result
    for part in key.split("/"):
        value = value.get(part, {}) if isinstance(value, dict) else {}
    return value if isinstance(value, (int, float)) else -np.inf


def jobs(tasks, seeds, lrs, lambdas, n_jobs) -> list[dict]:
    out = []
    for task in tasks:
        settings = [("SPPO", "outcome", f"tuned_examples/{task}_sppo.yaml", {"lr": lr}) for lr in lrs]
        settings += [("PPO", "outcome", f"tuned_examples/{task}_ppo.yaml", {"lr": lr, "lambda": lam})
                     for lr in lrs for lam in lambdas]
        if task in DENSE:
            settings.append(("PPO", "dense", DENSE[task][0], {}))
        out += [{"task": task, "algo": a, "reward": r, "yaml": y, "setting": s, "seed": seed, "jobs": n_jobs}
                for a, r, y, s in settings for seed in seeds]
    return out


def key(row: dict) -> str:
    return json.dumps([row["task"], row["algo"], row["reward"], row["setting"], row["seed"]], sort_keys=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["cartpole", "mountaincar", "pendulum", "lunarlander", "hopper"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.95, 1.0], help="PPO's GAE lambda (gamma 1.0)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one process (and one torch thread) each")
    args = p.parse_args()
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in RUNS.read_text().splitlines()] if RUNS.exists() else []
    done = {key(r) for r in rows}
    todo = [j for j in jobs(args.tasks, args.seeds, args.lrs, args.lambdas, args.jobs) if key(j) not in done]
    print(f"{len(todo)} runs to do, {len(rows)} already in {RUNS}", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(run_with_retries, todo):
            with RUNS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(row["task"], row["algo"], row["reward"], row["setting"], row["seed"], row["steps"], row["wall_s"],
                  round(row["return"], 3), "reached" if row["reached"] else "cap", flush=True)
            write(rows)


def summarise(rows: list) -> list[dict]:
    """One entry per (task, algorithm, reward, setting) over its seeds, and which setting is each one's best."""
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["algo"], r["reward"], json.dumps(r["setting"], sort_keys=True)), []).append(r)
    out = []
    for (task, algo, reward, setting), sel in groups.items():
        sel = sorted(sel, key=lambda r: r["seed"])
        out.append({"task": task, "algo": algo, "reward": reward, "setting": json.loads(setting), "runs": sel,
                    "reached": sum(r["reached"] for r in sel), "mean_steps": float(np.mean([r["steps"] for r in sel])),
                    "mean_return": float(np.mean([r["return"] for r in sel]))})
    for s in out:  # the best setting of each (task, algorithm, reward)
        rivals = [o for o in out if (o["task"], o["algo"], o["reward"]) == (s["task"], s["algo"], s["reward"])]
        rank = lambda o: (-o["reached"], o["mean_steps"], -o["mean_return"])  # noqa: E731
        s["best"] = min(rivals, key=rank) is s
    return out


def _setting(s: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in s.items()) or "upstream"


def write(rows: list) -> None:
    with open(f"{OUT}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "algo", "reward", "setting", "seed", "env_steps", "wall_s", "final_return", "target",
                    "cap", "reached", "load_before", "load_after"])
        for r in sorted(rows, key=key):
            w.writerow([r["task"], r["algo"], r["reward"], _setting(r["setting"]), r["seed"], r["steps"], r["wall_s"],
                        f"{r['return']:.3f}", r["target"], r["cap"], r["reached"], r["load_before"], r["load_after"]])
    summary = summarise(rows)
    loads = [x for r in rows for x in (r["load_before"], r["load_after"])]
    lines = ["# Classic control: SPPO vs RLlib PPO on the same outcome reward, each with its best learning rate", "",
             *provenance(),
             "Per setting, over its seeds: how many reach the target mean outcome before the env-step cap, the mean "
             "env steps (a miss counts as the cap) and the final outcome per seed. **Bold**: the setting each "
             "algorithm is reported with (most seeds reaching, then fewest steps, then highest outcome). Env steps "
             "and outcomes do not depend on the machine's load; wall times do (load average over all runs "
             f"{min(loads):.1f}-{max(loads):.1f} on 2 cores, with up to {max(r['jobs'] for r in rows)} runs at a time).",
             "",
             "| task | algorithm | reward | setting | reached | mean env steps | per seed: env steps (outcome) | "
             "mean wall s |", "|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["task"], s["algo"] != "SPPO", s["reward"], _setting(s["setting"]))):
        b = "**" if s["best"] else ""
        per_seed = " / ".join(f"{r['steps']:,} ({r['return']:.3f})" + ("" if r["reached"] else " cap")
                              for r in s["runs"])
        lines.append(f"| {s['task']} | {b}{s['algo']}{b} | {s['reward']} | {b}{_setting(s['setting'])}{b} | "
                     f"{b}{s['reached']}/{len(s['runs'])}{b} | {s['mean_steps']:,.0f} | {per_seed} | "
                     f"{np.mean([r['wall_s'] for r in s['runs']]):.0f} |")
    Path(f"{OUT}.md").write_text("\n".join(lines) + "\n")
    plot([s for s in summary if s["best"]])


def plot(best: list) -> None:
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(s["task"] for s in best))
    fig = Figure(figsize=(4 * len(tasks), 3.5), layout="tight")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for s in (s for s in best if s["task"] == task):
            scale = DENSE[task][1] if s["reward"] == "dense" else 1.0  # the dense return on the outcome's scale
            for i, r in enumerate(s["runs"]):
                steps, ret = zip(*r["curve"])
                ax.plot(steps, np.array(ret) / scale, color={"SPPO": "C0", "PPO": "C1"}[s["algo"]],
                        ls="--" if s["reward"] == "dense" else "-", alpha=0.8,
                        label=f"{s['algo']} {s['reward']} ({_setting(s['setting'])})" if i == 0 else None)
        ax.axhline(next(s["runs"][0]["target"] for s in best if (s["task"], s["reward"]) == (task, "outcome")),
                   color="grey", lw=0.5)
        ax.set(title=task, xlabel="env steps")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("episode outcome (mean)")
    fig.savefig(f"{OUT}.png", dpi=100)


if __name__ == "__main__":
    main()
