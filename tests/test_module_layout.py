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
    return "relayd" if path.name == "__init__.py" else f"relayd.{path.stem}"


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
            if node.module == "relayd":  # from relayd import spool: the submodule itself
                found += [(f"relayd.{alias.name}", "") for alias in node.names]
            elif node.module.startswith("relayd."):
                found += [(node.module, alias.name) for alias in node.names]
    return [(target, name) for target, name in found if target != module]


def _imports_by_module() -> dict[str, list[tuple[str, str]]]:
    graph: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
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
        [sys.executable, "-m", "relayd.cli", "--config", str(missing), "queue", "list"],
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
    cli_side = {"relayd.cli", "relayd.cli_admin", "relayd.cli_queue", "relayd.clicommon", "relayd.queueview"}
    assert "relayd.control" in loaded
    assert loaded & cli_side == set()
