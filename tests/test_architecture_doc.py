"""docs/ARCHITECTURE.md matches the code: its layer table is the one tests/test_layers.py enforces, and its module
map names every module and subpackage of the source tree."""

from __future__ import annotations

import re
from pathlib import Path

from test_layers import LAYERS, SRC

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def doc_layers() -> list[tuple[str, ...]]:
    """The layer table's rows, lowest layer first: | n | unit, unit | what |."""
    rows = []
    for line in section("Layers").splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]+)\|", line)
        if m:
            units = tuple(u.strip().strip("`").replace("\\_", "_") for u in m.group(2).split(","))
            rows.append((int(m.group(1)), units))
    rows.sort()
    assert [n for n, _ in rows] == list(range(len(rows))), "the table numbers its layers 0, 1, 2... once each"
    return [units for _, units in rows]


def test_the_layer_table_is_the_enforced_one():
    assert doc_layers() == LAYERS


def test_the_module_map_names_every_module_and_subpackage():
    listing = section("Modules")
    units = [p.stem for p in SRC.glob("*.py")] + [p.name + "/" for p in SRC.iterdir() if (p / "__init__.py").is_file()]
    named = [u for u in units if re.search(rf"^\s+{re.escape(u)}(?!\w)", listing, re.M)]
    missing = sorted(set(units) - set(named) - {"__init__", "__main__"})
    assert not missing, f"docs/ARCHITECTURE.md's module map does not name {missing}"
