"""SPPO's math as pure, batch-first, masked torch functions.

Shapes: ``B`` samples (episodes or responses), ``T`` steps/tokens. ``mask`` is 1 on
real steps/tokens and 0 on padding. Nothing here knows about RLlib; the learners
call these functions and only these.

One SPPO update, read top to bottom (arXiv 2604.08865):

    z   = critic(prompt)                        # one logit per sample
    A   = R - sigmoid(z)                        # sequence_advantage, before the critic update
    L_v = BCE(z, R)                             # critic_bce_loss
    L_p = PPO-clip(ratio_t, A) over tokens      # ppo_clip_loss, A broadcast to every token
    w_t = min(pi_old / pi_engine, cap)          # truncated_is_weights (optional): each token's L_p weighed by w_t

Baselines for comparison share the loss: GRPO / Dr.GRPO (``group_advantage``) and
RLOO (``rloo_advantage``) replace the critic by N > 1 samples per prompt; token-level
PPO (``gae_advantage``) replaces V(prompt) by a critic read at every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
CRITIC_LOSSES = ("bce", "mse")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (0 if the mask is empty); ``denominator`` replaces the count of
    those entries (a micro-batch's share of its minibatch's mean)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / (mask.sum().clamp(min=1.0) if denominator is None else denominator)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the entries where ``mask`` is 1 (unbiased variance, as verl's ``masked_whiten``);
    0 elsewhere."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean).pow(2), mask) * n / (n - 1).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + eps) * mask


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


def critic_prediction(critic_out: torch.Tensor, critic_loss: str = "bce") -> torch.Tensor:
    """The critic's value estimate in fp32: sigmoid(z) for the bce critic, the output itself for mse."""
    out = critic_out.float()
    return torch.sigmoid(out) if critic_loss == "bce" else out


def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] token rewards: each sample's outcome R on its last valid token, 0 elsewhere."""
    mask = mask.float()
    last = mask * (mask.flip(-1).cumsum(-1).flip(-1) == 1)
    return rewards.float().unsqueeze(-1) * last


def gae_advantage(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  gamma: float = 1.0, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the valid tokens of each row, right to left; returns (advantages, returns), [B, T].

    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 after the last valid token;
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V. Masked positions are skipped
    (the recursion carries over them) and come out 0. With gamma = lam = 1 and the
    outcome on the last token, A_t = R - V_t. Detached, fp32.
    """
    r, v, m = token_rewards.detach().float(), values.detach().float(), mask.detach().float()
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        adv = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv
        valid = m[:, t] > 0
        advantages[:, t] = torch.where(valid, adv, 0.0)
        next_value = torch.where(valid, v[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    return advantages, (advantages + v) * m


def group_advantage(rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A = (R - mean of its group) / (std of its group + eps); Dr.GRPO: no std division.

    The std is the unbiased one (as GRPO's reference code computes it).
    """
    r = rewards.detach().float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1, device=r.device).index_add_(0, inverse, torch.ones_like(r))
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
    count = torch.zeros(int(inverse.max()) + 1, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, inverse, r)
    return r - (total[inverse] - r) / (count[inverse] - 1).clamp(min=1)


def critic_bce_loss(critic_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                    denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over entries where ``mask`` is 1 (default all), in fp32.

    Targets in [0, 1]: an outcome, or a GAE return of [0, 1] outcomes and values.
    """
    loss = F.binary_cross_entropy_with_logits(critic_logits.float(), targets.float(), reduction="none")
    return masked_mean(loss, torch.ones_like(loss) if mask is None else mask, denominator)


def critic_mse_loss(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                    denominator: torch.Tensor | float | None = None, old_values: torch.Tensor | None = None,
                    clip: float | None = None) -> torch.Tensor:
    """0.5 * squared error, mean over entries where ``mask`` is 1 (default all), in fp32.

    With ``clip`` (verl's ``cliprange_value``), PPO's clipped value loss: the prediction may move at most ``clip``
    from ``old_values`` (the critic before this update) before the larger of the two errors counts.
    """
    values, targets = values.float(), targets.float()
    loss = (values - targets).pow(2)
    if clip is not None:
        clipped = old_values.float() + (values - old_values.float()).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - targets).pow(2))
    return masked_mean(0.5 * loss, torch.ones_like(loss) if mask is None else mask, denominator)


def agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
             denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: every valid token weighs the same (long responses weigh more).
    seq-mean-token-mean: mean per sequence, then mean over sequences.
    seq-mean-token-sum: sum per sequence, then mean over sequences.
    ``denominator`` replaces the count the mode divides by (valid tokens, or sequences): a micro-batch passes its
    minibatch's count, so that the micro-batches' losses add up to the minibatch's (gradient accumulation).
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        total, count = (loss * mask).sum(), mask.sum().clamp(min=1.0)
    elif mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        per_seq = (loss * mask).sum(-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / mask.sum(-1).clamp(min=1.0)
        total, count = per_seq.sum(), max(per_seq.numel(), 1)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGG_MODES}")
    return total / (count if denominator is None else denominator)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    counts: tuple | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clipped surrogate with dual clip, as the reference runs it.

    ``advantages`` is [B, T] or [B] (broadcast over tokens). Returns the loss and
    detached diagnostics: clip fractions, approx KL (mean of old - new log-prob)
    and ratio statistics. ``counts`` = (valid tokens, sequences) of the minibatch this
    batch is a micro-batch of: the loss and the means are then this micro-batch's share
    (they add up over the micro-batches; ``ratio_max``/``ratio_min`` take the max/min).
    ``weights`` [B, T] (detached, e.g. ``truncated_is_weights``) multiply each token's
    loss before it is aggregated, whatever the ``agg`` mode (as verl and TRL apply them).
    """
    tokens, sequences = counts if counts is not None else (None, None)
    denominator = tokens if agg == "token-mean" else sequences
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
        lower_clipfrac = masked_mean(((clipped > surr3) & negative).float(), mask, tokens)
    if weights is not None:
        losses = losses * weights.detach()
    loss = agg_loss(losses, mask, agg, denominator)
    m = mask.bool()
    stats = {
        "clipfrac": masked_mean((surr2 > surr1).float(), mask, tokens),
        "clipfrac_lower": lower_clipfrac,
        "approx_kl": masked_mean(-log_ratio, mask, tokens),
        "ratio_mean": masked_mean(ratio, mask, tokens),
        "ratio_max": ratio[m].max() if m.any() else ratio.new_ones(()),
        "ratio_min": ratio[m].min() if m.any() else ratio.new_ones(()),
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def truncated_is_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float,
                         tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling (TIS, as verl's and TRL's) for responses sampled by another policy than the
    learner's old one: an inference engine whose numerics differ, or whose weights are an update behind (asynchronous
    rollouts). Per token, ratio = pi_old / pi_sampler = exp(old_logp - sampler_logp) and the weight min(ratio, cap),
    detached, 0 on padding. Returns the weights and diagnostics: ``is_ratio_mean`` (over valid tokens; ``tokens``
    replaces their count, a micro-batch's share of its minibatch's mean), ``is_ratio_max``, ``is_ratio_min`` and
    ``is_capped_frac`` (share of tokens whose ratio exceeded the cap)."""
    ratio = torch.exp((old_logp.detach() - sampler_logp.detach()).float().clamp(-20.0, 20.0))
    m = mask.bool()
    stats = {
        "is_ratio_mean": masked_mean(ratio, mask, tokens),
        "is_ratio_max": ratio[m].max() if m.any() else ratio.new_ones(()),
        "is_ratio_min": ratio[m].min() if m.any() else ratio.new_ones(()),
        "is_capped_frac": masked_mean((ratio > cap).float(), mask, tokens),
    }
    return ratio.clamp(max=cap) * mask.to(ratio.dtype), stats


def token_budget_micro_batches(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Row indices of the micro-batches of a minibatch, verl's dynamic batch size: rows sorted by length, longest
    first, packed greedily while the padded size (rows x the longest row) stays within ``max_tokens``; a row longer
    than the budget is a micro-batch of its own. ``None``: one micro-batch, every row in order."""
    if max_tokens is None:
        return [list(range(len(lengths)))]
    out, width = [], 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if out and (len(out[-1]) + 1) * width <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
            width = lengths[i]
    return out


# The critic as an instrument: choosing prompts by its prediction, and how well calibrated it is.

def selection_weights(critic_logits: torch.Tensor, floor: float) -> torch.Tensor:
    """How much a prompt is worth sampling, from the critic's logit z before any generation: p (1 - p) + ``floor``
    with p = sigmoid(z). p (1 - p) is the variance of the 0/1 outcome, E|A| of SPPO's A = R - p up to a factor 2: a
    prompt the policy always (p = 1) or never (p = 0) solves teaches nothing. The floor keeps every prompt's weight
    above 0."""
    p = torch.sigmoid(critic_logits.detach().double())
    return p * (1.0 - p) + floor


def reliability_bins(p: torch.Tensor, rate: torch.Tensor, bins: int = 10):
    """Problems binned by their predicted p into ``bins`` equal-width bins of [0, 1] (p = 1 in the last one): per
    bin ``(count, mean p, mean rate)``, the means NaN where a bin is empty."""
    p, rate = p.double(), rate.double()
    index = (p * bins).floor().long().clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    mean = lambda x: torch.bincount(index, x, minlength=bins) / count  # noqa: E731 (0 / 0 = NaN: empty bin)
    return count, mean(p), mean(rate)


def expected_calibration_error(p: torch.Tensor, rate: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """ECE: sum over equal-width bins of p of (problems in the bin / problems) x |mean p - mean solve rate|."""
    count, p_mean, rate_mean = reliability_bins(p, rate, bins)
    full = count > 0
    return (count[full] * (p_mean[full] - rate_mean[full]).abs()).sum() / count.sum()


def brier_score(p: torch.Tensor, solved: torch.Tensor) -> torch.Tensor:
    """Mean squared error of p [P] against each of the k outcomes of its problem, ``solved`` [P, k] (0/1): the Brier
    score, = mean (p - rate)^2 + mean rate (1 - rate), the second term being the outcomes' own noise."""
    return (p.double()[:, None] - solved.double()).pow(2).mean()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x``, ties sharing the mean of the ranks they span."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of ``scores`` for the 0/1 ``labels``: the chance that a positive outscores a
    negative, ties counting 1/2 (Mann-Whitney U). NaN when one class is empty."""
    labels = labels.bool()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (average_ranks(scores)[labels].sum() - pos * (pos + 1) / 2) / (pos * neg)


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation (Pearson's on average ranks). NaN when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.pow(2).sum() * ry.pow(2).sum()).sqrt()
    return (rx * ry).sum() / denominator if denominator > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def critic_calibration(p: torch.Tensor, solved: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """How the critic's p [P] of each problem compares with its k outcomes ``solved`` [P, k] (0/1): Brier score,
    expected calibration error against the solve rate, AUROC of p for "solved at least once", Spearman correlation
    of p with the solve rate."""
    solved = solved.double()
    rate = solved.mean(1)
    return {"brier": float(brier_score(p, solved)), "ece": float(expected_calibration_error(p, rate, bins)),
            "auroc": float(auroc(p, solved.amax(1) > 0)), "spearman": float(spearman(p, rate))}
