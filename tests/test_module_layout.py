"""The package's shape: no import circle among relayd modules, no private name
imported across modules, and relayctl behaving the same however it is started."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "relayd"

# Private names knowingly imported across modules, each as (importing module,
# imported module, name) with a comment saying why. None today: give a shared
# name a public spelling (or move it to the module both use) instead.
KNOWN_PRIVATE_IMPORTS: frozenset[tuple[str, str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PACKAGES = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}


def _relayd_imports(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(imported relayd module, name or '') for every import in the module.

    Imports inside functions count: one loaded late ("imports this module: load
    it late") still closes a circle at run time. Imports under `if
    TYPE_CHECKING:` count too: mypy follows them.
    """
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("relayd.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            if node.module in PACKAGES:  # from relayd.queue import spool: the submodule itself
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.append((sub, "") if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                                 or sub in PACKAGES else (node.module, alias.name))
            elif node.module.startswith("relayd."):
                found += [(node.module, alias.name) for alias in node.names]
    return [(target, name) for target, name in found if target != module]


def _imports_by_module() -> dict[str, list[tuple[str, str]]]:
    graph: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph[module] = _relayd_imports(ast.parse(path.read_text(), str(path)), module)
    return graph


def _find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt)
                if circle is not None:
                    return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            circle = visit(start)
            if circle is not None:
                return circle
    return None


def test_the_circle_finder_finds_a_circle_and_accepts_a_tree() -> None:
    assert _find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_among_relayd_modules() -> None:
    graph = _imports_by_module()
    edges = {module: {target for target, _ in imports if target in graph} for module, imports in graph.items()}
    assert _find_circle(edges) is None


def test_no_module_imports_a_private_name_from_another_relayd_module() -> None:
    private = {
        (module, target, name)
        for module, imports in _imports_by_module().items()
        for target, name in imports
        if name.startswith("_")
    }
    assert private - KNOWN_PRIVATE_IMPORTS == set()
    assert KNOWN_PRIVATE_IMPORTS - private == set(), "fixed: remove it from KNOWN_PRIVATE_IMPORTS"


def test_relayctl_run_as_python_m_relayd_cli_reports_an_ordinary_error_as_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "relay.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "relayd.ops.cli", "--config", str(missing), "queue", "list"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == f"relayctl: {missing}: cannot read the file: No such file or directory\n"
    assert "internal error" not in result.stderr


def _imported_from(start: str) -> set[str]:
    graph = _imports_by_module()
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        for target, _ in graph.get(module, []):
            if target in graph and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_daemon_loads_neither_the_cli_nor_its_queue_formatting() -> None:
    loaded = _imported_from("relayd.daemon")
    cli_side = {"relayd.ops.cli", "relayd.ops.cli_admin", "relayd.ops.cli_daemon", "relayd.ops.cli_queue",
                "relayd.ops.cli_queueact", "relayd.ops.cli_tenant", "relayd.ops.clicommon", "relayd.ops.queuesource",
                "relayd.ops.queueview"}
    assert "relayd.ops.control" in loaded
    assert loaded & cli_side == set()


# The stages in the order data flows, after the shared foundations. A module
# may import its own layer and earlier ones, never a later one: a stage that
# needs a later stage is handed a callable or a Protocol by relayd.daemon.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("relayd", "relayd.values", "relayd.replies", "relayd.safeio", "relayd.jsonwire", "relayd.netaddr",
     "relayd.hardening", "relayd.sdnotify"),
    ("relayd.config",),
    ("relayd.observe",),
    ("relayd.smtp",),
    ("relayd.queue",),
    ("relayd.delivery",),
    ("relayd.ops",),
    ("relayd.daemon", "relayd.runtime"),
)

# Imports that still point at a later stage, each as (importing, imported).
KNOWN_LATER_STAGE_IMPORTS: frozenset[tuple[str, str]] = frozenset()


def _layer(module: str) -> int:
    best = -1, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "relayd" and module.startswith(prefix + "."))
            if inside and len(prefix) > best[1]:
                best = rank, len(prefix)
    assert best[0] >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def test_every_module_belongs_to_a_stage_and_no_stage_imports_a_later_one() -> None:
    later = {
        (module, target)
        for module, imports in _imports_by_module().items()
        for target, _ in imports
        if target.startswith("relayd") and _layer(target) > _layer(module)
    }
    assert later - KNOWN_LATER_STAGE_IMPORTS == set()
    assert KNOWN_LATER_STAGE_IMPORTS - later == set(), "fixed: remove it from KNOWN_LATER_STAGE_IMPORTS"


# Modules that still import a relayd module inside a function.
KNOWN_LOCAL_IMPORTS: frozenset[str] = frozenset()


def test_no_relayd_module_is_imported_inside_a_function() -> None:
    local: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("relayd")):
                        local.add(_module_name(path))
                    elif isinstance(node, ast.Import) and any(a.name.startswith("relayd") for a in node.names):
                        local.add(_module_name(path))
    assert local - KNOWN_LOCAL_IMPORTS == set()
    assert KNOWN_LOCAL_IMPORTS - local == set(), "fixed: remove it from KNOWN_LOCAL_IMPORTS"


MAX_MODULE_LINES = 600  # a module a newcomer reads in one sitting
KNOWN_LONG_MODULES: frozenset[str] = frozenset({
    "relayd.delivery.transport", "relayd.delivery.walk",
})


def test_no_module_is_longer_than_a_sitting() -> None:
    long = {
        _module_name(path)
        for path in PACKAGE.rglob("*.py")
        if len(path.read_text().splitlines()) > MAX_MODULE_LINES
    }
    assert long - KNOWN_LONG_MODULES == set()
    assert KNOWN_LONG_MODULES - long == set(), "shortened: remove it from KNOWN_LONG_MODULES"
