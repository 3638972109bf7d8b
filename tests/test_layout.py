"""The package's shape: imports point one way (docs/layout.md).

A short walk over every ``import`` statement in ``src/dmdx`` (top-level and inside functions alike), without
importing anything:

- no import cycle between modules;
- the core's layers import only their own layer and the ones below;
- the core never imports a teacher kind (a vertical slice under ``dmdx/teachers/``), and slices never import each
  other;
- no module imports a dmdx module inside a function (the only reason to do so is to dodge a cycle; lazy imports of
  optional heavy packages such as diffusers are not dmdx modules and are not counted).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "dmdx"

# the core, bottom to top; a module belongs to the first entry that is it or a package above it
LAYERS = [
    ("maths", ("dmdx.schedules", "dmdx.param", "dmdx.denoiser", "dmdx.sampling", "dmdx.mixtures", "dmdx.config",
               "dmdx.viz")),
    ("folders", ("dmdx.pipelines", "dmdx.data")),
    ("nets", ("dmdx.nets",)),
    ("model folders", ("dmdx.models", "dmdx.export")),
    ("metrics", ("dmdx.eval", "dmdx.evaluate")),
    ("methods", ("dmdx.methods",)),
    ("train", ("dmdx.pairs", "dmdx.recipes", "dmdx.train")),
    ("kinds", ("dmdx.kinds",)),
    ("slices", ("dmdx.teachers.",)),  # each sub-package of dmdx.teachers is one slice
    ("top", ("dmdx.teachers", "dmdx.cli", "dmdx.demo", "dmdx.__main__")),
]


def modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / PKG).rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(mods: dict[str, Path]) -> list[tuple[str, str, bool, int]]:
    """(importer, imported dmdx module, inside a function, line) for every import of a dmdx module."""
    found = set()
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        tree = ast.parse(f.read_text(), str(f))
        in_fn = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_fn.update(id(sub) for sub in ast.walk(node) if sub is not node)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and (t == PKG or t.startswith(PKG + ".")):
                    found.add((name, t, id(node) in in_fn, node.lineno))
    return sorted(found)


def layer_of(mod: str) -> int:
    if mod == PKG:
        return len(LAYERS) - 1  # the package itself is the top
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if p.endswith(".") and mod.startswith(p):
                return i
            if mod == p or mod.startswith(p + "."):
                return i
    raise AssertionError(f"{mod} is in no layer of tests/test_layout.py: add it to LAYERS")


def slice_of(mod: str) -> str | None:
    parts = mod.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 and parts[1] == "teachers" else None


def test_every_module_has_a_layer():
    for mod in modules():
        layer_of(mod)


def test_no_import_cycles():
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _, _ in imports(mods):
        graph[a].add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycle = stack[stack.index(w):] + [w]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)


def test_layers_import_downwards_and_slices_stay_apart():
    bad = []
    for a, b, _, line in imports(modules()):
        la, lb = layer_of(a), layer_of(b)
        sa, sb = slice_of(a), slice_of(b)
        if lb > la:
            bad.append(f"{a}:{line} ({LAYERS[la][0]}) imports {b} ({LAYERS[lb][0]}), a layer above it")
        elif sa and sb and sa != sb:
            bad.append(f"{a}:{line} imports {b}: teacher kinds do not import each other")
    assert not bad, "\n".join(bad)


def test_no_dmdx_import_inside_a_function():
    local = [f"{a}:{line} imports {b}" for a, b, inside, line in imports(modules()) if inside]
    assert not local, "imports of dmdx modules inside functions (move them to the top):\n" + "\n".join(local)
