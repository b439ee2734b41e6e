"""The package's module-level import graph has no cycle and follows the layering (STYLE.md "One loop, one way up").

Every module of ``dfkd_fast`` (``pkgutil``; ``dfkd_fast.kernels`` included) is parsed with ``ast``; its module-level
imports (also inside module-level ``if`` / ``try``) become edges, relative imports resolved, ``from pkg import
name`` resolved to the submodule ``pkg.name`` when that is a module. Importing ``a.b.c`` also runs ``a.b``'s
``__init__``: that parent package is an edge too unless it is an ancestor of the importing module (already being
imported then). Imports inside functions are deliberately lazy and are not edges.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import pkgutil

import pytest

import dfkd_fast

PKG = "dfkd_fast"


def _modules() -> dict[str, str]:
    mods = {PKG: dfkd_fast.__file__}
    # dfkd_fast.kernels lives in the top-level kernels/ folder (package_dir): walk it under its installed name
    kernels = importlib.util.find_spec(PKG + ".kernels")
    roots = [(list(dfkd_fast.__path__), PKG + ".")]
    if kernels is not None and kernels.submodule_search_locations:
        mods[PKG + ".kernels"] = kernels.origin
        roots.append((list(kernels.submodule_search_locations), PKG + ".kernels."))
    for path, prefix in roots:
        for info in pkgutil.walk_packages(path, prefix):
            spec = importlib.util.find_spec(info.name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                mods[info.name] = spec.origin
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """``name`` if it is one of the package's modules, else its closest enclosing module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _top_level_nodes(tree: ast.Module) -> list[ast.stmt]:
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        out.append(node)
        if isinstance(node, ast.If):
            todo[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo[:0] = node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return out


def _imports(name: str, path: str, lazy: bool = False) -> set[str]:
    """Modules of the package that importing ``name`` imports directly (module level only; with ``lazy``
    also the imports inside functions)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if os.path.basename(path) == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in (ast.walk(tree) if lazy else _top_level_nodes(tree)):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PKG:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.add(sub if sub in MODULES else base)
    edges: set[str] = set()
    ancestors = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
    for t in targets:
        m = _owner(t)
        while m is not None:  # the module and every parent package it runs, up to a shared ancestor
            if m not in ancestors and m != name:
                edges.add(m)
            parent = m.rpartition(".")[0]
            m = parent if parent and parent not in ancestors else None
    return edges


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}
LAZY_GRAPH = {m: _imports(m, p, lazy=True) for m, p in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        color[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if color.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if color.get(w) is None:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        color[v] = 2
        return None

    for v in sorted(graph):
        if color.get(v) is None:
            found = visit(v)
            if found:
                return found
    return None


def test_walk_finds_the_package():
    for m in ("dfkd_fast.comm", "dfkd_fast.runner", "dfkd_fast.distributed", "dfkd_fast.synthesis.cmi",
              "dfkd_fast.transfer_set", "dfkd_fast.ops", "dfkd_fast.kernels", "dfkd_fast.tasks.distill"):
        assert m in MODULES, m
    assert "dfkd_fast.synthesis.base" in GRAPH["dfkd_fast.synthesis.cmi"]
    assert "dfkd_fast.comm" in GRAPH["dfkd_fast.contrast"]


def test_cycle_finder_finds_a_planted_cycle():  # negative control
    g = {k: set(v) for k, v in GRAPH.items()}
    g["dfkd_fast.comm"].add("dfkd_fast.runner")
    cycle = _find_cycle(g)
    assert cycle is not None and cycle[0] == cycle[-1] and "dfkd_fast.comm" in cycle
    assert "dfkd_fast.runner" in cycle


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _layer(m: str) -> str:
    parts = m.split(".")
    if len(parts) == 1:
        return "package"
    head = parts[1]
    if head in ("kernels", "_C", "_backend", "_checks"):
        return "kernels"
    if head == "ops":
        return "ops"
    if head == "synthesis":
        return "synthesis"
    if head in ("tasks", "demo", "compat"):
        return "tasks"
    if head in ("cli", "__main__", "config", "runner", "distributed", "info"):
        return "top"
    return "block"


RANK = {"kernels": 0, "ops": 1, "block": 2, "synthesis": 3, "tasks": 4, "top": 5}


@pytest.mark.parametrize("low,forbidden", [("ops", ("synthesis", "tasks", "top")),
                                           ("block", ("synthesis", "tasks", "top")),
                                           ("synthesis", ("tasks", "top"))])
def test_layering(low, forbidden):
    """Also for imports inside functions: a lazy import still makes the lower layer depend on the higher."""
    bad = [(m, t) for m, ts in LAZY_GRAPH.items() if _layer(m) == low for t in ts if _layer(t) in forbidden]
    assert not bad, f"{low} modules import higher layers: {bad}"


def test_comm_is_a_leaf():
    assert not GRAPH["dfkd_fast.comm"], GRAPH["dfkd_fast.comm"]
