"""Where model directories come from: a local path, or a built-in offline model built once and cached."""

from pathlib import Path

from rllib_sppo.llm.assets import smollm2_model
from rllib_sppo.llm.assets.tiny import TINY_MODELS

BUILTIN_MODELS = {**TINY_MODELS, "smollm2-135m-instruct": smollm2_model}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_model(spec: str) -> str:
    """A Hugging Face model directory from a path or ``builtin:NAME`` (see ``BUILTIN_MODELS``)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {spec!r}; choose one of "
                             f"{sorted('builtin:' + n for n in BUILTIN_MODELS)}")
        return BUILTIN_MODELS[name]()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {spec!r} does not exist")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"model directory {spec!r} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return str(path)
