"""The advantage estimators: ONE registry that the config, the module build and the loss all read.

Each estimator names the critic it needs, and nothing else decides it:
- ``"sequence"``: V(s_0), one value per episode (for LLMs: the prompt), read before the update (SPPO);
- ``"token"``: V at every action token (token-level PPO, as verl runs it);
- ``None``: no critic at all (the module builds none, the learner runs none); the baseline is the group of
  N > 1 samples of the same prompt (GRPO, Dr.GRPO, RLOO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rllib_sppo.core import (critic_prediction, gae_advantage, group_advantage, masked_whiten, outcome_token_rewards,
                             rloo_advantage, sequence_advantage)

CRITICS = ("sequence", "token", None)


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
    #: The critic it reads: "sequence", "token" or None (see the module docstring).
    critic: str | None
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


def _sppo(x: EstimatorInput):
    return sequence_advantage(x.rewards, x.values, x.normalize, x.critic_loss), x.rewards


def _token_ppo(x: EstimatorInput):
    """verl's PPO: GAE on the outcome paid at the last token, whitened over the batch's tokens; the critic's
    targets are the unwhitened returns."""
    advantages, returns = gae_advantage(outcome_token_rewards(x.rewards, x.mask),
                                        critic_prediction(x.values, x.critic_loss), x.mask, x.gamma, x.lambda_)
    return masked_whiten(advantages, x.mask), returns


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("sppo", "sequence", _sppo, default_critic_loss="bce"),
    Estimator("grpo", None, lambda x: (group_advantage(x.rewards, x.group_ids), x.rewards)),
    Estimator("drgrpo", None, lambda x: (group_advantage(x.rewards, x.group_ids, std_normalize=False), x.rewards)),
    Estimator("rloo", None, lambda x: (rloo_advantage(x.rewards, x.group_ids), x.rewards)),
    Estimator("ppo", "token", _token_ppo, default_critic_loss="mse", default_value_clip=0.5),
)}
