"""benchmarks/classic_control.py's protocol: the same grid shape for both algorithms, a grid that moves until its best
learning rate is inside it, the pick made on tuning seeds and reported on others, the target judged on the last 100
episodes, and a rerun that resumes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import classic_control as cc  # noqa: E402


def args(*extra):
    return cc.parse(["--tasks", "cartpole", "--tune-seeds", "100", "101", "--seeds", "0", "1", "2", *extra])


def finish(job: dict, best_lr: dict) -> dict:
    """A made-up run: it reaches the target in fewer env steps the closer its lr is to its algorithm's best."""
    distance = abs(np.log10(job["setting"]["lr"] / best_lr[job["algo"]]))
    reached = bool(distance < 1.2)
    steps = int(50_000 * (1 + distance)) if reached else job["budget"] + 1_234  # a miss overshoots the budget
    final = 0.96 if reached else 0.9 - 0.1 * distance  # a miss ends higher the closer it is
    return {**job, "reached": reached, "steps": steps, "final": final, "episodes": 500,
            "wall_s": 1.0, "load_before": 0.1, "load_after": 0.1, "jobs": 1, "curve": [(steps, 0.5)]}


def run_all(a, best_lr: dict) -> list:
    """Runs the protocol to its end on made-up runs, one ``plan`` at a time (as the benchmark does after each run)."""
    rows = []
    while jobs := cc.plan(rows, a):
        rows.append(finish(jobs[0], best_lr))
    return rows


def test_the_ladder_of_learning_rates():
    assert [cc.ladder(i) for i in range(-8, -3)] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert [cc.rung(lr, "x") for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)] == list(range(-8, -3))
    with pytest.raises(SystemExit, match="x: lr 0.002 is not on the 1-3-10 ladder .*; set it to 0.003"):
        cc.rung(2e-3, "x")


def test_both_algorithms_start_on_the_same_grid_shape_on_the_tuning_seeds():
    jobs = cc.plan([], args())
    target, budget = (cc.shared("cartpole")[k] for k in ("target", "budget"))
    for algo, knob, values in [("SPPO", "critic_lr", {1e-3, 3e-3}), ("PPO", "lambda", {0.95, 1.0})]:
        mine = [j for j in jobs if j["algo"] == algo]
        centre = cc.rung(cc.experiment("cartpole", algo)["config"]["lr"], "x")  # the YAML's lr, in the middle
        assert sorted({j["setting"]["lr"] for j in mine}) == [cc.ladder(centre + d) for d in (-1, 0, 1)]
        assert {j["setting"][knob] for j in mine} == values and set(mine[0]["setting"]) == {"lr", knob}
        assert len(mine) == 3 * 2 * 2 and {j["seed"] for j in mine} == {100, 101}
        assert all(j["phase"] == "tune" and (j["target"], j["budget"]) == (target, budget) for j in mine)


def test_an_edge_pick_moves_the_grid_until_inside_then_is_reported_on_the_other_seeds():
    centre = {algo: cc.experiment("cartpole", algo)["config"]["lr"] for algo in cc.KNOBS}
    up = cc.ladder(cc.rung(centre["SPPO"], "x") + 1)  # the top of SPPO's first grid: the grid moves up once
    rows = run_all(args(), {"SPPO": up, "PPO": centre["PPO"]})
    sppo = cc.tuning(rows, "cartpole", "SPPO", args())
    ppo = cc.tuning(rows, "cartpole", "PPO", args())
    assert sppo["pick"]["lr"] == up and sppo["inside"] and sppo["moves"] == 1
    assert sppo["lrs"] == [cc.ladder(cc.rung(up, "x") + d) for d in (-1, 0, 1)]
    assert ppo["pick"]["lr"] == centre["PPO"] and ppo["inside"] and ppo["moves"] == 0
    tuned = {algo: [r for r in rows if (r["algo"], r["phase"]) == (algo, "tune")] for algo in cc.KNOBS}
    assert len(tuned["PPO"]) == 12 and len(tuned["SPPO"]) == 12 + 2 * 2  # the move ran one new lr x 2 knobs x 2 seeds
    for algo, t in [("SPPO", sppo), ("PPO", ppo)]:
        reported = [r for r in rows if (r["algo"], r["phase"]) == (algo, "report")]
        assert [r["seed"] for r in reported] == [0, 1, 2] and all(r["setting"] == t["pick"] for r in reported)
    assert cc.plan(rows, args()) == []  # nothing left: a rerun does nothing


def test_a_grid_stops_moving_after_max_moves_and_says_its_pick_is_at_the_edge():
    rows = run_all(args("--max-moves", "1"), {"SPPO": 1.0, "PPO": 1e-6})
    sppo, ppo = (cc.tuning(rows, "cartpole", algo, args("--max-moves", "1")) for algo in ("SPPO", "PPO"))
    assert not sppo["inside"] and sppo["pick"]["lr"] == sppo["lrs"][-1] and sppo["moves"] == 1
    assert not ppo["inside"] and ppo["pick"]["lr"] == ppo["lrs"][0]
    assert sum(r["phase"] == "report" for r in rows) == 6


def test_the_pick_is_never_reported_on_a_tuning_seed(capsys):
    with pytest.raises(SystemExit):
        cc.parse(["--tune-seeds", "100", "0", "--seeds", "0", "1", "2"])
    assert "seeds [0] are both tuning and reported seeds" in capsys.readouterr().err


def test_a_rerun_resumes_where_it_stopped():
    best = {"SPPO": 3e-3, "PPO": 3e-3}
    rows, first = [], cc.plan([], args())
    rows = [finish(j, best) for j in first[:5]]
    assert cc.plan(rows, args()) == first[5:]


def test_runs_count_only_with_the_yamls_envs_per_runner_and_older_runs_had_one():
    best = {"SPPO": 3e-3, "PPO": 3e-3}
    first = cc.plan([], args())
    assert {j["envs"] for j in first} == {cc.shared("cartpole")["envs"]} != {1}  # the YAMLs' (several envs)
    one_env = [{k: v for k, v in finish(j, best).items() if k != "envs"} for j in first]  # logged before envs was
    assert cc.plan(one_env, args()) == first  # runs with another env count are redone, and kept in the log
    assert cc.plan([finish(j, best) for j in first[:5]], args()) == first[5:]


def test_settings_rank_by_seeds_reaching_then_steps_with_a_miss_at_the_budget_then_outcome():
    budget = 100_000

    def runs(*steps_final):  # None: a miss (its steps overshoot the budget)
        return [{"reached": s is not None, "steps": s or budget + 999, "final": f} for s, f in steps_final]

    slow_but_both = runs((90_000, 0.9), (95_000, 0.9))
    fast_but_one = runs((10_000, 0.9), (None, 0.99))
    missed_higher = runs((None, 0.8), (None, 0.8))
    missed_lower = runs((None, 0.7), (None, 0.7))
    ranked = sorted([missed_lower, fast_but_one, missed_higher, slow_but_both], key=lambda r: cc.score(r, budget))
    assert ranked == [slow_but_both, fast_but_one, missed_higher, missed_lower]
    assert cc.score(fast_but_one, budget)[1] == (10_000 + budget) / 2


def test_the_target_is_judged_on_the_last_100_completed_episodes(ray_session):
    """A real run: random CartPole episodes last ~22 steps (outcome ~0.045), so a low target is reached as soon as 100
    episodes are complete (the first iteration), and an unreachable one runs to the budget. (One epoch an update:
    the stop rule is the subject, not learning.)"""
    job = {"task": "cartpole", "algo": "SPPO", "phase": "tune",
           "setting": {"lr": 3e-3, "critic_lr": 1e-3, "num_epochs": 1},
           "seed": 100, "jobs": 1}
    low = cc.run({**job, "target": 0.01, "budget": 100_000})
    assert low["reached"] and len(low["curve"]) == 1 and low["episodes"] >= 100 and 0.01 <= low["final"] < 0.1
    high = cc.run({**job, "target": 1.01, "budget": 8_000})
    assert not high["reached"] and high["steps"] >= 8_000 and len(high["curve"]) == 2
    assert high["curve"][0][0] < 8_000 <= high["curve"][1][0]


def test_tables_and_plot_are_written(tmp_path):
    a = args("--out", str(tmp_path / "cc"))
    rows = run_all(a, {algo: cc.experiment("cartpole", algo)["config"]["lr"] for algo in cc.KNOBS})  # no moves
    cc.write(rows, a)
    table = (tmp_path / "cc.md").read_text()
    target, budget, envs = cc.shared("cartpole").values()
    row = f"| cartpole ({target:g}, {budget:,}, {envs}) | SPPO |"
    sppo_row = next(line for line in table.splitlines() if line.startswith(row))
    assert "(inside the grid) | 3/3 | 50,000 (50,000–50,000) | 0.960 (0.960–0.960) | 12 |" in sppo_row
    assert (tmp_path / "cc.png").stat().st_size > 0
    assert len((tmp_path / "cc.csv").read_text().splitlines()) == 1 + len(rows)
    assert json.dumps(rows)  # records stay JSON (the runs log)
