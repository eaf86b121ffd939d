"""Check a whole source before training: one bad tile should fail in seconds up front, not hours in.

:func:`scan` opens every image (``verify`` for structure, then a full decode, which is what catches
truncated files), bounds-checks HDF5 references, and reports classes that cannot be learnt. It also hashes
every image file, so the same image listed twice (by path, or as a byte-for-byte copy) is caught: copies in one
split with one label are dropped with a warning (they would count twice), while a file in two splits (a leak
from training into evaluation) or under two labels stops the run, naming the files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, one_line
from ..files import file_problem
from ..report import progress_bar
from .images import READ_ERRORS, to_rgb
from .types import SPLITS, H5Ref, PatchSource, Sample

PROBLEM_KINDS = ("missing", "unreadable", "corrupt", "truncated")
SHOWN_BAD = 3  # bad files named in the one-line summary; the rest are counted (and listed in bad_files.csv)


@dataclass(frozen=True)
class BadFile:
    """One sample that cannot be read; ``kind`` is one of :data:`PROBLEM_KINDS`."""

    key: Path | H5Ref
    kind: str
    detail: str


@dataclass
class ScanReport:
    """What :func:`scan` found; ``apply`` turns it into an error or a cleaned source."""

    origin: str
    checked: int
    bad: list[BadFile] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    unseen: dict[str, list[str]] = field(default_factory=dict)
    # Groups of samples that are one image (the same path, or files with identical bytes):
    leaks: list[list[Sample]] = field(default_factory=list)  # across splits
    conflicts: list[list[Sample]] = field(default_factory=list)  # one split, several labels
    duplicates: list[list[Sample]] = field(default_factory=list)  # one split, one label: safe to drop
    classes: list[str] = field(default_factory=list)  # class names, for messages
    listing: Path | None = None  # where every bad file is listed (a run's bad_files.csv), named in the summary

    @property
    def ok(self) -> bool:
        return not (self.blocking or self.duplicates)

    @property
    def blocking(self) -> bool:
        """Problems that stop a run unless skip_bad (duplicates alone are dropped with a warning)."""
        return bool(self.bad or self.empty_classes or self.unseen or self.leaks or self.conflicts)

    def summary(self) -> str:
        """One line for logs and error messages: counts per problem kind and what to do."""
        if self.ok:
            return f"{self.origin}: {self.checked} images checked, no problems"
        parts: list[str] = []
        advice: list[str] = []
        if self.bad:
            kinds = Counter(b.kind for b in self.bad)
            detail = ", ".join(f"{kinds[k]} {k}" for k in PROBLEM_KINDS if kinds[k])
            shown = ", ".join(str(b.key) for b in self.bad[:SHOWN_BAD])
            shown = f"{shown} ({self.bad[0].detail[:120]}{'...' if len(self.bad[0].detail) > 120 else ''} first)"
            more = len(self.bad) - SHOWN_BAD
            if more > 0:
                shown += f" and {more} more"
            where = f"; all listed in {self.listing}" if self.listing is not None else ""
            parts.append(f"{len(self.bad)} of {self.checked} images bad ({detail}: {shown}{where})")
            advice.append("fix or remove the bad files, or skip them with --skip-bad")
        if self.empty_classes:
            parts.append(
                f"{len(self.empty_classes)} class(es) without training images ({', '.join(self.empty_classes)})"
            )
        if self.unseen:
            seen = "; ".join(f"{split}: {', '.join(names)}" for split, names in self.unseen.items())
            parts.append(f"labels not seen in train ({seen})")
        if self.empty_classes or self.unseen:
            advice.append("add training images for those classes or remove them from the data")
        if self.leaks:
            g = self.leaks[0]
            where = " and ".join(f"{s.path_or_key} in {s.split}" for s in g[:2])
            parts.append(f"{len(self.leaks)} image(s) in more than one split, a leak into evaluation (first: {where})")
            advice.append("remove the copies from val/test, or drop them there with --skip-bad")
        if self.conflicts:
            g = self.conflicts[0]
            labels = " and ".join(f"{s.path_or_key} as '{self._name(s.label)}'" for s in g[:2])
            parts.append(f"{len(self.conflicts)} image(s) under more than one label (first: {labels})")
            advice.append("fix their labels, or drop them with --skip-bad")
        if not parts and self.duplicates:
            return self.duplicate_note()
        return f"{self.origin}: {', '.join(parts)}; {' and '.join(advice)}"

    def _name(self, label: int) -> str:
        return self.classes[label] if label < len(self.classes) else str(label)

    def duplicate_note(self) -> str:
        """One line on the duplicates that ``apply`` drops."""
        n = sum(len(g) - 1 for g in self.duplicates)
        first = self.duplicates[0]
        what = "listed twice" if first[0].path_or_key == first[1].path_or_key else f"a copy of {first[0].path_or_key}"
        return (
            f"{self.origin}: dropped {n} duplicate sample(s), so that each image counts once "
            f"(first: {first[1].path_or_key} in {first[1].split}, {what})"
        )

    def bad_files_csv(self) -> str:
        """Every bad file as CSV text: ``path,problem,detail``, one row each, in path order."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "problem", "detail"])
        writer.writerows([str(b.key), b.kind, b.detail] for b in self.bad)
        return buffer.getvalue()

    def lines(self) -> list[str]:
        """One line per problem, for a full listing (the summary names only the first bad file)."""
        out = [f"{b.kind}: {b.key} ({b.detail})" for b in self.bad]
        out += [f"empty class: {c} has no training images" for c in self.empty_classes]
        out += [f"unseen label: {split} has {c}, which train lacks" for split, cs in self.unseen.items() for c in cs]
        for kind, groups in (("leak", self.leaks), ("conflict", self.conflicts), ("duplicate", self.duplicates)):
            for g in groups:
                out.append(f"{kind}: " + ", ".join(f"{s.path_or_key} ({s.split}, {self._name(s.label)})" for s in g))
        return out

    def apply(self, source: PatchSource, skip_bad: bool = False) -> tuple[PatchSource, int]:
        """Raise DataError with the summary, or (skip_bad) return the source without bad files and the count.

        Duplicates (one image listed twice in one split, under one label) are always dropped, with a warning.
        skip_bad also drops unreadable files, the val/test copies of an image that is in an earlier split, and
        images under two labels. Skipping files cannot give a class training images, so empty classes raise
        either way.
        """
        if self.ok:
            return source, 0
        if self.blocking and not skip_bad:
            raise DataError(self.summary())
        drop: set[tuple] = set()
        for g in self.duplicates:
            drop |= {_ident(s) for s in g[1:]}
        if skip_bad:
            bad = {b.key for b in self.bad}
            drop |= {_ident(s) for s in source.all_samples() if s.path_or_key in bad}
            for g in self.leaks:
                first = min(SPLITS.index(s.split) for s in g)
                drop |= {_ident(s) for s in g if SPLITS.index(s.split) != first}
            for g in self.conflicts:
                drop |= {_ident(s) for s in g}
        cleaned = _without(source, drop)
        n_dupes = sum(len(g) - 1 for g in self.duplicates)
        if n_dupes:
            warnings.warn(self.duplicate_note(), stacklevel=3)
        rest = ScanReport(self.origin, self.checked, [], cleaned.empty_classes(), cleaned.unseen_labels())
        if not rest.ok:
            raise DataError(rest.summary())
        return cleaned, len(source) - len(cleaned) - n_dupes


def _ident(s: Sample) -> tuple:
    return (s.path_or_key, s.split, s.label)


def _without(source: PatchSource, drop: set[tuple]) -> PatchSource:
    """A copy without the samples whose (key, split, label) is in ``drop``; a sample repeated exactly counts once."""
    kept: dict[str, list[Sample]] = {}
    for split, items in source.samples.items():
        seen: set[tuple] = set()
        out = []
        for s in items:
            if _ident(s) in drop or _ident(s) in seen:
                continue
            seen.add(_ident(s))
            out.append(s)
        kept[split] = out
    return PatchSource(list(source.classes), kept, source.origin)


def _kind(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, UnidentifiedImageError | PermissionError | IsADirectoryError):
        return "unreadable"
    if isinstance(e, EOFError) or "truncat" in str(e).lower():
        return "truncated"
    return "corrupt"


def check_image(path: Path) -> BadFile | None:
    """None when the file opens, verifies, decodes fully and converts to RGB; otherwise what is wrong."""
    return _check_and_hash(path)[0]


def _check_and_hash(path: Path) -> tuple[BadFile | None, str | None]:
    """What is wrong with the image (or None), and the hash of its bytes (None when it cannot be read)."""
    problem = file_problem(path)
    if problem == "missing":
        return BadFile(path, "missing", "no such file"), None
    if problem is not None:  # a FIFO would block the scan forever, a broken link reads as a vanished file
        return BadFile(path, "unreadable", f"{problem}; replace it with the image file"), None
    try:
        data = path.read_bytes()
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums, without decoding
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: the only way to notice a truncated TIFF or BMP
            to_rgb(im)
    except READ_ERRORS as e:
        return BadFile(path, _kind(e), one_line(e)), None
    return None, digest


@contextmanager
def quiet_native_stderr() -> Iterator:
    """Silence what C decoders (libtiff inside PIL) print straight to file descriptor 2 while reading images.

    That noise only repeats what the scan reports, and it would print before the one-line error. Yields the
    text stream that still reaches the real stderr (for progress bars). A no-op where fd 2 cannot be swapped.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield sys.stderr
        return
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        python_on_fd2 = False  # captured (pytest, a notebook): Python's writes do not go to fd 2
    stream = io.TextIOWrapper(os.fdopen(os.dup(saved), "wb"), line_buffering=True) if python_on_fd2 else sys.stderr
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield stream
    finally:
        try:
            stream.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if stream is not sys.stderr:
                stream.close()


def check_h5(file: Path, dataset: str, refs: list[H5Ref]) -> list[BadFile]:
    """Open the file once, check the dataset exists, is readable, and every index is in bounds."""
    try:
        with h5py.File(file, "r") as f:
            if dataset not in f:
                return [BadFile(r, "corrupt", f"no dataset '{dataset}' in the file") for r in refs]
            ds = f[dataset]
            n = ds.shape[0]
            if n:
                ds[0]  # one read proves the data is reachable, not just the header
    except FileNotFoundError:
        return [BadFile(r, "missing", "no such file") for r in refs]
    except READ_ERRORS as e:
        return [BadFile(r, _kind(e), one_line(e)) for r in refs]
    return [BadFile(r, "corrupt", f"index outside 0..{n - 1}") for r in refs if not 0 <= r.index < n]


def scan(source: PatchSource, progress: bool = False, workers: int | None = None) -> ScanReport:
    """Check every sample of every split; a thread pool overlaps file I/O and the C decoders."""
    keys = list(dict.fromkeys(s.path_or_key for s in source.all_samples()))
    paths = [k for k in keys if not isinstance(k, H5Ref)]
    groups: dict[tuple[Path, str], list[H5Ref]] = defaultdict(list)
    for k in keys:
        if isinstance(k, H5Ref):
            groups[(k.file, k.dataset)].append(k)
    bad: list[BadFile] = []
    digests: dict[Path, str] = {}
    n_workers = workers or min(32, 4 * (os.cpu_count() or 1))
    # Decoder warnings (PIL, tifffile) only repeat what the report says about a file, and would print first.
    tiff_log = logging.getLogger("tifffile")
    tiff_level = tiff_log.level
    tiff_log.setLevel(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            quiet_native_stderr() as stream,
            progress_bar(len(keys), "scanning images", "img", enabled=progress, file=stream) as bar,
            ThreadPoolExecutor(max_workers=n_workers) as pool,
        ):
            warnings.simplefilter("ignore")
            for path, (result, digest) in zip(paths, pool.map(_check_and_hash, paths), strict=True):
                bar.update(1)
                if result is not None:
                    bad.append(result)
                elif digest is not None:
                    digests[path] = digest
            for (file, dataset), refs in groups.items():
                bad.extend(check_h5(file, dataset, refs))
                bar.update(len(refs))
    finally:
        tiff_log.setLevel(tiff_level)
    bad.sort(key=lambda b: str(b.key))
    report = ScanReport(source.origin, len(keys), bad, source.empty_classes(), source.unseen_labels())
    report.leaks, report.conflicts, report.duplicates = same_images(source, digests)
    report.classes = list(source.classes)
    return report


def same_images(source: PatchSource, digests: dict) -> tuple[list, list, list]:
    """Groups of samples that are one image (one path, or identical bytes): (across splits, several labels, copies).

    HDF5 references are compared by reference only (hashing every array of a large h5 would read it all).
    """
    groups: dict[object, list[Sample]] = defaultdict(list)
    for s in source.all_samples():
        groups[digests.get(s.path_or_key, s.path_or_key)].append(s)
    leaks, conflicts, duplicates = [], [], []
    for g in groups.values():
        if len(g) < 2:
            continue
        g = sorted(g, key=lambda s: (SPLITS.index(s.split), str(s.path_or_key)))
        if len({s.split for s in g}) > 1:
            leaks.append(g)
        elif len({s.label for s in g}) > 1:
            conflicts.append(g)
        else:
            duplicates.append(g)

    def first(g: list[Sample]) -> str:
        return str(g[0].path_or_key)

    return sorted(leaks, key=first), sorted(conflicts, key=first), sorted(duplicates, key=first)


def check_source(source: PatchSource, skip_bad: bool = False, progress: bool = False) -> tuple[PatchSource, int]:
    """scan + apply in one call: the usable source and how many samples were skipped."""
    return scan(source, progress=progress).apply(source, skip_bad=skip_bad)
