"""The ``rllib`` command that Ray 2.60 dropped: ``rllib train`` and ``rllib evaluate``.

    rllib train file tuned_examples/cartpole_sppo.yaml [--stop JSON] [--storage-path DIR] [--resume]
    rllib train --algo SPPO --env OutcomeCartPole-v1 --stop '{"training_iteration": 5}' [--config JSON]
    rllib evaluate CHECKPOINT [--episodes N] [--explore]

YAML files use RLlib's legacy tuned-example schema ``{name: {run, env, config, stop}}`` (read by
``rllib_sppo.experiments``).
Bad input (malformed YAML, unknown algorithm, env or config key) prints one line
naming the problem and the file, with nothing before it, and exits with code 2.
The console: progress lines (``monitoring.Progress``), no log line a user cannot act on
(``monitoring.quiet_console`` in every process), then per trial a readable summary on stderr
and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

from rllib_sppo.cluster import check_resources
from rllib_sppo.experiments import UsageError, build_config, load_experiments, resolve_algorithm, tune_object

EXIT_USAGE = 2
EXIT_FAILED = 1  # a trial failed (its error is printed)


def _search_keys(value, prefix: tuple = ()) -> list[tuple]:
    """The key paths of a config dict that hold a Tune ``grid_search``."""
    if not isinstance(value, dict):
        return []
    if "grid_search" in value:
        return [prefix]
    return [path for k, v in value.items() for path in _search_keys(v, (*prefix, k))]


def _lookup(config: dict, path: tuple):
    for key in path:  # AlgorithmConfig.to_dict() keeps some keys private: model_config -> _model_config
        config = config.get(key, config.get(f"_{key}")) if isinstance(config, dict) else None
    return config


def run_experiment(name: str, exp: dict, where: str, storage_path: str | None, stop_override: dict | None,
                   resume: bool = False):
    from ray import tune

    from rllib_sppo.monitoring import Progress, plot_curves, plot_reliability

    algo_cls = resolve_algorithm(exp["run"], where)
    config = build_config(algo_cls, exp.get("env"), exp.get("config"), where)
    swept = _search_keys(exp.get("config"))
    if not swept:
        try:
            config.validate()
        except ValueError as e:
            raise UsageError(f"{where}: invalid config: {str(e).splitlines()[0]}") from None
    scheduler, search_alg = (tune_object(kind, exp[kind], where) if exp.get(kind) else None
                             for kind in ("scheduler", "search_alg"))
    ckpt = {"checkpoint_at_end": True, **exp.get("checkpoint_config", {})}
    storage = os.path.abspath(os.path.expanduser(storage_path or exp.get("storage_path") or "~/ray_results"))
    callbacks = [wandb_callback(exp["wandb"], os.path.join(storage, name))] if exp.get("wandb") is not None else []
    callbacks.append(Progress())
    stop = stop_override or exp.get("stop") or {}
    if resume:
        # Tune's saved experiment (stop, checkpoint_config, callbacks) goes on; unfinished and errored trials
        # continue from their latest checkpoint, finished ones stay finished.
        path = os.path.join(storage, name)
        if stop_override:
            raise UsageError("--stop cannot change a resumed experiment: it goes on with its saved stop criteria")
        if not tune.Tuner.can_restore(path):
            raise UsageError(f"{where}: nothing to resume: no experiment {name!r} in {storage}")
        start_ray()
        check_resources(algo_cls, config, bool(swept), where)
        tuner = tune.Tuner.restore(path, trainable=algo_cls, resume_errored=True)
    else:
        start_ray()
        check_resources(algo_cls, config, bool(swept), where)
        tuner = tune.Tuner(
            algo_cls,
            param_space=config,
            tune_config=tune.TuneConfig(num_samples=exp.get("num_samples", 1), scheduler=scheduler,
                                        search_alg=search_alg),
            run_config=tune.RunConfig(
                name=name, stop=stop, verbose=0, callbacks=callbacks,  # the console: Progress's lines, then a summary
                storage_path=storage, failure_config=tune.FailureConfig(max_failures=exp.get("max_failures", 0)),
                checkpoint_config=tune.CheckpointConfig(**ckpt)),
        )
    print(f"rllib: {'resuming' if resume else 'training'} {exp['run']} on {exp.get('env')}"
          + (f" until {json.dumps(stop)}" if stop and not resume else "")
          + f"; results in {os.path.join(storage, name)}", file=sys.stderr, flush=True)
    start = time.time()
    results = tuner.fit()
    for r in results:
        if r.error:  # Ray and Tune have printed the traceback; its last line says what went wrong
            cause = str(r.error).strip().splitlines()[-1]
            print(f"rllib: trial {os.path.basename(r.path)} failed: {cause} (traceback in {r.path}/error.txt)",
                  file=sys.stderr)
            continue
        m = r.metrics or {}
        env_runners = m.get("env_runners", {})
        curves = plot_curves(r)
        best = best_checkpoint(r)
        summary = {
            "experiment": name, "algo": exp["run"], "env": exp.get("env"),
            **({"swept": {"/".join(k): _lookup(r.config, k) for k in swept}} if swept else {}),
            "training_iteration": m.get("training_iteration"),
            "env_steps": env_runners.get("num_env_steps_sampled_lifetime"),
            "episode_return_mean": env_runners.get("episode_return_mean"),
            "wall_s": round(time.time() - start, 1),
            "checkpoint": r.checkpoint.path if r.checkpoint else None,
            "best_checkpoint": best["path"] if best else None,
            "curves": curves,
            "reliability": plot_reliability(r),
        }
        print_summary(summary, r, best)
        print(json.dumps(summary), flush=True)
    return results


def best_checkpoint(result) -> dict | None:
    """The kept checkpoint with the highest held-out accuracy measured at its iteration (its first avg@k), else the
    highest training return; with neither, the latest: ``{path, iteration, metric, value}``."""
    from ray.tune.utils import flatten_dict

    from rllib_sppo.monitoring import ACCURACY, RETURN, console_name, evaluated_at

    kept = [(c, flatten_dict(m, delimiter="/")) for c, m in result.best_checkpoints or []]
    if not kept:
        return None
    candidates = []
    for checkpoint, m in kept:
        it = m.get("training_iteration", 0)
        accuracy = sorted(k for k in m if k.startswith(ACCURACY) and "avg@" in k)
        metric = accuracy[0] if accuracy and evaluated_at(it, result.config) else RETURN
        value = m.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            name = "return" if metric == RETURN else console_name(metric)
            candidates.append(((metric != RETURN, value), {"path": checkpoint.path, "iteration": it, "metric": name,
                                                           "value": value}))
    if not candidates:
        checkpoint, m = max(kept, key=lambda c: c[1].get("training_iteration", 0))
        return {"path": checkpoint.path, "iteration": m.get("training_iteration"), "metric": None, "value": None}
    return max(candidates, key=lambda c: c[0])[1]


def print_summary(summary: dict, result, best: dict | None) -> None:
    """The end of a trial in a few readable lines on stderr (the JSON line on stdout follows)."""
    from ray.tune.utils import flatten_dict

    from rllib_sppo.monitoring import ACCURACY, RETURN, accuracy_curve, console_name

    final = flatten_dict(result.metrics or {}, delimiter="/").get(RETURN)
    parts = [f"return {final:.4g}"] if isinstance(final, (int, float)) else []
    df = result.metrics_dataframe
    for metric in sorted(c for c in df if c.startswith(ACCURACY)) if df is not None else []:
        data = accuracy_curve(df, metric, result.config)
        if len(data):  # the last measured value, and when
            last = data.iloc[-1]
            parts.append(f"{console_name(metric)} {last[metric]:.3f} (iter {last['training_iteration']:.0f})")
    steps = f", {summary['env_steps']:.0f} env steps" if summary["env_steps"] is not None else ""
    lines = [f"done: {summary['experiment']} ({summary['algo']} on {summary['env']}), iteration "
             f"{summary['training_iteration']}{steps}, {summary['wall_s']:.0f} s",
             "final: " + (" | ".join(parts) or "no metrics")]
    if best:
        measured = f" ({best['metric']} {best['value']:.4g} at iteration {best['iteration']})" if best["metric"] \
            else f" (the latest, iteration {best['iteration']})"
        lines += [f"best checkpoint: {best['path']}{measured}",
                  f"evaluate it: rllib evaluate {shlex.quote(best['path'])}"]
    if summary["curves"]:
        lines.append(f"curves: {summary['curves']}")
    if summary["reliability"]:
        lines.append(f"critic's reliability diagram: {summary['reliability']}")
    for line in lines:
        print(f"rllib: {line}", file=sys.stderr)
    sys.stderr.flush()


def start_ray() -> None:
    """Starts Ray for ``rllib train`` (unless it runs already), with ``quiet_console`` in every worker, and leaves
    the console to ``Progress``."""
    import ray

    from rllib_sppo.grafana import install_dashboard

    # Tune's console tables print even at verbose=0 unless its legacy output is chosen (which then prints nothing).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        ray.init(runtime_env={"worker_process_setup_hook": "rllib_sppo.monitoring.quiet_console"})
    install_dashboard()  # SPPO's Grafana dashboard beside Ray's (docs/monitoring.md)


def wandb_callback(options: dict, run_dir: str):
    """Tune's wandb logger (same metric names as the console), writing under ``run_dir/wandb``.
    Without ``WANDB_API_KEY`` it logs offline; ``wandb sync`` uploads later."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    os.makedirs(run_dir, exist_ok=True)
    options = {"project": "rllib-sppo", "dir": run_dir, **(options or {})}
    if not os.environ.get("WANDB_API_KEY") and os.environ.setdefault("WANDB_MODE", "offline") == "offline":
        # Also explicit: a Ray worker started before this line would not see the variable.
        options.setdefault("mode", "offline")
        print(f"rllib: wandb logs offline (no WANDB_API_KEY) into {run_dir}/wandb; upload later with "
              "`wandb sync`", file=sys.stderr)
    return WandbLoggerCallback(**options)


def evaluate(checkpoint: str, episodes: int, explore: bool) -> dict:
    """Runs ``episodes`` episodes with the checkpoint's policy on its own env; for LLM bandits, scores the
    held-out split instead (avg@k and pass@k, k = the config's ``eval_samples_per_prompt``, and with SPPO's critic
    its calibration on them: ``critic/heldout_*`` and the reliability diagram's bins)."""
    import numpy as np
    from ray.rllib.algorithms.algorithm import Algorithm
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    import envs  # noqa: F401
    import rllib_sppo  # noqa: F401

    if not os.path.isdir(checkpoint):
        raise UsageError(f"checkpoint {checkpoint!r} is not a directory")
    try:
        algo = Algorithm.from_checkpoint(os.path.abspath(checkpoint))
    except (ValueError, FileNotFoundError) as e:  # cut short (SPPO's manifest) or not an RLlib checkpoint
        raise UsageError(f"cannot restore {checkpoint!r}: {str(e).splitlines()[0]}") from None
    runner_cls = algo.config.env_runner_cls or SingleAgentEnvRunner
    heldout = hasattr(runner_cls, "heldout_samples")  # LLM bandits: the held-out split, k samples each (avg@k, pass@k)
    config = algo.config
    if not heldout:
        # N episodes from one env: from several, RLlib's sample(num_episodes=N) returns the first N to end, short ones
        config = config.copy(copy_frozen=False).env_runners(num_envs_per_env_runner=1)
    runner = runner_cls(config=config)
    runner.set_state({"rl_module": algo.learner_group.get_state(components="learner/rl_module", inference_only=True)[
        "learner"]["rl_module"]})
    if heldout:
        from rllib_sppo.llm.critic import critic_logits
        from rllib_sppo.llm.evaluation import heldout_report

        samples = runner.heldout_samples(algo.config.eval_samples_per_prompt)
        logits = (critic_logits(algo.learner_group, samples["texts"]) if getattr(algo.config, "prompt_critic", False)
                  else None)  # and the critic's calibration on them
        report = {"checkpoint": checkpoint, "env": algo.config.env, **heldout_report(samples, logits)}
        runner.stop()
        algo.stop()
        return report
    done = []
    while len(done) < episodes:
        done += [e for e in runner.sample(num_episodes=episodes - len(done), explore=explore) if e.is_done]
    outcomes = np.array([e.get_return() for e in done])
    raw = [e.get_infos()[-1].get("raw_return") for e in done]
    report = {"checkpoint": checkpoint, "env": algo.config.env, "episodes": len(done),
              "episode_return_mean": float(outcomes.mean()), "episode_return_std": float(outcomes.std()),
              "episode_len_mean": float(np.mean([len(e) for e in done]))}
    if all(x is not None for x in raw):
        report["raw_return_mean"] = float(np.mean(raw))
    algo.stop()
    return report


def _json_arg(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rllib", description="Train and evaluate RLlib algorithms (with SPPO).")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a tuned-example YAML file or from flags")
    train.add_argument("file_kw", nargs="?", choices=["file"], help="'file' then PATH to run a YAML file")
    train.add_argument("path", nargs="?", help="tuned-example YAML file")
    train.add_argument("--algo", "--run", dest="algo", help="algorithm name (SPPO, PPO, ...)")
    train.add_argument("--env", help="environment id")
    train.add_argument("--config", default="{}", help="config overrides as JSON")
    train.add_argument("--stop", help='stop criteria as JSON, e.g. \'{"training_iteration": 10}\'')
    train.add_argument("--storage-path", help="where Tune writes results and checkpoints")
    train.add_argument("--wandb", metavar="PROJECT", help="log to wandb (offline without WANDB_API_KEY)")
    train.add_argument("--resume", action="store_true",
                       help="continue the experiment (same name and storage path) from its latest checkpoints")
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--explore", action="store_true", help="sample actions instead of acting greedily")
    return p


def _quiet_console() -> None:
    from rllib_sppo.monitoring import quiet_console  # (imports RLlib: not before the YAML file is read)

    quiet_console()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.getcwd() not in sys.path and "" not in sys.path:  # dotted paths to the user's own modules, as python -m
        sys.path.insert(0, os.getcwd())
    try:
        if args.command == "evaluate":
            _quiet_console()
            print(json.dumps(evaluate(args.checkpoint, args.episodes, args.explore)))
            return 0
        stop = _json_arg(args.stop, "--stop") if args.stop else None
        overrides = _json_arg(args.config, "--config")
        if args.file_kw == "file":
            if not args.path:
                raise UsageError("usage: rllib train file PATH.yaml")
            spec = load_experiments(args.path)
            where = args.path
        else:
            if not (args.algo and args.env):
                raise UsageError("rllib train needs 'file PATH.yaml' or both --algo and --env")
            spec = {f"{args.algo}_{args.env}": {"run": args.algo, "env": args.env,
                                                 "config": {}}}
            where = "command line"
        _quiet_console()
        failed = False
        for name, exp in spec.items():
            exp["config"] = {**(exp.get("config") or {}), **overrides}  # --config's top-level keys win
            if args.wandb:
                exp["wandb"] = {**(exp.get("wandb") or {}), "project": args.wandb}
            results = run_experiment(name, exp, where, args.storage_path, stop, args.resume)
            failed = failed or any(r.error for r in results)
        return EXIT_FAILED if failed else 0
    except UsageError as e:
        print(f"rllib: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
