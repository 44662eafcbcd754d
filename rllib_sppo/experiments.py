"""Experiments as YAML files: RLlib's legacy tuned-example schema ``{name: {run, env, config, stop}}`` read into
algorithm configs, with every error naming the problem and the file (``UsageError``). Used by ``rllib train`` and by
the benchmarks.

``env`` is a registered id, gymnasium's ``module:Id`` or a dotted path to an env class or creator;
``config.env_config.outcome`` wraps it in an outcome reward (``envs.classic.make_env``); ``config.llm`` wires an LLM run
(``SPPOConfig.llm``); class- and function-valued keys are given as dotted paths.
"""

from __future__ import annotations

import difflib
import os

from envs.dotted import import_dotted


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


EXPERIMENT_KEYS = {"run", "env", "config", "stop", "storage_path", "checkpoint_config", "num_samples", "wandb",
                   "max_failures", "scheduler", "search_alg"}
# Config keys that AlgorithmConfig.update_from_dict understands without a same-named attribute.
SPECIAL_CONFIG_KEYS = {"multiagent", "model", "optimizer", "env_config", "callbacks", "model_config",
                       "rl_module_spec", "lambda", "num_workers", "framework", "input", "learner_connector",
                       "env_to_module_connector", "module_to_env_connector"}


# Keys whose values are classes or functions; YAML gives them as dotted strings.
CALLABLE_KEYS = {"env_runner_cls", "callbacks_class", "callbacks", "learner_class", "module_class",
                 "learner_connector", "env_to_module_connector", "module_to_env_connector",
                 "custom_evaluation_function", "catalog_class"}


def _resolve_classes(value, where: str, key: str = ""):
    """Dotted strings under class- or function-valued keys (``CALLABLE_KEYS``) become objects."""
    if isinstance(value, dict):
        return {k: _resolve_classes(v, where, k) for k, v in value.items()}
    if isinstance(value, str) and key in CALLABLE_KEYS and "." in value:
        try:
            return import_dotted(value)
        except ValueError as e:
            raise UsageError(f"{where}: key {key!r}: {e}") from None
    return value


def load_experiments(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"malformed YAML in {path}{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(spec, dict) or not spec or not all(isinstance(v, dict) for v in spec.values()):
        raise UsageError(f"{path}: expected {{name: {{run, env, config, stop}}}} at the top level")
    for name, exp in spec.items():
        unknown = set(exp) - EXPERIMENT_KEYS
        if unknown:
            raise UsageError(f"{path}: experiment {name!r} has unknown key(s) {sorted(unknown)}; "
                             f"allowed: {sorted(EXPERIMENT_KEYS)}")
        if "run" not in exp:
            raise UsageError(f"{path}: experiment {name!r} needs 'run' (an algorithm name such as SPPO or PPO)")
    return spec


def tune_object(kind: str, spec, where: str):
    """A Tune scheduler (``kind`` "scheduler") or search algorithm ("search_alg") from its YAML block ``{type: NAME,
    **arguments}``: NAME as Tune's ``create_scheduler`` / ``create_searcher`` know it (``async_hyperband``, ``pbt``,
    ``pb2``, ``optuna``, ...) or a scheduler's class name (``ASHAScheduler``, ``PopulationBasedTraining``). Unlike
    those functions, an argument the class does not take is refused, not dropped."""
    import inspect

    from ray.tune import schedulers, search

    registry = schedulers.SCHEDULER_IMPORT if kind == "scheduler" else search.SEARCH_ALG_IMPORT
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise UsageError(f"{where}: {kind} must be a mapping with a type, e.g. {kind}: {{type: "
                         f"{'async_hyperband' if kind == 'scheduler' else 'optuna'}, metric: ..., mode: max}}")
    kwargs = dict(spec)
    name = kwargs.pop("type")
    cls = registry.get(name.lower()) or getattr(schedulers if kind == "scheduler" else search, name, None)
    if cls is not None and not inspect.isclass(cls):  # Tune imports some lazily (PB2, every searcher)
        cls = cls()
    if not inspect.isclass(cls):
        raise UsageError(f"{where}: unknown {kind} {name!r}; Tune has {sorted(registry)}")
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params:
                close = difflib.get_close_matches(key, list(params), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"{where}: {kind} {name} has no argument {key!r}{hint}; it takes {', '.join(params)}")
    try:
        return cls(**kwargs)
    except (ImportError, AssertionError, RuntimeError, TypeError, ValueError) as e:  # a missing package, a bad value
        raise UsageError(f"{where}: {kind} {name}: {str(e).strip().splitlines()[0]}") from None


def resolve_algorithm(name: str, where: str):
    """The algorithm class ``run: NAME`` names: SPPO, or one of RLlib's (importing only that one: Tune's own lookup
    imports every algorithm, DreamerV3's warnings included)."""
    from rllib_sppo import SPPO
    from rllib_sppo.private_api import rllib_algorithms

    if name == "SPPO":  # (not through Tune's registry: a Ray restarted in this process has forgotten it)
        return SPPO
    algorithms = rllib_algorithms()
    if name in algorithms:
        return algorithms[name]()[0]
    close = difflib.get_close_matches(name, ["SPPO", *algorithms], n=1)
    hint = f"did you mean {close[0]!r}?" if close else "try SPPO, PPO, APPO, IMPALA, DQN, SAC"
    raise UsageError(f"{where}: unknown algorithm {name!r} ({hint})")


def resolve_env(env: str, env_config: dict | None, where: str) -> None:
    """Checks ``env`` (a registered id, gymnasium's ``module:Id`` or a dotted path to an env class or creator) and
    ``env_config``'s ``outcome``, and registers it with Tune where RLlib would not find it by itself."""
    from envs.classic import check_env_spec, register_env_spec
    from rllib_sppo.private_api import registered_env_creator

    registered = registered_env_creator(env) is not None
    try:
        check_env_spec(env, env_config, registered=registered)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    register_env_spec(env, env_config, registered=registered)


def build_config(algo_cls, env: str | None, cfg: dict, where: str):
    """An AlgorithmConfig from a YAML/JSON dict, refusing keys the algorithm does not have."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    config = algo_cls.get_default_config()
    cfg = _absolute_paths(_resolve_classes(dict(cfg or {}), where))
    if env is not None:
        resolve_env(env, cfg.get("env_config"), where)
        config.environment(env)
    for key in cfg:
        if key in SPECIAL_CONFIG_KEYS or key.startswith("evaluation_") or hasattr(config, key):
            continue
        close = difflib.get_close_matches(key, [k for k in vars(config) if not k.startswith("_")], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"{where}: unknown config key {key!r} for {algo_cls.__name__}{hint}")
    if "llm" in cfg:  # first: the keys written beside it override what it sets
        llm = cfg.pop("llm")
        if not isinstance(llm, dict) or "policy" not in llm:
            raise UsageError(f"{where}: llm must be a mapping with at least a policy, e.g. llm: {{policy: "
                             f"builtin:tiny-arith, engine: vllm}}")
        try:
            config.llm(**llm)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{where}: llm: {e}") from None
    # Connector keys are stored privately; update_from_dict would set unused public attributes.
    if "learner_connector" in cfg:
        config.learners(learner_connector=cfg.pop("learner_connector"))
    for key in ("env_to_module_connector", "module_to_env_connector"):
        if key in cfg:
            config.env_runners(**{key: cfg.pop(key)})
    if "model_config" in cfg:
        config.rl_module(model_config=cfg.pop("model_config"))
    if "rl_module_spec" in cfg:
        config.rl_module(rl_module_spec=RLModuleSpec(**cfg.pop("rl_module_spec")))
    config.update_from_dict(cfg)
    return config


def _absolute_paths(value):
    """Relative paths to files or folders that exist (strings with a path separator, e.g. ``data/train.parquet``)
    made absolute: they are relative to where ``rllib train`` runs, and Tune runs each trial in its own folder."""
    if isinstance(value, dict):
        return {k: _absolute_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_paths(v) for v in value]
    if isinstance(value, str) and os.sep in value and not os.path.isabs(value) and os.path.exists(value):
        return os.path.abspath(value)
    return value
