"""The ONE door to the private members of RLlib, Ray (Tune), DeepSpeed and vLLM that this package reads or overrides.

Reads go through the accessors below; overrides of private methods through the hook classes below, which turn each
into a public, documented method that the package's subclasses override instead (``SPPOConfig`` subclasses
``AlgorithmConfigHooks``, the torch learner ``TorchLearnerHooks``, the classic-control EnvRunner
``SingleAgentEnvRunnerHooks``). ``USED`` lists every internal reached, with where and why; the pinned versions
(``pyproject.toml``) have them all, and an upgrade may rename or drop any: ``tests/test_private_api.py`` checks each
against the installed versions, and scans the repository (the package, ``envs``, benchmarks and tests) for a private
use anywhere else.

One exception, by RLlib's design: an RLModule implements ``_forward`` (RLlib's documented way to write a module;
``DOCUMENTED_OVERRIDES``). ``envs`` imports nothing of this package: the one registry read it needs (is an env id
registered with Tune?) is made here (``registered_env_creator``) by the callers in ``rllib_sppo``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

#: Private modules of Ray and torch whose loggers ``monitoring.KNOWN_NOISE`` quiets (each in ``USED``: its logger).
PRIVATE_LOGGERS = {
    "ray_deprecation": "ray._common.deprecation",
    "ray_auth_token": "ray._private.authentication.authentication_token_setup",
    "train_storage": "ray.train._internal.storage",
    "torch_triton": "torch._library.triton",
}

#: (module, class or None for a module attribute, internal name, where this package uses it and why).
USED = (
    *((module, None, "logger", "monitoring.KNOWN_NOISE: a filter on the module's logger drops its known lines")
      for module in PRIVATE_LOGGERS.values()),
    # RLlib: AlgorithmConfig (through AlgorithmConfigHooks)
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_value_error", "AlgorithmConfigHooks.refuse: "
     "RLlib's way to refuse a config (an error, or a warning when validation is lenient)"),
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_model_config_auto_includes",
     "AlgorithmConfigHooks.model_config_additions: SPPO's module keys (temperature, critic kind and bias, budget)"),
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_learner_connector",
     "AlgorithmConfigHooks.learner_connector_instance: which learner connector a config installs"),
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_is_frozen", "AlgorithmConfigHooks.freeze"),
    ("ray.rllib.algorithms.algorithm_config", "AlgorithmConfig", "_dont_auto_sync_env_runner_states",
     "AlgorithmConfigHooks.freeze: async_rollouts turns off the per-iteration sync of EnvRunner connector states"),
    # RLlib and Tune: Algorithm, checkpoints, EnvRunners
    ("ray.rllib.utils.checkpoints", "Checkpointable", "_check_component",
     "asked_for: whether get_state was asked for a component (SPPO, LLMEnvRunner, the DeepSpeed learner and group)"),
    ("ray.rllib.utils.checkpoints", "Checkpointable", "_get_subcomponents", "subcomponents: DeepSpeedLearnerGroup"),
    ("ray.tune.trainable.trainable", "Trainable", "_storage",
     "trial_storage: the trial's storage, to name the checkpoint a failed write leaves intact"),
    ("ray.tune.trainable.trainable", "Trainable", "_trial_info",
     "trial_info, keep_trial_info: the trial's name in monitoring's gauges (RLlib drops it from the config)"),
    ("ray.rllib.env.env_runner_group", "EnvRunnerGroup", "_worker_manager",
     "remote_env_runner_actor: kill a stuck remote EnvRunner so that RLlib restarts it"),
    ("ray.rllib.utils.actor_manager", "FaultTolerantActorManager", "_num_actor_restarts",
     "count_env_runner_restarts: runners Ray restarted unseen by RLlib count in num_remote_worker_restarts"),
    ("ray.rllib.execution.rollout_ops", "synchronous_parallel_sample", "_uses_new_env_runners",
     "sample_episodes: a keyword argument, episodes from new-stack EnvRunners"),
    ("ray.rllib.execution.rollout_ops", "synchronous_parallel_sample", "_return_metrics",
     "sample_episodes: a keyword argument, the runners' metrics returned with the episodes"),
    ("ray.rllib.env.single_agent_env_runner", "SingleAgentEnvRunner", "_try_env_reset",
     "SingleAgentEnvRunnerHooks.reset_seed: EpisodeEnvRunner draws each reset's seed (new states every batch)"),
    ("ray.rllib.core.learner.learner_group", "LearnerGroup", "_get_results", "learner_results: DeepSpeedLearnerGroup"),
    ("ray.rllib.core.learner.learner_group", "LearnerGroup", "_learner",
     "local_learner: benchmarks and tests read a local learner's module and optimizers"),
    ("ray._private.worker", "init", "_metrics_export_port",
     "ray_init: tests read the package's series at a Prometheus port they chose (ray start's --metrics-export-port)"),
    ("ray.tune.registry", None, "_global_registry",
     "registered_env_creator: envs registered with tune.register_env (read for envs.classic's callers)"),
    ("ray.rllib.algorithms.registry", None, "ALGORITHMS", "rllib_algorithms: the CLI resolves RLlib's algorithm names"),
    ("ray._private.worker", None, "_global_node",
     "grafana.dashboards_folder: this Ray session's folder (where its dashboard writes Grafana's dashboards)"),
    ("ray.tune.execution.cluster_info", None, "_is_ray_cluster",
     "autoscaling_cluster: the CLI's resource check (Tune's test for an autoscaling cluster, where nodes may come)"),
    # RLlib: Learner and TorchLearner (through TorchLearnerHooks)
    ("ray.rllib.core.learner.learner", "Learner", "_optimizer_lr_schedules",
     "optimizer_lr_schedules: SPPOLearner.set_state sets a restored optimizer to the config's fixed learning rate"),
    ("ray.rllib.core.learner.learner", "Learner", "_set_optimizer_lr",
     "set_optimizer_lr: SPPOLearner.set_state (a PBT trial restored with a mutated lr trains with it at once)"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_uncompiled_update",
     "TorchLearnerHooks.minibatch_update: micro-batches with gradient accumulation inside one minibatch"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_make_modules_ddp_if_necessary",
     "TorchLearnerHooks.wrap_modules_for_data_parallel: DeepSpeed wraps the modules instead of DDP"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_get_optimizer_state",
     "TorchLearnerHooks.read_optimizer_state: the optimizer state of DeepSpeed's engines"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_set_optimizer_state",
     "TorchLearnerHooks.write_optimizer_state"),
    ("ray.rllib.core.learner.torch.torch_learner", "TorchLearner", "_compute_off_policyness",
     "TorchLearnerHooks.log_off_policyness: RLlib's off-policyness metric, as its own update logs it"),
    ("ray.rllib.core.learner.learner", "Learner", "_optimizer_parameters",
     "TorchLearnerHooks.optimizers: zeroing the gradients of an update"),
    ("ray.rllib.core.learner.learner", "Learner", "_params",
     "TorchLearnerHooks.parameters_by_id: an update's gradients"),
    ("ray.rllib.core.learner.learner", "Learner", "_weights_seq_no",
     "TorchLearnerHooks.weights_seq_no: the weights' sequence number sent with them"),
    ("ray.rllib.core.learner.learner", "Learner", "_learner_connector",
     "learner_pipeline: SPPOLearner.build appends SPPO's advantage connector"),
    # RLlib: the documented way to write an RLModule (DOCUMENTED_OVERRIDES)
    ("ray.rllib.core.rl_module.torch.torch_rl_module", "TorchRLModule", "_forward",
     "SPPOMLPModule, SPPOLLMModule: the forward pass (RLlib's RLModule guide: implement _forward)"),
    # DeepSpeed
    ("deepspeed.ops", None, "__compatible_ops__",
     "disable_deepspeed_shm_comm: the shared-memory comm op marked unusable (it needs a compiler at run time)"),
    # vLLM (the engine in this process, weights reloaded in place, LoRA adapters swapped, sleep mode)
    ("vllm.envs", "environment_variables", "VLLM_ENABLE_V1_MULTIPROCESSING",
     "vllm_in_this_process: the engine core in the caller's process (collective_rpc reaches its worker)"),
    ("vllm.entrypoints.llm", "LLM", "collective_rpc", "vllm_reload_weights"),
    ("vllm.v1.worker.gpu_worker", "Worker", "reload_weights",
     "vllm_reload_weights: the policy's new weights loaded in place, lazily from an iterator (CPUWorker inherits)"),
    ("vllm.entrypoints.llm", "LLM", "llm_engine", "vllm_swap_lora: the engine under the offline LLM"),
    ("vllm.v1.engine.llm_engine", "LLMEngine", "add_lora", "vllm_swap_lora: the new adapter loaded now"),
    ("vllm.v1.engine.llm_engine", "LLMEngine", "remove_lora", "vllm_swap_lora: the last adapter dropped"),
    ("vllm.entrypoints.llm", "LLM", "sleep", "VLLMEngine.sleep: the KV cache (and weights) freed during the update"),
    ("vllm.entrypoints.llm", "LLM", "wake_up", "VLLMEngine.wake_up"),
)
#: Private names that RLlib documents as the way to extend a class; overridden where they are implemented.
DOCUMENTED_OVERRIDES = {"_forward"}


# Accessors.

def asked_for(checkpointable, component: str, components, not_components) -> bool:
    """Whether a ``get_state(components, not_components=...)`` call asks for ``component``."""
    return checkpointable._check_component(component, components, not_components)


def subcomponents(checkpointable, component: str, components):
    """The parts of ``components`` under ``component`` (e.g. ``learner/rl_module`` -> ``rl_module``)."""
    return checkpointable._get_subcomponents(component, components)


def learner_results(learner_group, results):
    """The values of a ``foreach_learner`` call, errors raised."""
    return learner_group._get_results(results)


def local_learner(learner_group):
    """The learner of a learner group that runs it in this process (``learner_group.is_local``)."""
    return learner_group._learner


def ray_init(*, metrics_export_port: int, **kwargs):
    """``ray.init(**kwargs)`` with Prometheus' metrics export on ``metrics_export_port``."""
    import ray

    return ray.init(_metrics_export_port=metrics_export_port, **kwargs)


def learner_pipeline(learner):
    """A learner's learner-connector pipeline (None without one)."""
    return learner._learner_connector


def optimizer_lr_schedules(learner) -> dict:
    """{optimizer: its learning-rate ``Scheduler``} of a learner (the config's lr or schedule, as registered)."""
    return learner._optimizer_lr_schedules


def set_optimizer_lr(learner, optimizer, lr: float) -> None:
    """Sets ``optimizer``'s learning rate, as RLlib's learner does after each update."""
    learner._set_optimizer_lr(optimizer, lr=lr)


def trial_storage(trainable):
    """The Tune trial's storage context (None outside Tune)."""
    return trainable._storage


def trial_info(trainable):
    """The Tune trial's info (None outside Tune)."""
    return trainable._trial_info


def keep_trial_info(trainable, config) -> None:
    """Gives an Algorithm built by Tune its trial's info: RLlib drops it from the config dict it is built from
    (``AlgorithmConfig.update_from_dict`` skips ``TRIAL_INFO``), so Tune's ``trial_name`` and ``trial_id`` would say
    "default" in every trial."""
    from ray.tune.result import TRIAL_INFO

    info = config.get(TRIAL_INFO) if isinstance(config, dict) else None
    if info is not None:
        trainable._trial_info = info


def ray_session_dir() -> str:
    """The folder of the Ray session this process is connected to (on a cluster: as named on its head node)."""
    from ray._private import worker

    return worker._global_node.get_session_dir_path()


def remote_env_runner_actor(env_runner_group, index: int):
    """The Ray actor of a remote EnvRunner (to kill a stuck one, which RLlib then restarts), and its manager."""
    manager = env_runner_group._worker_manager
    return manager.actors()[index], manager


def count_env_runner_restarts(env_runner_group, n: int) -> None:
    """Adds ``n`` restarts to RLlib's count (``fault_tolerance/num_remote_worker_restarts``): remote EnvRunners that
    Ray restarted after their process died between two calls, which RLlib does not see."""
    env_runner_group._worker_manager._num_actor_restarts += n


def sample_episodes(env_runner_group, *, max_env_steps: int, sample_timeout_s: float) -> tuple[list, list]:
    """RLlib's synchronous sampling from new-stack EnvRunners: (episodes, the runners' metrics)."""
    from ray.rllib.execution.rollout_ops import synchronous_parallel_sample

    return synchronous_parallel_sample(worker_set=env_runner_group, max_env_steps=max_env_steps,
                                       sample_timeout_s=sample_timeout_s, _uses_new_env_runners=True,
                                       _return_metrics=True)


def registered_env_creator(spec: str):
    """The creator ``ray.tune.register_env`` registered under ``spec``, or None."""
    from ray.tune.registry import ENV_CREATOR, _global_registry

    return _global_registry.get(ENV_CREATOR, spec) if _global_registry.contains(ENV_CREATOR, spec) else None


def rllib_algorithms() -> dict:
    """RLlib's algorithm registry: name -> a function returning (Algorithm class, default config)."""
    from ray.rllib.algorithms.registry import ALGORITHMS

    return ALGORITHMS


def autoscaling_cluster() -> bool:
    """Whether Ray runs with an autoscaler that may add nodes (Tune's own test: the cluster launcher's bootstrap
    config exists)."""
    from ray.tune.execution.cluster_info import _is_ray_cluster

    return _is_ray_cluster.__wrapped__()  # (asked anew: Tune caches the first answer for the process)


def disable_deepspeed_shm_comm() -> None:
    """DeepSpeed's shared-memory comm op builds a C++ extension at run time; marked unusable, DeepSpeed uses gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def vllm_in_this_process() -> None:
    """vLLM's engine core in this process (before the engine starts): ``vllm_reload_weights`` reaches its worker."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def vllm_reload_weights(llm, named_tensors) -> None:
    """Loads (name, tensor) pairs into the engine's model in place, consuming the iterator lazily."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})


def vllm_swap_lora(llm, request, previous=None) -> None:
    """Serves the LoRA adapter ``request`` (a ``LoRARequest``) from now on, dropping ``previous`` (its request)."""
    if previous is not None:
        llm.llm_engine.remove_lora(previous.lora_int_id)
    llm.llm_engine.add_lora(request)


# Hooks: a private method overridden here calls a public one, which the package's subclasses override.

class AlgorithmConfigHooks(AlgorithmConfig):
    """RLlib's AlgorithmConfig with its private parts behind public names."""

    def refuse(self, message: str) -> None:
        """Refuses the config with ``message`` (RLlib: a ValueError; a warning when validation is off)."""
        self._value_error(message)

    def learner_connector_instance(self):
        """The learner connector this config installs (built for no spaces), or None."""
        return self._learner_connector(None, None) if self._learner_connector else None

    def model_config_additions(self) -> dict:
        """Hook: keys the algorithm adds to every RLModule's model_config (RLlib's ``_model_config_auto_includes``)."""
        return {}

    def sync_env_runner_states_each_iteration(self) -> bool:
        """Hook: whether RLlib syncs the EnvRunners' connector states after every iteration (its default: yes)."""
        return True

    @property
    def _model_config_auto_includes(self) -> dict:
        return super()._model_config_auto_includes | self.model_config_additions()

    def freeze(self) -> None:
        if not self._is_frozen:
            self._dont_auto_sync_env_runner_states = not self.sync_env_runner_states_each_iteration()
        super().freeze()


class TorchLearnerHooks(TorchLearner):
    """RLlib's TorchLearner with its private update steps and state as public hooks, and its private attributes
    behind public names."""

    def minibatch_update(self, batch, **kwargs):
        """Hook: one update on a minibatch, returning (forward outputs, losses, metrics) (RLlib's
        ``TorchLearner._uncompiled_update``)."""
        return super()._uncompiled_update(batch, **kwargs)

    def wrap_modules_for_data_parallel(self) -> None:
        """Hook: with several learners, RLlib wraps the modules in torch's DDP."""
        super()._make_modules_ddp_if_necessary()

    def read_optimizer_state(self) -> dict:
        """Hook: the optimizers' state, for a checkpoint."""
        return super()._get_optimizer_state()

    def write_optimizer_state(self, state: dict) -> None:
        """Hook: restores the optimizers' state."""
        super()._set_optimizer_state(state)

    def log_off_policyness(self, batch) -> None:
        """RLlib's off-policyness metric of a batch, as its own update logs it."""
        self._compute_off_policyness(batch)

    @property
    def optimizers(self):
        """The learner's optimizers."""
        return self._optimizer_parameters

    @property
    def parameters_by_id(self) -> dict:
        """The learner's parameters by id."""
        return self._params

    @property
    def weights_seq_no(self) -> int:
        """The sequence number of the learner's current weights."""
        return self._weights_seq_no

    def _uncompiled_update(self, batch, **kwargs):
        return self.minibatch_update(batch, **kwargs)

    def _make_modules_ddp_if_necessary(self) -> None:
        self.wrap_modules_for_data_parallel()

    def _get_optimizer_state(self):
        return self.read_optimizer_state()

    def _set_optimizer_state(self, state) -> None:
        self.write_optimizer_state(state)


class SingleAgentEnvRunnerHooks(SingleAgentEnvRunner):
    """RLlib's SingleAgentEnvRunner with the seed of each env reset as a public hook."""

    def reset_seed(self, seed: int | None) -> int | None:
        """Hook: the seed an env reset gets, given RLlib's (None: not seeded)."""
        return seed

    def _try_env_reset(self, *, seed=None, options=None):
        return super()._try_env_reset(seed=self.reset_seed(seed), options=options)


def missing() -> list[str]:
    """The entries of ``USED`` the installed versions lack: a class attribute or method that is gone, an instance
    attribute its class's source no longer assigns, a function's keyword argument or a module attribute that is gone.
    Entries of a package that is not installed (vLLM, DeepSpeed: optional) are not checked."""
    gone = []
    for module_name, owner_name, name, _ in USED:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if importlib.util.find_spec(module_name.split(".")[0]) is None:
                continue  # an optional package this machine does not have
            raise
        owner = module if owner_name is None else getattr(module, owner_name, None)
        if owner is None:
            ok = False
        elif isinstance(owner, dict):  # a registry, e.g. vLLM's environment variables
            ok = name in owner
        elif inspect.isfunction(owner):  # a keyword argument, in its signature or taken from its **kwargs
            ok = name in inspect.signature(owner).parameters or f'kwargs.pop("{name}"' in inspect.getsource(owner)
        else:
            ok = hasattr(owner, name) or inspect.isclass(owner) and any(
                f"self.{name} =" in inspect.getsource(base) or f"self.{name}: " in inspect.getsource(base)
                for base in owner.__mro__ if base.__module__.startswith(module_name.split(".")[0]))
        if not ok:
            gone.append(f"{module_name}.{owner_name + '.' if owner_name else ''}{name}")
    return gone
