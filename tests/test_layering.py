"""The package's import graph: no circle, and every arrow runs down the layers of ARCHITECTURE.md.

Every ``import`` of a hierbayes module anywhere in a module counts, at the top, inside a
function or under ``TYPE_CHECKING``: a circle through a lazy import is still a circle a reader
has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hierbayes"

#: Layers, lowest first: a module may import from its own layer and the layers below. The
#: longest matching prefix decides a module's layer.
LAYERS: list[tuple[str, ...]] = [
    ("hierbayes.errors",),
    ("hierbayes.tasks", "hierbayes.data"),
    ("hierbayes.models",),
    (
        "hierbayes.inference.predictions",
        "hierbayes.inference.linear_gaussian",
        "hierbayes.inference.core.joint",
        "hierbayes.inference.core.numerics",
    ),
    ("hierbayes.inference.curvature",),
    ("hierbayes.inference.core",),
    ("hierbayes.inference.posteriors",),
    ("hierbayes.inference.diagnostics",),
    ("hierbayes.inference.guide",),
    ("hierbayes.inference.objectives",),
    ("hierbayes.inference.references",),
    ("hierbayes.inference.training",),
    ("hierbayes.inference",),  # the facade: hierbayes/inference/__init__.py
    ("hierbayes.experiments",),
    ("hierbayes.__main__", "hierbayes"),  # hierbayes/__init__.py: the top facade
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in names:
            if target.startswith("hierbayes"):
                resolved = _resolve(target)
                if resolved is not None and resolved != name:
                    targets.add(resolved)
    # "from hierbayes.a import b" also resolves to the package hierbayes.a when b is a module
    # of it; keep only the most specific target of each statement
    return {t for t in targets if not any(o != t and o.startswith(t + ".") for o in targets)}


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or name.startswith(prefix + ".")
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best >= 0, f"{name} has no layer: add it to LAYERS"
    return best


def _cycles() -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle() -> None:
    assert _cycles() == []


def test_every_import_runs_down_the_layers() -> None:
    upward = [
        f"{source} (layer {_layer(source)}) imports {target} (layer {_layer(target)})"
        for source, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if _layer(target) > _layer(source)
    ]
    assert upward == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_passes_400_lines(name: str) -> None:
    lines = MODULES[name].read_text().count("\n")
    assert lines <= 400, f"{name} has {lines} lines: split it"
