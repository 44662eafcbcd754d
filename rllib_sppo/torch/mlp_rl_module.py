"""Policy MLP plus a decoupled critic MLP V(s_0), for classic control."""

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchMultiCategorical
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from rllib_sppo.apis import TokenLogpAPI
from rllib_sppo.estimators import CriticKind


def mlp(in_dim: int, hiddens: list[int], out_dim: int, act: type = nn.Tanh) -> nn.Sequential:
    layers, dim = [], in_dim
    for h in hiddens:
        layers += [nn.Linear(dim, h), act()]
        dim = h
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class SPPOMLPModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI, TokenLogpAPI):
    """``model_config``: ``pi_hiddens`` and ``vf_hiddens`` (the critic has its own size), ``init_log_std`` (Box
    actions: the Gaussian's log-std before training, 0.0: std 1); set by ``SPPOConfig``:
    ``critic_kind`` (``CriticKind.SEQUENCE``: V(s_0), or None: no critic), ``critic_bias``,
    ``max_tokens_per_micro_batch`` (here: steps per micro-batch).

    Observations arrive flat (``SPPOConfig``'s env-to-module connector is RLlib's FlattenObservations; the spaces it
    takes: ``rllib_sppo.env_runner.check_spaces``). Discrete actions give Categorical logits, MultiDiscrete ones a
    Categorical per dimension, Box actions a diagonal Gaussian with a state-independent log-std. The critic ``vf`` is
    never built on EnvRunners.
    """

    def setup(self):
        obs_dim = int(np.prod(self.observation_space.shape))
        cfg = {"pi_hiddens": [64, 64], "vf_hiddens": [64, 64], "init_log_std": 0.0,
               "critic_kind": CriticKind.SEQUENCE, "max_tokens_per_micro_batch": None, **(self.model_config or {})}
        if cfg["critic_kind"] not in (CriticKind.SEQUENCE, None):
            raise ValueError(f"SPPOMLPModule's critic reads s_0 (critic_kind 'sequence') or there is none, got "
                             f"{cfg['critic_kind']!r}; for a per-token critic on classic control use RLlib's PPO.")
        self.max_rows = cfg["max_tokens_per_micro_batch"]
        self.continuous = isinstance(self.action_space, gym.spaces.Box)
        if self.continuous:
            out_dim = self.action_space.shape[0]
        elif isinstance(self.action_space, gym.spaces.MultiDiscrete):
            lens = self.action_space.nvec.tolist()
            out_dim, self.action_dist_cls = sum(lens), TorchMultiCategorical.get_partial_dist_cls(input_lens=lens)
        else:
            out_dim = self.action_space.n
        self.pi = mlp(obs_dim, cfg["pi_hiddens"], out_dim)
        if self.continuous:
            self.log_std = nn.Parameter(torch.full((out_dim,), float(cfg["init_log_std"])))
        if not self.inference_only and cfg["critic_kind"]:
            self.vf = mlp(obs_dim, cfg["vf_hiddens"], 1)
            if cfg.get("critic_bias") is not None:  # SPPOConfig.critic_init
                nn.init.constant_(self.vf[-1].bias, cfg["critic_bias"])

    def _forward(self, batch, **kwargs):
        out = self.pi(batch[Columns.OBS])
        if self.continuous:
            out = torch.cat([out, self.log_std.expand_as(out)], dim=-1)
        return {Columns.ACTION_DIST_INPUTS: out}

    def compute_values(self, batch, embeddings=None):
        return self.vf(batch[Columns.OBS]).squeeze(-1)

    def _dist(self, fwd_out):
        return self.get_train_action_dist_cls().from_logits(fwd_out[Columns.ACTION_DIST_INPUTS])

    def action_logp(self, batch, fwd_out):
        logp = self._dist(fwd_out).logp(batch[Columns.ACTIONS])
        return logp, batch[Columns.ACTION_LOGP], self.action_mask(batch)

    def action_mask(self, batch):
        return batch.get(Columns.LOSS_MASK, torch.ones(len(batch[Columns.OBS]), device=batch[Columns.OBS].device))

    def micro_batches(self, batch):
        """Consecutive rows (steps), ``max_tokens_per_micro_batch`` at a time (None: the batch itself)."""
        n = len(batch[Columns.OBS])
        size = self.max_rows or n
        rows = torch.arange(n, device=batch[Columns.OBS].device).split(size)
        if len(rows) == 1:
            return [(rows[0], batch)]
        return [(r, {k: v[r] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()})
                for r in rows]

    def entropy(self, batch, fwd_out):
        return self._dist(fwd_out).entropy()

    def get_non_inference_attributes(self):
        return ["vf"] if hasattr(self, "vf") else []

    def policy_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("vf.")]

    def critic_parameters(self):
        return list(self.vf.parameters()) if hasattr(self, "vf") else []
