"""Tune's schedulers and search algorithms from a YAML, run by `rllib train file`: ASHA stops trials at its rungs, PBT
restores a better trial's checkpoint into a worse one (weights, optimizers, the sampler's place, the random state)
with a mutated lr that the next update uses."""

import glob
import itertools
import json
import os
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ray.rllib.core import DEFAULT_MODULE_ID

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.cli import main
from rllib_sppo.experiments import load_experiments, tune_object
from rllib_sppo.private_api import local_learner

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"



@pytest.mark.parametrize("block, message", [
    ("scheduler: {type: asha}", "unknown scheduler 'asha'; Tune has ['async_hyperband', "),
    ("scheduler: {type: ASHAScheduler, grace: 2}", "scheduler ASHAScheduler has no argument 'grace'"),
    ("scheduler: async_hyperband", "scheduler must be a mapping with a type"),
    ("scheduler: {type: pb2, metric: m, mode: max, hyperparam_bounds: {lr: [0.001, 0.01]}}",
     "scheduler pb2: Please install scikit-learn to use PB2."),
    ("search_alg: {type: optuna, metric: m, mode: max}", "search_alg optuna: Optuna must be installed! Run `pip "
                                                          "install optuna`."),
    ("search_alg: {type: no_such_search}", "unknown search_alg 'no_such_search'"),
])
def test_a_bad_scheduler_or_search_block_is_one_line_and_exit_2(yaml_file, tmp_path, capsys, block, message):
    path = yaml_file(f"x:\n  run: SPPO\n  env: OutcomeCartPole-v1\n  stop: {{training_iteration: 1}}\n  {block}\n")
    assert main(["train", "file", path, "--storage-path", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err == f"rllib: error: {path}: {message}" + err.split(message, 1)[1] and err.count("\n") == 1, err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("path, scheduler, trials", [
    ("tuned_examples/arith_tiny_sppo_asha.yaml", "AsyncHyperBandScheduler", 8),
    ("tuned_examples/arith_tiny_sppo_pbt.yaml", "PopulationBasedTraining", 4),
])
def test_the_scheduler_examples_build_their_schedulers(path, scheduler, trials):
    from ray.tune.search.variant_generator import generate_variants

    (name, exp), = load_experiments(path).items()
    built = tune_object("scheduler", exp["scheduler"], path)
    assert type(built).__name__ == scheduler and built.metric == "evaluation/env_runners/accuracy/avg@4"
    assert len(list(generate_variants(exp["config"]))) == trials


def test_a_checkpoint_restored_under_a_new_lr_trains_with_it_from_the_checkpoints_place_and_random_state(tmp_path):
    """What PBT's exploit does: a trial built with a mutated config restores a better trial's checkpoint. The restored
    trial draws on from the checkpoint's place in the data with the checkpoint's random state, and its optimizers
    take the new config's learning rate at once (RLlib alone keeps the checkpoint's until after the next update)."""
    from rllib_sppo.llm.assets import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny", seed=0)

    def config(lr):
        return (SPPOConfig().llm(policy=tiny, engine="transformers")
                .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 40,
                                                               "chat_template_model": tiny})
                .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
                .training(lr=lr, critic_lr=1e-3, train_batch_size_per_learner=8, minibatch_size=8,
                          max_response_tokens=4)
                .debugging(seed=0))

    def lrs(algo):
        return {name: optimizer.param_groups[0]["lr"]
                for name, optimizer in local_learner(algo.learner_group).get_optimizers_for_module(DEFAULT_MODULE_ID)}

    better = config(1e-3).build_algo()
    for _ in range(2):
        better.train()
    path = better.save_to_path(str(tmp_path / "ckpt"))
    place = better.env_runner.sampler.get_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())  # what the checkpoint's generators draw next
    better.stop()
    exploiting = config(1e-2).build_algo()
    exploiting.restore_from_path(path)
    assert exploiting.env_runner.sampler.get_state() == place == {"epoch": 0, "pos": 16}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    assert lrs(exploiting) == {"policy": 1e-2, "critic": 1e-3}
    result = exploiting.train()
    assert result["training_iteration"] == 3 and exploiting.env_runner.sampler.get_state() == {"epoch": 0, "pos": 24}
    exploiting.stop()


def summaries(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.system
def test_asha_from_yaml_stops_the_trials_below_its_cutoff(yaml_file, ray_session, tmp_path, capsys):
    """Four trials, one at a time (each holds both CPUs), ASHA's rungs at iterations 1 and 2 on a metric known in
    advance (each trial's learning rate, highest first): the first trial trains to max_t, each later one is below the
    median of those recorded at rung 1 and is stopped there."""
    path = yaml_file("""\
        asha:
          run: SPPO
          env: OutcomeCartPole-v1
          stop: {training_iteration: 3}
          scheduler: {type: ASHAScheduler, time_attr: training_iteration,
                      metric: learners/default_policy/policy_learning_rate, mode: max, max_t: 3, grace_period: 1,
                      reduction_factor: 2}
          config:
            seed: 0
            num_env_runners: 0
            num_cpus_for_main_process: 2
            lr: {grid_search: [0.004, 0.002, 0.001, 0.0005]}
            train_batch_size_per_learner: 200
            minibatch_size: 100
            model_config: {pi_hiddens: [8], vf_hiddens: [8]}
        """)
    assert main(["train", "file", path, "--storage-path", str(tmp_path / "results")]) == 0
    iterations = {s["swept"]["lr"]: s["training_iteration"] for s in summaries(capsys.readouterr().out)}
    assert iterations == {0.004: 3, 0.002: 1, 0.001: 1, 0.0005: 1}


def results(trial_dir: str) -> list[dict]:
    with open(os.path.join(trial_dir, "result.json")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.system
def test_pbt_from_yaml_continues_a_worse_trial_from_a_better_ones_checkpoint(ray_session, tmp_path, capsys,
                                                                              tiny_llm_experiment):
    """Two LLM trials, one at a time, different batch sizes (so their places in the data differ), evaluated on the
    held-out split every iteration; PBT (synch) at iteration 2: the lower one continues from the upper one's
    checkpoint with its config and a mutated lr. Its next result is the source's next iteration: the same iteration
    count, env steps and place in the data (the source's batches, not its own), trained with the new lr."""
    path = tiny_llm_experiment("pbt", lr=1e-3, train_batch_size_per_learner={"grid_search": [8, 16]},
                               num_cpus_for_main_process=2, evaluation_interval=1, eval_samples_per_prompt=2)
    spec = yaml.safe_load(open(path))
    spec["pbt"]["stop"] = {"training_iteration": 4}
    spec["pbt"]["scheduler"] = {
        "type": "PopulationBasedTraining", "time_attr": "training_iteration", "perturbation_interval": 2,
        "metric": "evaluation/env_runners/accuracy/avg@2", "mode": "max", "quantile_fraction": 0.5, "synch": True,
        "resample_probability": 0.0, "hyperparam_mutations": {"lr": [1e-4, 1e-3, 1e-2]}}
    open(path, "w").write(yaml.safe_dump(spec))
    storage = tmp_path / "results"
    assert main(["train", "file", path, "--storage-path", str(storage)]) == 0, capsys.readouterr().err[-3000:]
    with open(storage / "pbt" / "pbt_global.txt") as f:
        target, source, target_it, source_it, _, new_config = json.loads(f.readline())
    # (Tune logs the source's iteration before the result on which, synch, it decided: 1 here; its checkpoint is at 2.)
    assert target_it == 2 and source_it in (1, 2) and new_config["lr"] in (1e-4, 1e-2)  # one step along the list
    trial = {tag: glob.glob(str(storage / "pbt" / f"*_{tag}_*"))[0] for tag in (target, source)}
    after = {r["training_iteration"]: r for r in results(trial[target])}
    before = {r["training_iteration"]: r for r in results(trial[source])}

    def epoch(r):
        return r["env_runners"]["rollout/epoch"]

    assert epoch(after[2]) != epoch(before[2])  # their own places differ: 2 x 8 or 2 x 16 prompts drawn
    first = [r for r in results(trial[target]) if r["config"]["lr"] == new_config["lr"]][0]
    assert first["training_iteration"] == 3 and epoch(first) == epoch(before[3])  # the source's next batch
    assert first["env_runners"]["num_env_steps_sampled_lifetime"] == before[3]["env_runners"][
        "num_env_steps_sampled_lifetime"]
    assert first["learners"]["default_policy"]["policy_learning_rate"] == new_config["lr"]


def fake_rows(lrs, accuracies, interval=2, critic_lr=1e-4, start=1):
    """A trial's result.json rows: one per lr (its iteration's config), held-out accuracy at every evaluated
    iteration (repeated in between, as RLlib reports it), the evaluation before training in the first row."""
    rows, last = [], None
    for i, lr in enumerate(lrs):
        it = start + i
        last = accuracies.get(it, last)
        row = {"training_iteration": it, "time_this_iter_s": 2.0, "config": {"lr": lr, "critic_lr": critic_lr,
                                                                             "evaluation_interval": interval}}
        if last is not None:
            row["evaluation"] = {"env_runners": {"accuracy/avg@4": last}}
        if i == 0 and start == 1:
            row["evaluation_before_training"] = {"accuracy/avg@4": 0.25}
        rows.append(row)
    return rows


@pytest.fixture
def sched_benchmark(monkeypatch):
    """benchmarks/schedulers.py (and its harness) as modules."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import schedulers

    return schedulers


def test_the_scheduler_benchmark_counts_each_trials_own_seconds_and_picks_the_best_last_evaluation(
        tmp_path, sched_benchmark):
    """benchmarks/schedulers.py's pure parts on made-up trials: a trial's seconds are its own iterations' (a PBT trial
    continuing from another's checkpoint at iteration 3 counts 2 iterations, not 4), its curve only the evaluated
    iterations, a sweep's best the highest last evaluation; the table and ASHA's goal from a runs file."""
    import harness

    schedulers = sched_benchmark
    full = schedulers.trial_record(fake_rows([1e-5] * 4, {2: 0.5, 4: 0.75}), "accuracy/avg@4")
    assert full == {"lr": [1e-5], "critic_lr": 1e-4, "iterations": 4, "trial_s": 8.0, "trial_iterations": 4,
                    "curve": [[0, 0.0, 0.25], [2, 4.0, 0.5], [4, 8.0, 0.75]]}
    exploited = schedulers.trial_record(fake_rows([2e-5, 2e-5], {2: 0.4}) + fake_rows([4e-5, 4e-5], {4: 0.8}, start=3),
                                        "accuracy/avg@4")
    assert exploited["lr"] == [2e-5, 4e-5] and exploited["trial_s"] == 8.0 and exploited["curve"][-1] == [4, 8.0, 0.8]
    stopped = schedulers.trial_record(fake_rows([4e-5] * 2, {2: 0.3}), "accuracy/avg@4")
    never = schedulers.trial_record(fake_rows([1e-6], {}, interval=0), "accuracy/avg@4")
    assert never["curve"] == [[0, 0.0, 0.25]] and stopped["curve"][-1] == [2, 4.0, 0.3]
    grid = schedulers.sweep_record([full, stopped, full])
    assert grid["trial_s"] == 20.0 and grid["trial_iterations"] == 10
    assert grid["best"] == 0.75 and grid["best_trial"] == {
        "lr": [1e-5], "critic_lr": 1e-4, "iterations": 4}
    asha = schedulers.sweep_record([stopped, full])
    runs = [{"label": "grid", "seed": 0, "key": "accuracy/avg@4", "wall_s": 30.0, **grid, "load_before": 0.2,
             "load_after": 2.0, "trial_list": [full, stopped, full]},
            {"label": "ASHA", "seed": 0, "key": "accuracy/avg@4", "wall_s": 15.0, **asha, "load_before": 1.5,
             "load_after": 2.0}]
    # seed 1: the grid on a machine twice as slow (probe 2.0 s against 1.0): its seconds do not compare, iterations do
    runs += [r | {"seed": 1, "machine": {"cpu": "x", "probe_s": probe}, "trial_s": r["trial_s"] * probe,
                  "load_before": 0.2} for r, probe in zip(runs, (2.0, 1.0))]
    out = tmp_path / "schedulers"
    (tmp_path / "schedulers_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    loaded = harness.load_runs(out)
    schedulers.write(loaded, {"grace_period": 2, "reduction_factor": 2, "max_t": 4}, out)
    text = (tmp_path / "schedulers.md").read_text()
    assert "| grid | 0 | 3 | 20 | 100% | 10 | 100% | 30 | - | 0.750 | [1e-05], 0.0001, 4 |" in text
    assert "| ASHA | 0 | 2 | 12 | 60% | 6 | 60% | 15 | - | 0.750 |" in text
    assert "ASHA, seed 0: 60% of the grid's trial-seconds, best 0.750 against the grid's 0.750: goal (<= 40%, the " \
           "same best) not met." in text
    assert "| ASHA | 1 | 2 | 12 | 30% | 6 | 60% | 15 | 1.0 | 0.750 |" in text
    assert "ASHA, seed 1: 60% of the grid's trial-iterations (the two sweeps ran on machines of different speed), " \
           "best 0.750" in text
    assert "Runs taken under load" in text and "ASHA seed 0 (load 1.5 before" in text
    assert "ASHA replayed on the grid's curves, seed 0 (Tune's cutoff rule, one trial at a time): in the grid's " \
           "order 100% of its trial-iterations, best 0.750; over all 6 orders of its 3 trials," in text


def test_asha_replayed_on_a_grid_stops_what_tunes_cutoff_stops(sched_benchmark):
    """ASHA (grace 2, reduction factor 2, max 8: rungs at 2 and 4) on three trials of 8 iterations, one at a time.
    In the order A, B, C: A goes on (first at every rung); B's 0.4 at 2 is below the rung's 0.5, stopped (2
    iterations); C's 0.6 at 2 is above the median of 0.5 and 0.4, its 0.65 at 4 above A's 0.6: 8 + 2 + 8. In the order
    C, B, A: B stops at 2; A's 0.5 at 2 is the median of 0.6 and 0.4, goes on, its 0.6 at 4 is below C's 0.65:
    8 + 2 + 4, and A's last evaluation is its 0.6 at 4."""
    a = {"iterations": 8, "curve": [[0, 0, 0.2], [2, 1, 0.5], [4, 2, 0.6], [6, 3, 0.6], [8, 4, 0.7]]}
    b = {"iterations": 8, "curve": [[0, 0, 0.2], [2, 1, 0.4], [4, 2, 0.7], [8, 4, 0.9]]}
    c = {"iterations": 8, "curve": [[0, 0, 0.2], [2, 1, 0.6], [4, 2, 0.65], [8, 4, 0.8]]}
    asha = {"grace_period": 2, "reduction_factor": 2, "max_t": 8}
    assert sched_benchmark.asha_replay([a, b, c], asha, [0, 1, 2]) == (18, 0.8)
    assert sched_benchmark.asha_replay([a, b, c], asha, [2, 1, 0]) == (14, 0.8)
    # B first runs to its 0.9; A goes on at 2 (0.5 >= 0.4) and stops at 4 (0.6 < 0.7); C's 0.65 at 4 is the median
    assert sched_benchmark.asha_replay([a, b, c], asha, [1, 0, 2]) == (20, 0.9)
    for order in itertools.permutations(range(3)):  # and in every order, what Tune's own ASHAScheduler decides
        assert sched_benchmark.asha_replay([a, b, c], asha, order) == tune_asha([a, b, c], asha, order), order


def tune_asha(trials, asha, order):
    """Tune's ASHAScheduler, through its public calls, fed each trial's evaluations one trial at a time: the
    iterations it lets each trial train and the best last evaluation kept (the control for ``asha_replay``)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = ASHAScheduler(time_attr="it", metric="m", mode="max", **asha)
    spent, kept = 0, []
    for i in order:
        trial = types.SimpleNamespace(trial_id=str(i))
        scheduler.on_trial_add(None, trial)
        stop, last = trials[i]["iterations"], None
        for it, _, value in trials[i]["curve"][1:]:
            last = value
            if scheduler.on_trial_result(None, trial, {"it": it, "m": value}) == TrialScheduler.STOP and it < stop:
                stop = it
                break
        spent, kept = spent + stop, kept + [last]
    return spent, max(kept)


def test_the_scheduler_benchmark_runs_the_asha_example_without_its_scheduler_as_the_grid(sched_benchmark):
    specs = sched_benchmark.sweep_specs("tuned_examples/arith_tiny_sppo_asha.yaml",
                                        "tuned_examples/arith_tiny_sppo_pbt.yaml")
    (grid_name, grid), = specs["grid"].items()
    (asha_name, asha), = specs["ASHA"].items()
    assert grid_name == "arith-tiny-sppo-asha-grid" and "scheduler" not in grid and "scheduler" in asha
    assert {k: v for k, v in asha.items() if k != "scheduler"} == grid
    assert specs["PBT"]["arith-tiny-sppo-pbt"]["scheduler"]["type"] == "PopulationBasedTraining"
