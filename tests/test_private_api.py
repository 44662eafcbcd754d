"""The private internals of RLlib, Tune and DeepSpeed the package overrides or reads still exist in the pinned
versions (``rllib_sppo.private_api``): an upgrade that drops one fails here, by name."""

import ast
from pathlib import Path

from rllib_sppo import private_api

REPO = Path(__file__).resolve().parents[1]


def test_every_private_internal_used_still_exists():
    assert private_api.missing() == []


def test_a_missing_internal_is_named(monkeypatch):
    monkeypatch.setattr(private_api, "USED", (*private_api.USED, ("ray.rllib.core.learner.learner", "Learner",
                                                                   "_no_such_thing", "a test")))
    assert private_api.missing() == ["ray.rllib.core.learner.learner.Learner._no_such_thing"]


def test_private_objects_of_other_packages_are_read_only_through_the_module():
    """Outside private_api (and envs.classic's one registry read), no import of a private name from ray or deepspeed,
    and no reference to the private objects listed as module attributes."""
    module_attrs = {name for _, cls, name, _ in private_api.USED if cls is None}
    allowed = {REPO / "rllib_sppo" / "private_api.py", REPO / "envs" / "classic.py"}
    offenders = []
    for path in [*REPO.glob("rllib_sppo/**/*.py"), *REPO.glob("envs/**/*.py")]:
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("ray", "deepspeed"):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name in module_attrs]
            if isinstance(node, ast.Attribute) and node.attr in module_attrs | {"_worker_manager"}:
                offenders.append(f"{path.name}: .{node.attr}")
    assert offenders == []
