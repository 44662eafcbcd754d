"""The advantage estimators: ONE registry that the config, the module build and the loss all read.

Each estimator names the critic it needs (a ``CriticKind``, or None), and nothing else decides it:
- ``CriticKind.SEQUENCE``: V(s_0), one value per episode (for LLMs: the prompt), read before the update (SPPO);
- ``CriticKind.TOKEN``: V at every action token (token-level PPO, as verl runs it);
- ``None``: no critic at all (the module builds none, the learner runs none); the baseline is the group of
  N > 1 samples of the same prompt (GRPO, Dr.GRPO, RLOO).

Your own estimator is one decorated function in a module of yours::

    @estimator("my_sppo", critic=CriticKind.SEQUENCE, default_critic_loss="bce")
    def my_sppo(x: EstimatorInput):
        return 2.0 * sequence_advantage(x.rewards, x.values), x.rewards

then ``advantage_estimator="my_pkg.my_module.my_sppo"``, its dotted path (``get_estimator`` imports it in every process
that reads it: the driver, each learner). The built-in ones are in ``ESTIMATORS`` by name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch

from envs.dotted import builtin_or_dotted
from rllib_sppo.core import (critic_prediction, gae_advantage, group_advantage, masked_whiten, outcome_token_rewards,
                             rloo_advantage, sequence_advantage)


class CriticKind(enum.StrEnum):
    """Where an estimator reads its critic (a string, so that a YAML's ``critic_kind: token`` is one too)."""

    SEQUENCE = "sequence"  # V(s_0): one value per episode, from the prompt alone
    TOKEN = "token"  # V at every action token


@dataclass(frozen=True)
class EstimatorInput:
    """What every advantage estimator reads; one row per episode (``B``)."""

    rewards: torch.Tensor  # [B] outcomes R
    values: torch.Tensor | None  # critic output before this update: [B] at s_0, or [B, T] per token
    mask: torch.Tensor | None  # [B, T] 1 on action tokens (per-token critic only)
    group_ids: torch.Tensor | None  # [B] which prompt each sample answers (critic-free estimators only)
    critic_loss: str = "bce"
    normalize: bool = False
    gamma: float = 1.0
    lambda_: float = 1.0


@dataclass(frozen=True)
class Estimator:
    name: str
    #: The critic it reads (see the module docstring); None: none, its baseline is the group of samples.
    critic: CriticKind | None
    #: (EstimatorInput) -> (advantages, value targets), each [B] or [B, T].
    advantages: Callable[[EstimatorInput], tuple[torch.Tensor, torch.Tensor]]
    #: The critic loss when ``critic_loss`` is not set: "bce" (a logit, outcomes in [0, 1]) or "mse" (a value).
    default_critic_loss: str | None = None
    #: The clip range of its value loss when ``value_clip`` is not set (verl's ``cliprange_value``); None: unclipped.
    default_value_clip: float | None = None

    @property
    def needs_groups(self) -> bool:
        """Critic-free estimators compare N > 1 samples of each prompt; the others sample one."""
        return self.critic is None


def estimator(name: str, *, critic: CriticKind | None, default_critic_loss: str | None = None,
              default_value_clip: float | None = None):
    """Decorator: makes ``fn(EstimatorInput) -> (advantages, value targets)`` an ``Estimator`` called ``name`` that
    reads the critic ``critic`` (``default_critic_loss`` is required with a critic, and none without)."""
    if critic is not None:
        critic = CriticKind(critic)
    if (critic is None) != (default_critic_loss is None):
        raise ValueError(f"estimator {name!r}: give default_critic_loss ('bce' or 'mse') if and only if it reads a "
                         f"critic")
    return lambda fn: Estimator(name, critic, fn, default_critic_loss, default_value_clip)


@estimator("sppo", critic=CriticKind.SEQUENCE, default_critic_loss="bce")
def _sppo(x: EstimatorInput):
    return sequence_advantage(x.rewards, x.values, x.normalize, x.critic_loss), x.rewards


@estimator("grpo", critic=None)
def _grpo(x: EstimatorInput):
    return group_advantage(x.rewards, x.group_ids), x.rewards


@estimator("drgrpo", critic=None)
def _drgrpo(x: EstimatorInput):
    return group_advantage(x.rewards, x.group_ids, std_normalize=False), x.rewards


@estimator("rloo", critic=None)
def _rloo(x: EstimatorInput):
    return rloo_advantage(x.rewards, x.group_ids), x.rewards


@estimator("ppo", critic=CriticKind.TOKEN, default_critic_loss="mse", default_value_clip=0.5)
def _token_ppo(x: EstimatorInput):
    """verl's PPO: GAE on the outcome paid at the last token, whitened over the batch's tokens; the critic's
    targets are the unwhitened returns."""
    advantages, returns = gae_advantage(outcome_token_rewards(x.rewards, x.mask),
                                        critic_prediction(x.values, x.critic_loss), x.mask, x.gamma, x.lambda_)
    return masked_whiten(advantages, x.mask), returns


#: The built-in estimators: ``advantage_estimator`` name -> its Estimator.
ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (_sppo, _grpo, _drgrpo, _rloo, _token_ppo)}


def get_estimator(name: str) -> Estimator:
    """The estimator ``advantage_estimator`` names: a built-in one by name, or yours by its dotted path."""
    return builtin_or_dotted("advantage_estimator", name, ESTIMATORS, lambda found: isinstance(found, Estimator),
                             "an Estimator: a function decorated with @rllib_sppo.estimators.estimator(...)")
