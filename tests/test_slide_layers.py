"""The imports of the whole-slide side obey its layers (read from the source, imports inside functions included).

engine.runtime      the Fabric factory, Runtime, the inference loop      (no model, no slides)
features            the slide feature file                               (errors, report.io, version)
slides | mil        extraction and slide I/O | aggregators and training  (never each other)
heatmaps            MIL tile scores over slides                          (the one module joining both)
cli                 flags in, one library call out
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pathotune"

# package (or module) -> pathotune modules it must never import, at any depth of the module
FORBIDDEN = {
    "features": ("slides", "mil", "engine", "heatmaps", "cli", "model", "bundle", "data"),
    "slides": ("mil", "heatmaps", "cli"),
    "mil": ("slides", "heatmaps", "cli"),
    "engine": ("slides", "mil", "features", "heatmaps", "cli"),
    "engine/runtime.py": ("model", "bundle", "data", "backbones", "prompts"),
}
# The function-level imports these packages keep, each for the reason given beside it in the source.
LAZY = {
    ("slides/reader.py", "tifffile"),
    ("slides/reader.py", "tiffslide"),
    ("engine/runtime.py", "lightning_fabric"),
}


def modules(target: str) -> list[Path]:
    path = SRC / target
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


def imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, imported inside a function) for every import in ``path``."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]  # a module's (or __init__'s) package
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = list(package[: len(package) - (child.level - 1)])
                    name = ".".join(base + ([child.module] if child.module else []))
                    names = [name] if child.module else [f"{name}.{a.name}" for a in child.names]
                else:
                    names = [child.module or ""]
                found.extend((n, nested) for n in names)
            visit(child, inner)

    visit(tree, False)
    return found


@pytest.mark.parametrize("target", sorted(FORBIDDEN))
def test_layers(target: str) -> None:
    bad = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in modules(target)
        for name, _ in imports(path)
        for other in FORBIDDEN[target]
        if name == f"pathotune.{other}" or name.startswith(f"pathotune.{other}.")
    ]
    assert not bad, bad


@pytest.mark.parametrize("target", ["features", "slides", "mil", "heatmaps.py", "engine/runtime.py", "engine/infer.py"])
def test_no_function_level_imports(target: str) -> None:
    bad = [
        f"{path.relative_to(SRC)}: {name}"
        for path in modules(target)
        for name, nested in imports(path)
        if nested and (str(path.relative_to(SRC)), name.split(".")[0]) not in LAZY
    ]
    assert not bad, bad
