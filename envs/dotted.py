"""The one way a YAML names code: a dotted path ``"pkg.module.name"`` (env classes and creators, reward functions,
RLlib classes)."""

import importlib


def import_dotted(dotted: str):
    """The object ``dotted`` names; a ValueError saying why it cannot be imported otherwise."""
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import {dotted!r} ({e})") from None
