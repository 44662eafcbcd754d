"""Your own gymnasium env, named in a YAML by its dotted path (``env: examples.your_task.corridor.Corridor``): a
corridor of ``length`` cells; the agent starts at the left wall and steps left or right; reaching the right end
terminates the episode (a success), ``max_steps`` cuts it short without one (a random walk rarely gets there)."""

import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        self.length, self.max_steps = int(config.get("length", 12)), int(config.get("max_steps", 30))
        self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)

    def _obs(self):
        return np.array([self.pos / (self.length - 1)], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.steps = 0, 0
        return self._obs(), {}

    def step(self, action):
        self.pos = max(0, self.pos + (1 if action == 1 else -1))
        self.steps += 1
        success = self.pos == self.length - 1
        return self._obs(), float(success), success, self.steps >= self.max_steps and not success, {}
