"""SPPO's math as pure, batch-first, masked torch functions.

Shapes: ``B`` samples (episodes or responses), ``T`` steps/tokens. ``mask`` is 1 on
real steps/tokens and 0 on padding. Nothing here knows about RLlib; the learners
call these functions and only these.

One SPPO update, read top to bottom (arXiv 2604.08865):

    z   = critic(prompt)                        # one logit per sample
    A   = R - sigmoid(z)                        # sequence_advantage, before the critic update
    L_v = BCE(z, R)                             # critic_bce_loss
    L_p = PPO-clip(ratio_t, A) over tokens      # ppo_clip_loss, A broadcast to every token

Baselines for comparison share the loss: GRPO / Dr.GRPO (``group_advantage``) and
RLOO (``rloo_advantage``) replace the critic by N > 1 samples per prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
CRITIC_LOSSES = ("bce", "mse")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (0 if the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def sequence_advantage(
    rewards: torch.Tensor,
    critic_logits: torch.Tensor,
    normalize: bool = False,
    critic_loss: str = "bce",
    eps: float = 1e-3,
) -> torch.Tensor:
    """The SPPO advantage, one scalar per sample, in fp32 and detached.

    bce critic: A = R - p with p = sigmoid(z); with ``normalize``,
    A = (R - p) / sqrt(p (1 - p)), p clamped into [eps, 1 - eps].
    mse critic: A = R - V (the critic output is the value itself).
    """
    r = rewards.detach().float()
    out = critic_logits.detach().float()
    if critic_loss == "mse":
        if normalize:
            raise ValueError("normalize=True needs the bce critic (p must be a probability)")
        return r - out
    p = torch.sigmoid(out)
    if not normalize:
        return r - p
    p = p.clamp(eps, 1.0 - eps)
    return (r - p) / torch.sqrt(p * (1.0 - p))


def group_advantage(rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A = (R - mean of its group) / (std of its group + eps); Dr.GRPO: no std division.

    The std is the unbiased one (as GRPO's reference code computes it).
    """
    r = rewards.detach().float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inverse, r) / count
    centered = r - mean[inverse]
    if not std_normalize:
        return centered
    var = torch.zeros_like(count).index_add_(0, inverse, centered.pow(2)) / (count - 1).clamp(min=1)
    return centered / (var.sqrt()[inverse] + eps)


def rloo_advantage(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO: A = R - mean of the OTHER rewards of its group (leave-one-out baseline)."""
    r = rewards.detach().float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, inverse, r)
    return r - (total[inverse] - r) / (count[inverse] - 1).clamp(min=1)


def critic_bce_loss(critic_logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over samples, in fp32 (targets in [0, 1])."""
    return F.binary_cross_entropy_with_logits(critic_logits.float(), rewards.float())


def critic_mse_loss(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 * mean squared error, in fp32 (for continuous outcomes)."""
    return 0.5 * (values.float() - targets.float()).pow(2).mean()


def agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: every valid token weighs the same (long responses weigh more).
    seq-mean-token-mean: mean per sequence, then mean over sequences.
    seq-mean-token-sum: sum per sequence, then mean over sequences.
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        return masked_mean(loss, mask)
    seq_sum = (loss * mask).sum(-1)
    if mode == "seq-mean-token-sum":
        return seq_sum.mean()
    if mode == "seq-mean-token-mean":
        return (seq_sum / mask.sum(-1).clamp(min=1.0)).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGG_MODES}")


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clipped surrogate with dual clip, as the reference runs it.

    ``advantages`` is [B, T] or [B] (broadcast over tokens). Returns the loss and
    detached diagnostics: clip fractions, approx KL (mean of old - new log-prob)
    and ratio statistics.
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logp)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    surr1 = -advantages * ratio
    surr2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(surr1, surr2)
    losses = clipped
    lower_clipfrac = torch.zeros((), device=logp.device)
    if dual_clip is not None:
        surr3 = -advantages * dual_clip
        negative = advantages < 0
        losses = torch.where(negative, torch.minimum(clipped, surr3), clipped)
        lower_clipfrac = masked_mean(((clipped > surr3) & negative).float(), mask)
    loss = agg_loss(losses, mask, agg)
    m = mask.bool()
    stats = {
        "clipfrac": masked_mean((surr2 > surr1).float(), mask),
        "clipfrac_lower": lower_clipfrac,
        "approx_kl": masked_mean(-log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": ratio[m].max() if m.any() else ratio.new_ones(()),
        "ratio_min": ratio[m].min() if m.any() else ratio.new_ones(()),
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return (torch.exp(-log_ratio) + log_ratio - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
