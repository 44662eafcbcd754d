"""The package's layers (docs/architecture.md): a module imports only from its own layer or lower ones, at the top of
the file or inside a function; no import cycle at module level; ``envs`` and ``core.py`` import nothing of the rest;
benchmarks import the package and ``harness``, not each other. Read from the source (ast), nothing is imported."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Lowest first. An entry names a module, or a package and all its modules; a module takes its longest entry.
LAYERS = (
    ("envs: gymnasium envs, data, tasks, rewards", ("envs",)),
    ("the math", ("rllib_sppo.core",)),
    ("the built-in models: built and loaded (read envs' tasks)", ("rllib_sppo.llm.assets",)),
    ("the one door to private internals", ("rllib_sppo.private_api",)),
    ("estimators", ("rllib_sppo.estimators",)),
    # monitoring.py: PrometheusExport is a callback the config installs; the CLI's progress lines and curves sit
    # beside it and import nothing higher.
    ("the RLlib pieces", ("rllib_sppo.apis", "rllib_sppo.watchdog", "rllib_sppo.connectors", "rllib_sppo.env_runner",
                          "rllib_sppo.sppo_learner", "rllib_sppo.torch", "rllib_sppo.llm", "rllib_sppo.llm_wiring",
                          "rllib_sppo.monitoring")),
    ("the algorithm", ("rllib_sppo.__init__", "rllib_sppo.config", "rllib_sppo.config_checks", "rllib_sppo.sppo",
                       "rllib_sppo.rollouts", "rllib_sppo.checkpoints")),
    ("edges", ("rllib_sppo.experiments", "rllib_sppo.cli", "rllib_sppo.cluster", "rllib_sppo.grafana")),
)
#: Benchmark-to-benchmark imports still to move into harness.py: none.
BENCHMARK_IMPORTS_TO_MOVE = set()


def modules(*roots: str) -> dict[str, Path]:
    """{dotted name: file}; a package's ``__init__.py`` is ``<package>.__init__``."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for r in roots for p in (ROOT / r).rglob("*.py")}


def imports(name: str, path: Path, known: dict) -> list[tuple[str, bool]]:
    """(module imported, at module level) for each import of a project module in ``path``. ``from a.b import c``
    imports ``a.b.c`` when that is a module, else ``a.b`` (its ``__init__`` for a package); the parent packages
    Python imports on the way are not counted."""
    package = name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top = module_level_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known
                       or f"{base}.{alias.name}.__init__" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            target = target if target in known else f"{target}.__init__"
            if target in known and target != name:
                found.append((target, id(node) in top))
    return found


def module_level_nodes(tree: ast.Module) -> set[int]:
    """The ids of the nodes that run when the module is imported (not inside a function)."""
    ids, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        ids.add(id(node))
        todo.extend(ast.iter_child_nodes(node))
    return ids


def layer(name: str) -> int:
    matches = [(len(entry), i) for i, (_, entries) in enumerate(LAYERS) for entry in entries
               if name == entry or name.startswith(entry + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return max(matches)[1]


def graph() -> dict[str, list[tuple[str, bool]]]:
    known = modules("rllib_sppo", "envs")
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
              for name, targets in graph().items() for target, _ in targets if layer(target) > layer(name)]
    assert upward == []


def test_envs_and_the_math_import_nothing_of_the_rest():
    edges = graph()
    assert [(n, t) for n in edges if n.startswith("envs.") for t, _ in edges[n] if not t.startswith("envs.")] == []
    assert edges["rllib_sppo.core"] == []


def test_no_import_cycle_at_module_level():
    edges = {name: sorted({t for t, top in targets if top}) for name, targets in graph().items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for target in edges[name]:
            visit(target)
        path.pop()
        done.add(name)

    for name in edges:
        visit(name)


def test_benchmarks_import_the_harness_not_each_other_nor_the_cli():
    benchmarks = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"harness"}
    found = set()
    for name in benchmarks:
        for node in ast.walk(ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                found |= {(name, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found |= {(name, node.module)}
    assert {(b, m) for b, m in found if m in benchmarks or m == "rllib_sppo.cli"} == BENCHMARK_IMPORTS_TO_MOVE
