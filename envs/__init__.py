"""Environments for rllib-sppo; importing this package registers them with gymnasium and Tune."""

from envs.classic import OUTCOME_TASKS, OutcomeReward, register_classic

register_classic()

__all__ = ["OUTCOME_TASKS", "OutcomeReward", "register_classic"]
