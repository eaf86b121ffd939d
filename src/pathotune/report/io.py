"""Atomic writes, so an interrupted run never leaves a half-written report, figure, JSON file or folder behind.

Files: :func:`atomic_path` (and the ``atomic_write_*`` helpers on top of it). Folders built in one go (demo tiles,
a dataset cache): :func:`atomic_dir`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import write_error


def _default_mode(full: int = 0o666) -> int:
    """Permissions a plain ``open(path, 'w')`` (``full=0o666``) or ``mkdir`` (``0o777``) would give, since
    mkstemp's 0600 and mkdtemp's 0700 would hide shared results."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


_DEFAULT_MODE = _default_mode()
_DEFAULT_DIR_MODE = _default_mode(0o777)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes.

    The temporary file keeps the target's suffix so writers that infer a format from the name still work.
    On any exception it is removed and ``path`` is left as it was. Parent folders are created. An OSError
    (a full disk, a read-only folder) becomes an :class:`~pathotune.errors.OutputError` naming ``path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(target, e) from e
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else _DEFAULT_MODE
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(target, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it becomes ``path`` only if the block finishes.

    Readers never see half a folder. On success whatever is at ``path`` (an older build, an empty folder) is moved
    aside, the new folder is renamed in and the old one deleted; if that rename fails, the old one is put back. On
    any exception the temporary folder is removed and ``path`` is left as it was. The folder gets the permissions a
    plain ``mkdir`` would give. Parent folders are created.

    OSErrors propagate unchanged, so that the caller can say what the folder is for. When another process renamed
    its own folder into ``path`` first, the final rename fails with an OSError and ``path`` holds that folder: a
    caller building a shared cache catches the error and checks whether that folder will do.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    aside: Path | None = None
    try:
        os.chmod(tmp, _DEFAULT_DIR_MODE)
        yield tmp
        if target.exists() or target.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, aside / "old")
        try:
            os.replace(tmp, target)
        except OSError:
            if aside is not None and not (target.exists() or target.is_symlink()):
                with contextlib.suppress(OSError):
                    os.replace(aside / "old", target)
            raise
        tmp = None
    finally:
        for leftover in (tmp, aside):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` all-or-nothing and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` all-or-nothing, byte for byte (no newline translation), and return the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def _key(key: Any) -> Any:
    """JSON object keys must be str/int/float/bool/None; numpy scalars become Python ones, others str."""
    if isinstance(key, np.generic):
        key = key.item()
    return key if key is None or isinstance(key, (str, int, float, bool)) else str(key)


def to_jsonable(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays, tuples, sets and paths into JSON/YAML-safe Python values."""
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (key order kept, numpy values converted) all-or-nothing."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def csv_text(rows: list, header: list[str] | None = None, lineterminator: str = "\r\n") -> str:
    """CSV text from dict rows (columns from ``header``, else the first row's keys) or from list rows under
    ``header``; ``lineterminator`` as Python's csv module takes it (its default ends lines with CRLF)."""
    buf = io.StringIO()
    if rows and isinstance(rows[0], dict):
        fields = list(header or rows[0])
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator=lineterminator)
        w.writeheader()
        w.writerows(rows)
    else:
        w = csv.writer(buf, lineterminator=lineterminator)
        if header is not None:
            w.writerow(header)
        w.writerows(rows)
    return buf.getvalue()


def atomic_write_csv(
    path: str | os.PathLike[str], rows: list, header: list[str] | None = None, lineterminator: str = "\r\n"
) -> Path:
    """:func:`csv_text` written all-or-nothing (the one CSV writer of every output table)."""
    return atomic_write_text(path, csv_text(rows, header, lineterminator))
