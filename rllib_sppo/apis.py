"""What an RLModule must offer SPPO's learner besides RLlib's ``ValueFunctionAPI``."""

import abc


class TokenLogpAPI(abc.ABC):
    """Per-step (or per-token) log-probs of the sampled actions, new and old.

    Classic control: one step per row, mask = 1. LLMs: [B, T] response tokens with
    the response mask. ``policy_parameters``/``critic_parameters`` split the module
    for the learner's two optimizers (the critic is a separate network, or none).
    ``micro_batches`` splits a batch into the pieces one forward/backward takes
    (``max_tokens_per_micro_batch``); the learner and the connectors run every
    forward pass through it.
    """

    @abc.abstractmethod
    def action_logp(self, batch, fwd_out):
        """Returns ``(logp, old_logp, mask)``, all the same shape."""

    @abc.abstractmethod
    def action_mask(self, batch):
        """1 on the action steps (tokens) of ``batch``, the shape of ``logp``."""

    @abc.abstractmethod
    def micro_batches(self, batch) -> list:
        """``[(rows, micro_batch), ...]``: the row indices (a LongTensor) of ``batch`` in each micro-batch, and the
        micro-batch (the batch itself when there is one)."""

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


class SeparateNetworksAPI(abc.ABC):
    """The policy and the critic as two ``nn.Module`` s, for a learner that wraps each one in an engine with its
    own optimizer (DeepSpeed)."""

    @abc.abstractmethod
    def networks(self) -> dict:
        """``{"policy": nn.Module, "critic": nn.Module}``, holding ``policy_parameters()`` and
        ``critic_parameters()``; each one's forward is the whole of what the module runs of it."""

    @abc.abstractmethod
    def run_networks_with(self, **wrappers) -> None:
        """Runs the module's forward passes through these wrappers (by network name), each calling the network
        it wraps (e.g. a DeepSpeed engine, whose forward also does ZeRO's bookkeeping)."""


class SamplerLogpAPI(abc.ABC):
    """A module whose actions another implementation of its policy sampled (an inference engine such as vLLM), with
    that sampler's log-probs in the batch: truncated importance sampling (``tis_cap``) corrects the learner's old
    log-probs towards them."""

    @abc.abstractmethod
    def sampler_logp(self, batch):
        """The sampler's log-probs of the actions, the shape of ``action_logp``'s (0 where the mask is 0)."""
