"""How user errors reach the terminal: one line and exit code 2, unless --debug asks for the traceback.

Warnings (Python's ``warnings`` and library loggers such as tifffile's) are held back while a command runs and
printed, one line each, only when it succeeds: when it fails, the error line stands alone. ``--debug`` shows
everything as it happens.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable

from ..errors import PathoTuneError, describe_os_error, interrupt_message


class _Held(logging.Handler):
    """Collects library log records of level WARNING and above (shown as one line each on success)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a malformed record must never take the command down
            self.lines.append(f"{record.name}: {record.getMessage()}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def run_cli(app: Callable[[], object]) -> None:
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    sys.argv = expand_multi_value(sys.argv, "--seeds")
    if debug:
        _run(app, debug=True)
        return
    held = _Held()
    root = logging.getLogger()
    root.addHandler(held)
    try:
        with warnings.catch_warnings(record=True) as caught:
            code = _run(app, debug=False)
    finally:
        root.removeHandler(held)
    if code in (None, 0):
        shown = [str(w.message) if w.category is UserWarning else f"{w.category.__name__}: {w.message}" for w in caught]
        lines = shown + held.lines
        for line in dict.fromkeys(_one_line(x) for x in lines):
            print(f"warning: {line}", file=sys.stderr)
    sys.exit(code)


def _run(app: Callable[[], object], debug: bool) -> int | str | None:
    """Run the app; the exit code (None for success). Errors a user can cause become one line and code 2."""
    usage, no_args, aborts = _click_exceptions()
    try:
        result = app(standalone_mode=False)  # click's usage errors come back here instead of a framed panel
        if result == 130:  # click turns Ctrl-C into exit code 130 without a word
            print(interrupt_message(), file=sys.stderr)
        return result if isinstance(result, int) and not isinstance(result, bool) else None
    except no_args as e:
        e.show()
        return e.exit_code
    except usage as e:
        if debug:
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = _one_line(e.format_message()).replace(": Value error, ", ": ")  # typer's Literal check says so
        print(f"error: {message}{hint}", file=sys.stderr)
        return 2
    except aborts:
        print(interrupt_message(), file=sys.stderr)
        return 130
    except SystemExit as e:
        if debug:
            raise
        return e.code
    except PathoTuneError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (a full disk, a read-only folder) rather than a pathotune bug
        if debug:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(
            f"error: could not access{where} ({describe_os_error(e)}); check the path and free space", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(interrupt_message(), file=sys.stderr)
        return 130
    return None


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, no-arguments help, aborts) of click and of the click that newer typer versions vendor."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(__import__(name, fromlist=["ClickException"]))
        except ImportError:
            continue
    usage = tuple(m.ClickException for m in mods)
    no_args = tuple(m.NoArgsIsHelpError for m in mods if hasattr(m, "NoArgsIsHelpError"))
    aborts = tuple(m.Abort for m in mods if hasattr(m, "Abort"))
    try:
        import typer

        aborts += (typer.Abort,)
    except (ImportError, AttributeError):
        pass
    return usage, no_args, aborts


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
