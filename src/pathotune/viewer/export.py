"""A self-contained viewer folder: Deep Zoom pyramids, overlay data and the page, for ``file://`` or any web host.

The folder holds exactly what the server answers under the same names (:mod:`.app`), so the page cannot tell the
two apart: ``index.html``, ``static/`` (script, style, OpenSeadragon and its licence), ``data/catalog.js``,
``data/slides/<slide_id>.js`` and per slide a standard DZI pyramid, ``slides/<slide_id>.dzi`` with
``slides/<slide_id>_files/<level>/<col>_<row>.jpeg``, which other Deep Zoom viewers open too.

``max_level`` cuts each pyramid at that Deep Zoom level (level L is at most 2^L px on its longer side) and
``quality`` sets the JPEG quality: together they bound the size on disk. The folder is built beside ``out`` and
swapped in only when complete; an existing folder with anything in it is replaced only with ``overwrite``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, OutputError, write_error
from ..report.io import atomic_dir
from ..report.progress import progress_bar
from .catalog import Catalog
from .deepzoom import SlidePyramid, check_quality
from .page import static_dir

__all__ = ["ExportedSlide", "check_export_options", "export_viewer", "folder_bytes"]


@dataclass(frozen=True)
class ExportedSlide:
    slide_id: str
    max_level: int  # the finest Deep Zoom level written
    width: int  # that level's size in pixels
    height: int
    full_level: int  # the slide's full-resolution level
    tiles: int
    bytes: int  # pyramid and overlay data of this slide


def folder_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (what a copy or an upload moves)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_export_options(out: str | Path, max_level: int | None, quality: int, overwrite: bool) -> Path:
    """Refuse bad settings and a non-empty ``out`` (unless ``overwrite``) before any slide is read."""
    check_quality(quality)
    if max_level is not None and max_level < 0:
        raise ConfigError(f"--max-level must be >= 0 (Deep Zoom level L is at most 2^L px wide), got {max_level}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} is not empty; pass --overwrite to replace it, or another --out")
    return out


def _write(path: Path, data: bytes | str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(raw)
    return len(raw)


def export_viewer(
    catalog: Catalog,
    out: str | Path,
    max_level: int | None = None,
    quality: int = 75,
    overwrite: bool = False,
    progress: bool = True,
) -> list[ExportedSlide]:
    """Write the viewer folder for ``catalog``'s slides to ``out`` (see the module doc); one row per slide."""
    out = check_export_options(out, max_level, quality, overwrite)
    tops = {
        sid: min(e.max_level, e.max_level if max_level is None else max_level) for sid, e in catalog.entries.items()
    }
    total = sum(c * r for sid, e in catalog.entries.items() for c, r in e.level_tiles[: tops[sid] + 1])
    rows = []
    try:
        with atomic_dir(out) as tmp, progress_bar(total, "Deep Zoom tiles", "tile", enabled=progress) as bar:
            static = static_dir()
            shutil.copytree(static, tmp / "static", ignore=shutil.ignore_patterns("index.html", "__pycache__"))
            shutil.copy2(static / "index.html", tmp / "index.html")
            _write(tmp / "data" / "catalog.js", catalog.catalog_script(tops))
            for sid, e in catalog.entries.items():
                size = _write(tmp / "data" / "slides" / f"{sid}.js", catalog.slide_script(sid))
                pyr = SlidePyramid(e.source)
                try:
                    size += _write(tmp / "slides" / f"{sid}.dzi", pyr.dzi(tops[sid]))
                    count = 0
                    for level in range(tops[sid] + 1):
                        cols, rows_ = pyr.level_tiles[level]
                        for row in range(rows_):
                            for col in range(cols):
                                data = pyr.tile(level, col, row, quality)
                                size += _write(tmp / "slides" / f"{sid}_files" / str(level) / f"{col}_{row}.jpeg", data)
                                count += 1
                                bar.update(1)
                finally:
                    pyr.close()
                w, h = e.level_dimensions[tops[sid]]
                rows.append(ExportedSlide(sid, tops[sid], w, h, e.max_level, count, size))
    except OSError as err:
        raise write_error(out, err) from err
    return rows
