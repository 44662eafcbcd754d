"""SPPO's DeepSpeed learner: the policy and the critic each in a ZeRO-2/3 engine with its own AdamW.

``SPPOConfig.deepspeed = {"zero_stage": 2 | 3, "offload_optimizer": bool, "offload_param": bool}`` selects it.
The loss is ``SPPOTorchLearner``'s; only the update's plumbing changes: one backward of the loss, through each
engine's hooks (the policy loss reaches only policy parameters and the critic loss only critic ones), then a step
per engine, DeepSpeed clipping each network's gradient to ``grad_clip``. RLlib keeps the learning rates on the
torch optimizers DeepSpeed steps. Under ZeRO-3 the parameters are partitioned: state (weight sync, checkpoints)
is read and written with them gathered whole, and a written state refreshes the engines' fp32 master weights.
With several learners (data-parallel, one ZeRO group), gathering is collective: ``DeepSpeedLearnerGroup`` reads the
state on every learner at once where RLlib would ask the first alone, and checkpoints hold every learner's
optimizer partition.
"""

import contextlib
import importlib.util
import math
import os
import tempfile
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import tree
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.learner.learner_group import LearnerGroup

from rllib_sppo.apis import SeparateNetworksAPI
from rllib_sppo.llm.weight_group import describe, plan
from rllib_sppo.private_api import (asked_for, disable_deepspeed_shm_comm, learner_results,
                                    subcomponents)
from rllib_sppo.torch.sppo_torch_learner import SPPOTorchLearner, learner_rank

INSTALL = "pip install 'rllib-sppo[deepspeed]'"
#: ``SPPOConfig.deepspeed``'s keys and their defaults.
DEEPSPEED_DEFAULTS = {"zero_stage": 2, "offload_optimizer": False, "offload_param": False}


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (also a ValueError: config validation reports it like the others)."""


def deepspeed_problems(config):
    """What is wrong with ``config.deepspeed`` (``SPPOConfig.validate``), each with its fix; a MissingExtraError if
    DeepSpeed is not installed."""
    ds = config.deepspeed
    if not isinstance(ds, dict):
        yield f"deepspeed must be a dict such as {{'zero_stage': 3}} (or None), got {ds!r}."
        return
    unknown = sorted(set(ds) - set(DEEPSPEED_DEFAULTS))
    if unknown:
        yield (f"deepspeed has unknown key(s) {unknown}; its keys are zero_stage (2 or 3), offload_optimizer and "
               f"offload_param (True/False).")
    ds = {**DEEPSPEED_DEFAULTS, **ds}
    if ds["zero_stage"] not in (2, 3):
        yield (f"deepspeed zero_stage={ds['zero_stage']!r}: set 2 (gradients and optimizer state partitioned) or 3 "
               f"(parameters too).")
    for key in ("offload_optimizer", "offload_param"):
        if not isinstance(ds[key], bool):
            yield f"deepspeed {key} must be True or False, got {ds[key]!r}."
    if ds["offload_param"] and ds["zero_stage"] != 3:
        yield ("deepspeed offload_param=True needs zero_stage 3 (ZeRO-2 keeps whole parameters on the device); set "
               "zero_stage: 3, or drop offload_param.")
    module_class = getattr(config.rl_module_spec, "module_class", None)
    if not (isinstance(module_class, type) and issubclass(module_class, SeparateNetworksAPI)):
        yield (f"deepspeed trains a module whose policy and critic are separate networks (SeparateNetworksAPI, e.g. "
               f"SPPOLLMModule); {getattr(module_class, '__name__', module_class)} is not one. Classic-control "
               f"networks are small: leave deepspeed unset (the torch learner).")
    if config.grad_clip_by != "global_norm":
        yield (f"deepspeed clips gradients by their global norm (grad_clip), not by {config.grad_clip_by!r}: set "
               f"grad_clip_by='global_norm'.")
    if importlib.util.find_spec("deepspeed") is None:
        raise MissingExtraError(f"deepspeed={config.deepspeed} needs DeepSpeed, which is not installed: {INSTALL}",
                                name="deepspeed")


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise MissingExtraError(f"config.deepspeed needs DeepSpeed, which is not installed: {INSTALL}",
                                name="deepspeed") from e
    return deepspeed


def _init_distributed(deepspeed) -> None:
    """DeepSpeed's communication backend over a one-process group (RLlib's, or a new one in this process)."""
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
    if deepspeed.get_accelerator().device_name() == "cpu":
        # DeepSpeed compiles a shared-memory all-reduce for CPU ranks at its first init (a C++ build, about a
        # minute on 2 cores); one process has no peer to share memory with, so gloo alone does.
        disable_deepspeed_shm_comm()
    if not torch.distributed.is_initialized():  # num_learners=0: the learner lives in this process
        torch.distributed.init_process_group(deepspeed.get_accelerator().communication_backend_name(),
                                             init_method=f"file://{tempfile.mkdtemp(prefix='sppo_ds_')}/store",
                                             rank=0, world_size=1)
    deepspeed.init_distributed()


def engine_config(config, params: list, bf16: bool) -> dict:
    """One engine's DeepSpeed config from the SPPO config (RLlib makes the minibatches, the learner the micro-batches,
    marking the accumulation boundary itself)."""
    ds = {**DEEPSPEED_DEFAULTS, **config.deepspeed}
    # Communication buckets no larger than the network (ZeRO-3 allocates its 5e8-element default up front).
    bucket = min(int(5e8), math.ceil(sum(p.numel() for p in params) / 64) * 64)  # a multiple of the alignment
    zero = {"stage": ds["zero_stage"], "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds["offload_param"]:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": config.minibatch_size or config.train_batch_size_per_learner,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},  # DeepSpeed casts the network to bfloat16, keeps fp32 masters and Adam moments
        "zero_allow_untested_optimizer": True,  # torch's AdamW, as the torch learner steps
        "zero_force_ds_cpu_optimizer": False,  # ... also when offloading (DeepSpeedCPUAdam is a compiled op)
        "steps_per_print": 2 ** 31,
    }


class SPPODeepSpeedLearner(SPPOTorchLearner):
    def build(self) -> None:
        self._engines = {}  # module id -> {"policy": engine, "critic": engine}
        self._gathered = 0  # depth of _whole_parameters contexts
        self._pending_optimizer_state = None
        _init_distributed(import_deepspeed())
        super().build()

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        deepspeed = import_deepspeed()
        module = self.module[module_id].unwrapped()
        engines = {}
        for name, lr, weight_decay in (("policy", config.lr, config.weight_decay),
                                       ("critic", config.critic_lr, config.critic_weight_decay)):
            network = module.networks()[name]
            params = list(network.parameters())
            engine, zero_optimizer, _, _ = deepspeed.initialize(
                model=network, optimizer=torch.optim.AdamW(params, weight_decay=weight_decay),
                config=engine_config(config, params, bf16=module.compute_dtype == torch.bfloat16))
            # RLlib sets the learning rate (and its schedule) on the torch optimizer inside DeepSpeed's.
            self.register_optimizer(module_id=module_id, optimizer_name=name, optimizer=zero_optimizer.optimizer,
                                    params=params, lr_or_lr_schedule=lr)
            engines[name] = engine
        module.run_networks_with(**engines)
        self._engines[module_id] = engines

    def wrap_modules_for_data_parallel(self) -> None:
        """DeepSpeed's engines, not DDP, hold the networks."""

    # The update is the torch learner's (micro-batches accumulated into one step per minibatch); only its steps
    # change: DeepSpeed's engines, not DDP, hold the networks and reduce (ZeRO: partition) the gradients in their
    # backward hooks, at the accumulation boundary, the minibatch's last micro-batch; each engine then steps,
    # clipping its network's gradient to ``grad_clip``. After a non-finite loss no further backward runs (so no
    # boundary is reached), the accumulated gradients are dropped and no engine steps.

    def _zero_gradients(self) -> None:
        self._loss_finite = True

    def _accumulating(self, module_id, last: bool):
        for engine in self._engines[module_id].values():
            engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def _backward(self, loss, last: bool) -> None:
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss))
        if self._loss_finite:
            loss.backward()

    def _step(self) -> None:
        applied = self._loss_finite
        for module_id, engines in self._engines.items():
            for name, engine in engines.items():
                if not self._loss_finite:
                    engine.optimizer.zero_grad(set_to_none=True)
                    continue
                engine.step()
                applied = applied and engine.was_step_applied()
                norm = engine.get_global_grad_norm()  # before clipping, as the torch learner logs it
                if norm is not None:
                    self.metrics.log_value((module_id, f"gradients_{name}_global_norm"), float(norm), window=1)
        self._count_update(applied=applied)

    # State: under ZeRO-3 a parameter holds only its partition; it is gathered whole to be read or written. The
    # optimizers' state is DeepSpeed's own (ZeRO's flat fp32 master weights, AdamW moments and step; one process
    # holds all of it), loaded after the weights, whose fp32 master copy it then replaces exactly.

    def _partitioned(self) -> bool:
        return any(e.zero_optimization_partition_weights() for es in self._engines.values() for e in es.values())

    @contextmanager
    def _whole_parameters(self, write: bool = False, networks=("policy", "critic")):
        """Gathers the ZeRO-3-partitioned parameters of ``networks`` for the duration. After a write, partitions
        the new values, copies them into the engines' fp32 master weights, then loads a pending optimizer state."""
        import deepspeed

        self._gathered += 1
        try:
            with ExitStack() as stack:
                if self._gathered == 1 and self._partitioned():
                    for engines in self._engines.values():
                        for name in networks:
                            stack.enter_context(deepspeed.zero.GatheredParameters(
                                list(engines[name].module.parameters()), modifier_rank=0 if write else None))
                yield
            if write and self._gathered == 1:
                for engines in self._engines.values():
                    for engine in engines.values():
                        engine.optimizer.refresh_fp32_params()
                state, self._pending_optimizer_state = self._pending_optimizer_state, None
                if state is not None:
                    self._load_optimizer_state(state)
        finally:
            self._gathered -= 1

    def get_state(self, components=None, *, not_components=None, **kwargs):
        networks = ()
        if asked_for(self, COMPONENT_RL_MODULE, components, not_components):
            networks = ("policy",) if kwargs.get("inference_only") else ("policy", "critic")
        with self._whole_parameters(networks=networks):
            state = super().get_state(components, not_components=not_components, **kwargs)
            if networks and self._partitioned():  # copies: the gathered tensors are freed on exit
                state[COMPONENT_RL_MODULE] = tree.map_structure(
                    lambda x: x.copy() if isinstance(x, np.ndarray) else x.clone() if torch.is_tensor(x) else x,
                    state[COMPONENT_RL_MODULE])
        return state

    def set_state(self, state) -> None:
        with self._whole_parameters(write=True):
            super().set_state(state)

    def policy_buckets(self, max_bytes: int):
        """Under ZeRO-3, the policy's parameters are gathered one bucket at a time (by every learner: it is a
        collective), and only the first learner reads them, in the compute dtype; the layout comes from the
        partitions' full shapes, before any gather. (LoRA's adapters, and ZeRO-2, as the torch learner.)"""
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        if module.lora or not self._partitioned():
            return super().policy_buckets(max_bytes)
        skip = set(module.get_non_inference_attributes())
        entries = [(name, t) for name, t in module.state_dict(keep_vars=True).items() if name.split(".")[0] not in skip]
        shapes = [tuple(getattr(t, "ds_shape", t.shape)) for _, t in entries]
        dtypes = [module.compute_dtype if t.is_floating_point() else t.dtype for _, t in entries]
        parts = plan((math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes)), max_bytes)
        layout = [[describe(entries[i][0], shapes[i], dtypes[i]) for i in part] for part in parts]
        return layout, self._gathered_buckets(entries, dtypes, parts)

    def _gathered_buckets(self, entries: list, dtypes: list, parts: list):
        import deepspeed

        first = learner_rank() == 0
        for part in parts:
            params = list({id(t): t for t in (entries[i][1] for i in part) if hasattr(t, "ds_id")}.values())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield [(entries[i][0], entries[i][1].detach().to(dtypes[i])) for i in part] if first else []

    def get_state_collectively(self, *args, **kwargs):
        """``get_state`` run by every learner at once (ZeRO gathers across all of them); the first returns it."""
        state = self.get_state(*args, **kwargs)
        return state if torch.distributed.get_rank() == 0 else None

    def save_to_path(self, path=None, *, state=None, **kwargs):
        """Writes ``state`` (by default, this learner's gathered state); the module writes its Hugging Face folder
        from it too, so writing reads no partitioned parameter."""
        return super().save_to_path(path, state=self.get_state() if state is None else state, **kwargs)

    def restore_from_path(self, *args, **kwargs) -> None:
        with self._whole_parameters(write=True):
            super().restore_from_path(*args, **kwargs)

    def read_optimizer_state(self):
        """Every learner's partition of each engine's optimizer state, in learner (ZeRO rank) order."""
        # (Detached: ZeRO-2 hands out views of its fp32 partitions, which carry autograd history.)
        local = {f"{module_id}_{name}": tree.map_structure(lambda x: x.detach().cpu() if torch.is_tensor(x) else x,
                                                           engine.optimizer.state_dict())
                 for module_id, engines in self._engines.items() for name, engine in engines.items()}
        partitions = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(partitions, local)
        return {key: {"module_id": module_id, "partitions": [p[key] for p in partitions]}
                for module_id, engines in self._engines.items() for key in (f"{module_id}_{n}" for n in engines)}

    def write_optimizer_state(self, state) -> None:
        if self._gathered:  # written with the weights: loaded once they are in place (see _whole_parameters)
            self._pending_optimizer_state = state
        else:
            self._load_optimizer_state(state)

    def _load_optimizer_state(self, state) -> None:
        for key, saved in state.items():
            module_id = saved["module_id"]
            if module_id not in self._engines:
                continue
            if "partitions" not in saved:
                raise ValueError(f"optimizer state {key!r} is not DeepSpeed's (a checkpoint of the torch learner?): "
                                 f"restore it with the learner that wrote it, or load only its weights "
                                 f"(components='learner/rl_module').")
            written, learners = len(saved["partitions"]), torch.distributed.get_world_size()
            if written != learners:
                raise ValueError(f"optimizer state {key!r} holds the ZeRO partitions of {written} learner(s), this "
                                 f"run has {learners}: resume with num_learners={written}, or "
                                 f"load only its weights (components='learner/rl_module').")
            engine = self._engines[module_id][key[len(module_id) + 1:]]
            engine.optimizer.load_state_dict(saved["partitions"], load_from_fp32_weights=True)  # takes its rank's


class DeepSpeedLearnerGroup(LearnerGroup):
    """RLlib's LearnerGroup, except that the learners' state is read on all of them at once: ZeRO gathers the
    partitions collectively, where RLlib asks the first learner alone. (Writing a state already reaches all.)"""

    def get_state(self, components=None, *, not_components=None, **kwargs):
        if self.is_local or not asked_for(self, COMPONENT_LEARNER, components, not_components):
            return super().get_state(components, not_components=not_components, **kwargs)
        comps = subcomponents(self, COMPONENT_LEARNER, components)
        not_comps = subcomponents(self, COMPONENT_LEARNER, not_components)
        states = learner_results(self, self.foreach_learner(
            lambda learner: learner.get_state_collectively(comps, not_components=not_comps, **kwargs)))
        return {COMPONENT_LEARNER: next(state for state in states if state is not None)}

    def save_to_path(self, path=None, *, state=None, **kwargs):
        """Writes the state read from all learners (RLlib would have the first one read and write it alone)."""
        return super().save_to_path(path, state=self.get_state() if state is None else state, **kwargs)
