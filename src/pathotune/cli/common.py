"""Small pieces shared by command modules: tables, switches, machine-readable output, where inference runs."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from ..engine.config import PRECISION_HELP, check_precision
from ..errors import ConfigError
from ..report import to_jsonable

console = Console()
UNBOUNDED = 100_000  # columns a table may take when measured for a pipe

# --precision of every command that runs a model: one help text, one default (engine.config.DEFAULT_PRECISION;
# train's comes from its config field, which carries the same two).
PrecisionOpt = Annotated[str, typer.Option(help=PRECISION_HELP)]


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
        table.add_column(c, overflow="fold")  # never an ellipsis: a cut name cannot be copied back
    for r in rows:
        table.add_row(*[fmt(r.get(c)) for c in columns])
    if console.is_terminal:
        console.print(table)
    else:  # piped or logged: as wide as the table needs, so no cell wraps or folds (80 columns otherwise)
        natural = Measurement.get(console, console.options.update_width(UNBOUNDED), table).maximum
        wide = Console(file=console.file, width=max(console.width, natural), no_color=console.no_color)
        wide.print(table)


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
        if v["mean"] is None:
            return "undefined"
        return f"{v['mean']:.4f} ± {v['std']:.4f}"
    return str(v)


@contextlib.contextmanager
def human_output(json_mode: bool) -> Iterator[None]:
    """With ``--json``, whatever a command prints for people goes to stderr, so stdout holds the JSON alone."""
    if not json_mode:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_json(obj: Any) -> None:
    """``obj`` as one JSON document on stdout (numpy values converted, NaN and infinities as null)."""
    sys.stdout.write(json.dumps(_finite(to_jsonable(obj)), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def parse_devices(devices: str) -> int | str:
    """``--devices``: a count (``2``, ``-1`` for all) or Fabric's own spellings (``auto``, ``0,1``)."""
    text = devices.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def inference_runtime(accelerator: str, devices: str, precision: str) -> Any:
    """The Runtime ``eval`` and ``predict`` run on: core's one Fabric factory, as training uses it."""
    from ..core.runtime import Runtime, make_fabric

    try:
        check_precision(precision)
    except ValueError as e:
        raise ConfigError(f"--precision '{precision}': {e}") from None
    return Runtime.of(make_fabric(accelerator, parse_devices(devices), "auto", precision))


def cohort_exit(rows: list[dict], out: Any, errors_name: str = "errors.csv") -> int | None:
    """After a per-slide command: None when every slide succeeded, else the closing line on stderr and exit code 3
    (some slides failed; they are listed in ``errors.csv`` and a rerun retries only those)."""
    failed = [r for r in rows if r.get("status") == "failed"]
    if not failed:
        return None
    from ..cohort import PARTIAL_EXIT

    first = failed[0]
    print(
        f"warning: {len(failed)} of {len(rows)} slide(s) failed (first: {first.get('slide_id')}: "
        f"{first.get('reason')}); all are listed in {out}/{errors_name}; fix them and rerun the same command to "
        "retry only those",
        file=sys.stderr,
    )
    return PARTIAL_EXIT
