"""The estimator registry is open: a user's own decorated function becomes an ``advantage_estimator`` that trains
like a built-in one."""

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.core import DEFAULT_MODULE_ID

from rllib_sppo import SPPOConfig
from rllib_sppo.core import sequence_advantage
from rllib_sppo.estimators import ESTIMATORS, CriticKind, register_estimator


class Match(gym.Env):
    """One step: the observation is a state s in 0..3; the outcome is 1 if the action names s (a random policy: 1/4)."""

    observation_space, action_space = gym.spaces.Discrete(4), gym.spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s = int(self.np_random.integers(4))
        return self.s, {}

    def step(self, action):
        return self.s, float(action == self.s), True, False, {}


@pytest.fixture
def doubled_sppo():
    """A user's estimator: SPPO's advantage, doubled."""

    @register_estimator("doubled_sppo", critic=CriticKind.SEQUENCE, default_critic_loss="bce")
    def doubled(x):
        return 2.0 * sequence_advantage(x.rewards, x.values), x.rewards

    yield "doubled_sppo"
    del ESTIMATORS["doubled_sppo"]


def match_algo(estimator: str):
    from ray.tune.registry import register_env

    register_env("Match", lambda cfg: Match())
    return (SPPOConfig().environment("Match")
            .training(advantage_estimator=estimator, lr=1e-2, critic_lr=1e-2, weight_decay=0.0,
                      critic_weight_decay=0.0, train_batch_size_per_learner=200, minibatch_size=50, num_epochs=4)
            .env_runners(num_env_runners=0).debugging(seed=0)).build_algo()


def test_a_registered_estimator_trains(ray_session, doubled_sppo):
    """The first batch (the same episodes, the same untrained critic) gets exactly twice SPPO's advantages, and the
    policy learns the task: a quarter right at first, then nearly always."""
    control = match_algo("sppo")
    first_control = control.train()["learners"][DEFAULT_MODULE_ID]
    control.stop()
    algo = match_algo(doubled_sppo)
    results = [algo.train() for _ in range(8)]
    algo.stop()
    first = results[0]["learners"][DEFAULT_MODULE_ID]
    assert first["rollout/outcome_mean"] == first_control["rollout/outcome_mean"]
    assert first["policy/advantage_abs_mean"] == pytest.approx(2 * first_control["policy/advantage_abs_mean"])
    returns = [r["env_runners"]["episode_return_mean"] for r in results]
    assert returns[0] < 0.4 and np.mean(returns[-2:]) > 0.9, returns


def test_registration_says_what_is_wrong(doubled_sppo):
    with pytest.raises(ValueError, match="'doubled_sppo' is registered already"):
        register_estimator(doubled_sppo, critic=None)
    with pytest.raises(ValueError, match="give default_critic_loss .'bce' or 'mse'. if and only if it reads a critic"):
        register_estimator("mine", critic=CriticKind.TOKEN)
    with pytest.raises(ValueError, match="'hinge' is not a valid CriticKind"):
        register_estimator("mine", critic="hinge", default_critic_loss="bce")
    with pytest.raises(ValueError, match=r"advantage_estimator='mine'; choose one of \['doubled_sppo', 'drgrpo'"):
        SPPOConfig().environment("OutcomeCartPole-v1").training(advantage_estimator="mine").validate()
