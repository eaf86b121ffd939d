"""Markdown run reports: one human-readable page per run that links its figures and pins its config."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from .io import atomic_write_text

DASH = "–"


def trainable_percent(trainable: int, total: int) -> float:
    """Trainable parameters as a percentage of all the model's parameters (backbone, prompts and head together).

    The one definition: metrics.json stores it raw as ``trainable_percent``; wherever it is shown it goes through
    :func:`format_percent`.
    """
    return 100.0 * float(trainable) / float(total) if total else 0.0


def format_percent(percent: float) -> str:
    """A percentage as shown in reports and on the console: two decimals, e.g. ``1.51 %``."""
    return f"{percent:.2f} %"


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def format_cell(value: Any, floatfmt: str = ".3f") -> str:
    """One table cell: None/NaN as a dash, ints with separators, floats, mean ± std, [low, high] pairs."""
    if value is None:
        return DASH
    if isinstance(value, Mapping) and "mean" in value and "std" in value:
        if value["mean"] is None:
            return DASH
        return f"{format_cell(value['mean'], floatfmt)} ± {format_cell(value['std'], floatfmt)}"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return f"{int(value):,}"
    if isinstance(value, Real):
        number = float(value)
        return DASH if math.isnan(number) else format(number, floatfmt)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(v is None or _is_number(v) for v in value):
        if value[0] is None and value[1] is None:
            return DASH
        return f"[{format_cell(value[0], floatfmt)}, {format_cell(value[1], floatfmt)}]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _numeric_column(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    """Right-align a column when every filled cell is a number or a mean ± std summary."""
    filled = [row.get(column) for row in rows if row.get(column) is not None]
    return bool(filled) and all(
        _is_number(v) or (isinstance(v, Mapping) and "mean" in v and "std" in v) for v in filled
    )


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".3f"
) -> str:
    """A GitHub-flavoured table (no trailing newline); columns default to keys in first-seen order."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    if not columns:
        return ""
    header = "| " + " | ".join(format_cell(str(c)) for c in columns) + " |"
    rule = "|" + "|".join("---:" if _numeric_column(rows, c) else "---" for c in columns) + "|"
    body = ["| " + " | ".join(format_cell(row.get(c), floatfmt) for c in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def format_params(n: float | None) -> str:
    """Parameter counts at three significant digits: '1.23 M', '45.6 K', '812'."""
    if n is None:
        return DASH
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 999.5:
        return f"{sign}{value:.0f}"
    for scale, unit in ((1e3, "K"), (1e6, "M"), (1e9, "B"), (1e12, "T")):
        rounded = float(f"{value / scale:.3g}")
        if rounded < 1000 or unit == "T":
            decimals = 2 if rounded < 10 else 1 if rounded < 100 else 0
            return f"{sign}{rounded:.{decimals}f} {unit}"
    raise AssertionError("unreachable: the last unit always returns")


def check_section(path: Path, key: str) -> str:
    """The text of ``path`` (a new page's title when absent), once its ``key`` section markers are sound: both or
    neither, each once, start before end. Anything else (a hand edit) raises OutputError naming the fix."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.is_file() else f"# {path.stem.title()}\n"
    if (start in text) != (end in text):
        lost = start if end in text else end
        raise OutputError(f"{path}: the marker {lost} is missing; put it back around the old section and rerun")
    for marker in (start, end):
        if text.count(marker) > 1:
            raise OutputError(
                f"{path}: the marker {marker} appears {text.count(marker)} times; keep one pair and rerun"
            )
    if start in text and text.index(end) < text.index(start):
        raise OutputError(f"{path}: the marker {end} comes before {start}; put them in order and rerun")
    return text


def merge_section(path: Path, key: str, section: str) -> None:
    """Write ``section`` into the markdown file ``path`` between ``<!-- key:start -->`` and ``<!-- key:end -->``,
    replacing what was there and keeping everything else (appended when absent). Markers that lost their pair,
    repeat or come out of order (a hand edit) are refused, file untouched, rather than written a second time."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = check_section(path, key)
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
