"""SPPO's pure functions against numbers computed by hand."""

import math

import pytest
import torch

from rllib_sppo.core import (agg_loss, auroc, critic_bce_loss, critic_calibration, critic_mse_loss, gae_advantage,
                             group_advantage, outcome_token_rewards, ppo_clip_loss, reliability_bins,
                             rloo_advantage, selection_weights, sequence_advantage, spearman, truncated_is_weights)

LN3 = math.log(3.0)


def close(x, y, tol=1e-6):
    assert torch.allclose(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64),
                          atol=tol), (x, y)


def test_advantage_is_outcome_minus_probability():
    # p = sigmoid([0, ln3, -ln3]) = [0.5, 0.75, 0.25]
    a = sequence_advantage(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, LN3, -LN3]))
    close(a, [0.5, -0.75, 0.75])
    assert a.dtype == torch.float32


def test_advantage_is_detached_and_fp32_from_bf16():
    z = torch.tensor([0.0], dtype=torch.bfloat16, requires_grad=True)
    a = sequence_advantage(torch.tensor([1.0]), z)
    assert not a.requires_grad and a.dtype == torch.float32


def test_normalized_advantage():
    # (R - p) / sqrt(p (1 - p)): sqrt(.25) = .5, sqrt(.1875) = .4330127
    a = sequence_advantage(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, LN3, -LN3]), normalize=True)
    close(a, [1.0, -0.75 / 0.4330127, 0.75 / 0.4330127])
    # p = sigmoid(10) ~ 0.99995 is clamped to 0.999: (1 - .999) / sqrt(.999 * .001)
    a = sequence_advantage(torch.tensor([1.0]), torch.tensor([10.0]), normalize=True)
    close(a, [0.001 / math.sqrt(0.999 * 0.001)])


def test_mse_advantage_and_bad_combination():
    close(sequence_advantage(torch.tensor([0.5, 0.2]), torch.tensor([0.3, 0.4]), critic_loss="mse"), [0.2, -0.2])
    with pytest.raises(ValueError, match="bce"):
        sequence_advantage(torch.tensor([0.5]), torch.tensor([0.3]), normalize=True, critic_loss="mse")


def test_critic_losses():
    # -(log 0.5 + log 0.25) / 2
    close(critic_bce_loss(torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0])), (math.log(2) + math.log(4)) / 2)
    # soft target 0.3 at p = 0.5: -(0.3 log .5 + 0.7 log .5) = log 2
    close(critic_bce_loss(torch.tensor([0.0]), torch.tensor([0.3])), math.log(2))
    close(critic_mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])), 0.5 * (1 + 4) / 2)
    # masked: only the entries where the mask is 1 count; an empty mask gives 0
    close(critic_mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])), 0.5 * 4)
    close(critic_bce_loss(torch.tensor([0.0, 9.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])), math.log(2))
    close(critic_mse_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0])), 0.0)


RATIOS = [1.5, 0.5, 1.1, 5.0]
ADVS = [1.0, 1.0, -1.0, -1.0]


def _case(dual_clip=3.0, mask=(1, 1, 1, 1)):
    logp = torch.log(torch.tensor([RATIOS])).requires_grad_(True)
    loss, stats = ppo_clip_loss(logp, torch.zeros(1, 4), torch.tensor([ADVS]), torch.tensor([mask], dtype=torch.float32),
                                dual_clip=dual_clip)
    return logp, loss, stats


def test_ppo_clip_with_dual_clip():
    # per token: -1.2 (clipped high), -0.5 (A>0, r<1-eps: unclipped), 1.1, min(5, 3) = 3 (dual clip)
    logp, loss, stats = _case()
    close(loss, (-1.2 - 0.5 + 1.1 + 3.0) / 4)
    close(stats["clipfrac"], 0.25)
    close(stats["clipfrac_lower"], 0.25)
    close(stats["approx_kl"], -sum(math.log(r) for r in RATIOS) / 4)
    close(stats["ratio_max"], 5.0)
    loss.backward()
    # clipped tokens have no gradient; d(-A r)/dlogp = -A r, / 4 tokens
    close(logp.grad, [[0.0, -0.5 / 4, 1.1 / 4, 0.0]])


def test_ppo_clip_without_dual_clip_and_masked():
    _, loss, stats = _case(dual_clip=None)
    close(loss, (-1.2 - 0.5 + 1.1 + 5.0) / 4)
    close(stats["clipfrac_lower"], 0.0)
    _, loss, _ = _case(mask=(1, 1, 1, 0))
    close(loss, (-1.2 - 0.5 + 1.1) / 3)


def test_sequence_advantage_broadcasts_over_tokens():
    logp = torch.zeros(2, 2)
    loss, _ = ppo_clip_loss(logp, logp, torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    close(loss, (-1 - 1 + 1) / 3)


def test_log_ratio_is_clamped():
    loss, _ = ppo_clip_loss(torch.tensor([50.0]), torch.tensor([0.0]), torch.tensor([-1.0]), torch.ones(1),
                            dual_clip=None)
    close(loss / math.exp(20.0), 1.0)


def test_loss_aggregation_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(agg_loss(loss, mask, "token-mean"), 7 / 3)
    close(agg_loss(loss, mask, "seq-mean-token-mean"), (1.5 + 4.0) / 2)
    close(agg_loss(loss, mask, "seq-mean-token-sum"), (3.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(loss, mask, "sum")


def test_grpo_group_of_four():
    # rewards [1, 0, 0, 1] in one group: mean 0.5, unbiased std sqrt(1/3) = 0.57735
    groups = torch.tensor([7, 7, 7, 7, 3, 3])
    a = group_advantage(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), groups)
    s = math.sqrt(1 / 3)
    close(a, [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0], tol=1e-4)
    # Dr.GRPO: no std division
    close(group_advantage(torch.tensor([1.0, 0.0, 0.0, 1.0]), groups[:4], std_normalize=False), [0.5, -0.5, -0.5, 0.5])


def test_rloo_group_of_four():
    # rewards [1, 0, 0, 0]: baselines are the means of the other three: 0, 1/3, 1/3, 1/3
    a = rloo_advantage(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0]))
    close(a, [1.0, -1 / 3, -1 / 3, -1 / 3])


# Two responses in the [B, T] next-token layout: position 0 is a prompt position, then 5 and 2 response tokens,
# then padding. Values at masked positions (9.0) must be ignored.
GAE_MASK = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.float32)
GAE_VALUES = torch.tensor([[9.0, 0.5, 0.4, 0.6, 0.7, 0.9, 9.0], [9.0, 9.0, 0.2, 0.3, 9.0, 9.0, 9.0]])
GAE_REWARDS = outcome_token_rewards(torch.tensor([1.0, 0.0]), GAE_MASK)


def test_outcome_sits_on_the_last_response_token():
    close(outcome_token_rewards(torch.tensor([1.0, 0.5]), GAE_MASK),
          [[0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0.5, 0, 0, 0]])


def test_gae_with_gamma_lambda_one_is_outcome_minus_value():
    adv, ret = gae_advantage(GAE_REWARDS, GAE_VALUES, GAE_MASK)
    close(adv, [[0, 0.5, 0.6, 0.4, 0.3, 0.1, 0], [0, 0, -0.2, -0.3, 0, 0, 0]])
    close(ret, [[0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]])


def test_gae_by_hand():
    # gamma 0.9, lambda 0.8 (gamma lambda = 0.72); row 0: V = .5 .4 .6 .7 .9, R = 1 on the last token
    # delta = gamma V_next - V (+ R last): -.14, .14, .03, .11, .1
    # A from the right: .1, .11 + .72 * .1 = .182, .03 + .72 * .182 = .16104, .14 + .72 * .16104 = .2559488,
    #                   -.14 + .72 * .2559488 = .044283136
    # row 1: V = .2 .3, R = 0: delta .9 * .3 - .2 = .07, -.3; A = -.3, .07 + .72 * -.3 = -.146
    adv, ret = gae_advantage(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.8)
    close(adv, [[0, 0.044283136, 0.2559488, 0.16104, 0.182, 0.1, 0], [0, 0, -0.146, -0.3, 0, 0, 0]])
    close(ret, [[0, 0.544283136, 0.6559488, 0.76104, 0.882, 1.0, 0], [0, 0, 0.054, 0.0, 0, 0, 0]])
    assert adv.dtype == torch.float32 and not adv.requires_grad


def test_token_advantages_feed_the_clip_loss():
    # ratio 1: the loss is minus the token-mean of the per-token advantages
    adv, _ = gae_advantage(GAE_REWARDS, GAE_VALUES, GAE_MASK)
    loss, _ = ppo_clip_loss(torch.zeros(2, 7), torch.zeros(2, 7), adv, GAE_MASK)
    close(loss, -(0.5 + 0.6 + 0.4 + 0.3 + 0.1 - 0.2 - 0.3) / 7)


def test_selection_weights_are_outcome_variance_plus_floor():
    # p = [0.5, 0.75, 0.25, ~1]: p (1 - p) = [0.25, 0.1875, 0.1875, ~0] + 0.05
    w = selection_weights(torch.tensor([0.0, LN3, -LN3, 40.0]), floor=0.05)
    close(w, [0.30, 0.2375, 0.2375, 0.05])


# A made-up held-out set: 5 problems, 4 samples each. p = the critic's prediction, solved = 0/1 per sample.
HELDOUT_P = torch.tensor([0.95, 0.62, 0.68, 0.15, 0.68])
HELDOUT_SOLVED = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_critic_calibration_by_hand():
    m = critic_calibration(HELDOUT_P, HELDOUT_SOLVED)
    # Brier: per problem the mean of (p - y)^2 over its 4 samples: .05^2; (.38^2 + .62^2) / 2; (.32^2 + .68^2) / 2;
    # .15^2; .68^2.
    assert m["brier"] == pytest.approx((0.0025 + 0.2644 + 0.2824 + 0.0225 + 0.4624) / 5)
    # ECE, 10 bins: [0.9, 1] holds .95 (rate 1); [0.6, 0.7) holds .62, .68, .68 (mean .66, rates .5 .5 0: mean 1/3);
    # [0.1, 0.2) holds .15 (rate 0).
    assert m["ece"] == pytest.approx((0.05 + 3 * abs(0.66 - 1 / 3) + 0.15) / 5)
    # AUROC for "solved at least once" (.95 .62 .68 vs .15 .68): pairs won .95: 2, .62: 1, .68: 1 + a tie (1/2).
    assert m["auroc"] == pytest.approx(4.5 / 6)
    # Spearman: ranks of p [5, 2, 3.5, 1, 3.5], of the rates [1, .5, .5, 0, 0]: [5, 3.5, 3.5, 1.5, 1.5];
    # deviations from 3: [2, -1, .5, -2, .5] and [2, .5, .5, -1.5, -1.5]: 6 / sqrt(9.5 * 9).
    assert m["spearman"] == pytest.approx(6 / math.sqrt(9.5 * 9))
    count, p_mean, rate_mean = reliability_bins(HELDOUT_P, HELDOUT_SOLVED.double().mean(1))
    assert count.tolist() == [0, 1, 0, 0, 0, 0, 3, 0, 0, 1]
    close(p_mean[[1, 6, 9]], [0.15, 0.66, 0.95])
    close(rate_mean[[1, 6, 9]], [0.0, 1 / 3, 1.0])
    assert torch.isnan(p_mean[0]) and torch.isnan(rate_mean[0])  # an empty bin


def test_calibration_edge_cases():
    assert math.isnan(auroc(torch.tensor([0.2, 0.9]), torch.tensor([1, 1])))  # one class: undefined
    assert math.isnan(spearman(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.0, 0.5, 1.0])))  # a constant critic
    assert auroc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert spearman(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, 0.5, 0.0])) == pytest.approx(-1.0)
    # p = 1 falls in the last bin; a perfect critic of deterministic outcomes has Brier 0 and ECE 0
    m = critic_calibration(torch.tensor([1.0, 0.0]), torch.tensor([[1, 1], [0, 0]]))
    assert (m["brier"], m["ece"], m["auroc"]) == (0.0, 0.0, 1.0)


def test_truncated_importance_weights_weigh_each_tokens_loss_in_every_aggregation():
    """pi_old / pi_engine per token = [2, 0.5, 3 | 1, 2, pad], capped at 2.5: weights [2, 0.5, 2.5 | 1, 2, 0]. With
    ratio pi / pi_old = 1 and A = [1, -2], the per-token losses -A = [-1 x3 | 2 x2] become [-2, -0.5, -2.5 | 2, 4]."""
    log = lambda *p: torch.tensor(p).log()  # noqa: E731
    old = torch.stack([log(0.5, 0.2, 0.9), log(0.6, 0.1, 0.5)]).requires_grad_()
    engine = torch.stack([log(0.25, 0.4, 0.3), log(0.6, 0.05, 0.9)])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights, stats = truncated_is_weights(old, engine, mask, cap=2.5)
    close(weights, [[2.0, 0.5, 2.5], [1.0, 2.0, 0.0]], 1e-5)
    assert not weights.requires_grad
    close([stats["is_ratio_mean"], stats["is_ratio_max"], stats["is_ratio_min"], stats["is_capped_frac"]],
          [8.5 / 5, 3.0, 0.5, 1 / 5], 1e-5)
    # A micro-batch's share of a minibatch of 10 tokens: the means divide by 10.
    _, share = truncated_is_weights(old, engine, mask, cap=2.5, tokens=10.0)
    close([share["is_ratio_mean"], share["is_capped_frac"]], [0.85, 0.1], 1e-5)
    advantages = torch.tensor([1.0, -2.0])
    expected = {"token-mean": (-5 + 6) / 5, "seq-mean-token-mean": (-5 / 3 + 6 / 2) / 2, "seq-mean-token-sum": 1 / 2}
    for mode, value in expected.items():
        logp = old.detach().clone().requires_grad_()
        loss, _ = ppo_clip_loss(logp, old.detach(), advantages, mask, agg=mode, weights=weights)
        close(loss, value, 1e-5)
        if mode == "token-mean":  # d loss / d logp = -A w / 5 (ratio 1, unclipped); 0 on padding
            loss.backward()
            close(logp.grad, [[-0.4, -0.1, -0.5], [0.4, 0.8, 0.0]], 1e-5)
    unweighted, _ = ppo_clip_loss(old.detach(), old.detach(), advantages, mask)
    close(unweighted, (-3 + 4) / 5)  # the control: without weights, the plain token-mean
