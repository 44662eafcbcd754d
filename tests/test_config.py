"""SPPOConfig's own keys are exactly ``training()``'s typed, documented keyword arguments."""

import inspect

import pytest
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

from rllib_sppo import SPPOConfig


def sppo_keys() -> set[str]:
    return set(vars(SPPOConfig())) - set(vars(AlgorithmConfig()))


def test_every_sppo_key_is_a_documented_training_argument_that_sets_it():
    arguments = set(inspect.signature(SPPOConfig.training).parameters) - {"self", "kwargs"}
    assert arguments == sppo_keys()
    doc = inspect.getdoc(SPPOConfig.training)
    assert [key for key in sorted(arguments) if f"\n    {key}: " not in doc] == []
    marker = object()
    for key in arguments:
        assert getattr(SPPOConfig().training(**{key: marker}), key) is marker


def test_rllibs_keys_pass_through_and_an_unknown_key_is_refused():
    config = SPPOConfig().training(lr=3e-4, gamma=0.99, critic_lr=1e-3)
    assert (config.lr, config.gamma, config.critic_lr) == (3e-4, 0.99, 1e-3)
    with pytest.raises(TypeError, match="critic_learning_rate"):
        SPPOConfig().training(critic_learning_rate=1e-3)
