"""SPPO's torch learner: two AdamW optimizers (policy, critic) and the loss."""

import torch

from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from rllib_sppo.connectors import CRITIC_MASK, ESTIMATORS, critic_output
from rllib_sppo.core import critic_bce_loss, critic_mse_loss, ppo_clip_loss, masked_mean
from rllib_sppo.sppo_learner import NONFINITE_SKIPPED, NONFINITE_STREAK, SPPOLearner


class SPPOTorchLearner(SPPOLearner, TorchLearner):
    _nonfinite_streak = 0

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self.module[module_id].unwrapped()
        for name, params, lr, wd in (
            ("policy", module.policy_parameters(), config.lr, config.weight_decay),
            ("critic", module.critic_parameters(), config.critic_lr, config.critic_weight_decay),
        ):
            self.register_optimizer(module_id=module_id, optimizer_name=name,
                                    optimizer=torch.optim.AdamW(params, weight_decay=wd),
                                    params=params, lr_or_lr_schedule=lr)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        logp, old_logp, mask = module.action_logp(batch, fwd_out)
        pg_loss, stats = ppo_clip_loss(
            logp, old_logp, batch[Columns.ADVANTAGES], mask,
            clip_low=config.clip_low, clip_high=config.clip_high,
            dual_clip=config.dual_clip, agg=config.loss_agg_mode)
        critic_out = critic_output(module, batch, ESTIMATORS[config.advantage_estimator][0])
        critic_fn = critic_bce_loss if config.critic_loss == "bce" else critic_mse_loss
        critic_loss = critic_fn(critic_out, batch[Columns.VALUE_TARGETS], batch[CRITIC_MASK])
        total = pg_loss + critic_loss
        if config.entropy_coeff:
            entropy = masked_mean(module.entropy(batch, fwd_out), mask)
            total = total - config.entropy_coeff * entropy
            stats["entropy"] = entropy.detach()
        self.metrics.log_dict(
            {"policy/loss": pg_loss.detach(), "critic/loss": critic_loss.detach(),
             **{f"policy/{k}": v for k, v in stats.items()}},
            key=module_id, window=1)
        return total

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
