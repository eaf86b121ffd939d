"""Small pieces shared by command modules."""

from __future__ import annotations

import yaml
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError

console = Console()


def parse_switches(items: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs; values are read as YAML scalars so ``8``, ``true`` and ``0.1`` get their types."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--switch '{item}' is not KEY=VALUE, e.g. --switch tvp_tokens=20")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def print_table(rows: list[dict], title: str | None = None, columns: list[str] | None = None) -> None:
    if not rows:
        console.print("(nothing)")
        return
    columns = columns or list(rows[0])
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[fmt(r.get(c)) for c in columns])
    console.print(table)


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if v and abs(v) < 1e-2 else f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.4f} ± {v['std']:.4f}"
    return str(v)
