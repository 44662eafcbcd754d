"""SPPO in its own regime: long chains of thought. SPPO (N=1) against GRPO and RLOO (N=8) and verl's token-level PPO
(N=1, gamma = lambda = 1, a critic read at every token) on the chain task (``envs.chain``) at three horizons, each
estimator with its own policy learning rate, tuned the same way.

    python benchmarks/long_horizon.py --lrs 1e-5 3e-5 1e-4 --tune-seed 100 --seeds 0 1 2

The study, in order (each run in a fresh process through ``harness.run_seed``; runs go to ``<out>_runs.jsonl`` as they
finish and a rerun of the command skips them, so it runs in pieces; ``--phase`` runs one part only):
1. ``tune``: every estimator at every ``--lrs`` on ``--tune-seed`` (never reported), at the long horizon, for
   ``--tune-minutes`` of training each. Each estimator's pick is the rate with the highest mean held-out accuracy over
   the iterations all its tuning runs reached (the area under its curve: level and speed both count; over iterations,
   not minutes, because a piece of the study may run on a faster machine than the next: ``harness.machine`` records
   each run's, and ``common`` says more); a pick on the edge of the grid adds the next
   rate beyond that edge (the same spacing), until the pick is inside (``--max-widen`` times at most). A tuning run is
   a screen, shorter than a reported one: at 12 minutes GRPO's curve was still rising at its best rates.
2. ``report``: at the picked rates, ``--seeds``: all four estimators at the long horizon; SPPO and GRPO at the medium
   and short horizons, and token-level PPO at the short one too (does the tail effect grow with the answer?).
The critics share the examples' critic rate. All estimators pose the same prompts per iteration (GRPO and RLOO draw
N samples of each, with N times the batch and minibatch: the same prompts per optimizer step) and get the same
training budget per horizon in the report phase (``--budget``, evaluations left out; long enough that GRPO's curve
flattens, which the results check); the held-out split (avg@4 and pass@4 of exact answers, T = 0.6) is evaluated
every tenth of the budget.

Writes ``<out>.md`` (per horizon and estimator: peak held-out avg@4 and pass@4, training seconds and generated tokens
to reach 95% of GRPO's peak, the SPPO : GRPO ratio per seed (a seed's runs run back to back, SPPO's and GRPO's first;
a seed whose two ran on machines of different speed gives no ratio), the iteration's split into generation, scoring,
update and weight sync, and whether each estimator's curve had flattened (``plateau``; GRPO's decides the budget)),
``<out>.csv`` (every curve) and ``<out>.png`` (accuracy against training seconds, one panel per horizon; the SPPO : GRPO
wall-clock ratio against response length).

``--task smollm2 --critic-layers 2`` runs the same protocol on the real model (``tuned_examples/smollm2_rg_sppo.yaml``,
one horizon, 64-token answers): SPPO with a critic of the policy's first 2 layers against GRPO, the check the paper
recommends for large policies (does the cheaper critic turn GRPO's wall-clock lead around?):

    python benchmarks/long_horizon.py --task smollm2 --critic-layers 2 --seeds 0 1
"""

import argparse
from pathlib import Path

import numpy as np

import harness
from harness import estimators, reach
from rllib_sppo.estimators import ESTIMATORS

HORIZONS = ("short", "medium", "long")
ALL = ("sppo", "grpo", "rloo", "ppo")
#: {task: (the YAML of each horizon, the horizon the rates are tuned on, what runs where after tuning as (horizon,
#: estimators), the reported runs' training minutes per horizon, the output path stem, the report's title)}.
TASKS = {
    "chain": ({h: f"tuned_examples/chain_{h}_sppo.yaml" for h in HORIZONS}, "long",
              (("long", ALL), ("medium", ("sppo", "grpo")), ("short", ("sppo", "grpo", "ppo"))),
              {"short": 4, "medium": 8, "long": 24}, "benchmarks/results/long_horizon",
              "Long chains of thought: SPPO vs GRPO vs RLOO vs token-level PPO on envs.chain, three horizons"),
    "smollm2": ({"smollm2": "tuned_examples/smollm2_rg_sppo.yaml"}, "smollm2", (("smollm2", ("sppo", "grpo")),),
                {"smollm2": 24}, "benchmarks/results/long_horizon_smollm2",
                "The real model: SPPO (with --critic-layers: a critic of the policy's first layers) vs GRPO on "
                "SmolLM2-135M"),
}
#: The share of GRPO's peak the time-to-target columns use.
SHARE = 0.95
#: A curve is flat at the end of its budget when its fitted plateau is less than this above it (under one
#: evaluation's noise, about ±0.03 for 128 problems x 4 samples, and under the 5% of GRPO's peak the target leaves).
FLAT = 0.02


def main(argv: list | None = None):
    args = arguments(argv)
    if args.phase in ("tune", "all"):
        tune(args)
    if args.phase in ("report", "all"):
        picked = picks(harness.load_runs(harness.out_stem(args)), args)
        missing = [e for e in args.compared if e not in picked]
        if missing:
            raise SystemExit(f"long_horizon: no pick yet for {missing}: run the tune phase to its end first")
        for horizon, names in args.reported:
            run(args, horizon, {name: [picked[name]] for name in names}, args.seeds, args.budget[horizon])


def arguments(argv: list | None = None) -> argparse.Namespace:
    """The command line, with the task's YAMLs, tuned horizon, reported runs and budget filled in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="chain")
    p.add_argument("--critic-layers", type=int,
                   help="the critic of SPPO and token-level PPO: the policy's first N transformer layers (LLM tasks)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4], help="the policy learning-rate grid")
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the reported seeds")
    p.add_argument("--tune-minutes", type=float, default=12, help="training minutes of each tuning run")
    p.add_argument("--budget", nargs="+", default=[],
                   help="training minutes of each reported run at each horizon (the task's by default: chain's are "
                        "short=4 medium=8 long=24)")
    p.add_argument("--max-widen", type=int, default=2, help="grid extensions at most, per estimator")
    p.add_argument("--n", type=int, default=8, help="samples per prompt of GRPO and RLOO")
    p.add_argument("--phase", choices=["tune", "report", "all"], default="all")
    p.add_argument("--estimators", nargs="+", choices=ALL,
                   help="tune these now (a piece of the tune phase; by default all the task compares, which the "
                        "report phase needs picked)")
    p.add_argument("--config", default="{}", help="JSON config overrides for every run (e.g. a smoke test's)")
    p.add_argument("--out", help="output path stem (the task's by default: benchmarks/results/long_horizon[_<task>])")
    p.add_argument("--lock", help="hold an exclusive lock on this file during each run (see harness.parser)")
    args = p.parse_args(argv)
    args.yamls, args.tuned_on, args.reported, budget, out, args.title = TASKS[args.task]
    args.budget = budget | {h: float(m) for h, m in (b.split("=") for b in args.budget)}
    args.compared = list(dict.fromkeys(name for _, names in args.reported for name in names))
    args.estimators = args.estimators or args.compared
    args.out = args.out or out
    return args


def label(args, horizon: str, name: str, lr: float) -> str:
    small = f", critic = first {args.critic_layers} layers" if args.critic_layers and ESTIMATORS[name].critic else ""
    return f"{horizon} | {next(iter(estimators(1, 1, args.n, [name])))}{small} | lr {lr:g}"


def parse(run: dict) -> tuple[str, str, float]:
    """(horizon, estimator label, lr) of a run."""
    horizon, estimator, lr = run["label"].split(" | ")
    return horizon, estimator, float(lr.removeprefix("lr "))


def run(args, horizon: str, rates: dict, seeds: list, minutes: float) -> list:
    """The estimators of ``rates`` ({name: [lr, ...]}) at ``horizon`` on ``seeds``, ``minutes`` of training each (runs
    already done are skipped)."""
    from rllib_sppo.experiments import load_experiments

    yaml = args.yamls[horizon]
    (_, exp), = load_experiments(yaml).items()
    cfg = exp["config"]
    compared = dict(zip(rates, estimators(cfg["train_batch_size_per_learner"], cfg["minibatch_size"], args.n,
                                          list(rates)).values()))
    if args.critic_layers:
        small = {"llm": {**cfg["llm"], "critic_layers": args.critic_layers}}
        compared = {name: {**o, **small} if ESTIMATORS[name].critic else o for name, o in compared.items()}
    # every estimator's first rate, then every one's second, ...: side by side early (the report's one rate each: SPPO
    # and GRPO first, back to back)
    todo = {label(args, horizon, name, lr): {**compared[name], "lr": lr} for i in range(max(map(len, rates.values())))
            for name, lr in ((n, sorted(lrs)[i]) for n, lrs in rates.items() if i < len(lrs))}
    piece = argparse.Namespace(yaml=yaml, seeds=seeds, minutes=minutes, eval_every=10**9,
                               eval_every_s=minutes * 6, config=args.config, out=args.out, lock=args.lock)
    return harness.run_variants(piece, todo, lambda runs, _, out: write(runs, args, out))


def tune(args) -> None:
    """The grid on the tuning seed, widened where a pick is on its edge."""
    grid = {name: sorted(args.lrs) for name in args.estimators}
    for _ in range(args.max_widen + 1):
        runs = run(args, args.tuned_on, grid, [args.tune_seed], args.tune_minutes)
        widen = {}
        for name in args.estimators:
            lrs, best = grid[name], picks(runs, args)[name]
            step = lrs[1] / lrs[0]
            if best == lrs[0]:
                widen[name] = [float(f"{lrs[0] / step:.3g}"), *lrs]
            elif best == lrs[-1]:
                widen[name] = [*lrs, float(f"{lrs[-1] * step:.3g}")]
        if not widen:
            return
        grid |= widen


def score(run: dict, iterations: float | None = None) -> float:
    """The mean held-out accuracy over the run's first ``iterations`` (all by default; the curve read linearly between
    evaluations): the area under its curve against training, level and speed both counting."""
    curve, key = run["curve"], run["key"]
    x, y = np.array([c["iteration"] for c in curve], float), np.array([c[key] for c in curve])
    end = x[-1] if iterations is None else iterations
    keep = x < end
    x, y = np.append(x[keep], end), np.append(y[keep], np.interp(end, x, y))
    return float(np.trapezoid(y, x) / max(end, 1e-9))


def tuning_runs(runs: list, args) -> dict:
    """{estimator name: [(lr, run), ...]}: the tuning seed's runs at the tuned horizon."""
    grid = {}
    for r in runs:
        horizon, _, lr = parse(r)
        if horizon == args.tuned_on and r["seed"] == args.tune_seed:
            grid.setdefault(next(n for n in ALL if label(args, horizon, n, lr) == r["label"]), []).append((lr, r))
    return grid


def common(grid_runs: list) -> int:
    """The iterations every run of an estimator's grid reached: its rates are compared over these. Each run trains
    the same minutes, but not always on a machine of the same speed (see ``harness.machine``), and a faster one gets
    more iterations in them; over the same iterations each rate has had the same training (the same prompts an
    iteration), whichever machine ran it. The limit: a rate that slows its own iterations (longer answers) shortens
    every rate's window, and what each one costs a second does not count."""
    return min(r["iterations"] for _, r in grid_runs)


def picks(runs: list, args) -> dict:
    """{estimator name: its picked lr}: the rate whose tuning run has the highest mean held-out accuracy over the
    iterations all of the estimator's tuning runs reached (estimators with no tuning run left out)."""
    return {name: max(grid, key=lambda lr_run: score(lr_run[1], common(grid)))[0]
            for name, grid in tuning_runs(runs, args).items()}


def peak(run: dict, key: str) -> float:
    return max(c[key] for c in run["curve"])


def write(runs: list, args, out: Path) -> None:
    key = runs[0]["key"]
    pass_key = key.replace("avg@", "pass@")
    harness.write_curves_csv(out, runs, "run", ["seed", "iteration", "train_s", "tokens", key, pass_key])
    fmt = harness.mean_range
    per_seed = lambda xs: " / ".join("never" if np.isnan(x) else f"{x:,.0f}" for x in xs)  # noqa: E731
    reported = [r for r in runs if r["seed"] != args.tune_seed]
    lines = [f"# {args.title}", "",
             *harness.provenance(("ray", "torch", "vllm")),
             f"Held-out {key} and {pass_key} of exact answers ({held_out(args)}) at T = 0.6, evaluated every "
             f"tenth of the budget; training minutes per reported run {args.budget} "
             f"(evaluations not counted); the same prompts per iteration for all estimators. Target = {SHARE:.0%} of "
             f"GRPO's peak {key} (the mean over its seeds). Mean (min-max) over seeds.", "",
             f"## Tuning (seed {args.tune_seed}, {args.tuned_on} horizon, {args.tune_minutes:g} min a run, not "
             f"reported): mean held-out {key} over the iterations every run of the estimator reached", "",
             "| estimator | lr | iterations compared | mean accuracy over them (the pick's score) | "
             f"peak {key} | iterations | machine probe s | load before |", "|---" * 8 + "|"]
    chosen = picks(runs, args)
    grids = tuning_runs(runs, args)
    for name, grid in ((n, grids[n]) for n in ALL if n in grids):
        compared = common(grid)
        for lr, r in sorted(grid, key=lambda lr_run: lr_run[0]):
            mark = " (picked)" if chosen[name] == lr else ""
            lines.append(f"| {parse(r)[1]} | {lr:g}{mark} | {compared} | {score(r, compared):.3f} | "
                         f"{peak(r, key):.3f} | {r['iterations']} | {harness.probe(r)} | {r['load_before']} |")
    lines += ["", "The machine probe is `harness.machine`'s seconds for a fixed small-tensor workload (lower is "
                  "faster; \"-\" for a run recorded before the probe existed): runs on machines of different speed are "
                  "compared over the iterations they all reached, not over their minutes."]
    ratios = {}
    for horizon in [h for h in reversed(args.yamls) if any(parse(r)[0] == h for r in reported)]:
        here = [r for r in reported if parse(r)[0] == horizon]
        grpo = [r for r in here if parse(r)[1].startswith("GRPO")]
        target = SHARE * float(np.mean([peak(r, key) for r in grpo])) if grpo else np.nan
        lines += ["", f"## {horizon} horizon ({args.budget[horizon]:g} min a run; target {target:.3f})", "",
                  f"| estimator | lr | seeds | {key} before | peak {key} | peak {pass_key} | iterations | "
                  "training s to the target, per seed | generated tokens to it | generate / score / update / sync s "
                  "per iteration | generation share | machine probe s, per seed |", "|---" * 12 + "|"]
        for estimator in dict.fromkeys(parse(r)[1] for r in here):
            sel = [r for r in here if parse(r)[1] == estimator]
            parts = [np.mean([r[k] for r in sel]) for k in ("generate_s", "score_s", "update_s", "sync_s")]
            lines.append(
                f"| {estimator} | {parse(sel[0])[2]:g} | {len(sel)} | {fmt([r['curve'][0][key] for r in sel])} | "
                f"{fmt([peak(r, key) for r in sel])} | {fmt([peak(r, pass_key) for r in sel])} | "
                f"{np.mean([r['iterations'] for r in sel]):.0f} | "
                f"{per_seed([reach(r['curve'], key, target, 'train_s') for r in sel])} | "
                f"{per_seed([reach(r['curve'], key, target, 'tokens') for r in sel])} | "
                f"{' / '.join(f'{p:.2f}' for p in parts)} | {parts[0] / np.mean([r['iter_s'] for r in sel]):.0%} | "
                f"{' / '.join(harness.probe(r) for r in sel)} |")
        sppo = {r["seed"]: r for r in here if parse(r)[1].startswith("SPPO")}
        ratio, bounds = [], []  # a seed where only one of the two reaches the target within its budget: a bound
        for g in (g for g in grpo if g["seed"] in sppo):
            s = sppo[g["seed"]]
            a, b = (reach(r["curve"], key, target, "train_s") for r in (g, s))
            if not harness.same_machine(g, s):
                bounds += ["", f"Seed {g['seed']}: SPPO and GRPO ran on machines of different speed (probe "
                               f"{harness.probe(s)} s against {harness.probe(g)} s), so its seconds are not compared; "
                               "run the pair again on one machine."]
            elif np.isfinite(a) and np.isfinite(b):
                ratio.append(a / b)
            elif np.isfinite(a):
                bounds += ["", f"Seed {g['seed']}: only GRPO reaches the target ({a:,.0f} s), so SPPO : GRPO is below "
                               f"{a / s['curve'][-1]['train_s']:.2f}x."]
            elif np.isfinite(b):
                bounds += ["", f"Seed {g['seed']}: only SPPO reaches the target ({b:,.0f} s), so SPPO : GRPO is above "
                               f"{g['curve'][-1]['train_s'] / b:.2f}x."]
        if ratio:
            ratios[horizon] = ratio
            lines += ["", f"SPPO : GRPO in training seconds to the target: {np.mean(ratio):.2f}x (per seed "
                          f"{', '.join(f'{x:.2f}x' for x in ratio)}; range {min(ratio):.2f}-{max(ratio):.2f}x)."]
        lines += bounds
        lines += flattened(here, key)
    lines += harness.under_load(runs)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    plot(reported, list(args.yamls), ratios, key, out)
    print("\n".join(lines), flush=True)


def held_out(args) -> str:
    """What the task's held-out accuracy counts, read from its (first) YAML: the reward that must pay 1 and the
    problems."""
    from rllib_sppo.experiments import load_experiments

    (_, exp), = load_experiments(next(iter(args.yamls.values()))).items()
    env = exp["config"]["env_config"]
    why = (": the boxed answer right and every line of the working the reference's"
           if env["reward_fn"] == "working" else "")
    return f"reward_fn `{env['reward_fn']}` pays 1.0{why}; {env['heldout_size']} problems"


def flattened(here: list, key: str) -> list[str]:
    """Whether the curves had flattened by the end of the budget, per estimator (GRPO's decides whether the budget is
    long enough): ``plateau`` fitted to its seeds' evaluations pooled, flat when less than ``FLAT`` is left to gain."""
    fits = {}
    for estimator in dict.fromkeys(parse(r)[1] for r in here):
        fit = plateau([r for r in here if parse(r)[1] == estimator], key)
        fits[estimator] = ("no plateau in sight (still rising)" if fit is None else
                           f"{fit[0]:.3f} (tau {fit[1]:,.0f} s; {fit[2]:.3f} left to gain at the end: "
                           f"{'flat' if fit[2] < FLAT else 'still rising'})")
    return ["", "Plateaus (y = a - b exp(-t / tau) fitted by least squares to each estimator's evaluations, its seeds "
                f"pooled; flat = less than {FLAT} left to gain at the end of the budget, under one evaluation's noise "
                "of about ±0.03; GRPO's verdict says whether the budget is long enough): "
                f"{'; '.join(f'{e} {v}' for e, v in fits.items())}."]


def plateau(runs: list, key: str) -> tuple[float, float, float] | None:
    """(a, tau, left): the saturating curve y = a - b exp(-t / tau) fitted by least squares to the evaluations of
    ``runs`` against training seconds (tau on a log grid up to four budgets, a and b exact for each), and what it has
    left to gain at the runs' mean last training second; None when the best tau is the grid's largest (no plateau in
    sight within the data)."""
    t = np.array([c["train_s"] for r in runs for c in r["curve"]])
    y = np.array([c[key] for r in runs for c in r["curve"]])
    end = float(np.mean([r["curve"][-1]["train_s"] for r in runs]))

    def fit(tau: float):
        x = np.stack([np.ones_like(t), -np.exp(-t / tau)], axis=1)
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        return float(np.sum((x @ coef - y) ** 2)), coef

    taus = end * np.geomspace(0.02, 4.0, 200)
    errors, coefs = zip(*map(fit, taus))
    best = int(np.argmin(errors))
    if best == len(taus) - 1:
        return None
    a, b = coefs[best]
    return float(a), float(taus[best]), float(b * np.exp(-end / taus[best]))


def plot(runs: list, horizons: list, ratios: dict, key: str, out: Path) -> None:
    """Accuracy against training seconds, one panel per horizon; the SPPO : GRPO ratio against the response length of
    the chain task's horizons (its reference working's length: one token a character)."""
    from matplotlib.figure import Figure

    from envs.chain import HORIZONS as STEPS, chain_records

    horizons = [h for h in horizons if any(parse(r)[0] == h for r in runs)]
    if not horizons:
        return
    lengths = {h: np.mean([len(r["extra_info"]["solution"]) for r in chain_records(1000, STEPS[h])])
               for h in ratios if h in STEPS}
    fig = Figure(figsize=(5 * (len(horizons) + bool(lengths)), 4), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(horizons) + bool(lengths)))
    names = list(dict.fromkeys(parse(r)[1] for r in runs))
    for ax, horizon in zip(axes, horizons):
        for r in (r for r in runs if parse(r)[0] == horizon):
            i = names.index(parse(r)[1])
            ax.plot([c["train_s"] for c in r["curve"]], [c[key] for c in r["curve"]], marker=".", color=f"C{i}",
                    alpha=0.8, label=parse(r)[1] if r["seed"] == min(x["seed"] for x in runs) else None)
        ax.set(title=f"{horizon} horizon", xlabel="training wall-clock (s)", ylabel=f"held-out {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if lengths:
        ax = axes[-1]
        for horizon, length in lengths.items():
            ax.scatter([length] * len(ratios[horizon]), ratios[horizon], color="C0")
            ax.plot([length], [np.mean(ratios[horizon])], marker="_", markersize=20, color="k")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(title="SPPO : GRPO wall-clock to 95% of GRPO's peak", xlabel="response tokens", ylabel="ratio (x)")
        ax.grid(alpha=0.3)
    fig.savefig(f"{out}.png", dpi=100)


if __name__ == "__main__":
    main()
