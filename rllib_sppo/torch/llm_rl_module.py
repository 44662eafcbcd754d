"""The LLM RLModule: a transformers causal-LM policy and, when the estimator reads one, a decoupled critic V(prompt).

``model_config``:
  policy (str): local Hugging Face model directory of the policy, or ``builtin:NAME``
      (``rllib_sppo.llm.models.BUILTIN_MODELS``: offline models built once and cached).
  critic (str, optional): model directory of the critic's backbone (default: the policy's).
      It may use another tokenizer: prompts are then re-tokenised from their text
      (not with a per-token critic: tokens of two tokenizers cannot be aligned).
  critic_layers (int, optional): a smaller critic: only the first N transformer layers of that
      backbone (its embeddings, those N layers and its final norm, with their pretrained weights;
      the value head is new). None: all of them.
  critic_kind: a ``CriticKind``, "sequence" (read at the last prompt token) or "token" (at every response token,
      token-level PPO), or None (no critic is built: GRPO, RLOO); set by ``SPPOConfig`` from
      ``advantage_estimator`` (``rllib_sppo.estimators``).
  temperature (float): sampling temperature; log-probs use logits / temperature (default 0.6).
  dtype (str): the compute dtype, "float32" (default) or "bfloat16". The parameters stay float32 (the
      master weights the optimizer updates) and the forward passes run under autocast; a DeepSpeed
      learner casts them to bfloat16 itself and keeps its own fp32 masters.
  gradient_checkpointing (bool): trade compute for memory in both models (default False).
  critic_bias (float, optional): the value head's initial bias (set by ``SPPOConfig.critic_init``).
  max_tokens_per_micro_batch (int, optional): the token budget of one forward/backward (set by
      ``SPPOConfig``); None: a whole minibatch at once.
  logp_chunk_tokens (int): response positions per chunk of the LM head (default 1024).
  entropy_grad (bool): whether the entropy is in the loss (set by ``SPPOConfig`` from ``entropy_coeff``); False: it
      is computed without a graph, as a diagnostic (default True).
  lora (dict, optional): {r, alpha, target_modules, dropout}: train LoRA adapters of the policy only, its base frozen
      (``rllib_sppo.llm.lora``); the EnvRunners then receive only the adapters, and ``hf_policy/`` is the adapter
      folder. None: full fine-tuning.

Batch columns (built by ``rllib_sppo.llm.connectors.TokenBatch``): ``input_ids``,
``attention_mask`` (prompt + response, right-padded), ``response_mask``, ``old_logp`` and
``engine_logp`` (the generating engine's) aligned with next-token positions [B, L-1], ``critic_input_ids``,
``critic_attention_mask`` (prompt only; with a sequence critic). The LM head runs only
on the response positions, a chunk at a time, its fp32 logits recomputed in the
backward pass instead of kept: no [B, L, vocabulary] tensor exists. The critic is not
part of the inference-only (EnvRunner) weights.
"""

import logging
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from rllib_sppo.apis import SamplerLogpAPI, SeparateNetworksAPI, TokenLogpAPI, TokenValueAPI
from rllib_sppo.core import token_budget_micro_batches
from rllib_sppo.estimators import CriticKind

#: The ``model_config`` keys the module reads (``SPPOConfig.llm`` takes them).
MODEL_CONFIG_KEYS = {"policy", "critic", "critic_layers", "critic_kind", "temperature", "dtype",
                     "gradient_checkpointing", "critic_bias", "max_tokens_per_micro_batch", "logp_chunk_tokens",
                     "lora", "entropy_grad"}
#: Columns that hold the critic's prompt (their own width); the others are [B, L] or [B, L - 1] (or [B]).
CRITIC_PROMPT_COLUMNS = ("critic_input_ids", "critic_attention_mask")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: The CPU flags of native bfloat16 arithmetic (Linux's names for AVX512-BF16 and AMX-BF16).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def emulated_bf16(cpuinfo: str | None) -> bool:
    """Whether bfloat16 compute is emulated on a CPU, read from its ``/proc/cpuinfo`` text (None: not known, False).
    Emulated, a linear layer's forward and backward under bf16 autocast took 17x float32's time (an AMD EPYC without
    AVX512, 2026-12-07), and a chain SPPO update 25 s against about 1.3 s on a CPU with AVX512-BF16."""
    return cpuinfo is not None and not BF16_CPU_FLAGS & set(cpuinfo.split())


def read_cpuinfo() -> str | None:
    """This machine's ``/proc/cpuinfo`` text, None where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def first_layers(model_dir: str, layers: int | None):
    """The config of ``model_dir``'s model cut to its first ``layers`` transformer layers (None: all of them);
    ``from_pretrained`` with it loads the pretrained weights of those layers and leaves out the others."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if layers is None:
        return config
    total = config.num_hidden_layers
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= total:
        raise ValueError(f"model_config critic_layers={layers!r}: the critic's backbone {model_dir} has {total} "
                         f"layers; pick an int from 1 to {total} (or None: all of them)")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding or full), one per layer
        config.layer_types = config.layer_types[:layers]
    return config


@contextmanager
def _quiet_load_report(quiet: bool):
    """Without transformers' load report (a warning listing the checkpoint's weights a model did not take)."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def head_logp_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                      entropy_grad: bool = True):
    """log pi(target) and the entropy at each row of ``hidden`` [N, H], from head(hidden) / temperature in fp32; the
    entropy without a graph unless ``entropy_grad``."""
    logits = head(hidden).float() / temperature
    logz = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = logz - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp, entropy


class PolicyModel(nn.Module):
    """The policy as one network: log-probs and entropies of the next tokens at the scored positions [B, L-1] (0
    elsewhere), the LM head run only there, ``chunk`` positions at a time (recomputed in backward)."""

    def __init__(self, lm: nn.Module, temperature: float, chunk: int, dtype: torch.dtype, entropy_grad: bool = True):
        super().__init__()
        self.lm, self.temperature, self.chunk, self.dtype = lm, temperature, chunk, dtype
        self.entropy_grad = entropy_grad
        if getattr(lm.config, "final_logit_softcapping", None) or getattr(lm.config, "logit_scale", None):
            raise ValueError(f"{type(lm).__name__} transforms its logits beyond the LM head (softcapping or scaling), "
                             f"which the chunked log-probs do not apply; this model is not supported yet.")

    def forward(self, input_ids, attention_mask, score_mask):
        with _autocast(input_ids.device, self.dtype):
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
        scored = score_mask.bool()
        h, targets = hidden[:, :-1][scored], input_ids[:, 1:][scored]
        head = self.lm.get_output_embeddings()
        logp, entropy = [], []
        for start in range(0, len(h), self.chunk):
            args = (head, h[start:start + self.chunk], targets[start:start + self.chunk], self.temperature,
                    self.entropy_grad)
            with _autocast(input_ids.device, self.dtype):
                lp, ent = (checkpoint(head_logp_entropy, *args, use_reentrant=False) if torch.is_grad_enabled()
                           else head_logp_entropy(*args))
            logp.append(lp)
            entropy.append(ent)
        zeros = torch.zeros(score_mask.shape, dtype=torch.float32, device=input_ids.device)
        if not logp:
            return zeros, zeros
        return zeros.masked_scatter(scored, torch.cat(logp)), zeros.masked_scatter(scored, torch.cat(entropy))


class ValueModel(nn.Module):
    """The critic as one network: a backbone and a one-output head, a value logit at every position [B, L]."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.backbone, self.head, self.dtype = backbone, head, dtype

    def forward(self, input_ids, attention_mask):
        with _autocast(input_ids.device, self.dtype):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).last_hidden_state
            return self.head(hidden).squeeze(-1).float()


class SPPOLLMModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI, TokenLogpAPI, TokenValueAPI,
                    SamplerLogpAPI, SeparateNetworksAPI):
    def setup(self):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from rllib_sppo.llm.lora import peft_config, resolve_lora
        from rllib_sppo.llm.models import resolve_model

        cfg = {"temperature": 0.6, "dtype": "float32", "gradient_checkpointing": False,
               "critic_kind": CriticKind.SEQUENCE, "max_tokens_per_micro_batch": None, "logp_chunk_tokens": 1024,
               **self.model_config}
        if not cfg.get("policy"):
            raise ValueError("SPPOLLMModule needs model_config['policy']: a local Hugging Face model directory")
        if cfg["dtype"] not in DTYPES:
            raise ValueError(f"model_config dtype={cfg['dtype']!r}: choose one of {sorted(DTYPES)} (float16 would "
                             f"need loss scaling; use bfloat16)")
        if cfg["critic_kind"] not in (*CriticKind, None):
            raise ValueError(f"critic_kind={cfg['critic_kind']!r}: one of {[str(k) for k in CriticKind]} or None")
        self.temperature = float(cfg["temperature"])
        self.compute_dtype = DTYPES[cfg["dtype"]]
        self.max_tokens = cfg["max_tokens_per_micro_batch"]
        self.critic_kind = CriticKind(cfg["critic_kind"]) if cfg["critic_kind"] and not self.inference_only else None
        policy_dir = resolve_model(cfg["policy"])
        self.tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        self.policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        self.lora = resolve_lora(cfg.get("lora"))
        if self.lora:  # adapters injected in place (the same model class): only they require gradients
            self.policy.add_adapter(peft_config(self.lora))
        if self.critic_kind:
            critic_dir = resolve_model(cfg.get("critic") or cfg["policy"])
            self.critic_tokenizer = AutoTokenizer.from_pretrained(critic_dir)
            config = first_layers(critic_dir, cfg.get("critic_layers"))
            with _quiet_load_report(cfg.get("critic_layers") is not None):  # (it lists the layers left out)
                self.critic = AutoModel.from_pretrained(critic_dir, dtype=torch.float32, config=config)
            self.value_head = nn.Linear(self.critic.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.constant_(self.value_head.bias, cfg.get("critic_bias") or 0.0)
            self.same_tokenizer = self.critic_tokenizer.get_vocab() == self.tokenizer.get_vocab()
            if self.critic_kind == CriticKind.TOKEN and not self.same_tokenizer:
                raise ValueError(
                    f"token-level PPO (advantage_estimator='ppo') reads the critic at every policy token, but the "
                    f"critic {cfg.get('critic')!r} has another tokenizer than the policy {cfg['policy']!r}, so its "
                    f"tokens cannot be aligned with the policy's; use a critic with the policy's tokenizer, or "
                    f"advantage_estimator='sppo' (its critic reads the re-tokenised prompt).")
        if cfg["gradient_checkpointing"]:
            for model in (self.policy, getattr(self, "critic", None)):
                if model is not None:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The networks (in a plain dict, so not registered twice: the state-dict keys stay policy.*, critic.*,
        # value_head.*), and what runs each one: itself, or a learner's wrapper of it (run_networks_with).
        self._networks = {"policy": PolicyModel(self.policy, self.temperature, int(cfg["logp_chunk_tokens"]),
                                                self.compute_dtype, bool(cfg.get("entropy_grad", True)))}
        if self.critic_kind:
            self._networks["critic"] = ValueModel(self.critic, self.value_head, self.compute_dtype)
        self._runners = dict(self._networks)

    def _forward(self, batch, **kwargs):
        logp, entropy = self._runners["policy"](batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        return {"logp": logp, "entropy": entropy}

    def response_logp(self, batch) -> torch.Tensor:
        """The policy's log-probs of the response tokens, [B, L-1] (0 elsewhere), without gradients."""
        with torch.no_grad():
            return self._runners["policy"](batch["input_ids"], batch["attention_mask"], batch["response_mask"])[0]

    # TokenLogpAPI
    def action_logp(self, batch, fwd_out):
        return fwd_out["logp"], batch["old_logp"], batch["response_mask"]

    def action_mask(self, batch):
        return batch["response_mask"]

    # SamplerLogpAPI
    def sampler_logp(self, batch):
        return batch["engine_logp"]

    def entropy(self, batch, fwd_out):
        return fwd_out["entropy"]

    def micro_batches(self, batch):
        """Rows packed by length under ``max_tokens_per_micro_batch`` (``core.token_budget_micro_batches``), each
        micro-batch's columns trimmed to its own longest row."""
        lengths = batch["attention_mask"].sum(-1).tolist()
        groups = token_budget_micro_batches(lengths, self.max_tokens)
        device = batch["attention_mask"].device
        if len(groups) == 1:
            return [(torch.arange(len(lengths), device=device), batch)]
        return [(rows, self._rows(batch, rows)) for rows in (torch.tensor(g, device=device) for g in groups)]

    @staticmethod
    def _rows(batch: dict, rows: torch.Tensor) -> dict:
        width = batch["attention_mask"].shape[1]
        keep = int(batch["attention_mask"][rows].sum(-1).max())
        keep_prompt = (int(batch["critic_attention_mask"][rows].sum(-1).max())
                       if "critic_attention_mask" in batch else None)
        out = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                out[key] = value
                continue
            value = value[rows]
            if key in CRITIC_PROMPT_COLUMNS:
                value = value[:, :keep_prompt]
            elif value.dim() == 2 and value.shape[1] == width:
                value = value[:, :keep]
            elif value.dim() == 2 and value.shape[1] == width - 1:
                value = value[:, :keep - 1]
            out[key] = value
        return out

    def policy_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad]  # (a LoRA policy's: the adapters)

    def critic_parameters(self):
        return list(self.critic.parameters()) + list(self.value_head.parameters()) if self.critic_kind else []

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
        return self._runners["critic"](batch["input_ids"], batch["attention_mask"])[:, :-1]

    @torch.no_grad()
    def prompt_values(self, texts: list[str]) -> torch.Tensor:
        """The sequence critic's output for each prompt text (a logit for the bce critic), [len(texts)] on the CPU,
        before any response exists: the prompt tokenised as the EnvRunner does (then for the critic, as
        ``critic_inputs``), read in micro-batches of at most ``max_tokens_per_micro_batch`` tokens."""
        from rllib_sppo.llm.connectors import pad

        ids = self.critic_inputs(texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        device = next(self.critic.parameters()).device
        out = torch.empty(len(ids))
        for rows in token_budget_micro_batches([len(i) for i in ids], self.max_tokens):
            input_ids, mask = pad([ids[r] for r in rows], self.tokenizer.pad_token_id or 0)
            values = self.compute_values({"critic_input_ids": input_ids.to(device),
                                          "critic_attention_mask": mask.to(device)})
            out[rows] = values.float().cpu()
        return out

    def critic_inputs(self, prompt_texts: list[str], prompt_ids: list[list[int]]) -> list[list[int]]:
        """The critic's token ids of each prompt: the policy's ids, or the text re-tokenised."""
        if self.same_tokenizer:
            return prompt_ids
        return [self.critic_tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]

    def get_non_inference_attributes(self):
        return ["critic", "value_head"] if self.critic_kind else []

    def get_state(self, components=None, *, not_components=None, inference_only=False, **kwargs):
        """The parameters as torch tensors, as they are (views, no numpy round trip; the critic left out if
        ``inference_only``): RLlib's ``set_state``, checkpoints and the EnvRunners take them. What the EnvRunners
        need of a LoRA policy (``inference_only``) is its adapters, named as PEFT saves them: their engines hold
        the frozen base."""
        if inference_only and self.lora:
            return {f"policy.{k}": v.detach() for k, v in self.policy.get_adapter_state_dict().items()}
        skip = self.get_non_inference_attributes() if inference_only and not self.inference_only else []
        return {k: v.detach() for k, v in self.state_dict().items() if k.split(".")[0] not in skip}

    def save_to_path(self, path=None, *, state=None, **kwargs) -> str:
        """RLlib's checkpoint, plus the policy as a Hugging Face folder ``hf_policy/`` that transformers and vLLM load
        directly (in the compute dtype), both written from one state (a DeepSpeed learner's is gathered from its
        ZeRO partitions). A LoRA policy's ``hf_policy/`` is its adapter folder (PEFT's format, over the ``policy``
        base), which ``AutoModelForCausalLM.from_pretrained`` loads with its base. The compute-dtype copies are made
        one tensor at a time in host memory: on a GPU shared with an awake engine, a copy of the whole policy on the
        card could run it out of memory."""
        state = self.get_state() if state is None else state
        path = super().save_to_path(path, state=state, **kwargs)
        policy = {k.removeprefix("policy."): torch.as_tensor(v).to("cpu", self.compute_dtype)
                  for k, v in state.items() if k.startswith("policy.")}
        self.policy.config.dtype = self.compute_dtype  # what the saved tensors hold
        self.policy.save_pretrained(f"{path}/hf_policy", state_dict=policy)
        self.tokenizer.save_pretrained(f"{path}/hf_policy")
        return path
