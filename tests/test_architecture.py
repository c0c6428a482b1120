"""The engine's layers (docs/ARCHITECTURE.md): no import cycle, not even one inside a function or under
TYPE_CHECKING, and the core below the orchestration. Read from the source, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "src" / "napari_segthenseg" / "engine"
ORCHESTRATION = {"rough", "fine", "slide", "pipeline", "volume", "volume_out", "volume_chunks"}
PACKAGE = "napari_segthenseg.engine."


def engine_imports() -> dict[str, set[str]]:
    """Which engine modules each engine module imports, wherever the import statement stands."""
    graph: dict[str, set[str]] = {}
    for path in ENGINE.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                found.add(node.module.split(".")[2])
        graph[path.stem] = found - {path.stem}
    return graph


def test_the_engine_has_no_import_cycle():
    graph = engine_imports()
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != "open", " -> ".join([*stack, node, dep])
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_core_sits_below_the_orchestration():
    graph = engine_imports()
    assert not graph["core"] & ORCHESTRATION
    below = set()
    todo = ["core"]
    while todo:  # everything the core needs, directly or not
        for dep in graph[todo.pop()] - below:
            below.add(dep)
            todo.append(dep)
    assert not below & ORCHESTRATION, below & ORCHESTRATION
    assert "rough" not in graph["fine"] | graph["slide"] and "pipeline" not in graph["rough"]


def test_the_engine_imports_no_gui_and_nothing_of_the_plugin():
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                assert top not in {"napari", "qtpy", "PyQt6", "PySide6", "magicgui", "vispy", "trainer"}, \
                    f"{path.name} imports {name}"
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                raise AssertionError(f"{path.name} imports from outside the engine ({node.module})")
