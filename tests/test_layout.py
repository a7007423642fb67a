"""The package's shape: no import cycles (every import counted, function-local ones too) and no file above ~700
lines outside the two model files."""

from __future__ import annotations

import ast
import os

from tests.utils import ROOT

PACKAGE = os.path.join(ROOT, "esm_dual")
MAX_LINES = 700
MODEL_FILES = {"esm_dual/pt/modeling_esm.py", "esm_dual/tf/modeling_esm.py"}
# Files of other parts of the tree still above the limit (issue 17 splits them); each entry is a debt.
KNOWN_LONG: set[str] = set()
# Function-local imports that close a cycle by design: the model dispatches to its fast path, which builds on the
# model's classes, only at call time (module -> package prefix).
LAZY_BY_DESIGN = {("esm_dual.pt.modeling_esm", "esm_dual.pt.fast")}


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of esm_dual."""
    out = {}
    for d, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The esm_dual modules ``name`` imports, at module level or inside functions (``from a import b`` counts a.b
    when that is a module), less the function-local imports of :data:`LAZY_BY_DESIGN`."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    tree = ast.parse(open(path, encoding="utf-8").read())
    top = {id(n) for n in tree.body}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import esm_dual.pt.x.y` -> the longest module prefix
                t = t.rpartition(".")[0]
            lazy = id(node) not in top
            if lazy and any(name == a and (t == b or t.startswith(b + ".")) for a, b in LAZY_BY_DESIGN):
                continue
            if t.startswith("esm_dual") and t != name:
                out.add(t)
    return out


def test_import_graph_has_no_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_walk_sees_imports():
    modules = _modules()
    got = _imports("esm_dual.io.hub", modules["esm_dual.io.hub"], modules)
    assert {"esm_dual.io.fair_esm", "esm_dual.io.resolve", "esm_dual.common.config"} <= got
    assert "esm_dual.io.hub" in _imports("esm_dual.cli._common", modules["esm_dual.cli._common"], modules)


def test_no_file_above_the_line_limit():
    long = {}
    for path in _modules().values():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES and rel not in MODEL_FILES:
            long[rel] = n
    assert set(long) <= KNOWN_LONG, {k: v for k, v in long.items() if k not in KNOWN_LONG}


def test_models_are_built_from_tensors_in_one_place_per_framework():
    """Only the factories (``from_checkpoint`` in the two model files) and ESMFold's own loader (which hands its
    stem to the encoder's) copy tensors into a model: the CLI, conversion and ESMFold call ``from_checkpoint``."""
    allowed = {"esm_dual/pt/modeling_esm.py", "esm_dual/tf/modeling_esm.py", "esm_dual/pt/folding/esmfold.py"}
    callers = set()
    for path in _modules().values():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "load_hub_tensors":
                callers.add(os.path.relpath(path, ROOT).replace(os.sep, "/"))
    assert callers <= allowed, callers - allowed
