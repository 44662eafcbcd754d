"""Environments for rllib-sppo; importing this package registers them with gymnasium and Tune.

- ``Outcome*`` ids: classic control under verifiable outcome rewards (``envs.classic``).
- ``ReasoningBandit-v0``: one-step LLM reasoning episodes (``envs.reasoning``).
"""

from envs.classic import OUTCOME_TASKS, OutcomeReward, register_classic
from envs.reasoning import ReasoningEnv, register_reasoning

register_classic()
register_reasoning()

__all__ = ["OUTCOME_TASKS", "OutcomeReward", "ReasoningEnv", "register_classic", "register_reasoning"]
