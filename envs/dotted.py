"""The one way a YAML names code: a dotted path ``"pkg.module.name"`` (env classes and creators, reward functions,
advantage estimators, RLlib classes)."""

import importlib
from typing import Any, Callable


def import_dotted(dotted: str):
    """The object ``dotted`` names; a ValueError saying why it cannot be imported otherwise."""
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import {dotted!r} ({e})") from None


def builtin_or_dotted(key: str, name: str, builtins: dict[str, Any], is_one: Callable[[Any], bool], one: str):
    """What the config key ``key`` names: ``builtins[name]``, or the object ``name``'s dotted path names when ``is_one``
    says it is ``one`` (e.g. "a function"); a ValueError saying which of these failed otherwise."""
    if name in builtins:
        return builtins[name]
    if "." not in name:
        raise ValueError(f"{key}={name!r}; choose one of {sorted(builtins)}, or the dotted path of your own ({one}, "
                         f"e.g. 'my_pkg.my_module.name')")
    return dotted_object(key, name, is_one, one)


def dotted_object(key: str, name: str, is_one: Callable[[Any], bool], one: str):
    """The object the dotted path ``name`` (the config key ``key``) names, when ``is_one`` says it is ``one``; a
    ValueError saying why not otherwise."""
    try:
        found = import_dotted(name)
    except ValueError as e:
        raise ValueError(f"{key}={name!r}: {e}") from None
    if not is_one(found):
        raise ValueError(f"{key}={name!r} names a {type(found).__name__!r} object, not {one}")
    return found
