"""What an RLModule must offer SPPO's learner besides RLlib's ``ValueFunctionAPI``."""

import abc


class TokenLogpAPI(abc.ABC):
    """Per-step (or per-token) log-probs of the sampled actions, new and old.

    Classic control: one step per row, mask = 1. LLMs: [B, T] response tokens with
    the response mask. ``policy_parameters``/``critic_parameters`` split the module
    for the learner's two optimizers (the critic is a separate network).
    """

    @abc.abstractmethod
    def action_logp(self, batch, fwd_out):
        """Returns ``(logp, old_logp, mask)``, all the same shape."""

    @abc.abstractmethod
    def entropy(self, batch, fwd_out):
        """Per-step entropy of the current policy, same shape as ``logp``."""

    @abc.abstractmethod
    def policy_parameters(self) -> list:
        """Parameters the policy optimizer updates."""

    @abc.abstractmethod
    def critic_parameters(self) -> list:
        """Parameters the critic optimizer updates."""


class TokenValueAPI(abc.ABC):
    """A critic read at every action token, for token-level PPO (``advantage_estimator="ppo"``)."""

    @abc.abstractmethod
    def compute_token_values(self, batch):
        """Returns ``(values, mask)``, [B, T], aligned with ``action_logp``: the critic's output (a logit
        for the bce critic) at each token's state, and 1 on the action tokens."""
