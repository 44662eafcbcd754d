"""SPPO's torch learner: AdamW for the policy (and one for the critic, if the estimator has one), and the loss.

One minibatch is one optimizer step, its gradient accumulated over the module's micro-batches (at most
``max_tokens_per_micro_batch`` tokens each, ``TokenLogpAPI.micro_batches``): every loss term of a micro-batch is
normalised by its MINIBATCH's count (tokens, sequences or critic entries), so the micro-batches' losses and gradients
add up to the unsplit minibatch's, for every ``loss_agg_mode``.
"""

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray
import torch

from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns

from rllib_sppo.connectors import CRITIC_MASK, VALUES_OLD, critic_output
from rllib_sppo.core import critic_bce_loss, critic_mse_loss, masked_mean, ppo_clip_loss, truncated_is_weights
from rllib_sppo.estimators import get_estimator
from rllib_sppo.llm.weight_group import WeightGroup, buckets, drain, layout
from rllib_sppo.private_api import TorchLearnerHooks
from rllib_sppo.sppo_learner import NONFINITE_SKIPPED, NONFINITE_STREAK, SPPOLearner
from rllib_sppo.torch.llm_rl_module import emulated_bf16, read_cpuinfo

logger = logging.getLogger(__name__)
MINIBATCH = "_sppo_minibatch"  # batch key of a micro-batch: its minibatch's counts and diagnostics (a Minibatch)


@dataclass
class Minibatch:
    """What a micro-batch's loss needs of the minibatch it is part of: the counts its terms divide by, and the
    diagnostics of all its micro-batches, added up (``*_max``/``*_min``: the max/min)."""

    tokens: torch.Tensor
    sequences: int
    critic_entries: torch.Tensor | None
    stats: dict = field(default_factory=dict)

    @classmethod
    def of(cls, module, batch: dict) -> "Minibatch":
        mask = module.action_mask(batch)
        critic = batch[CRITIC_MASK].sum().clamp(min=1.0) if CRITIC_MASK in batch else None
        return cls(mask.sum().clamp(min=1.0), mask.shape[0] if mask.dim() > 1 else 1, critic)

    def add(self, stats: dict) -> None:
        for key, value in stats.items():
            old = self.stats.get(key)
            self.stats[key] = value if old is None else (
                torch.maximum(old, value) if key.endswith("_max") else
                torch.minimum(old, value) if key.endswith("_min") else old + value)


def adamw(params: list, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) when every parameter is on a CUDA device."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, weight_decay=weight_decay, fused=fused or None)


def learner_rank() -> int:
    """This learner's rank among the learners (0 alone)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class SPPOTorchLearner(SPPOLearner, TorchLearnerHooks):
    _nonfinite_streak = 0
    weight_group = None  # this learner's membership of the weight-sync group (rank 0 only), once formed

    def build(self) -> None:
        super().build()
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        if getattr(module, "compute_dtype", None) == torch.bfloat16 and self.device.type == "cpu":
            if emulated_bf16(read_cpuinfo()):
                logger.warning("dtype='bfloat16' on a CPU learner whose CPU has no native bfloat16 (no avx512_bf16 or "
                               "amx_bf16 among its flags): torch emulates it, and the update runs many times slower "
                               "than in float32 (17x on a linear layer on an AMD EPYC without it); set llm(dtype='float32') (YAML: "
                               "llm: {dtype: float32}) on this machine.")

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id].unwrapped()
        for name, params, lr, wd in (
            ("policy", module.policy_parameters(), config.lr, config.weight_decay),
            ("critic", module.critic_parameters(), config.critic_lr, config.critic_weight_decay),
        ):
            if params:  # a critic-free estimator's module has no critic
                self.register_optimizer(module_id=module_id, optimizer_name=name,
                                        optimizer=adamw(params, wd),
                                        params=params, lr_or_lr_schedule=lr)

    def minibatch_update(self, batch, **kwargs):
        """One optimizer step on a minibatch, accumulated over its micro-batches."""
        self.log_off_policyness(batch)
        self._zero_gradients()
        fwd_out, losses = {}, {}
        for module_id, module_batch in batch.items():
            module = self.module[module_id].unwrapped()
            minibatch = Minibatch.of(module, module_batch)
            parts = module.micro_batches(module_batch)
            config = self.config.get_config_for_module(module_id)
            for i, (_, micro) in enumerate(parts):
                last = i == len(parts) - 1
                with self._accumulating(module_id, last):
                    fwd_out[module_id] = self.module[module_id].forward_train(micro)
                    loss = self.compute_loss_for_module(module_id=module_id, config=config,
                                                        batch={**micro, MINIBATCH: minibatch},
                                                        fwd_out=fwd_out[module_id])
                    self._backward(loss, last)
                losses[module_id] = losses.get(module_id, 0.0) + loss.detach()
            self.metrics.log_dict(minibatch.stats, key=module_id, window=1)
        self._step()
        self._zero_gradients()  # freed now, not at the next update: no gradient held through sampling
        return fwd_out, losses, {}

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        """The PPO-clip policy loss (each token's weighed by its truncated importance weight with ``tis_cap``), plus
        the critic's loss if the estimator has a critic; this micro-batch's share of its minibatch's
        (``batch[MINIBATCH]``), diagnostics added to it."""
        minibatch: Minibatch = batch[MINIBATCH]
        module = self.module[module_id].unwrapped()
        logp, old_logp, mask = module.action_logp(batch, fwd_out)
        weights, tis_stats = None, {}
        if config.tis_cap is not None:
            weights, tis_stats = truncated_is_weights(old_logp, module.sampler_logp(batch), mask, config.tis_cap,
                                                      minibatch.tokens)
        total, stats = ppo_clip_loss(
            logp, old_logp, batch[Columns.ADVANTAGES], mask,
            clip_low=config.clip_low, clip_high=config.clip_high, dual_clip=config.dual_clip,
            agg=config.loss_agg_mode, counts=(minibatch.tokens, minibatch.sequences), weights=weights)
        stats = {**{f"policy/{k}": v for k, v in stats.items()}, **{f"rollout/{k}": v for k, v in tis_stats.items()}}
        stats["policy/loss"] = total.detach()
        critic = get_estimator(config.advantage_estimator).critic
        if critic is not None:
            out = critic_output(module, batch, critic)
            targets, critic_mask = batch[Columns.VALUE_TARGETS], batch[CRITIC_MASK]
            if config.resolved_critic_loss == "bce":
                critic_loss = critic_bce_loss(out, targets, critic_mask, minibatch.critic_entries)
            else:
                critic_loss = critic_mse_loss(out, targets, critic_mask, minibatch.critic_entries,
                                              old_values=batch[VALUES_OLD], clip=config.resolved_value_clip)
            total = total + critic_loss
            stats["critic/loss"] = critic_loss.detach()
        with torch.set_grad_enabled(bool(config.entropy_coeff)):  # only a diagnostic at 0: no graph kept for it
            entropy = masked_mean(module.entropy(batch, fwd_out), mask, minibatch.tokens)
        if config.entropy_coeff:
            total = total - config.entropy_coeff * entropy
        stats["policy/entropy"] = entropy.detach()
        minibatch.add(stats)
        return total

    def policy_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The policy's weights for remote EnvRunners: the inference-only state in the module's compute dtype. Tied
        tensors (an LM head tied to the embedding) go under each name: vLLM's reload needs every name. Runs on every
        learner (gathering ZeRO-3 partitions is collective)."""
        state = self.get_state(components=COMPONENT_RL_MODULE, inference_only=True)[COMPONENT_RL_MODULE]
        dtype = getattr(self.module[DEFAULT_MODULE_ID].unwrapped(), "compute_dtype", None)
        cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t  # noqa: E731
        return [(name, cast(torch.as_tensor(value))) for name, value in state[DEFAULT_MODULE_ID].items()]

    def policy_buckets(self, max_bytes: int) -> tuple[list, Iterator[list[tuple[str, torch.Tensor]]]]:
        """``policy_tensors`` in buckets of at most ``max_bytes`` (a larger tensor is a bucket of its own): their
        ``layout`` and an iterator of the buckets, which every learner consumes to its end (the DeepSpeed learner
        gathers ZeRO-3 partitions a bucket at a time, collectively); the first learner's holds the tensors, valid
        until the next bucket is read."""
        parts = buckets(self.policy_tensors(), max_bytes)
        return layout(parts), iter(parts)

    def weight_chunks(self, max_bytes: int) -> tuple[list, int]:
        """``policy_buckets`` put in Ray's object store, a chunk each: ``(refs, weights_seq_no)``; the first learner
        returns the chunks, the others none."""
        _, parts = self.policy_buckets(max_bytes)
        if learner_rank() != 0:
            drain(parts)
            return [], self.weights_seq_no
        return [ray.put(dict(bucket)) for bucket in parts], self.weights_seq_no

    def join_weight_group(self, host: str, port: int, size: int, device: str, timeout_s: float) -> bool:
        """The first learner joins SPPO's weight-sync group as its rank 0 (``rllib_sppo.llm.weight_group``); the
        others stay out of it. False if the group could not be formed within ``timeout_s``."""
        self.weight_group = None
        if learner_rank() != 0:
            return True
        try:
            self.weight_group = WeightGroup(host, port, 0, size, device, timeout_s)
        except RuntimeError as error:  # (torch.distributed's errors, a timeout among them)
            logger.warning("the weight-sync group was not formed: %s", error)
            return False
        return True

    def broadcast_weights(self, max_bytes: int) -> bool:
        """``policy_buckets`` to the weight-sync group, in buckets of at most ``max_bytes``, with ``weights_seq_no``.
        False if the broadcast failed (a member gone or past the group's timeout): the group must be formed again."""
        shapes, parts = self.policy_buckets(max_bytes)
        try:
            if learner_rank() != 0:
                return True
            if self.weight_group is None:
                return False
            self.weight_group.send(shapes, parts, seq_no=self.weights_seq_no)
        except RuntimeError as error:
            logger.warning("the weight broadcast failed: %s", error)
            self.weight_group = None
            return False
        finally:  # (every learner reads every bucket: under ZeRO-3 each is gathered by all of them)
            drain(parts)
        return True

    def prompt_values(self, texts: list[str]):
        """The sequence critic's logit for each prompt text, before any response (``SPPOLLMModule.prompt_values``),
        as numpy: what prompt selection and the held-out calibration read (``rllib_sppo.llm.critic``)."""
        return self.module[DEFAULT_MODULE_ID].unwrapped().prompt_values(texts).numpy()

    # The accumulation steps, which the DeepSpeed learner replaces.

    def _zero_gradients(self) -> None:
        for optim in self.optimizers:
            optim.zero_grad(set_to_none=True)

    def _accumulating(self, module_id, last: bool):
        """Under DDP (several learners), gradients are all-reduced once per minibatch, in its last backward."""
        module = self.module[module_id]
        if last or self.config.num_learners <= 1 or not hasattr(module, "no_sync"):
            return contextlib.nullcontext()
        return module.no_sync()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _step(self) -> None:
        gradients = {pid: p.grad for pid, p in self.parameters_by_id.items() if p.grad is not None}
        self.apply_gradients(self.postprocess_gradients(gradients))

    def apply_gradients(self, gradients_dict) -> None:
        """Skips (and counts) an update whose loss or gradient is not finite."""
        finite = all(torch.isfinite(g).all() for g in gradients_dict.values())
        if finite:
            super().apply_gradients(gradients_dict)
        self._count_update(applied=finite)

    def _count_update(self, applied: bool) -> None:
        """Counts an optimizer step skipped for a non-finite loss or gradient, and the streak of them."""
        self._nonfinite_streak = 0 if applied else self._nonfinite_streak + 1
        self.metrics.log_value(NONFINITE_SKIPPED, int(not applied), reduce="sum")
        self.metrics.log_value(NONFINITE_STREAK, self._nonfinite_streak, reduce="max", window=1)
