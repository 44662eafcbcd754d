"""The LLM RLModule: a transformers causal-LM policy and a decoupled critic V(prompt).

``model_config``:
  policy (str): local Hugging Face model directory of the policy, or ``builtin:NAME``
      (``rllib_sppo.llm.models.BUILTIN_MODELS``: offline models built once and cached).
  critic (str, optional): model directory of the critic's backbone (default: the policy's).
      It may use another tokenizer: prompts are then re-tokenised from their text
      (not with ``per_token_critic``: tokens of two tokenizers cannot be aligned).
  per_token_critic (bool): the critic is read at every response token (token-level
      PPO); set by ``SPPOConfig`` from ``advantage_estimator`` (default False).
  temperature (float): sampling temperature; log-probs use logits / temperature (default 0.6).
  dtype (str): torch dtype name for both models (default "float32").
  gradient_checkpointing (bool): trade compute for memory in both models (default False).
  critic_bias (float, optional): the value head's initial bias (set by ``SPPOConfig.critic_init``).

Batch columns (built by ``rllib_sppo.llm.connectors.TokenBatch``): ``input_ids``,
``attention_mask`` (prompt + response, right-padded), ``response_mask`` and
``old_logp`` aligned with next-token positions [B, L-1], ``critic_input_ids``,
``critic_attention_mask`` (prompt only). The critic reads only the prompt, at its
last token (or, per token, reads prompt + response at every next-token position
[B, L-1]). The critic is not part of the inference-only (EnvRunner) weights.
"""

import torch
from torch import nn

from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from rllib_sppo.apis import SeparateNetworksAPI, TokenLogpAPI, TokenValueAPI


def token_logp(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(x_{t+1} | x_<=t) for every position, from temperature-scaled logits: [B, L-1]."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


class ValueModel(nn.Module):
    """The critic as one network: a backbone and a one-output head, a value logit at every position [B, L]."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


class SPPOLLMModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI, TokenLogpAPI, TokenValueAPI,
                    SeparateNetworksAPI):
    def setup(self):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from rllib_sppo.llm.models import resolve_model

        cfg = {"temperature": 0.6, "dtype": "float32", "gradient_checkpointing": False, "per_token_critic": False,
               **self.model_config}
        if not cfg.get("policy"):
            raise ValueError("SPPOLLMModule needs model_config['policy']: a local Hugging Face model directory")
        self.temperature = float(cfg["temperature"])
        dtype = getattr(torch, cfg["dtype"])
        policy_dir = resolve_model(cfg["policy"])
        self.tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        self.policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype)
        if not self.inference_only:
            critic_dir = resolve_model(cfg.get("critic") or cfg["policy"])
            self.critic_tokenizer = AutoTokenizer.from_pretrained(critic_dir)
            self.critic = AutoModel.from_pretrained(critic_dir, dtype=dtype)
            self.value_head = nn.Linear(self.critic.config.hidden_size, 1, dtype=dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.constant_(self.value_head.bias, cfg.get("critic_bias") or 0.0)
            self.same_tokenizer = self.critic_tokenizer.get_vocab() == self.tokenizer.get_vocab()
            if cfg["per_token_critic"] and not self.same_tokenizer:
                raise ValueError(
                    f"token-level PPO (advantage_estimator='ppo') reads the critic at every policy token, but the "
                    f"critic {cfg.get('critic')!r} has another tokenizer than the policy {cfg['policy']!r}, so its "
                    f"tokens cannot be aligned with the policy's; use a critic with the policy's tokenizer, or "
                    f"advantage_estimator='sppo' (its critic reads the re-tokenised prompt).")
        if cfg["gradient_checkpointing"]:
            for model in (self.policy, getattr(self, "critic", None)):
                if model is not None:
                    model.gradient_checkpointing_enable()
        # The two networks (in a plain dict, so not registered twice: the state-dict keys stay policy.*, critic.*,
        # value_head.*), and what runs each one: itself, or a learner's wrapper of it (run_networks_with).
        self._networks = {"policy": self.policy}
        if not self.inference_only:
            self._networks["critic"] = ValueModel(self.critic, self.value_head)
        self._runners = dict(self._networks)

    def _forward(self, batch, **kwargs):
        logits = self._runners["policy"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {"logits": logits, "logp": token_logp(logits, batch["input_ids"], self.temperature)}

    # TokenLogpAPI
    def action_logp(self, batch, fwd_out):
        return fwd_out["logp"], batch["old_logp"], batch["response_mask"]

    def entropy(self, batch, fwd_out):
        logp = torch.log_softmax(fwd_out["logits"][:, :-1].float() / self.temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    def policy_parameters(self):
        return list(self.policy.parameters())

    def critic_parameters(self):
        return list(self.critic.parameters()) + list(self.value_head.parameters())

    # SeparateNetworksAPI
    def networks(self):
        return dict(self._networks)

    def run_networks_with(self, **wrappers):
        self._runners.update(wrappers)

    # ValueFunctionAPI: one logit per prompt, read at its last token.
    def compute_values(self, batch, embeddings=None):
        mask = batch["critic_attention_mask"]
        values = self._runners["critic"](batch["critic_input_ids"], mask)
        return values[torch.arange(values.shape[0]), mask.sum(-1).long() - 1]

    # TokenValueAPI: the critic at every next-token position of prompt + response, [B, L-1].
    def compute_token_values(self, batch):
        values = self._runners["critic"](batch["input_ids"], batch["attention_mask"])
        return values[:, :-1], batch["response_mask"]

    def critic_inputs(self, prompt_texts: list[str], prompt_ids: list[list[int]]) -> list[list[int]]:
        """The critic's token ids of each prompt: the policy's ids, or the text re-tokenised."""
        if self.same_tokenizer:
            return prompt_ids
        return [self.critic_tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]

    def get_non_inference_attributes(self):
        return ["critic", "value_head"]

    def get_state(self, components=None, *, not_components=None, inference_only=False, **kwargs):
        """RLlib's state (numpy arrays; the critic left out if ``inference_only``), except that bfloat16 tensors,
        which numpy has no type for, stay (CPU) torch tensors: RLlib's ``set_state`` and the EnvRunners take both."""
        skip = self.get_non_inference_attributes() if inference_only and not self.inference_only else []
        return {k: v.detach().cpu() if v.dtype == torch.bfloat16 else v.detach().cpu().numpy()
                for k, v in self.state_dict().items() if k.split(".")[0] not in skip}

    def save_to_path(self, path=None, *, state=None, **kwargs) -> str:
        """RLlib's checkpoint, plus the policy as a Hugging Face folder ``hf_policy/`` that transformers and vLLM load
        directly, both written from one state (a DeepSpeed learner's is gathered from its ZeRO partitions)."""
        state = self.get_state() if state is None else state
        path = super().save_to_path(path, state=state, **kwargs)
        policy = {k.removeprefix("policy."): torch.as_tensor(v) for k, v in state.items() if k.startswith("policy.")}
        self.policy.save_pretrained(f"{path}/hf_policy", state_dict=policy)
        self.tokenizer.save_pretrained(f"{path}/hf_policy")
        return path
