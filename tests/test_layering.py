"""The package's layers import downwards only: modules -> functional -> ops -> backends -> kernels (Triton launchers,
the torch backend in pykernels/reference/, the compiled extension). docs/adding-an-op.md states the rule; this
test reads every import statement of the package's sources, so a new upward import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer of each top-level part of the package; a module may import its own layer and the layers below it
LAYERS = {
    "pykernels._dtypes": 0,
    "pykernels.triton_kernels": 1,
    "pykernels.reference": 1,
    "pykernels._C": 1,
    "pykernels.backends": 2,
    "pykernels.gemm": 2,
    "pykernels.ops": 3,
    "pykernels.functional": 4,
    "pykernels.modules": 5,
    "pykernels.swap": 6,
    "pykernels.coverage": 7,
    "pykernels.__main__": 7,
    "pykernels": 7,  # the package's __init__: public names
}


def _layer(module: str) -> int:
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    assert best is not None, f"{module}: not in any layer of LAYERS"
    return best[1]


def _sources():
    for path in sorted((ROOT / "pykernels").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield path, ".".join(parts)
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        stem = "" if path.stem == "__init__" else "." + path.stem
        yield path, "pykernels.triton_kernels" + stem


def _imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "pykernels" or (node.level and not node.module):  # from pykernels import x: x is a module
                yield from (f"{name}.{alias.name}" for alias in node.names)
            else:
                yield name


SOURCES = list(_sources())


@pytest.mark.parametrize(("path", "module"), SOURCES, ids=[m for _, m in SOURCES])
def test_imports_go_down_the_layers(path, module):
    own = _layer(module)
    upward = [
        name
        for name in _imports(path, module)
        if (name == "pykernels" or name.startswith("pykernels.")) and _layer(name) > own
    ]
    assert not upward, f"{module} (layer {own}) imports from above: {upward}"


def test_kernels_import_only_torch_triton_and_the_leaf():
    """A Triton kernel module depends on torch, triton, pykernels._dtypes and its package's _common only."""
    for path, module in SOURCES:
        if not module.startswith("pykernels.triton_kernels."):
            continue
        for name in _imports(path, module):
            top = name.split(".")[0]
            ok = top in ("__future__", "math", "torch", "triton", "functools", "itertools", "typing") or name in (
                "pykernels._dtypes",
                "pykernels.triton_kernels._common",
            )
            assert ok, f"{module} imports {name}"
