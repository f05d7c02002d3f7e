"""The package's layers import only downward, and nothing imports in a circle.

    cli -> run -> bundle -> decide -> targets -> method -> model -> measure -> core

A module may import its own layer and the layers below it. Imports of the project written inside a
function are allowed only where LAZY lists them, each with its reason; every other import is at the
top of its module, so the graph below is the whole truth about who depends on whom.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("core", "measure", "model", "method", "targets", "decide", "bundle", "run", "cli")

# (module, imported module): project imports that stay inside a function, and why.
# The registry imports every target's entry (target.py) with the package, and each runtime's runner
# runs as `python -m` in a child process that imports the package too: a target entry that imported
# torch, gguf-py or onnx (its writer) would load them into every runner child, whose memory is
# measured; one that imported its runner would load the runner twice there.
_HEAVY = "the writer side (torch, gguf-py or onnx): kept out of the registry and the runner children"
_CHILD = "the runner runs as `python -m` in a child; imported first by the registry it would load twice"
LAZY: dict[tuple[str, str], str] = {
    ("mosaic_export.targets.gguf.target", "mosaic_export.method.evaluate"): _HEAVY,
    ("mosaic_export.targets.gguf.target", "mosaic_export.targets.gguf.pricing"): _HEAVY,
    ("mosaic_export.targets.gguf.target", "mosaic_export.targets.gguf.writer"): _HEAVY,
    ("mosaic_export.targets.onnx.target", "mosaic_export.targets.onnx.writer"): _HEAVY,
    ("mosaic_export.targets.gguf.target", "mosaic_export.targets.gguf.runner"): _CHILD,
    ("mosaic_export.targets.onnx.target", "mosaic_export.targets.onnx.runner"): _CHILD,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "mosaic_export").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    for path in sorted((ROOT / "targets").rglob("*.py")):
        parts = ("mosaic_export", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imported(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:
        base = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    found = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    return found or ([source] if source in MODULES else [])


def _imports(node: ast.AST, in_function: bool = False):
    """(import statement, inside a function) for every import under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function
        yield from _imports(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))


def _edges() -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import of the project's own modules."""
    edges = []
    for module, path in MODULES.items():
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            edges += [(module, t, in_function) for t in _imported(node, module, path.name == "__init__.py")]
    return edges


def layer(module: str) -> int:
    """A module's layer; the package itself (its __init__ and __main__) is above every layer."""
    parts = module.split(".")
    if len(parts) < 3 and parts[-1] not in LAYERS:
        return len(LAYERS)
    return LAYERS.index(parts[1])


def test_every_module_is_in_a_layer():
    stray = [m for m in MODULES if m not in ("mosaic_export", "mosaic_export.__main__")
             and m.split(".")[1] not in LAYERS]
    assert stray == []


def test_imports_only_go_down():
    upward = [f"{a} -> {b}" for a, b, _ in _edges() if layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _ in _edges():
        if a != b and not (MODULES[a].name == "__init__.py" and b.startswith(a + ".")):
            graph[a].add(b)
    # a package's __init__ importing its own submodules is no cycle unless one of them imports it back
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_project_imports_are_at_the_top_except_the_listed_ones():
    lazy = sorted({(a, b) for a, b, inside in _edges() if inside})
    assert [e for e in lazy if e not in LAZY] == []
    assert [e for e in LAZY if e not in lazy] == [], "a listed lazy import is gone: take it off LAZY"
