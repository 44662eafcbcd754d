"""Estimators are open: a user's own decorated function, named by its dotted path, is an ``advantage_estimator`` that
trains like a built-in one."""

import sys

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.core import DEFAULT_MODULE_ID

from rllib_sppo import SPPOConfig
from rllib_sppo.estimators import ESTIMATORS, CriticKind, estimator, get_estimator


class Match(gym.Env):
    """One step: the observation is a state s in 0..3; the outcome is 1 if the action names s (a random policy: 1/4)."""

    observation_space, action_space = gym.spaces.Discrete(4), gym.spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s = int(self.np_random.integers(4))
        return self.s, {}

    def step(self, action):
        return self.s, float(action == self.s), True, False, {}


#: A user's module with an estimator of their own: SPPO's advantage, doubled.
USER_MODULE = """
from rllib_sppo.core import sequence_advantage
from rllib_sppo.estimators import CriticKind, estimator


@estimator("doubled_sppo", critic=CriticKind.SEQUENCE, default_critic_loss="bce")
def doubled_sppo(x):
    return 2.0 * sequence_advantage(x.rewards, x.values), x.rewards


not_an_estimator = 3
"""


@pytest.fixture
def doubled_sppo(tmp_path, monkeypatch):
    """The dotted path of the user's estimator (its module not imported yet: the lookup imports it)."""
    (tmp_path / "my_estimators.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_estimators", raising=False)
    return "my_estimators.doubled_sppo"


def match_algo(name: str):
    from ray.tune.registry import register_env

    register_env("Match", lambda cfg: Match())
    return (SPPOConfig().environment("Match")
            .training(advantage_estimator=name, lr=1e-2, critic_lr=1e-2, weight_decay=0.0,
                      critic_weight_decay=0.0, train_batch_size_per_learner=200, minibatch_size=50, num_epochs=4)
            .env_runners(num_env_runners=0).debugging(seed=0)).build_algo()


def test_a_users_estimator_trains(ray_session, doubled_sppo, train_until):
    """The first batch (the same episodes, the same untrained critic) gets exactly twice SPPO's advantages, and the
    policy learns the task: a quarter right at first, then nearly always."""
    control = match_algo("sppo")
    first_control = control.train()["learners"][DEFAULT_MODULE_ID]
    control.stop()
    algo = match_algo(doubled_sppo)
    returns, results = train_until(algo, lambda r: len(r) >= 2 and np.mean(r[-2:]) > 0.9, most=8)
    algo.stop()
    first = results[0]["learners"][DEFAULT_MODULE_ID]
    assert first["rollout/outcome_mean"] == first_control["rollout/outcome_mean"]
    assert first["policy/advantage_abs_mean"] == pytest.approx(2 * first_control["policy/advantage_abs_mean"])
    assert returns[0] < 0.4 and np.mean(returns[-2:]) > 0.9, returns


def test_a_users_estimator_is_found_by_its_path_in_any_process_and_mistakes_are_named(doubled_sppo):
    """No registry to fill first: the lookup imports the user's module (as a remote learner's process does), and each
    mistake says what is wrong."""
    found = get_estimator(doubled_sppo)
    assert "my_estimators" in sys.modules and (found.name, found.critic) == ("doubled_sppo", CriticKind.SEQUENCE)
    assert get_estimator("sppo") is ESTIMATORS["sppo"]
    with pytest.raises(ValueError, match="give default_critic_loss .'bce' or 'mse'. if and only if it reads a critic"):
        estimator("mine", critic=CriticKind.TOKEN)
    with pytest.raises(ValueError, match="'hinge' is not a valid CriticKind"):
        estimator("mine", critic="hinge", default_critic_loss="bce")
    config = SPPOConfig().environment("OutcomeCartPole-v1")
    for name, message in [("mine", r"advantage_estimator='mine'; choose one of \['drgrpo', 'grpo', 'ppo', 'rloo', "
                                   r"'sppo'\], or the dotted path of your own \(an Estimator"),
                          ("my_estimators.not_an_estimator", "names a 'int' object, not an Estimator: a function"),
                          ("my_estimators.nothing", "advantage_estimator='my_estimators.nothing': cannot import")]:
        with pytest.raises(ValueError, match=message):
            config.copy().training(advantage_estimator=name).validate()
