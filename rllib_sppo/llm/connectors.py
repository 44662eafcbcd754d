"""Learner connector for one-step LLM episodes: episodes -> padded token tensors + old log-probs."""

from typing import Any

import numpy as np
import torch

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core import DEFAULT_MODULE_ID

from rllib_sppo.connectors import in_micro_batches
from rllib_sppo.core import masked_mean
from rllib_sppo.estimators import CriticKind


def pad(rows: list, value: int, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads lists of ids into [B, L]; returns (tensor, attention mask)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(np.asarray(r), dtype=dtype)
        mask[i, :len(r)] = 1
    return out, mask


class TokenBatch(ConnectorV2):
    """Builds the LLM training batch from one-step episodes (prompt -> response).

    Each episode carries ``prompt_ids``, ``response_ids`` and ``engine_logp`` as extra
    model outputs of its single step, and the prompt text as its observation. The
    old log-probs are recomputed by the learner's policy before any update (as the
    reference does), in the module's micro-batches; the engine's are kept beside them
    (``engine_logp``, for truncated importance sampling) and their mean absolute gap on
    the same tokens is logged as ``rollout/engine_logp_gap``: large in a synchronous run
    means the weight sync failed (with ``async_rollouts`` it also holds the one update
    the engine's weights are behind). The critic's prompt columns are built only for a
    sequence critic.
    """

    def __call__(self, *, rl_module, episodes, batch, metrics=None, **kwargs) -> Any:
        module = rl_module[DEFAULT_MODULE_ID].unwrapped()
        eps = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        prompt_ids = [list(map(int, e.get_extra_model_outputs("prompt_ids", 0))) for e in eps]
        response_ids = [list(map(int, e.get_extra_model_outputs("response_ids", 0))) for e in eps]
        engine_logp = [np.array(e.get_extra_model_outputs("engine_logp", 0), np.float32) for e in eps]  # (a copy:
        # on a remote learner the episodes come through Ray's object store, read-only)
        texts = [e.get_observations(0) for e in eps]
        pad_id = module.tokenizer.pad_token_id or 0
        device = next(module.policy.parameters()).device

        input_ids, attention_mask = pad([p + r for p, r in zip(prompt_ids, response_ids)], pad_id)
        response_mask = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        engine = torch.zeros_like(response_mask)
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            response_mask[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
            engine[i, len(p) - 1:len(p) + len(r) - 1] = torch.from_numpy(engine_logp[i])
        cols = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
        if module.critic_kind == CriticKind.SEQUENCE:
            cols["critic_input_ids"], cols["critic_attention_mask"] = pad(module.critic_inputs(texts, prompt_ids),
                                                                          pad_id)
        cols = {k: v.to(device) for k, v in cols.items()}
        old = in_micro_batches(module, cols, module.response_logp, width=response_mask.shape[1])
        cols["old_logp"] = old * cols["response_mask"]
        cols["engine_logp"] = engine.to(device) * cols["response_mask"]
        if metrics is not None:
            m = cols["response_mask"]
            gap = masked_mean((cols["old_logp"] - cols["engine_logp"]).abs(), m)
            metrics.log_dict({"rollout/engine_logp_gap": float(gap),
                              "rollout/response_len_mean": float(m.sum(-1).mean())},
                             key=DEFAULT_MODULE_ID, window=1)
        batch[DEFAULT_MODULE_ID] = cols
        return batch
