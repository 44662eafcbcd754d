"""Classic control under verifiable outcome rewards (the paper's "RLVR framework").

The whole episode is one action: the wrapped env pays 0 on every step and the
episode's outcome R in [0, 1] on its last step, so the episode return IS the outcome
and RLlib's PPO can be trained on the very same reward. ``info`` on the last step
carries ``outcome`` and the original ``raw_return``.

Outcomes (ours; the reference code has no classic control). Each is a soft
target in [0, 1] that early random policies already spread over, since a binary
success they never reach gives A = -p -> 0 and teaches nothing:
- CartPole-v1: steps survived / 500 (1.0 = the full 500 steps).
- MountainCar-v0: at the flag, 1 - 0.25 * steps / 200 (0.8625 = the "solved"
  110 steps); short of it, 0.75 * the highest x reached, mapped from [-1.2, 0.5].
- Pendulum-v1: the return mapped from [-1600, 0] onto [0, 1] (critic: mse).
- LunarLander-v3: the return mapped from [-200, 200] onto [0, 1] (1.0 = solved).
- Hopper-v5: the return mapped from [0, 3000] onto [0, 1] (critic: mse).
"""

from typing import Callable

import gymnasium as gym
import numpy as np


def _scaled(low: float, high: float) -> Callable[[dict], float]:
    return lambda ep: float(np.clip((ep["return"] - low) / (high - low), 0.0, 1.0))


def _mountain_car(ep: dict) -> float:
    if ep["max_obs"][0] >= 0.5:  # at the flag: 0.75 .. 1.0, faster is better
        return 1.0 - 0.25 * ep["steps"] / 200.0
    return 0.75 * float(np.clip((ep["max_obs"][0] + 1.2) / 1.7, 0.0, 1.0))


OUTCOME_TASKS: dict[str, tuple[str, Callable[[dict], float]]] = {
    "OutcomeCartPole-v1": ("CartPole-v1", _scaled(0.0, 500.0)),
    "OutcomeMountainCar-v0": ("MountainCar-v0", _mountain_car),
    "OutcomePendulum-v1": ("Pendulum-v1", _scaled(-1600.0, 0.0)),
    "OutcomeLunarLander-v3": ("LunarLander-v3", _scaled(-200.0, 200.0)),
    "OutcomeHopper-v5": ("Hopper-v5", _scaled(0.0, 3000.0)),
}


class OutcomeReward(gym.Wrapper):
    """Replaces the per-step reward by the episode outcome ``outcome(ep)``, paid once at the end.

    ``ep`` holds the raw ``return``, the ``steps`` taken and ``max_obs`` (element-wise
    maximum of the observations seen).
    """

    def __init__(self, env: gym.Env, outcome: Callable[[dict], float]):
        super().__init__(env)
        self.outcome = outcome

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._ep = {"return": 0.0, "steps": 0, "max_obs": np.asarray(obs, dtype=np.float64)}
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        ep = self._ep
        ep["return"] += float(reward)
        ep["steps"] += 1
        ep["max_obs"] = np.maximum(ep["max_obs"], obs)
        if not (terminated or truncated):
            return obs, 0.0, terminated, truncated, info
        outcome = self.outcome(ep)
        return obs, outcome, terminated, truncated, {**info, "outcome": outcome, "raw_return": ep["return"]}


def make_outcome_env(env_id: str, **kwargs) -> gym.Env:
    base_id, outcome = OUTCOME_TASKS[env_id]
    return OutcomeReward(gym.make(base_id, **kwargs), outcome)


def register_classic() -> None:
    """Registers every task as a gymnasium ID and with Tune (so remote EnvRunners find it)."""
    from ray.tune.registry import register_env

    for env_id in OUTCOME_TASKS:
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=make_outcome_env, kwargs={"env_id": env_id})
        register_env(env_id, lambda cfg, _id=env_id: make_outcome_env(_id, **dict(cfg or {})))
