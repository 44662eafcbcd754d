"""Classic control under verifiable outcome rewards (the paper's "RLVR framework"), and any gymnasium env so.

The whole episode is one action: the wrapped env pays 0 on every step and the
episode's outcome R in [0, 1] on its last step, so the episode return IS the outcome
and RLlib's PPO can be trained on the very same reward. ``info`` on the last step
carries ``outcome`` and the original ``raw_return``.

Outcomes (ours; the reference code has no classic control). Each is a soft
target in [0, 1] that early random policies already spread over, since a binary
success they never reach gives A = -p -> 0 and teaches nothing (a random policy
never reaches MountainCar's flag, never swings Acrobot up, never keeps CartPole
up for 500 steps nor Hopper for 1000, never lands LunarLander at rest):
- CartPole-v1: steps survived / 500 (1.0 = the full 500 steps).
- MountainCar-v0: at the flag, 1 - 0.25 * steps / 200 (0.8625 = the "solved"
  110 steps); short of it, 0.75 * the highest x reached, mapped from [-1.2, 0.5].
- Pendulum-v1: the return mapped from [-1600, 0] onto [0, 1] (critic: mse).
- LunarLander-v3: the return mapped from [-200, 200] onto [0, 1] (1.0 = solved).
- Hopper-v5: the return mapped from [0, 3000] onto [0, 1] (critic: mse).
- Acrobot-v1: swung up, 1 - 0.25 * steps / 500 (0.95 = the "solved" return of
  -100); short of it, 0.75 * the highest the tip reached, mapped from [-2, 1].

Any other env, from a YAML (``make_env``): ``env:`` names a gymnasium id (``Acrobot-v1``), gymnasium's
``module:Id`` (importing ``module`` registers ``Id``) or a dotted path to an env class or creator function
(``my_pkg.envs.MyEnv``, called with the env_config), and ``env_config: {outcome: ...}`` wraps it in
``OutcomeReward``:
- ``outcome: {return_range: [low, high]}``: the return mapped from [low, high] onto [0, 1] (clipped);
- ``outcome: success``: 1 if the episode terminated (reached its goal) before its time limit, else 0.
"""

import functools
from typing import Callable

import gymnasium as gym
import numpy as np

from envs.dotted import dotted_object, import_dotted

#: How ``env_config["outcome"]`` may be written (for error messages).
OUTCOME_FORMS = "'success' or {return_range: [low, high]} with low < high"


def _scaled(low: float, high: float) -> Callable[[dict], float]:
    return lambda ep: float(np.clip((ep["return"] - low) / (high - low), 0.0, 1.0))


def _success(ep: dict) -> float:
    return float(ep["terminated"])


def _goal_or_progress(ep: dict, max_steps: int, progress: Callable[[np.ndarray], float], low: float, high: float):
    """At the goal (the episode terminated): 0.75 .. 1.0, faster is better; short of it, 0.75 * the most ``progress``
    any observation showed, mapped from [low, high]."""
    if ep["terminated"]:
        return 1.0 - 0.25 * ep["steps"] / max_steps
    best = max(progress(obs) for obs in ep["observations"])
    return 0.75 * float(np.clip((best - low) / (high - low), 0.0, 1.0))


def _mountain_car(ep: dict) -> float:  # progress: the car's x (the flag at 0.5 terminates)
    return _goal_or_progress(ep, 200, lambda obs: obs[0], -1.2, 0.5)


def _acrobot(ep: dict) -> float:  # progress: the tip's height -cos(a) - cos(a + b) (above 1 terminates)
    return _goal_or_progress(ep, 500, lambda obs: -obs[0] - (obs[0] * obs[2] - obs[1] * obs[3]), -2.0, 1.0)


OUTCOME_TASKS: dict[str, tuple[str, Callable[[dict], float]]] = {
    "OutcomeCartPole-v1": ("CartPole-v1", _scaled(0.0, 500.0)),
    "OutcomeMountainCar-v0": ("MountainCar-v0", _mountain_car),
    "OutcomePendulum-v1": ("Pendulum-v1", _scaled(-1600.0, 0.0)),
    "OutcomeLunarLander-v3": ("LunarLander-v3", _scaled(-200.0, 200.0)),
    "OutcomeHopper-v5": ("Hopper-v5", _scaled(0.0, 3000.0)),
    "OutcomeAcrobot-v1": ("Acrobot-v1", _acrobot),
}


def outcome_fn(spec) -> Callable[[dict], float]:
    """The outcome an env_config's ``outcome`` value names: ``"success"`` or ``{"return_range": [low, high]}``."""
    if spec == "success":
        return _success
    if isinstance(spec, dict) and set(spec) == {"return_range"}:
        bounds = spec["return_range"]
        if (isinstance(bounds, (list, tuple)) and len(bounds) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                and bounds[0] < bounds[1]):
            return _scaled(float(bounds[0]), float(bounds[1]))
    raise ValueError(f"env_config outcome must be {OUTCOME_FORMS}, got {spec!r}")


class OutcomeReward(gym.Wrapper):
    """Replaces the per-step reward by the episode outcome ``outcome(ep)``, paid once at the end.

    ``ep`` holds the raw ``return``, the ``steps`` taken, the ``observations`` seen (any observation space) and, at
    the end, whether the episode ``terminated``.
    """

    def __init__(self, env: gym.Env, outcome: Callable[[dict], float]):
        super().__init__(env)
        self.outcome = outcome

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._ep = {"return": 0.0, "steps": 0, "observations": [obs], "terminated": False}
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        ep = self._ep
        ep["return"] += float(reward)
        ep["steps"] += 1
        ep["observations"].append(obs)
        if not (terminated or truncated):
            return obs, 0.0, terminated, truncated, info
        ep["terminated"] = bool(terminated)
        outcome = self.outcome(ep)
        return obs, outcome, terminated, truncated, {**info, "outcome": outcome, "raw_return": ep["return"]}


def make_outcome_env(env_id: str, **kwargs) -> gym.Env:
    base_id, outcome = OUTCOME_TASKS[env_id]
    if "outcome" in kwargs:
        raise ValueError(f"{env_id} already pays its own outcome; to choose one, use env: {base_id} with an outcome")
    return OutcomeReward(gym.make(base_id, **kwargs), outcome)


def check_env_spec(spec: str, env_config: dict | None = None, *, registered: bool = False) -> None:
    """Raises ValueError (one line, with a did-you-mean hint) unless ``make_env(spec, env_config)`` can build it.
    ``registered``: whether ``ray.tune.register_env`` registered ``spec`` (then its creator builds it)."""
    import difflib
    import importlib

    outcome = (env_config or {}).get("outcome")
    if outcome is not None:
        if spec in OUTCOME_TASKS:
            raise ValueError(f"{spec} already pays its own outcome; to choose one, use env: "
                             f"{OUTCOME_TASKS[spec][0]} with your outcome")
        outcome_fn(outcome)
    if registered:  # this package's envs, or one registered before
        return
    module, _, env_id = spec.rpartition(":")
    if module:  # gymnasium's module:Id
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"env {spec!r}: cannot import module {module!r} ({e})") from None
    if env_id in gym.registry:
        return
    if not module and "." in spec:
        dotted_object("env", spec, callable, "an env class or creator function")
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=1)
    hint = f" (did you mean {(module + ':' if module else '') + close[0]!r}?)" if close else ""
    raise ValueError(f"unknown env {spec!r}{hint}; env takes a gymnasium id, 'module:Id' or a dotted path to an "
                     f"env class or creator")


def make_env(spec: str, env_config: dict | None = None) -> gym.Env:
    """The env ``spec`` names, built with ``env_config`` (a dict or RLlib's EnvContext), wrapped in
    ``OutcomeReward`` when ``env_config`` has an ``outcome`` (which the env itself does not see).

    ``spec``: a gymnasium id or ``module:Id`` (``gym.make(spec, **env_config)``), else a dotted path to an env
    class or creator function (called with ``env_config``).
    """
    env_config = {} if env_config is None else env_config
    outcome = env_config.get("outcome")
    if outcome is not None:
        rest = {k: v for k, v in env_config.items() if k != "outcome"}
        # An EnvContext keeps its worker and vector index.
        env_config = env_config.copy_with_overrides(env_config=rest) if hasattr(env_config, "copy_with_overrides") \
            else rest
    if ":" in spec or spec in gym.registry:
        env = gym.make(spec, **env_config)
    else:
        env = import_dotted(spec)(env_config)
    return env if outcome is None else OutcomeReward(env, outcome_fn(outcome))


def register_env_spec(spec: str, env_config: dict | None = None, *, registered: bool = False) -> None:
    """Registers ``spec`` with Tune (so every Ray process of the job finds it) as ``make_env(spec, ...)`` when
    RLlib would not build it by itself: a dotted path, or any spec with an ``outcome`` in ``env_config``. Ids
    Tune already knows (``registered``: this package's, or registered before) and plain gymnasium ids are left as
    they are."""
    from ray.tune.registry import register_env

    if registered:
        return
    if (":" in spec or spec in gym.registry) and (env_config or {}).get("outcome") is None:
        return
    register_env(spec, functools.partial(make_env, spec))


def register_classic() -> None:
    """Registers every task as a gymnasium ID and with Tune (so remote EnvRunners find it)."""
    from ray.tune.registry import register_env

    for env_id in OUTCOME_TASKS:
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=make_outcome_env, kwargs={"env_id": env_id})
        register_env(env_id, lambda cfg, _id=env_id: make_outcome_env(_id, **dict(cfg or {})))
