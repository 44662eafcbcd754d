"""The learner connector that turns episode outcomes into advantages: one R per episode, A per step or token."""

from typing import Any

import numpy as np
import torch

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI

from rllib_sppo.core import critic_prediction, masked_mean
from rllib_sppo.estimators import CriticKind, EstimatorInput, get_estimator

CRITIC_MASK = "critic_mask"  # where the critic is trained: each episode's first step, or every action token
VALUES_OLD = "values_old"  # the critic's output before this update, where it is trained (clipped value loss)
GROUP_ID = "group_id"  # extra model output: which prompt a sample answers (N samples per prompt)


def critic_output(module, batch, critic: CriticKind) -> torch.Tensor:
    """The critic's raw output (logits for bce) on a batch: [B, T] for a per-token critic, else one per row."""
    return module.compute_token_values(batch) if critic == CriticKind.TOKEN else module.compute_values(batch)


def in_micro_batches(module, batch: dict, fn, width: int | None = None) -> torch.Tensor:
    """``fn(micro_batch)`` over the module's micro-batches of ``batch`` (``TokenLogpAPI.micro_batches``), put back in
    the batch's row order: [B] (``width`` None) or [B, width], a micro-batch's narrower (trimmed) output filled in
    from the left and 0 beyond it."""
    parts = [(rows, fn(micro)) for rows, micro in module.micro_batches(batch)]
    if len(parts) == 1:
        return parts[0][1]
    n = sum(len(rows) for rows, _ in parts)
    out = parts[0][1].new_zeros((n,) if width is None else (n, width))
    for rows, part in parts:
        if width is None:
            out[rows] = part
        else:
            out[rows, :part.shape[1]] = part
    return out


class SequenceAdvantage(ConnectorV2):
    """Writes ``advantages`` on every step of each episode; SPPO's is R - sigmoid(V(s_0)).

    R is the episode's outcome (the sum of its rewards: outcome envs pay it once, at
    the end). The critic the estimator names (``rllib_sppo.estimators``) is read as it
    is before this batch's update, in the module's micro-batches: at the episode's
    first step (``CriticKind.SEQUENCE``), or at every action token (``TOKEN``, token-level PPO).
    SPPO's advantages are not standardised. Also writes ``value_targets`` (R on every
    step, or the returns per token), ``critic_mask`` (1 where the critic is trained:
    first steps, or action tokens) and ``values_old`` (the critic there, before the
    update); critic-free estimators (their baseline is the group of N samples of a
    prompt) read no critic and write neither.
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *, estimator: str = "sppo",
                 critic_loss: str = "bce", normalize: bool = False, gamma: float = 1.0, lambda_: float = 1.0):
        super().__init__(input_observation_space, input_action_space)
        self.estimator = get_estimator(estimator)
        self.settings = dict(critic_loss=critic_loss, normalize=normalize, gamma=gamma, lambda_=lambda_)

    def __call__(self, *, rl_module, episodes, batch, metrics=None, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        critic = self.estimator.critic
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
            if critic is not None and critic_loss == "bce" and len(bad):
                sources = sorted({str(eps[i].get_infos(-1).get("data_source", "?")) for i in bad})
                raise ValueError(
                    f"the BCE critic needs outcomes in [0, 1], got {outcomes[bad][:5].tolist()} (module {mid!r}, "
                    f"data_source {sources}); normalise the reward into [0, 1] or set critic_loss='mse'.")
            device = next(module.parameters()).device
            r = torch.as_tensor(outcomes, device=device)
            lens_t = torch.as_tensor(lens, device=device)
            values = token_mask = groups = None
            with torch.no_grad():
                if critic == CriticKind.SEQUENCE:
                    index = torch.as_tensor(starts, device=device)
                    first_rows = {k: v[index.to(v.device)] for k, v in module_batch.items()
                                  if isinstance(v, torch.Tensor)}
                    values = in_micro_batches(module, first_rows, module.compute_values)
                    critic_mask = torch.zeros(int(lens.sum()), device=device)
                    critic_mask[index] = 1.0
                    module_batch[VALUES_OLD] = torch.zeros_like(critic_mask).index_put((index,), values.float())
                elif critic == CriticKind.TOKEN:
                    token_mask = module.action_mask(module_batch).float()
                    values = in_micro_batches(module, module_batch, module.compute_token_values, token_mask.shape[1])
                    critic_mask = token_mask
                    module_batch[VALUES_OLD] = values.float() * token_mask
                else:
                    groups = torch.as_tensor(self._group_ids(eps), device=device)
            adv, targets = self.estimator.advantages(EstimatorInput(r, values, token_mask, groups, **self.settings))
            module_batch[Columns.ADVANTAGES] = adv.to(device).repeat_interleave(lens_t, dim=0)
            if critic is not None:
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
            raise ValueError(f"advantage_estimator={self.estimator.name!r} compares N samples of the same prompt, "
                             f"but the episodes carry no {GROUP_ID!r}; use the LLM runner with samples_per_prompt > 1."
                             ) from None
