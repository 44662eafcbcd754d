"""Offline model assets, built once and cached under ``$RLLIB_SPPO_CACHE`` (default ``~/.cache/rllib_sppo``).

Loading is apart from building: ``cache`` holds the folders, ``tiny`` and ``smollm2`` say how each built-in model is
made (a tiny character-level Llama supervised on one of the package's tasks; SmolLM2 converted from its PyPI GGUF),
and ``supervise`` is the supervised training loop that builds a tiny model, run only when its folder is missing.
"""

from rllib_sppo.llm.assets.cache import cache_root, cached
from rllib_sppo.llm.assets.smollm2 import SMOLLM2, SMOLLM2_PIP, smollm2_gguf, smollm2_model
from rllib_sppo.llm.assets.tiny import (TINY_ARITH, TINY_CHAIN, build_char_tokenizer, build_tiny_llama,
                                        tiny_arith_model, tiny_chain_model)

__all__ = ["SMOLLM2", "SMOLLM2_PIP", "TINY_ARITH", "TINY_CHAIN", "build_char_tokenizer", "build_tiny_llama",
           "cache_root", "cached", "smollm2_gguf", "smollm2_model", "tiny_arith_model", "tiny_chain_model"]
