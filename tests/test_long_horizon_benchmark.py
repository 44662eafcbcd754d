"""benchmarks/long_horizon.py's tuning protocol: each estimator's pick is the rate with the highest mean held-out
accuracy over its budget, a pick on the grid's edge widens the grid by one rate (the same spacing) until it is inside,
and only the tuning seed's long-horizon runs count."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_horizon as lh  # noqa: E402


def made_up(horizon, name, lr, seed, best_lr):
    """A run whose curve rises to a level that falls with the (log) distance of ``lr`` from ``best_lr``."""
    level = 0.8 - 0.2 * abs(np.log10(lr / best_lr))
    curve = [{"train_s": t, "iteration": t, "tokens": t, "avg@4": level * t / 60} for t in (0, 30, 60)]
    return {"label": lh.label(horizon, name, lr, 8), "seed": seed, "curve": curve, "key": "avg@4"}


def test_score_is_the_mean_accuracy_over_the_budget():
    run = {"curve": [{"train_s": 0, "a": 0.2}, {"train_s": 10, "a": 0.4}, {"train_s": 30, "a": 0.4}], "key": "a"}
    assert lh.score(run) == pytest.approx((10 * 0.3 + 20 * 0.4) / 30)


def test_an_edge_pick_widens_the_grid_until_the_pick_is_inside(monkeypatch):
    best = {"sppo": 3e-4, "grpo": 3e-5}  # sppo's best is past the grid's top edge: two widenings to get inside
    done = []

    def run(args, horizon, rates, seeds, minutes):
        assert minutes == args.tune_minutes
        for name, lrs in rates.items():
            for lr in lrs:
                for seed in seeds:
                    key = (name, lr, seed)
                    if key not in [d[:3] for d in done]:
                        done.append((*key, made_up(horizon, name, lr, seed, best[name])))
        return [d[3] for d in done]

    monkeypatch.setattr(lh, "run", run)
    args = lh.argparse.Namespace(lrs=[1e-5, 3e-5, 1e-4], tune_seed=100, tune_minutes=12, max_widen=2, estimators=["sppo", "grpo"], n=8)
    lh.tune(args)
    runs = [d[3] for d in done] + [made_up("long", "sppo", 1e-3, 0, 1e-3), made_up("short", "grpo", 1e-4, 100, 1e-4)]
    assert lh.picks(runs, args) == {"sppo": 3e-4, "grpo": 3e-5}  # other seeds and horizons do not count
    assert sorted(lr for name, lr, _ in (d[:3] for d in done) if name == "sppo") == [1e-5, 3e-5, 1e-4, 3e-4, 9e-4]
    assert sorted(lr for name, lr, _ in (d[:3] for d in done) if name == "grpo") == [1e-5, 3e-5, 1e-4]
