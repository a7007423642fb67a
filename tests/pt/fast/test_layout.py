"""The fast path's place in the import graph: it depends on modeling_esm, modeling_esm calls it only from
inside functions, and the module-level imports of esm_dual.pt have no cycle."""

from __future__ import annotations

import ast
import os

import esm_dual

PKG = os.path.dirname(os.path.abspath(esm_dual.__file__))


def _module_level_imports(path: str, module: str) -> set[str]:
    """Modules of esm_dual imported at module level (not inside functions) by the file at path."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("esm_dual"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("esm_dual"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from . import fast`
    return out


def _graph(root: str) -> dict[str, set[str]]:
    modules = {}
    for dirpath, _, files in os.walk(os.path.join(PKG, *root.split(".")[1:])):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                modules[rel.removesuffix(".__init__")] = path
    return {m: {t for t in _module_level_imports(p, m) if t in modules and t != m} for m, p in modules.items()}


def test_modeling_imports_no_fast_path_at_module_level():
    g = _graph("esm_dual.pt")
    assert not {m for m in g["esm_dual.pt.modeling_esm"] if m.startswith("esm_dual.pt.fast")}
    assert "esm_dual.pt.modeling_esm" in g["esm_dual.pt.fast.encoder"]
    # options imports nothing of the package (the CLI's info reads it)
    assert g["esm_dual.pt.fast.options"] == set()


def test_pt_import_graph_has_no_cycle():
    g = _graph("esm_dual.pt")
    # a package's __init__ importing its own submodules is not a cycle of its submodules
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            visit(t, path + [m])
        state[m] = 2

    for m in sorted(edges):
        visit(m, [])
