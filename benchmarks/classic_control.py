"""SPPO vs RLlib PPO on classic control, side by side in one invocation: same tasks, seeds and machine.

    python benchmarks/classic_control.py --tasks cartpole mountaincar pendulum lunarlander hopper --seeds 0

For each task and seed runs the task's tuned examples, ``tuned_examples/<task>_sppo.yaml`` and
``<task>_ppo.yaml`` (both on the same outcome reward), each to its own stop criterion, and for CartPole
also RLlib PPO on the dense reward (the unwrapped env, stopped at the same 450-step level). Writes env
steps, wall time and the final return to ``benchmarks/results/classic_control.{md,csv,png}``.
"""

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from provenance import provenance

# dense env, the raw return matching the outcome target, and the return that maps to outcome 1 (for the plot)
DENSE = {"cartpole": ("CartPole-v1", 450.0, 500.0)}
OUT = Path("benchmarks/results/classic_control")


def run(yaml_path: str, seed: int, env: str | None = None, target: float | None = None) -> dict:
    from rllib_sppo.cli import build_config, load_experiments, resolve_algorithm

    (name, exp), = load_experiments(yaml_path).items()
    stop = dict(exp["stop"])
    if target is not None:  # dense reward: same stop, on the raw return
        stop["env_runners/episode_return_mean"] = target
    algo = build_config(resolve_algorithm(exp["run"], yaml_path), env or exp["env"],
                        {**exp["config"], "seed": seed}, yaml_path).build_algo()
    start, curve = time.perf_counter(), []
    while True:
        result = algo.train()
        steps = result["env_runners"]["num_env_steps_sampled_lifetime"]
        ret = result["env_runners"].get("episode_return_mean", np.nan)
        curve.append((steps, ret))
        done = [k for k, v in stop.items() if _metric(result, k) >= v]
        if done:
            break
    algo.stop()
    return {"steps": int(steps), "wall_s": time.perf_counter() - start, "return": float(ret),
            "target": stop["env_runners/episode_return_mean"], "stopped_by": done[0], "curve": curve}


def _metric(result: dict, key: str) -> float:
    value = result
    for part in key.split("/"):
        value = value.get(part, {}) if isinstance(value, dict) else {}
    return value if isinstance(value, (int, float)) else -np.inf


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["cartpole", "mountaincar", "pendulum", "lunarlander", "hopper"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-dense", action="store_true", help="skip RLlib PPO on the dense CartPole reward")
    args = p.parse_args()
    import envs  # noqa: F401  (registers the Outcome* envs)

    rows = []
    for task in args.tasks:
        variants = [("SPPO", "outcome", f"tuned_examples/{task}_sppo.yaml", None, None),
                    ("PPO", "outcome", f"tuned_examples/{task}_ppo.yaml", None, None)]
        if not args.no_dense and task in DENSE:
            variants.append(("PPO", "dense", f"tuned_examples/{task}_ppo.yaml", *DENSE[task][:2]))
        for seed in args.seeds:
            for algo, reward, path, env, target in variants:
                r = run(path, seed, env, target)
                rows.append({"task": task, "algo": algo, "reward": reward, "seed": seed, **r})
                print(task, algo, reward, seed, r["steps"], round(r["wall_s"], 1), round(r["return"], 3),
                      r["stopped_by"], flush=True)
                write(rows)  # after every run: a long benchmark cut short keeps what it measured


def write(rows: list) -> None:
    import matplotlib

    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{OUT}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "algo", "reward", "seed", "env_steps", "wall_s", "final_return", "target", "stopped_by"])
        for r in rows:
            w.writerow([r["task"], r["algo"], r["reward"], r["seed"], r["steps"], f"{r['wall_s']:.1f}",
                        f"{r['return']:.3f}", r["target"], r["stopped_by"]])
    lines = ["# Classic control: SPPO vs RLlib PPO, env steps and wall time to the stop criterion", "",
             *provenance(),
             "| task | algorithm | reward | target | seeds reaching it | median env steps | median wall s | "
             "median final return |", "|---|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["task"], r["algo"], r["reward"]) for r in rows)
    for task, algo, reward in keys:
        sel = [r for r in rows if (r["task"], r["algo"], r["reward"]) == (task, algo, reward)]
        hit = [r for r in sel if r["stopped_by"] == "env_runners/episode_return_mean"]
        lines.append(f"| {task} | {algo} | {reward} | {sel[0]['target']} | {len(hit)}/{len(sel)} | "
                     f"{np.median([r['steps'] for r in sel]):,.0f} | {np.median([r['wall_s'] for r in sel]):.0f} | "
                     f"{np.median([r['return'] for r in sel]):.3f} |")
    lines += ["", "A run that does not reach its target stops at its cap (env steps or training seconds, see the "
              "YAML); its row then reports the cap."]
    Path(f"{OUT}.md").write_text("\n".join(lines) + "\n")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            steps, ret = zip(*r["curve"])
            scale = DENSE[task][2] if r["reward"] == "dense" else 1.0  # dense return on the outcome's scale
            ax.plot(steps, np.array(ret) / scale, label=f"{r['algo']} {r['reward']} s{r['seed']}")
        ax.set_title(task)
        ax.set_xlabel("env steps")
    axes[0][0].set_ylabel("episode outcome (mean)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(f"{OUT}.png", dpi=100)


if __name__ == "__main__":
    main()
