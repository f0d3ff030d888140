"""The package layers of ARCHITECTURE.md, checked: every import between kmedtl's packages
follows an allowed edge, and no two packages import each other (even through a chain).

Tool-free and fast: ``ast`` only, nothing of kmedtl (and no TensorFlow) is imported.
Every ``import kmedtl...`` / ``from kmedtl... import`` counts, module level *and* inside
functions (a deferred import only postpones an edge, it does not remove it).  Cycles
between single modules are ``test_import_graph.py``'s; this one looks at packages.

Nodes are packages (``kmedtl/<pkg>/``) and top-level modules (``kmedtl/<module>.py``),
with two groups:

- ``core``: the leaf modules everything may use (:data:`CORE`), and the ``kmedtl``
  face itself (``from kmedtl import __version__``);
- ``cli``: the front end -- ``kmedtl/cli.py``, ``kmedtl/init.py``, every ``__main__.py``
  and every package's ``cli.py``.  It may import anything; nothing but the front end may
  import it, except that a package's ``__init__`` may re-export its own ``cli``.

To add an edge, add it to :data:`ALLOWED` *and* to ARCHITECTURE.md's drawing; an edge
that points up a layer (:data:`LAYERS`) is refused by :func:`test_allowed_edges_point_down`.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "kmedtl"

CORE = {"kmedtl", "errors", "_text", "_quiet", "jsonio", "safe_yaml", "schema",
        "hierarchy", "ownership"}

#: Bottom to top; a node may import only nodes of lower layers (and ``core``).
LAYERS = [
    ["core"],
    ["data", "pretrained"],
    ["config", "models", "serving"],
    ["run_folder"],
    ["evaluation", "export"],
    ["training"],
    ["pipeline", "study"],
    ["cli"],
]

#: node -> the nodes it may import (``core`` is implied for all).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "data": set(),                          # files -> tf.data; knows no config
    "pretrained": set(),                    # weight files: sources, cache, checkpoints
    "config": {"data"},                     # the YAML config and its data sections
    "models": {"pretrained"},               # backbones, heads, precision; Keras only
    "serving": {"data"},                    # TF Serving client; no Keras
    "run_folder": {"config", "data", "models"},
    "evaluation": {"config", "data", "models", "run_folder"},
    "export": {"data", "models", "run_folder", "serving"},
    "training": {"config", "data", "models", "run_folder", "evaluation"},
    "pipeline": {"config", "data", "models", "run_folder", "evaluation", "export",
                 "training"},
    "study": {"config", "data", "models", "evaluation", "training"},
    "cli": {"config", "data", "pretrained", "models", "serving", "run_folder",
            "evaluation", "export", "training", "pipeline", "study"},
}


def node_of(module: str) -> str:
    """``kmedtl.training.stage`` -> ``training``; ``kmedtl.errors`` -> ``core``."""
    parts = module.split(".")
    if parts[-1] in ("cli", "__main__") or module == "kmedtl.init":
        return "cli"
    name = parts[1] if len(parts) > 1 else "kmedtl"
    return "core" if name in CORE else name


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _import_nodes(tree: ast.AST) -> list[tuple[ast.stmt, bool]]:
    """Every import statement in ``tree`` and whether it is inside a function body."""
    found = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            elif isinstance(child, (ast.expr, ast.Pass, ast.Break, ast.Continue)):
                continue  # no statements below an expression (lambdas cannot import)
            else:
                walk(child, in_function or isinstance(
                    child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(tree, False)
    return found


@functools.cache
def imports(root: Path = PACKAGE_ROOT) -> list[tuple[str, str, str, bool]]:
    """Every kmedtl-internal import: ``(src module, dst module, "file:line", deferred)``."""
    found = []
    top = root.name
    modules = _modules(root)
    rel = root.parent
    for src, (path, is_pkg) in modules.items():
        for node, deferred in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = src if is_pkg else src.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                # `from kmedtl.a import b`: the submodule b if there is one
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules
                           else module for a in node.names]
            where = f"{path.relative_to(rel).as_posix()}:{node.lineno}"
            for dst in targets:
                if dst == top or dst.startswith(top + "."):
                    found.append((src, dst, where, deferred))
    return found


def package_edges(root: Path = PACKAGE_ROOT) -> dict[tuple[str, str], list[str]]:
    """``(src node, dst node)`` -> the ``file:line`` of each import making it."""
    edges: dict[tuple[str, str], list[str]] = {}
    for src, dst, where, deferred in imports(root):
        a, b = node_of(src), node_of(dst)
        if a == b or dst == f"{src}.cli":  # a package face re-exporting its own command
            continue
        found = edges.setdefault((a, b), [])
        where += " (deferred)" if deferred else ""
        if where not in found:  # one line per statement
            found.append(where)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, recursive: the graph
    has ~15 nodes)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _report(edges, pairs) -> str:
    return "\n".join(f"  {a} -> {b}:\n" + "\n".join(f"      {w}" for w in edges[a, b])
                     for a, b in sorted(pairs))


def test_every_node_is_named():
    nodes = {node_of(m) for m in _modules(PACKAGE_ROOT)}
    unknown = nodes - set(ALLOWED)
    assert not unknown, (f"new package(s) {sorted(unknown)}: give each a layer in LAYERS, its "
                         "allowed imports in ALLOWED, and a line in ARCHITECTURE.md")
    assert {n for layer in LAYERS for n in layer} == set(ALLOWED)


def test_allowed_edges_point_down():
    layer = {n: i for i, names in enumerate(LAYERS) for n in names}
    up = [(a, b) for a, bs in ALLOWED.items() for b in bs if layer[b] >= layer[a]]
    assert not up, f"ALLOWED has edges that do not point to a lower layer: {up}"


def test_only_allowed_edges():
    edges = package_edges()
    bad = [(a, b) for a, b in edges if b != "core" and b not in ALLOWED.get(a, set())]
    assert not bad, ("imports between packages that ARCHITECTURE.md does not allow "
                     "(move the code to the layer it belongs to, or, if the edge points "
                     "down, add it to ALLOWED and the drawing):\n" + _report(edges, bad))


def test_no_package_cycles():
    edges = package_edges()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    found = cycles(graph)
    offending = [(a, b) for comp in found for a, b in edges if a in comp and b in comp]
    assert not found, (f"package cycles {found}; the imports on them:\n"
                       + _report(edges, offending))


# ------------------------------------------------------------------ the checker itself
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "kmedtl"


def test_checker_sees_deferred_and_relative_imports(tmp_path):
    root = _write(tmp_path, {
        "kmedtl/__init__.py": "",
        "kmedtl/errors.py": "",
        "kmedtl/models/__init__.py": "from .backbones import x\n",
        "kmedtl/models/backbones.py": "x = 1\n",
        "kmedtl/pretrained/__init__.py": "",
        "kmedtl/pretrained/catalog.py": (
            "from kmedtl import errors\n"
            "def f():\n    from kmedtl.models import backbones\n"),
        "kmedtl/pretrained/cli.py": "from kmedtl.models.backbones import x\n",
        "kmedtl/models/store.py": "from ..pretrained import catalog\n",
    })
    edges = package_edges(root)
    assert edges[("pretrained", "models")] == ["kmedtl/pretrained/catalog.py:3 (deferred)"]
    assert edges[("models", "pretrained")] == ["kmedtl/models/store.py:1"]
    assert ("pretrained", "core") in edges and ("cli", "models") in edges
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    assert cycles(graph) == [["models", "pretrained"]]


@pytest.mark.parametrize("module, node", [
    ("kmedtl", "core"), ("kmedtl.errors", "core"), ("kmedtl.cli", "cli"),
    ("kmedtl.study.__main__", "cli"), ("kmedtl.training.cli", "cli"),
    ("kmedtl.training.stage", "training"), ("kmedtl.run_folder", "run_folder"),
    ("kmedtl.init", "cli"),
])
def test_node_of(module, node):
    assert node_of(module) == node
