"""The EnvRunner SPPO samples classic-control episodes with."""

import numpy as np
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from envs.classic import register_env_spec  # importing envs registers the Outcome* ids in this process


class EpisodeEnvRunner(SingleAgentEnvRunner):
    """RLlib's SingleAgentEnvRunner, with new start states in every ``sample()`` of whole episodes, and any env
    ``envs.classic.make_env`` builds (a dotted path, an ``outcome`` in the env_config).

    In ``complete_episodes`` mode RLlib 2.60 resets its envs with ``config.seed`` at every ``sample()``, so a seeded
    run would start every batch from the same states (CartPole: one s_0 for the whole run). Here each such reset
    draws its seed from the process's numpy RNG, which RLlib seeds once from ``config.seed`` and the worker index
    and which SPPO's checkpoints carry: batches differ, and runs stay reproducible and resumable.
    """

    def make_env(self) -> None:
        if isinstance(self.config.env, str):  # in every process (a restored checkpoint's too), not only the CLI's
            register_env_spec(self.config.env, self.config.env_config)
        super().make_env()

    def _try_env_reset(self, *, seed=None, options=None):
        if seed is not None:
            seed = int(np.random.randint(2**31 - 1))
        return super()._try_env_reset(seed=seed, options=options)
