"""The learner connector that turns episode outcomes into advantages: one R and one A per episode."""

from typing import Any

import numpy as np
import torch

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI

from rllib_sppo.core import group_advantage, rloo_advantage, sequence_advantage

CRITIC_MASK = "critic_mask"  # 1 on each episode's first step: where V(s_0) is trained
GROUP_ID = "group_id"  # extra model output: which prompt a sample answers (N samples per prompt)

# name -> (uses the critic, fn(rewards, critic_out, group_ids, critic_loss, normalize) -> advantages)
ESTIMATORS = {
    "sppo": (True, lambda r, v, g, loss, norm: sequence_advantage(r, v, norm, loss)),
    "grpo": (False, lambda r, v, g, loss, norm: group_advantage(r, g)),
    "drgrpo": (False, lambda r, v, g, loss, norm: group_advantage(r, g, std_normalize=False)),
    "rloo": (False, lambda r, v, g, loss, norm: rloo_advantage(r, g)),
}


class SequenceAdvantage(ConnectorV2):
    """Writes ``advantages`` on every step of each episode; SPPO's is R - sigmoid(V(s_0)).

    R is the episode's outcome (the sum of its rewards: outcome envs pay it once, at
    the end). V is read at the episode's first step with the critic as it is before
    this batch's update. Advantages are not standardised. Also writes
    ``value_targets`` (R on every step) and ``critic_mask`` (1 on first steps; all 0
    for critic-free estimators, whose baseline is the group of N samples per prompt).
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *,
                 estimator: str = "sppo", critic_loss: str = "bce", normalize: bool = False):
        super().__init__(input_observation_space, input_action_space)
        self.uses_critic, self.estimate = ESTIMATORS[estimator]
        self.estimator = estimator
        self.critic_loss = critic_loss
        self.normalize = normalize

    def __call__(self, *, rl_module, episodes, batch, metrics=None, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        for mid, module_batch in batch.items():
            module = rl_module[mid]
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
            bad = np.flatnonzero((outcomes < 0) | (outcomes > 1))
            if self.critic_loss == "bce" and len(bad):
                sources = sorted({str(eps[i].get_infos(-1).get("data_source", "?")) for i in bad})
                raise ValueError(
                    f"the BCE critic needs outcomes in [0, 1], got {outcomes[bad][:5].tolist()} (module {mid!r}, "
                    f"data_source {sources}); normalise the reward into [0, 1] or set critic_loss='mse'.")
            index = torch.as_tensor(starts)
            critic_out = groups = None
            if self.uses_critic:
                first_rows = {k: v[index.to(v.device)] for k, v in module_batch.items()
                              if isinstance(v, torch.Tensor)}
                with torch.no_grad():
                    critic_out = module.compute_values(first_rows)
            else:
                groups = torch.as_tensor(self._group_ids(eps))
            device = next(module.parameters()).device
            r = torch.as_tensor(outcomes, device=device)
            adv = self.estimate(r, critic_out, groups, self.critic_loss, self.normalize).to(device)
            lens_t = torch.as_tensor(lens, device=device)
            module_batch[Columns.ADVANTAGES] = adv.repeat_interleave(lens_t)
            module_batch[Columns.VALUE_TARGETS] = r.repeat_interleave(lens_t)
            mask = torch.zeros(int(lens.sum()), device=device)
            if self.uses_critic:
                mask[index.to(device)] = 1.0
            module_batch[CRITIC_MASK] = mask
            if metrics is not None:
                stats = {"rollout/outcome_mean": float(r.mean()), "policy/advantage_mean": float(adv.mean()),
                         "policy/advantage_abs_mean": float(adv.abs().mean())}
                if critic_out is not None:
                    pred = torch.sigmoid(critic_out) if self.critic_loss == "bce" else critic_out
                    stats |= {"critic/prediction_mean": float(pred.mean()),
                              "critic/abs_error_mean": float((r - pred).abs().mean())}
                metrics.log_dict(stats, key=mid, window=1)
        return batch

    def _group_ids(self, eps) -> np.ndarray:
        try:
            return np.array([int(e.get_extra_model_outputs(GROUP_ID, 0)) for e in eps])
        except KeyError:
            raise ValueError(f"advantage_estimator={self.estimator!r} compares N samples of the same prompt, but "
                             f"the episodes carry no {GROUP_ID!r}; use the LLM runner with samples_per_prompt > 1."
                             ) from None
