"""Every output folder is a record: the one rule all of PathoTune's writers follow.

A record is a folder that one command made: a training run, a MIL run, a folder of slide features, tile plans,
heat maps, a viewer export, a benchmark's runs. ``.pathotune-record.json`` inside it says which kind, what
request made it and with which version. The rule, the same for every kind:

- a folder that holds a record is refused unless ``--overwrite`` (an incremental kind may continue its own
  request: a rerun of ``slides extract`` with the same model and tiles adds the slides it lacks);
- a replacement is built in a hidden staging folder inside the target and swapped in only once it is complete,
  so nothing new appears in the target before the swap and the old record is whole until then;
- the swap moves every entry the old record owns aside and the new ones in under a journal, with SIGINT and
  SIGTERM held back; if the process dies mid-swap anyway (``kill -9``, power), the next command that opens the
  folder finds the journal and rolls the old record back whole (:func:`recover`);
- generations never mix: the old record's entries all leave, whatever the new one writes.

Files in the target that no record kind owns (a user's notes) stay where they are. Staging, trash and journal
live inside the target, never beside it, so the swap never crosses a file-system boundary (``--out`` may be a
mount point).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, OutputError, describe_os_error, write_error
from .report.io import atomic_write_json
from .version import __version__

__all__ = [
    "KINDS",
    "MARKER",
    "STAGING",
    "Kind",
    "check_out_usable",
    "claim_file",
    "incremental",
    "mark_file",
    "held_signals",
    "kind_of",
    "owned_entries",
    "read_marker",
    "recover",
    "register_kind",
    "staged",
    "swap_in",
    "write_marker",
]

MARKER = ".pathotune-record.json"
STAGING = ".pathotune-staging"  # a fixed name, so every rank of a multi-process run builds in the same place
TRASH = ".pathotune-replaced"
JOURNAL = ".pathotune-swap.json"
FORMAT = "pathotune-record"
_HIDDEN_OF_RECORDS = frozenset({MARKER, STAGING, TRASH, JOURNAL})


@dataclass(frozen=True)
class Kind:
    """A kind of record: what it is called, which entry names of its folder it owns, and how a folder written
    before markers existed is recognised (``signature``)."""

    name: str
    title: str
    owns: Callable[[str], bool]
    signature: Callable[[Path], bool] = lambda folder: False
    incremental: bool = False  # a rerun with the same request continues it (per-slide outputs)


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    KINDS[kind.name] = kind
    return kind


def _names(*names: str, patterns: tuple[str, ...] = ()) -> Callable[[str], bool]:
    fixed = frozenset(names)
    compiled = [re.compile(p) for p in patterns]
    return lambda name: name in fixed or any(c.fullmatch(name) for c in compiled)


def _has(*names: str) -> Callable[[Path], bool]:
    return lambda folder: any((folder / n).exists() for n in names)


def _glob(*patterns: str) -> Callable[[Path], bool]:
    return lambda folder: any(next(folder.glob(p), None) is not None for p in patterns)


register_kind(
    Kind(
        "train",
        "a training run",
        _names(
            "config.yaml",
            "metrics.json",
            "report.md",
            "log.csv",
            "predictions.csv",
            "bad_files.csv",
            "bundle",
            "checkpoints",
            "figures",
            "eval",
            "logs",
            patterns=(r"seed_\d+",),
        ),
        lambda f: (
            (f / "metrics.json").is_file()
            and not _glob("fold_*/model.json")(f)
            or (f / "checkpoints" / "last.pt").is_file()
            or (f / "bundle").is_dir()
        ),
    )
)
register_kind(
    Kind(
        "mil",
        "a slide-level MIL run",
        _names(
            "config.yaml",
            "metrics.json",
            "report.md",
            "oof_predictions.csv",
            "confusion_matrix.png",
            "logs",
            patterns=(r"fold_.+",),
        ),
        _glob("fold_*/model.json"),
    )
)
register_kind(
    Kind(
        "features",
        "slide features",
        _names("extract_log.csv", "errors.csv", patterns=(r".+\.h5", r"extract_log\.rank\d+\.csv", r"\..+\.partial")),
        _has("extract_log.csv"),
        incremental=True,
    )
)
register_kind(
    Kind(
        "tiles",
        "slide tile plans",
        _names(
            "tiles_summary.csv",
            "errors.csv",
            patterns=(r".+_(qc\.png|tiles\.csv|patches\.h5|tissue\.geojson|(pen|blur|fold)\.(geojson|png))",),
        ),
        _has("tiles_summary.csv"),
        incremental=True,
    )
)
register_kind(
    Kind(
        "heatmaps",
        "slide heat maps",
        _names("errors.csv", "heatmaps.csv", patterns=(r".+\.png", r".+\.geojson")),
        _has("heatmaps.csv"),
        incremental=True,
    )
)


# -- the marker -----------------------------------------------------------------------------------------------
def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record marker of ``folder``, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def write_marker(folder: str | os.PathLike[str], kind: str, request: Mapping[str, Any] | None = None) -> Path:
    """Mark ``folder`` as a record of ``kind`` made by ``request`` (JSON-ready values), atomically."""
    body = {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        "pathotune_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request": dict(request or {}),
    }
    return atomic_write_json(Path(folder) / MARKER, body)


def kind_of(folder: str | os.PathLike[str]) -> Kind | None:
    """The kind of record ``folder`` holds: from its marker, else recognised by what it contains; None when it
    holds none (absent, empty, or only files no record owns)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marker = read_marker(folder)
    if marker is not None and marker.get("kind") in KINDS:
        return KINDS[str(marker["kind"])]
    for kind in KINDS.values():
        if kind.signature(folder):
            return kind
    return None


def owned_entries(folder: Path, kind: Kind | None) -> list[str]:
    """The entries of ``folder`` that belong to its record (its marker included), sorted."""
    if kind is None or not folder.is_dir():
        return []
    return sorted(
        e.name for e in folder.iterdir() if e.name == MARKER or (e.name not in _HIDDEN_OF_RECORDS and kind.owns(e.name))
    )


# -- signals and the journaled swap ---------------------------------------------------------------------------
@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (delivered after it), so a swap is never cut in half by Ctrl-C."""
    signals = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    except (AttributeError, ValueError, OSError):  # not the main thread's business, or no signal masks here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def recover(out: str | os.PathLike[str]) -> str | None:
    """Finish what an interrupted swap left in ``out``: with a journal, roll the old record back whole and drop
    the half-moved new one; without, remove a leftover trash folder. Returns a note when something was done."""
    out = Path(out)
    journal = out / JOURNAL
    if not journal.exists():
        if (out / TRASH).exists():
            shutil.rmtree(out / TRASH, ignore_errors=True)
        return None
    try:
        plan = json.loads(journal.read_text(encoding="utf-8"))
        old, new = list(plan["old"]), list(plan["new"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(
            f"{journal} records an interrupted replacement but is unreadable ({e}); the old record's entries are "
            f"in {out / TRASH}: move them back by hand, then delete the journal"
        ) from None
    trash, staging = out / TRASH, out / STAGING
    try:
        with held_signals():
            for name in new:  # a new entry no longer in staging was moved in: back it goes
                if (out / name).exists() and not (staging / name).exists():
                    _move(out / name, staging / name)
            for name in old:
                if (trash / name).exists() or (trash / name).is_symlink():
                    _move(trash / name, out / name)
            journal.unlink()
    except OSError as e:
        raise OutputError(
            f"could not restore the previous record in {out} after an interrupted replacement "
            f"({describe_os_error(e)}); its entries are in {trash}"
        ) from e
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)
    return f"note: {out} held a replacement interrupted mid-swap; the previous record was restored whole"


def swap_in(out: Path, staging: Path, kind: Kind | None) -> None:
    """Move the record ``out`` holds aside and ``staging``'s entries in, under a journal and with Ctrl-C held
    back; then delete the old entries. On an OSError the old record is put back and the error names both."""
    old_kind = kind_of(out) or kind
    old = owned_entries(out, old_kind)
    if kind is not None and old_kind is not None and old_kind is not kind:
        old = sorted(set(old) | set(owned_entries(out, kind)))
    new = sorted(e.name for e in staging.iterdir())
    trash, journal = out / TRASH, out / JOURNAL
    try:
        with held_signals():
            shutil.rmtree(trash, ignore_errors=True)
            atomic_write_json(journal, {"old": old, "new": new})
            trash.mkdir()
            for name in old:
                _move(out / name, trash / name)
            for name in new:
                if (out / name).exists():  # a user's file of the same name as a new output: kept aside too
                    _move(out / name, trash / name)
                    old.append(name)
                    atomic_write_json(journal, {"old": old, "new": new})
                _move(staging / name, out / name)
            journal.unlink()
    except OSError as e:
        with contextlib.suppress(OutputError):
            recover(out)
        raise OutputError(
            f"could not swap the new record into {out} ({describe_os_error(e)}); the previous record is unchanged"
        ) from e
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


# -- using a folder -------------------------------------------------------------------------------------------
def check_out_usable(out: str | os.PathLike[str], shown: str | os.PathLike[str] | None = None) -> None:
    """Fail on one line, before any work, when ``out`` cannot be a writable folder (``shown``: the path to name)."""
    out = Path(out)
    shown = shown or out
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {shown} is a file, not a folder; pass a folder path")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"--out {shown} lies under {probe}, which is a file; pass another path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable"
        raise OutputError(f"--out {shown} cannot be written: {probe} {why}; pass a writable folder")


def _contents(out: Path, kind: Kind) -> str:
    names = [n + ("/" if (out / n).is_dir() else "") for n in owned_entries(out, kind) if n != MARKER]
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def refuse_existing(out: Path, kind: Kind, overwrite: bool, what: str = "") -> Kind | None:
    """The kind of record ``out`` holds, after refusing it (one line) unless ``overwrite``. None: nothing held."""
    held = kind_of(out)
    if held is None or not owned_entries(out, held):
        return None
    if not overwrite:
        other = "" if held is kind else f" ({held.title}, not {kind.title})"
        raise ConfigError(
            f"{out} already holds {held.title}{other}: {_contents(out, held)}; it is kept as a record: pass another "
            f"--out, or --overwrite to replace it once the new {what or kind.title} is complete"
        )
    return held


@contextlib.contextmanager
def staged(
    out: str | os.PathLike[str],
    kind: str,
    overwrite: bool,
    request: Mapping[str, Any] | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Iterator[Path]:
    """Build a whole record of ``kind`` in a staging folder inside ``out`` and swap it in when the block ends.

    An existing record is refused unless ``overwrite``; a failed or interrupted build is deleted and whatever
    ``out`` held is untouched. ``is_main``/``barrier``: with several processes, only the main one prepares and
    swaps, after every rank passed the barrier.
    """
    target = KINDS[kind]
    out = Path(out)
    check_out_usable(out)
    if is_main:
        note = recover(out)
        if note:
            print(note)
    refuse_existing(out, target, overwrite)
    staging = out / STAGING
    if is_main:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            write_marker(staging, kind, request)
        except OSError as e:
            raise write_error(staging, e) from e
    barrier()
    try:
        yield staging
        barrier()
        if is_main:
            swap_in(out, staging, target)
    except BaseException:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                if out.is_dir() and not any(out.iterdir()):
                    out.rmdir()  # created only to hold the staging folder
        raise


def _same_request(marker: Mapping[str, Any] | None, request: Mapping[str, Any] | None) -> bool:
    if marker is None or request is None:
        return True  # a folder from before markers, or a kind that checks each output itself
    return json.loads(json.dumps(marker.get("request") or {}, default=str)) == json.loads(
        json.dumps(dict(request), default=str)
    )


@contextlib.contextmanager
def incremental(
    out: str | os.PathLike[str],
    kind: str,
    overwrite: bool,
    request: Mapping[str, Any] | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Iterator[Path]:
    """The folder a per-slide command writes into, and what happens to it at the end.

    ``out`` itself when it is new or holds this kind's record made by the same ``request`` (a rerun continues it:
    finished slides stay, the others are done now); with ``overwrite`` over an existing record, a staging folder
    that is swapped in once the block ends, so the old record stays whole until then. Another request's or
    another command's record is refused without ``overwrite``. ``request`` None: the command checks each of its
    outputs itself (``slides extract`` compares every feature file's attributes).
    """
    target = KINDS[kind]
    out = Path(out)
    check_out_usable(out)
    if is_main and out.is_dir():
        note = recover(out)
        if note:
            print(note)
    barrier()
    held = kind_of(out)
    owned = owned_entries(out, held)
    if held is not None and owned and not overwrite:
        marker = read_marker(out)
        if held is not target or not _same_request(marker, request):
            why = f" made by another request ({_request_diff(marker, request)})" if held is target else ""
            raise ConfigError(
                f"{out} already holds {held.title}{why}: {_contents(out, held)}; it is kept as a record: pass "
                f"another --out, or --overwrite to replace it once the new {target.title} are complete"
            )
    staging = out / STAGING
    workdir = staging if overwrite and held is not None and owned else out
    if is_main and workdir == staging:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as e:
            raise write_error(staging, e) from e
    barrier()

    def mark() -> None:  # a folder that exists now is a record of this kind, finished or not
        if is_main and workdir.is_dir() and read_marker(workdir) is None:
            write_marker(workdir, kind, request)

    try:
        yield workdir
        barrier()
        mark()
        if is_main and workdir == staging:
            swap_in(out, staging, target)
    except BaseException:
        if is_main and workdir == staging:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            with contextlib.suppress(OutputError):
                mark()
        raise


def _request_diff(marker: Mapping[str, Any] | None, request: Mapping[str, Any] | None) -> str:
    old = dict((marker or {}).get("request") or {})
    new = json.loads(json.dumps(dict(request or {}), default=str))
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3]) + ("; ..." if len(keys) > 3 else "")


# -- one file as a record (a predictions CSV) -------------------------------------------------------------------
def sidecar(path: str | os.PathLike[str]) -> Path:
    """The hidden marker beside an output file: what made it."""
    path = Path(path)
    return path.parent / f".{path.name}.pathotune-record.json"


def claim_file(path: str | os.PathLike[str], kind: str, request: Mapping[str, Any], overwrite: bool) -> bool:
    """Whether ``path`` holds this request's earlier output, to be continued (True), or may be written afresh
    (False: absent, or ``overwrite``). A file another request made, or that no record describes, is refused."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise OutputError(f"--out {path} is a folder, not a file; pass a file path such as {path / 'out.csv'}")
    if not path.exists() or overwrite:
        return False
    marker = read_marker_file(sidecar(path))
    if marker is not None and marker.get("kind") == kind and _same_request(marker, request):
        return True
    why = f" made by another request ({_request_diff(marker, request)})" if marker else ""
    raise ConfigError(
        f"{path} already exists{why}; it is kept as a record: pass another --out, or --overwrite to replace it"
    )


def read_marker_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def mark_file(path: str | os.PathLike[str], kind: str, request: Mapping[str, Any]) -> None:
    """Record what made the output file ``path`` (its hidden sidecar marker)."""
    body = {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        "pathotune_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request": dict(request),
    }
    atomic_write_json(sidecar(path), body)
