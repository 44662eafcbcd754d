"""``rllib_sppo.private_api`` is the one door to the internals of RLlib, Ray, DeepSpeed and vLLM: every internal it
lists still exists in the pinned versions (an upgrade that drops one fails here, by name), it lists every internal it
reaches, and nothing else in the repository (the package, ``envs``, the benchmarks and the tests) reaches one."""

import ast
import importlib
import inspect
import re
from pathlib import Path

from rllib_sppo import private_api

REPO = Path(__file__).resolve().parents[1]
DOOR = REPO / "rllib_sppo" / "private_api.py"
FOREIGN = ("ray", "deepspeed", "vllm")
#: Private names of the standard library the package calls (documented there): not a door's business.
STDLIB = {"_exit"}  # os._exit, the watchdog's way out of a stuck process


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_abc_impl"  # (every ABC's, Python's)


def sources() -> list[Path]:
    """The package's modules (``rllib_sppo`` and ``envs``)."""
    return sorted([*REPO.glob("rllib_sppo/**/*.py"), *REPO.glob("envs/**/*.py")])


def users() -> list[Path]:
    """Everything in the repository that may call the package: its modules, the benchmarks and the tests."""
    return sorted([*sources(), *REPO.glob("benchmarks/*.py"), *REPO.glob("tests/*.py")])


def defined_in(paths) -> set[str]:
    """Private names the files define themselves: functions, classes, variables, and attributes of their own objects
    (``self._x = ...``; writing another object's private attribute defines nothing)."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if is_private(name)}


def defined_here() -> set[str]:
    """Private names the repository defines itself, outside the door."""
    return defined_in(path for path in users() if path != DOOR)


#: A string naming a private module of another package (a logger's name, say): ``ray._private.worker``.
PRIVATE_MODULE = re.compile(r"(ray|deepspeed|vllm|torch)(\.\w+)*\._\w+(\.\w+)*")


def private_uses(path: Path, ours: set[str]) -> list[tuple[str, int]]:
    """(name, line) of the private names of other packages a file reaches: imported (or their private modules),
    read as an attribute, passed as a keyword argument, or named in a string."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and PRIVATE_MODULE.fullmatch(node.value):
            uses.append((node.value, node.lineno))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FOREIGN:
            uses += [(a.name, node.lineno) for a in node.names if is_private(a.name)]
            uses += [(part, node.lineno) for part in node.module.split(".") if is_private(part)]
        elif isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in ours | STDLIB:
            uses.append((node.attr, node.lineno))
        elif isinstance(node, ast.Call):
            uses += [(k.arg, node.lineno) for k in node.keywords if k.arg and is_private(k.arg) and k.arg not in ours]
    return uses


def package_classes():
    for path in sources():
        module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(
            ".__init__"))
        yield from (c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__)


def test_every_private_internal_used_still_exists():
    assert private_api.missing() == []


def test_a_missing_internal_is_named(monkeypatch):
    monkeypatch.setattr(private_api, "USED", (*private_api.USED, ("ray.rllib.core.learner.learner", "Learner",
                                                                   "_no_such_thing", "a test")))
    assert private_api.missing() == ["ray.rllib.core.learner.learner.Learner._no_such_thing"]


def test_nothing_outside_the_door_reads_a_private_internal():
    """No private import from ray, deepspeed or vllm, no read or write of a private attribute the repository does not
    define itself, no private keyword argument, no string naming a private module: anywhere in the package, the
    benchmarks or the tests but private_api.py (and this file's strings, which name internals to test the scan)."""
    ours = defined_here()
    offenders = {str(path.relative_to(REPO)): uses for path in users() if path != DOOR
                 for uses in [[use for use in private_uses(path, ours)
                               if not (path == Path(__file__).resolve() and "." in use[0])]] if uses}
    assert offenders == {}


def test_the_scan_finds_a_private_read_a_write_and_a_keyword(tmp_path):
    """The scan above, on a made-up file: a read of a learner group's private learner, a write of a learner's
    private update, a private keyword of ray.init and a private module's logger are each found; a private attribute
    of the file's own object and a public module's logger are not."""
    path = tmp_path / "user.py"
    path.write_text("class Own:\n    def __init__(self):\n        self._mine = 1\n\n"
                    "learner = group._learner\nlearner._possibly_compiled_update = f\n"
                    "ray.init(_metrics_export_port=8080)\nOwn()._mine\n"
                    "logging.getLogger('ray._private.worker')\nlogging.getLogger('ray.tune.tune')\n")
    uses = sorted(private_uses(path, defined_in([path])), key=lambda use: use[1])
    assert uses == [("_learner", 5), ("_possibly_compiled_update", 6), ("_metrics_export_port", 7),
                    ("ray._private.worker", 9)]


def test_nothing_outside_the_door_overrides_a_private_internal():
    """A class of the package defines no private method or attribute that a base class of ray, deepspeed or vllm has
    (which would override it unseen), but for the hook classes in private_api.py and RLlib's documented ``_forward``
    of an RLModule."""
    offenders = []
    for cls in package_classes():
        if cls.__module__ == private_api.__name__:
            continue
        foreign = [b for b in cls.__mro__ if b.__module__.split(".")[0] in FOREIGN]
        source = inspect.getsource(cls)
        names = {n for n in vars(cls) if is_private(n)} | {
            n.attr for n in ast.walk(ast.parse(inspect.cleandoc("\n" + source)))
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and is_private(n.attr)}
        for name in sorted(names - private_api.DOCUMENTED_OVERRIDES):
            if any(name in vars(base) or f"self.{name} =" in inspect.getsource(base) for base in foreign):
                offenders.append(f"{cls.__name__}.{name}")
    assert offenders == []


def test_the_door_lists_every_internal_it_reaches():
    """Every private name private_api.py reaches (imports, attributes, keyword arguments, overrides) is in USED, and
    the vLLM internals it lists are called nowhere else in the repository."""
    listed = {name for _, _, name, _ in private_api.USED}
    listed |= {part for module, _, _, _ in private_api.USED for part in module.split(".") if is_private(part)}
    listed |= {module for module, _, _, _ in private_api.USED}  # (named in a string: a logger's)
    reached = {name for name, _ in private_uses(DOOR, set())}
    hooks = [c for c in vars(private_api).values() if inspect.isclass(c) and c.__module__ == private_api.__name__]
    reached |= {name for c in hooks for name in vars(c) if is_private(name)}
    assert reached - listed == set()
    vllm_names = {name for module, _, name, _ in private_api.USED if module.startswith("vllm")} - {"sleep", "wake_up"}
    elsewhere = [f"{path.name}: {node.attr if isinstance(node, ast.Attribute) else node.value}"
                 for path in users() if path != DOOR for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Attribute) and node.attr in vllm_names
                 or isinstance(node, ast.Constant) and node.value in vllm_names]
    assert elsewhere == []
