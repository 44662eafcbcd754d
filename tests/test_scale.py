"""Scaling out with Ray: two DDP learners equal one learner on the same episodes; two EnvRunners sample and get the
learner's weights; a grid-search sweep runs through `rllib train file`."""

import json
import pickle
import textwrap

import numpy as np
import pytest

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.cli import main

MODULE = "default_policy"


def config(**learners):
    return (SPPOConfig().environment("OutcomeCartPole-v1")
            .training(lr=3e-3, critic_lr=3e-3, num_epochs=3, shuffle_batch_per_epoch=False)
            .rl_module(model_config={"pi_hiddens": [16], "vf_hiddens": [16]})
            .learners(num_cpus_per_learner=0.5, **learners).debugging(seed=0))


def learner_weights(algo, inference_only=False):
    state = algo.learner_group.get_state(components="learner/rl_module", inference_only=inference_only)
    return state["learner"]["rl_module"][MODULE]


def record_gradients(algo) -> None:
    """Each learner keeps the gradients of its optimizer steps as they step (after DDP's averaging; the learner frees
    them right after the step), by parameter name."""
    def install(learner):
        names = {id(p): name for name, p in learner.module[MODULE].unwrapped().named_parameters()}
        learner.stepped_gradients = {}

        def keep(optimizer, args, kwargs):
            learner.stepped_gradients.update({names[id(p)]: p.grad.numpy().copy() for group in optimizer.param_groups
                                              for p in group["params"] if p.grad is not None})

        for optimizer in learner.optimizers:
            optimizer.register_step_pre_hook(keep)

    for result in algo.learner_group.foreach_learner(install):
        result.get()


def last_gradients(algo):
    """Each learner's gradients of its last optimizer step (``record_gradients``), by parameter name."""
    return [r.get() for r in algo.learner_group.foreach_learner(lambda learner: learner.stepped_gradients)]


def paired_episodes(runner, pairs):
    """Episodes in pairs of equal length (different states and actions): split between two learners, each gets
    as many steps and episodes as the other, so the mean of their losses is the loss of the whole batch."""
    by_length, chosen = {}, []
    while len(chosen) < 2 * pairs:
        for episode in runner.sample(num_episodes=20):
            twin = by_length.pop(len(episode), None)
            if twin is None:
                by_length[len(episode)] = episode
            elif len(chosen) < 2 * pairs:
                chosen += [twin, episode]
    return chosen


@pytest.mark.system
def test_two_ddp_learners_equal_one_learner_on_the_same_episodes(ray_session):
    sampler = config(num_learners=0).build_algo()
    episodes = paired_episodes(sampler.env_runner, pairs=8)
    initial = learner_weights(sampler)
    sampler.stop()
    steps = sum(map(len, episodes))
    weights, grads = {}, {}
    # minibatch_size is per learner: every optimizer step sees the whole batch, on one learner or split over two;
    # "half": one learner on half the episodes, the control that shows what the tolerance tells apart.
    for run, num_learners, data, minibatch_size in ((1, 0, episodes, steps), (2, 2, episodes, steps // 2),
                                                    ("half", 0, episodes[::2], steps // 2)):
        algo = config(num_learners=num_learners).training(
            train_batch_size_per_learner=minibatch_size, minibatch_size=minibatch_size).build_algo()
        algo.learner_group.set_state({"learner": {"rl_module": {MODULE: initial}}})
        record_gradients(algo)
        algo.learner_group.update(**algo._learner_data(data), num_epochs=3, minibatch_size=minibatch_size)
        weights[run], grads[run] = learner_weights(algo), last_gradients(algo)
        algo.stop()
    one, (first, second), half = grads[1][0], grads[2], grads["half"][0]
    error = lambda g, name: np.linalg.norm(g[name] - one[name]) / np.linalg.norm(one[name])
    for name in one:
        assert np.array_equal(first[name], second[name])  # DDP: both learners stepped with the averaged gradient
        assert error(first, name) <= 1e-5, name  # float32 summation order only (measured <= 1e-6)
        assert np.allclose(weights[2][name], weights[1][name], rtol=0, atol=1e-6), name
        assert np.abs(weights[1][name] - initial[name]).max() > 1e-3  # 3 AdamW steps moved every tensor
    assert max(error(half, name) for name in one) > 0.5  # half the episodes: another gradient (policy: ~70-100 %)


def group_episodes(groups: int, n: int):
    """``groups`` prompts with ``n`` one-step samples each (GROUP_ID = the prompt), of uneven lengths."""
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from rllib_sppo.connectors import GROUP_ID

    lengths = [[1 + (3 * g + j) % 5 for j in range(n)] for g in range(groups)]
    return [SingleAgentEpisode(observations=[0] * (k + 1), actions=[0] * k, rewards=[0.0] * k,
                               extra_model_outputs={GROUP_ID: [g] * k}, len_lookback_buffer=0)
            for g in range(groups) for k in lengths[g]]


def test_groups_stay_whole_across_learners():
    """GRPO N=4 over 2 learners: a group is the unit dealt out (RLlib would cut by steps, so each learner's group
    statistics would come from fragments; with num_learners == N GRPO's advantage would be 0); loads stay even."""
    from rllib_sppo.connectors import GROUP_ID
    from rllib_sppo.sppo import deal_episodes

    episodes = group_episodes(groups=10, n=4)
    shards = deal_episodes(episodes, 2)
    owner = {}
    for i, shard in enumerate(shards):
        for e in shard:
            assert owner.setdefault(e.get_extra_model_outputs(GROUP_ID, 0), i) == i  # every sample of a group together
    assert sorted(e.id_ for s in shards for e in s) == sorted(e.id_ for e in episodes)
    loads = [sum(map(len, s)) for s in shards]
    assert abs(loads[0] - loads[1]) <= max(sum(map(len, episodes[i:i + 4])) for i in range(0, len(episodes), 4))


@pytest.mark.system
def test_two_learners_and_two_env_runners_train_and_sync(ray_session):
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    def count_steps_by_runner(*, env_runner, metrics_logger, samples, **kwargs):  # a closure: shipped by value
        metrics_logger.log_value(("steps_by_runner", env_runner.worker_index), sum(map(len, samples)),
                                 reduce="lifetime_sum")

    algo = (config(num_learners=2).training(train_batch_size_per_learner=200, minibatch_size=100)
            .env_runners(num_env_runners=2, num_cpus_per_env_runner=0.5)
            .callbacks(on_sample_end=count_steps_by_runner).build_algo())
    for _ in range(3):  # random-length CartPole episodes: each learner gets whole ones, never a cut one
        result = algo.train()
    by_runner = result["env_runners"]["steps_by_runner"]
    print(by_runner, result["env_runners"][NUM_ENV_STEPS_SAMPLED_LIFETIME])
    assert sorted(by_runner) == [1, 2] and min(by_runner.values()) > 0  # both runners sampled
    assert result["env_runners"][NUM_ENV_STEPS_SAMPLED_LIFETIME] == sum(by_runner.values()) >= 3 * 400
    runners = algo.env_runner_group
    assert np.isfinite(result["learners"][MODULE]["critic/loss"])
    learners = [r.get() for r in algo.learner_group.foreach_learner(lambda learner: learner.module[MODULE].get_state())]
    assert all(np.array_equal(learners[0][k], learners[1][k]) for k in learners[0])
    synced = learner_weights(algo, inference_only=True)
    assert not any(k.startswith("vf.") for k in synced)  # the critic stays on the learners
    for state in runners.foreach_env_runner(lambda r: r.module.get_state(), local_env_runner=False):
        assert state.keys() == synced.keys() and all(np.array_equal(state[k], synced[k]) for k in synced)
    algo.stop()


@pytest.mark.system
def test_grid_search_sweep_runs_from_a_yaml_file(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent("""
        sweep:
          run: SPPO
          env: OutcomeCartPole-v1
          stop: {training_iteration: 2}
          config:
            seed: 0
            lr: {grid_search: [0.0001, 0.01]}
            train_batch_size_per_learner: 200
            minibatch_size: 100
            model_config: {pi_hiddens: [16], vf_hiddens: {grid_search: [[8]]}}
    """))
    assert main(["train", "file", str(path), "--storage-path", str(tmp_path / "results")]) == 0
    trials = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"experiment"')]
    assert sorted(t["swept"]["lr"] for t in trials) == [0.0001, 0.01]
    assert all(t["swept"]["model_config/vf_hiddens"] == [8] and t["training_iteration"] == 2 for t in trials)
    assert len({t["checkpoint"] for t in trials}) == 2
    for t in trials:  # the swept critic size is the trained critic's (default: [64, 64])
        with open(f"{t['checkpoint']}/learner_group/learner/rl_module/{MODULE}/module_state.pkl", "rb") as f:
            assert pickle.load(f)["vf.0.weight"].shape == (8, 4)
