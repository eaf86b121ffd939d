"""The package's imports obey its layers (docs/ARCHITECTURE.md), read from the source, imports inside functions
included; and nothing outside the CLI imports inside a function, but for the few reasons listed here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pathotune"

# Each unit (a subpackage or a top-level module) imports only units of a lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version", "files"),
    ("hub", "listen"),
    ("report", "backbones", "prompts", "task", "card"),
    ("text", "switches", "features", "records", "cohort"),
    ("core",),  # what any run needs, generic: below every model, data and slide unit, so it cannot reach them
    ("methods",),
    ("model",),
    ("bundle", "data"),
    ("multitask", "inference"),
    ("engine", "slides", "mil", "serve"),  # one layer: MIL, slides and serve use core, never the patch engine
    ("heatmaps",),
    ("viewer",),
    ("cli", "__init__", "__main__"),
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}

# Function-level imports kept on purpose (the reason stands beside each in the source).
LAZY = {
    ("slides/reader.py", "tifffile"),  # the fallback slide backend, only for files OpenSlide cannot read
    ("slides/reader.py", "tiffslide"),
    ("slides/reader.py", "wsidicom"),  # ~0.8 s to import (with pydicom); only DICOM WSI folders need it
    ("slides/reader.py", "pydicom"),
    ("core/runtime.py", "lightning_fabric"),  # ~1 s to import; the feature readers never need it
    ("core/runtime.py", "pytorch_lightning"),  # optional dependency: MLflow logger (--logger mlflow)
    ("core/runtime.py", "wandb"),  # optional dependency: W&B's Fabric logger (--logger wandb)
    ("backbones/bundled.py", "onnx"),  # only to fill the weights cache once
    ("text/encoders.py", "open_clip"),  # optional dependency (the [clip] extra)
    ("data/layouts/hgsc.py", "pyarrow"),  # optional dependency (the [hgsc] extra)
    ("data/layouts/hgsc.py", "shapely"),
    ("data/demo.py", "importlib"),  # a TYPE_CHECKING-only import
    # pathotune.switches loads the prompt kinds (torch): the switches validator imports it when it runs, so that the
    # CLI can build train's flags from the config before it parses (cli/config_flags.py)
    ("engine/config.py", "pathotune"),
    # the package root's public names load on first use (PEP 562); these are its TYPE_CHECKING-only imports
    ("__init__.py", "pathotune"),
}


def unit_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, imported inside a function or conditional block) for every import in ``path``."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.If))
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


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer():
    assert {unit_of(p) for p in SOURCES} <= set(LAYER), sorted({unit_of(p) for p in SOURCES} - set(LAYER))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(SRC)) for p in SOURCES])
def test_imports_point_down_the_layers(path: Path):
    unit = unit_of(path)
    bad = []
    for name, _ in imports(path):
        if not name.startswith("pathotune."):
            continue
        other = name.split(".")[1]
        if other != unit and other in LAYER and LAYER[other] >= LAYER[unit]:
            bad.append(f"{unit} (layer {LAYER[unit]}) imports {other} (layer {LAYER[other]})")
    assert not bad, bad


@pytest.mark.parametrize("path", [p for p in SOURCES if unit_of(p) != "cli"], ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_level_imports(path: Path):
    rel = str(path.relative_to(SRC))
    bad = [name for name, nested in imports(path) if nested and (rel, name.split(".")[0]) not in LAZY]
    assert not bad, f"{rel} imports inside a function: {bad}"


def test_the_command_line_parses_before_loading_torch():
    """`pathotune --help` and `--version` stay fast (under a second): the CLI imports no heavy module until a
    command needs it."""
    import subprocess
    import sys

    heavy = ("torch", "timm", "peft", "transformers", "matplotlib", "lightning_fabric", "h5py", "openslide")
    code = f"import sys, pathotune.cli.main; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
