"""Every private internal of RLlib, Tune and DeepSpeed this package overrides or reads, in one place.

The pinned versions (``pyproject.toml``) have them; an upgrade may rename or drop any. ``tests/test_private_api.py``
checks each against the installed versions, so that an upgrade fails loudly here rather than deep in a run. Where
the package reads a private object it goes through the accessors below (``envs``, which imports nothing of this
package, has its one read in ``envs.classic.registered_creator``); where it overrides a private method or reads
a private attribute of a class it subclasses, the method is defined in that subclass and listed in ``USED``.
"""

from __future__ import annotations

import importlib

#: (module, class or None for a module attribute, private name, where this package uses it and why).
USED = (
    # RLlib: Algorithm and AlgorithmConfig
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_value_error",
     "SPPOConfig.validate: RLlib's way to refuse a config (an error, or a warning when validation is lenient)"),
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_model_config_auto_includes",
     "SPPOConfig: overridden, adds the sampling temperature, critic bias and kind, and micro-batch budget"),
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_learner_connector",
     "SPPOConfig._validate_llm_wiring: which learner connector a config installs"),
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_is_frozen", "SPPOConfig.freeze"),
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_dont_auto_sync_env_runner_states",
     "SPPOConfig.freeze: async_rollouts turns off the per-iteration sync of EnvRunner connector states (as IMPALA)"),
    ("ray.rllib.utils.checkpoints", "Checkpointable", "_check_component",
     "SPPO, LLMEnvRunner and the DeepSpeed learner group: whether get_state was asked for a component"),
    ("ray.rllib.utils.checkpoints", "Checkpointable", "_get_subcomponents", "DeepSpeedLearnerGroup.get_state"),
    ("ray.tune.trainable.trainable", "Trainable", "_storage",
     "SPPO.save_checkpoint: the trial's storage, to name the checkpoint a failed write leaves intact"),
    ("ray.tune.trainable.trainable", "Trainable", "_trial_info", "monitoring: the trial's name in gauges"),
    ("ray.rllib.env.env_runner_group", "EnvRunnerGroup", "_worker_manager",
     "SPPO._restart_stuck_runners: kill a stuck remote EnvRunner so that RLlib restarts it"),
    ("ray.rllib.utils.actor_manager", "FaultTolerantActorManager", "_num_actor_restarts",
     "SPPO._sample: EnvRunners Ray restarted unseen by RLlib count in fault_tolerance/num_remote_worker_restarts"),
    ("ray.rllib.core.learner.learner_group", "LearnerGroup", "_get_results", "DeepSpeedLearnerGroup.get_state"),
    # RLlib: Learner and TorchLearner
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_uncompiled_update",
     "SPPOTorchLearner: overridden, micro-batches with gradient accumulation inside one minibatch"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_make_modules_ddp_if_necessary",
     "SPPODeepSpeedLearner: overridden, DeepSpeed wraps the module instead of DDP"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_get_optimizer_state",
     "SPPODeepSpeedLearner: overridden, the optimizer state of DeepSpeed's engines"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_set_optimizer_state",
     "SPPODeepSpeedLearner: overridden"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_compute_off_policyness",
     "SPPOTorchLearner._uncompiled_update: RLlib's off-policyness metric, as its own update logs it"),
    ("ray.rllib.core.learner.learner", "Learner", "_optimizer_parameters", "SPPOTorchLearner: gradient clipping"),
    ("ray.rllib.core.learner.learner", "Learner", "_params", "SPPOTorchLearner: the gradients of an update"),
    ("ray.rllib.core.learner.learner", "Learner", "_weights_seq_no",
     "SPPOTorchLearner.weight_chunks: the weights' sequence number sent with them"),
    ("ray.rllib.core.learner.learner", "Learner", "_learner_connector",
     "SPPOLearner.build: appends SPPO's advantage connector"),
    # RLlib: EnvRunner, registries
    ("ray.rllib.env.single_agent_env_runner", "SingleAgentEnvRunner", "_try_env_reset",
     "EpisodeEnvRunner: overridden, whole episodes per sample"),
    ("ray.tune.registry", None, "_global_registry",
     "envs.classic.registered_creator (envs imports nothing of this package): envs registered with tune.register_env"),
    ("ray.rllib.algorithms.registry", None, "ALGORITHMS", "the CLI: RLlib's algorithm names, resolved and suggested"),
    # DeepSpeed
    ("deepspeed.ops", None, "__compatible_ops__",
     "the DeepSpeed learner: marks the shared-memory comm op unusable (it needs a compiler at run time)"),
)


def rllib_algorithms() -> dict:
    """RLlib's algorithm registry: name -> a function returning (Algorithm class, default config)."""
    from ray.rllib.algorithms.registry import ALGORITHMS

    return ALGORITHMS


def remote_env_runner_actor(env_runner_group, index: int):
    """The Ray actor of a remote EnvRunner (to kill a stuck one, which RLlib then restarts), and its manager."""
    manager = env_runner_group._worker_manager
    return manager.actors()[index], manager


def count_env_runner_restarts(env_runner_group, n: int) -> None:
    """Adds ``n`` restarts to RLlib's count (``fault_tolerance/num_remote_worker_restarts``): remote EnvRunners that
    Ray restarted after their process died between two calls, which RLlib does not see."""
    env_runner_group._worker_manager._num_actor_restarts += n


def disable_deepspeed_shm_comm() -> None:
    """DeepSpeed's shared-memory comm op builds a C++ extension at run time; marked unusable, DeepSpeed uses gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def missing() -> list[str]:
    """The entries of ``USED`` the installed versions lack: a class attribute or method that is gone, an instance
    attribute that its class's source no longer assigns, a module attribute that is gone."""
    import inspect

    gone = []
    for module_name, class_name, name, _ in USED:
        module = importlib.import_module(module_name)
        if class_name is None:
            ok = hasattr(module, name)
        else:
            cls = getattr(module, class_name, None)
            ok = cls is not None and (hasattr(cls, name) or any(
                f"self.{name} =" in inspect.getsource(base) or f"self.{name}: " in inspect.getsource(base)
                for base in cls.__mro__ if base.__module__.startswith(module_name.split(".")[0])))
        if not ok:
            gone.append(f"{module_name}.{class_name + '.' if class_name else ''}{name}")
    return gone
