"""The EnvRunner SPPO samples classic-control episodes with, and the observation and action spaces it takes."""

import copy

import gymnasium as gym
import numpy as np
from ray.rllib.connectors.env_to_module import FlattenObservations

from envs.classic import register_env_spec  # importing envs registers the Outcome* ids in this process
from rllib_sppo.private_api import SingleAgentEnvRunnerHooks, registered_env_creator

#: The observation spaces RLlib's FlattenObservations turns into one flat float vector (Discrete and MultiDiscrete
#: one-hot), also inside a Tuple or Dict.
OBSERVATION_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


def flatten_observations(env=None, spaces=None, device=None) -> list:
    """SPPO's ``env_to_module_connector``: RLlib's FlattenObservations, which writes every observation back into its
    episode as one float vector, so the RLModule, the critic's s_0 and the learner all read flat observations."""
    return [FlattenObservations()]


def _starts_at_0(space: gym.Space) -> bool:
    return not np.any(getattr(space, "start", 0))  # one-hot and the action distributions count from 0


def _unsupported_observation(space: gym.Space) -> gym.Space | None:
    """The first part of ``space`` FlattenObservations cannot take, or None."""
    if isinstance(space, (gym.spaces.Tuple, gym.spaces.Dict)):
        parts = space.spaces.values() if isinstance(space, gym.spaces.Dict) else space.spaces
        return next(filter(None, map(_unsupported_observation, parts)), None)
    flat = isinstance(space, OBSERVATION_SPACES) and _starts_at_0(space)
    return None if flat and not (isinstance(space, gym.spaces.MultiDiscrete) and space.nvec.ndim != 1) else space


def _supported_action(space: gym.Space) -> bool:
    """Has ``SPPOMLPModule`` an action distribution for ``space``: Categorical, MultiCategorical, diagonal Gaussian."""
    if isinstance(space, (gym.spaces.MultiDiscrete, gym.spaces.Box)):
        return len(space.shape) == 1 and _starts_at_0(space)
    return isinstance(space, gym.spaces.Discrete) and _starts_at_0(space)


def check_spaces(observation_space: gym.Space, action_space: gym.Space) -> None:
    """Raises ValueError (one line: the space and what to do) unless SPPO's classic-control path takes both spaces."""
    part = _unsupported_observation(observation_space)
    if part is not None:
        raise ValueError(f"observation space {part} is not supported: SPPO flattens observations with RLlib's "
                         f"FlattenObservations, which takes Box, Discrete, MultiDiscrete (1-D) and MultiBinary, "
                         f"counting from 0, also inside a Tuple or Dict; wrap the env in a "
                         f"gymnasium.ObservationWrapper that maps it to one of these")
    if not _supported_action(action_space):
        raise ValueError(f"action space {action_space} is not supported: SPPO's classic-control module samples "
                         f"Discrete, MultiDiscrete or Box actions (1-D, counting from 0); wrap the env in a "
                         f"gymnasium.ActionWrapper that maps its actions to one of these")


class EpisodeEnvRunner(SingleAgentEnvRunnerHooks):
    """RLlib's SingleAgentEnvRunner, with new start states in every ``sample()`` of whole episodes, and any env
    ``envs.classic.make_env`` builds (a dotted path, an ``outcome`` in the env_config) whose spaces ``check_spaces``
    takes.

    In ``complete_episodes`` mode RLlib 2.60 resets its envs with ``config.seed`` at every ``sample()``, so a seeded
    run would start every batch from the same states (CartPole: one s_0 for the whole run). Here each such reset
    draws its seed from the process's numpy RNG, which RLlib seeds once from ``config.seed`` and the worker index
    and which SPPO's checkpoints carry: batches differ, and runs stay reproducible and resumable.

    With several envs (``num_envs_per_env_runner`` > 1) RLlib's whole-episode sampling keeps the first N episodes to
    end and drops the N envs' unfinished ones, which favours short episodes (CartPole under its initial policy: 16.7
    steps on average with 16 envs against 21.4 with one). Here the envs instead run on across ``sample()`` calls, as
    in ``truncate_episodes`` mode, and each episode is returned once it has ended, stitched from its pieces: every
    episode counts once, whatever its length. An episode still running when the weights change finishes under the
    new ones (its actions keep their own log-probs), and a checkpoint does not carry these pieces: such a run resumes,
    but not bit-identically. One env keeps RLlib's own sampling (whole episodes from a reset, already unbiased), and
    so does a request for a number of episodes (RLlib's evaluation by episodes: with several envs, the first to end;
    evaluate with ``evaluation_config: {num_envs_per_env_runner: 1}`` for an unbiased mean).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pieces = {}  # episode id -> the episode so far, while it runs across sample() calls

    def sample(self, *, num_timesteps=None, num_episodes=None, explore=None, random_actions=False,
               force_reset=False, **kwargs):
        if self.num_envs == 1 or num_timesteps or num_episodes or self.config.batch_mode != "complete_episodes":
            return super().sample(num_timesteps=num_timesteps, num_episodes=num_episodes, explore=explore,
                                  random_actions=random_actions, force_reset=force_reset, **kwargs)
        if force_reset:
            self._pieces.clear()
        ended = []
        while not ended:
            pieces = super().sample(num_timesteps=16 * self.num_envs, explore=explore, random_actions=random_actions,
                                    force_reset=force_reset, **kwargs)  # each env 16 steps: few calls, little overshoot
            force_reset = False
            for piece in pieces:
                episode = self._pieces.pop(piece.id_, None)
                if episode is not None:
                    episode.concat_episode(piece)
                elif not piece.is_done:  # a copy to grow: RLlib keeps the piece itself for the episode's metrics
                    episode = copy.deepcopy(piece)
                else:
                    episode = piece
                if episode.is_done:
                    ended.append(episode.to_numpy() if self.config.episodes_to_numpy else episode)
                else:
                    self._pieces[piece.id_] = episode
        return ended

    def make_env(self) -> None:
        if isinstance(self.config.env, str):  # in every process (a restored checkpoint's too), not only the CLI's
            register_env_spec(self.config.env, self.config.env_config,
                              registered=registered_env_creator(self.config.env) is not None)
        super().make_env()
        check_spaces(self.env.single_observation_space, self.env.single_action_space)

    def reset_seed(self, seed):
        return None if seed is None else int(np.random.randint(2**31 - 1))
