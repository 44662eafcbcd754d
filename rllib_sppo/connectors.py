"""The learner connector that turns episode outcomes into advantages: one R per episode, A per step or token."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI

from rllib_sppo.core import (critic_prediction, gae_advantage, group_advantage, masked_mean, outcome_token_rewards,
                             rloo_advantage, sequence_advantage)

CRITIC_MASK = "critic_mask"  # where the critic is trained: each episode's first step, or every action token
GROUP_ID = "group_id"  # extra model output: which prompt a sample answers (N samples per prompt)


@dataclass(frozen=True)
class EstimatorInput:
    """What every advantage estimator reads; one row per episode (``B``)."""

    rewards: torch.Tensor  # [B] outcomes R
    values: torch.Tensor | None  # critic output before this update: [B] at s_0, or [B, T] per token
    mask: torch.Tensor | None  # [B, T] 1 on action tokens (per-token critic only)
    group_ids: torch.Tensor | None  # [B] which prompt each sample answers (critic-free estimators only)
    critic_loss: str = "bce"
    normalize: bool = False
    gamma: float = 1.0
    lambda_: float = 1.0


def _ppo(x: EstimatorInput) -> tuple[torch.Tensor, torch.Tensor]:
    return gae_advantage(outcome_token_rewards(x.rewards, x.mask), critic_prediction(x.values, x.critic_loss),
                         x.mask, x.gamma, x.lambda_)


# name -> (critic: None | "sequence" (V(s_0)) | "token" (V at every token),
#          fn(EstimatorInput) -> (advantages, value_targets), [B] or [B, T])
ESTIMATORS = {
    "sppo": ("sequence", lambda x: (sequence_advantage(x.rewards, x.values, x.normalize, x.critic_loss), x.rewards)),
    "grpo": (None, lambda x: (group_advantage(x.rewards, x.group_ids), x.rewards)),
    "drgrpo": (None, lambda x: (group_advantage(x.rewards, x.group_ids, std_normalize=False), x.rewards)),
    "rloo": (None, lambda x: (rloo_advantage(x.rewards, x.group_ids), x.rewards)),
    "ppo": ("token", _ppo),
}


def critic_output(module, batch, critic: str | None) -> torch.Tensor:
    """The critic's raw output (logits for bce) on a batch: [B, T] for a per-token critic, else one per row."""
    return module.compute_token_values(batch)[0] if critic == "token" else module.compute_values(batch)


class SequenceAdvantage(ConnectorV2):
    """Writes ``advantages`` on every step of each episode; SPPO's is R - sigmoid(V(s_0)).

    R is the episode's outcome (the sum of its rewards: outcome envs pay it once, at
    the end). The critic is read as it is before this batch's update: at the episode's
    first step (``sequence``), or at every action token (``token``, token-level PPO:
    GAE with R on the last token). Advantages are not standardised. Also writes
    ``value_targets`` (R on every step, or the GAE returns per token) and
    ``critic_mask`` (1 where the critic is trained: first steps, or action tokens; all
    0 for critic-free estimators, whose baseline is the group of N samples per prompt).
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *, estimator: str = "sppo",
                 critic_loss: str = "bce", normalize: bool = False, gamma: float = 1.0, lambda_: float = 1.0):
        super().__init__(input_observation_space, input_action_space)
        self.critic, self.estimate = ESTIMATORS[estimator]
        self.estimator = estimator
        self.settings = dict(critic_loss=critic_loss, normalize=normalize, gamma=gamma, lambda_=lambda_)

    def __call__(self, *, rl_module, episodes, batch, metrics=None, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        for mid, module_batch in batch.items():
            module = rl_module[mid].unwrapped()  # the module itself, also under DDP (TorchDDPRLModule)
            if not isinstance(module, ValueFunctionAPI):
                continue
            eps = [e for e in sa_episodes if e.module_id in (None, mid)]
            unfinished = [e.id_ for e in eps if not e.is_done]
            if unfinished:
                raise ValueError(
                    f"SPPO needs complete episodes (batch_mode='complete_episodes'); "
                    f"{len(unfinished)} episode(s) of module {mid!r} were cut off.")
            lens = np.array([len(e) for e in eps])
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            outcomes = np.array([e.get_return() for e in eps], dtype=np.float32)
            critic_loss = self.settings["critic_loss"]
            bad = np.flatnonzero((outcomes < 0) | (outcomes > 1))
            if critic_loss == "bce" and len(bad):
                sources = sorted({str(eps[i].get_infos(-1).get("data_source", "?")) for i in bad})
                raise ValueError(
                    f"the BCE critic needs outcomes in [0, 1], got {outcomes[bad][:5].tolist()} (module {mid!r}, "
                    f"data_source {sources}); normalise the reward into [0, 1] or set critic_loss='mse'.")
            device = next(module.parameters()).device
            r = torch.as_tensor(outcomes, device=device)
            lens_t = torch.as_tensor(lens, device=device)
            critic_mask = torch.zeros(int(lens.sum()), device=device)
            values = token_mask = groups = None
            with torch.no_grad():
                if self.critic == "sequence":
                    index = torch.as_tensor(starts, device=device)
                    first_rows = {k: v[index.to(v.device)] for k, v in module_batch.items()
                                  if isinstance(v, torch.Tensor)}
                    values = module.compute_values(first_rows)
                    critic_mask[index] = 1.0
                elif self.critic == "token":
                    values, token_mask = module.compute_token_values(module_batch)
                    critic_mask = token_mask.float()
                else:
                    groups = torch.as_tensor(self._group_ids(eps), device=device)
            adv, targets = self.estimate(EstimatorInput(r, values, token_mask, groups, **self.settings))
            module_batch[Columns.ADVANTAGES] = adv.to(device).repeat_interleave(lens_t, dim=0)
            module_batch[Columns.VALUE_TARGETS] = targets.to(device).repeat_interleave(lens_t, dim=0)
            module_batch[CRITIC_MASK] = critic_mask
            if metrics is not None:
                weight = torch.ones_like(adv) if token_mask is None else token_mask
                stats = {"rollout/outcome_mean": float(r.mean()),
                         "policy/advantage_mean": float(masked_mean(adv, weight)),
                         "policy/advantage_abs_mean": float(masked_mean(adv.abs(), weight))}
                if values is not None:
                    pred = critic_prediction(values, critic_loss)
                    stats |= {"critic/prediction_mean": float(masked_mean(pred, weight)),
                              "critic/abs_error_mean": float(masked_mean((targets - pred).abs(), weight))}
                metrics.log_dict(stats, key=mid, window=1)
        return batch

    def _group_ids(self, eps) -> np.ndarray:
        try:
            return np.array([int(e.get_extra_model_outputs(GROUP_ID, 0)) for e in eps])
        except KeyError:
            raise ValueError(f"advantage_estimator={self.estimator!r} compares N samples of the same prompt, but "
                             f"the episodes carry no {GROUP_ID!r}; use the LLM runner with samples_per_prompt > 1."
                             ) from None
