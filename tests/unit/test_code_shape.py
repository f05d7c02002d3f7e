"""The code stays readable: no module over 400 lines, no function over 60 lines or 8 parameters
in mosaic_export/ and targets/ (ruff's C901 checks the complexity)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "mosaic_export").rglob("*.py"), *(ROOT / "targets").rglob("*.py")])


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
            if params and params[0].arg in ("self", "cls"):
                params = params[1:]
            yield node, node.end_lineno - node.lineno + 1, len(params)


def test_modules_and_functions_stay_small():
    assert len(SOURCES) > 30
    long_modules, long_functions, many_params = [], [], []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT).as_posix()
        if len(text.splitlines()) > 400:
            long_modules.append(name)
        for node, lines, params in _functions(ast.parse(text)):
            if lines > 60:
                long_functions.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
            if params > 8:
                many_params.append(f"{name}:{node.lineno} {node.name} ({params} parameters)")
    assert long_modules == [] and long_functions == [] and many_params == []


def test_no_target_dispatch_outside_targets():
    """Outside targets/, no code compares a target name: the registry answers for each target."""
    offenders = []
    for path in SOURCES:
        if "targets" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                names = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(n in ("gguf", "onnx") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                    and node.slice.value in ("gguf", "onnx"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
