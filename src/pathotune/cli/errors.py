"""How user errors reach the terminal: one line and exit code 2, unless --debug asks for the traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import PathoTuneError


def run_cli(app: Callable[[], object]) -> None:
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    sys.argv = expand_multi_value(sys.argv, "--seeds")
    try:
        app()
    except PathoTuneError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def expand_multi_value(argv: list[str], flag: str) -> list[str]:
    """Accept ``--seeds 0 1 2`` as well as ``--seeds 0 --seeds 1``: typer options take one value each."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == flag:
            j = i + 1
            values = []
            while j < len(argv) and argv[j].lstrip("-").isdigit() and not argv[j].startswith("--"):
                values.append(argv[j])
                j += 1
            if values:
                out.append(values[0])
                for v in values[1:]:
                    out += [flag, v]
                i = j
                continue
        i += 1
    return out
