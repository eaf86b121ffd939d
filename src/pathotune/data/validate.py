"""Check a whole source before training: one bad tile should fail in seconds up front, not hours in.

:func:`scan` opens every image (``verify`` for structure, then a full decode, which is what catches
truncated files), bounds-checks HDF5 references, and reports classes that cannot be learnt.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .dataset import READ_ERRORS, to_rgb
from .sources import H5Ref, PatchSource

PROBLEM_KINDS = ("missing", "unreadable", "corrupt", "truncated")


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

    @property
    def ok(self) -> bool:
        return not (self.bad or self.empty_classes or self.unseen)

    def summary(self) -> str:
        """One line for logs and error messages: counts per problem kind and what to do."""
        if self.ok:
            return f"{self.origin}: {self.checked} images checked, no problems"
        parts: list[str] = []
        advice: list[str] = []
        if self.bad:
            kinds = Counter(b.kind for b in self.bad)
            detail = ", ".join(f"{kinds[k]} {k}" for k in PROBLEM_KINDS if kinds[k])
            first = self.bad[0]
            parts.append(f"{len(self.bad)} of {self.checked} images bad ({detail}; first: {first.key})")
            advice.append("fix or remove the bad files, or skip them with skip_bad")
        if self.empty_classes:
            parts.append(
                f"{len(self.empty_classes)} class(es) without training images ({', '.join(self.empty_classes)})"
            )
        if self.unseen:
            seen = "; ".join(f"{split}: {', '.join(names)}" for split, names in self.unseen.items())
            parts.append(f"labels not seen in train ({seen})")
        if self.empty_classes or self.unseen:
            advice.append("add training images for those classes or remove them from the data")
        return f"{self.origin}: {', '.join(parts)}; {' and '.join(advice)}"

    def lines(self) -> list[str]:
        """One line per problem, for a full listing (the summary names only the first bad file)."""
        out = [f"{b.kind}: {b.key} ({b.detail})" for b in self.bad]
        out += [f"empty class: {c} has no training images" for c in self.empty_classes]
        out += [f"unseen label: {split} has {c}, which train lacks" for split, cs in self.unseen.items() for c in cs]
        return out

    def apply(self, source: PatchSource, skip_bad: bool = False) -> tuple[PatchSource, int]:
        """Raise DataError with the summary, or (skip_bad) return the source without bad files and the count.

        Skipping files cannot give a class training images, so empty classes raise either way.
        """
        if self.ok:
            return source, 0
        if not skip_bad:
            raise DataError(self.summary())
        cleaned = source.without(b.key for b in self.bad)
        rest = ScanReport(self.origin, self.checked, [], cleaned.empty_classes(), cleaned.unseen_labels())
        if not rest.ok:
            raise DataError(rest.summary())
        return cleaned, len(source) - len(cleaned)


def _kind(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, UnidentifiedImageError | PermissionError | IsADirectoryError):
        return "unreadable"
    if isinstance(e, EOFError) or "truncat" in str(e).lower():
        return "truncated"
    return "corrupt"


def _detail(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_image(path: Path) -> BadFile | None:
    """None when the file opens, verifies, decodes fully and converts to RGB; otherwise what is wrong."""
    if not path.exists():
        return BadFile(path, "missing", "no such file")
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums, without decoding
        with Image.open(path) as im:
            im.load()  # full decode: the only way to notice a truncated TIFF or BMP
            to_rgb(im)
    except READ_ERRORS as e:
        return BadFile(path, _kind(e), _detail(e))
    return None


def check_h5(file: Path, dataset: str, refs: list[H5Ref]) -> list[BadFile]:
    """Open the file once, check the dataset exists, is readable, and every index is in bounds."""
    import h5py

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
        return [BadFile(r, _kind(e), _detail(e)) for r in refs]
    return [BadFile(r, "corrupt", f"index outside 0..{n - 1}") for r in refs if not 0 <= r.index < n]


def scan(source: PatchSource, progress: bool = False, workers: int | None = None) -> ScanReport:
    """Check every sample of every split; a thread pool overlaps file I/O and the C decoders."""
    from tqdm.auto import tqdm

    keys = list(dict.fromkeys(s.path_or_key for s in source.all_samples()))
    paths = [k for k in keys if not isinstance(k, H5Ref)]
    groups: dict[tuple[Path, str], list[H5Ref]] = defaultdict(list)
    for k in keys:
        if isinstance(k, H5Ref):
            groups[(k.file, k.dataset)].append(k)
    bad: list[BadFile] = []
    n_workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with (
        tqdm(total=len(keys), desc="scanning images", unit="img", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=n_workers) as pool,
    ):
        for result in pool.map(check_image, paths):
            bar.update(1)
            if result is not None:
                bad.append(result)
        for (file, dataset), refs in groups.items():
            bad.extend(check_h5(file, dataset, refs))
            bar.update(len(refs))
    bad.sort(key=lambda b: str(b.key))
    return ScanReport(source.origin, len(keys), bad, source.empty_classes(), source.unseen_labels())


def check_source(source: PatchSource, skip_bad: bool = False, progress: bool = False) -> tuple[PatchSource, int]:
    """scan + apply in one call: the usable source and how many samples were skipped."""
    return scan(source, progress=progress).apply(source, skip_bad=skip_bad)
