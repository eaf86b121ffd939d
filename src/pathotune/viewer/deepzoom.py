"""Deep Zoom pyramids over the project's slide reader, so one tiling path serves every format it opens.

OpenSlide's :class:`openslide.deepzoom.DeepZoomGenerator` does the Deep Zoom arithmetic (levels, tile grid,
overlap, which slide level to read and how far to shrink it) over any object with OpenSlide's slide API.
:class:`ReaderSlide` gives a :class:`~pathotune.slides.reader.SlideReader` that API, so slides opened through
OpenSlide, tiffslide, Pillow or any later backend (DICOM) tile the same way, and nothing here re-derives the
generator's geometry.

:class:`SlidePyramid` is one slide's pyramid with its tiles as JPEG bytes; :class:`PyramidPool` serves the tiles
of a fixed set of slides on demand: a bounded number of slides open at once and an LRU cache of encoded tiles,
so memory stays flat however far a viewer pans.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from ..errors import ConfigError
from ..slides.reader import SlideReader, open_slide

__all__ = [
    "DZ_OVERLAP",
    "DZ_TILE_SIZE",
    "PyramidPool",
    "ReaderSlide",
    "SlidePyramid",
    "SlideSource",
    "TileNotFound",
    "check_quality",
]

# OpenSlide's Deep Zoom defaults: 254 + 2 x 1 overlap = 256 px tiles, the size viewers fetch best.
DZ_TILE_SIZE = 254
DZ_OVERLAP = 1
DZ_FORMAT = "jpeg"
_DOWNSAMPLE_EPS = 1e-9


class TileNotFound(LookupError):
    """A slide id, Deep Zoom level or tile address outside the pyramids served (the server answers 404)."""


class _SlideClosed(RuntimeError):
    """The slide was closed (evicted from the pool) between looking it up and reading it."""


def check_quality(quality: int) -> int:
    if not 1 <= quality <= 95:
        raise ConfigError(f"--quality must lie in 1..95 (JPEG quality), got {quality}")
    return quality


class ReaderSlide:
    """OpenSlide's slide API over a :class:`SlideReader`, as far as ``DeepZoomGenerator`` uses it.

    The reader has already composited transparent pixels on white, so regions come back fully opaque (RGBA,
    since the generator composites on the background colour through the alpha channel) and the background is
    white. ``get_best_level_for_downsample`` keeps OpenSlide's strict rule (the last level not coarser than
    asked) rather than the reader's tolerance, so a tile is never read smaller than its Deep Zoom size.
    """

    properties: Mapping[str, str] = {}
    associated_images: Mapping[str, Image.Image] = {}
    color_profile = None

    def __init__(self, reader: SlideReader) -> None:
        self.reader = reader

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.reader.dimensions

    @property
    def level_count(self) -> int:
        return self.reader.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.reader.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.reader.level_downsamples

    def get_best_level_for_downsample(self, downsample: float) -> int:
        fits = [i for i, ds in enumerate(self.reader.level_downsamples) if ds <= downsample * (1 + _DOWNSAMPLE_EPS)]
        return max(fits, default=0)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        return self.reader.read_region(location, level, size).convert("RGBA")


@dataclass(frozen=True)
class SlideSource:
    """A slide the viewer may show: its id (the only name URLs use), its file and its mpp override."""

    slide_id: str
    path: Path
    mpp: float | None = None


class SlidePyramid:
    """One slide's Deep Zoom pyramid: geometry, the ``.dzi`` descriptor and JPEG tiles.

    Reads go through a lock: tiffslide and Pillow handles are not safe to share between the server's threads.
    """

    def __init__(self, source: SlideSource, reader: SlideReader | None = None) -> None:
        self.source = source
        self.reader = reader if reader is not None else open_slide(source.path, mpp=source.mpp)
        self.generator = DeepZoomGenerator(ReaderSlide(self.reader), DZ_TILE_SIZE, DZ_OVERLAP, limit_bounds=False)
        self.lock = threading.Lock()
        self.closed = False

    @property
    def level_count(self) -> int:
        return self.generator.level_count

    @property
    def max_level(self) -> int:
        return self.generator.level_count - 1

    @property
    def level_tiles(self) -> tuple[tuple[int, int], ...]:
        return self.generator.level_tiles

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.generator.level_dimensions

    def dzi(self, max_level: int | None = None) -> str:
        """The ``.dzi`` XML; with ``max_level`` that of the pyramid cut at that level (an export's)."""
        if max_level is None or max_level >= self.max_level:
            return self.generator.get_dzi(DZ_FORMAT)
        w, h = self.level_dimensions[max_level]
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" TileSize="{DZ_TILE_SIZE}" '
            f'Overlap="{DZ_OVERLAP}" Format="{DZ_FORMAT}"><Size Width="{w}" Height="{h}"/></Image>'
        )

    def check_address(self, level: int, col: int, row: int) -> None:
        if not 0 <= level < self.level_count:
            raise TileNotFound(f"slide '{self.source.slide_id}' has Deep Zoom levels 0..{self.max_level}, not {level}")
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(
                f"slide '{self.source.slide_id}' level {level} has {cols}x{rows} tiles; no tile {col}_{row}"
            )

    def tile(self, level: int, col: int, row: int, quality: int) -> bytes:
        """The JPEG bytes of one Deep Zoom tile; :class:`TileNotFound` outside the pyramid."""
        self.check_address(level, col, row)
        with self.lock:
            if self.closed:
                raise _SlideClosed(self.source.slide_id)
            image = self.generator.get_tile(level, (col, row))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.reader.close()


class PyramidPool:
    """Tiles of a fixed set of slides, made on demand.

    ``sources`` is built once (slide id -> file): a request names a slide by id and nothing else, so no URL part
    ever becomes a path. At most ``max_open`` slides stay open (least recently used closed first), and the
    last ``cache_tiles`` encoded tiles are kept in an LRU cache.
    """

    def __init__(
        self, sources: Mapping[str, SlideSource], quality: int = 75, cache_tiles: int = 1024, max_open: int = 8
    ) -> None:
        if cache_tiles < 0 or max_open < 1:
            raise ConfigError(f"cache_tiles must be >= 0 and max_open >= 1, got {cache_tiles} and {max_open}")
        self.sources = dict(sources)
        self.quality = check_quality(quality)
        self.max_open = max_open
        self._open: OrderedDict[str, SlidePyramid] = OrderedDict()
        self._lock = threading.Lock()
        self.tile = lru_cache(maxsize=cache_tiles)(self._render)

    def pyramid(self, slide_id: str) -> SlidePyramid:
        """The open pyramid of a known slide id; :class:`TileNotFound` for any other id."""
        if slide_id not in self.sources:
            raise TileNotFound(f"no slide '{slide_id}'")
        with self._lock:
            pyr = self._open.get(slide_id)
            if pyr is not None:
                self._open.move_to_end(slide_id)
                return pyr
            pyr = self._open[slide_id] = SlidePyramid(self.sources[slide_id])
            evicted = []
            while len(self._open) > self.max_open:
                evicted.append(self._open.popitem(last=False)[1])
        for old in evicted:
            old.close()
        return pyr

    def dzi(self, slide_id: str) -> str:
        return self.pyramid(slide_id).dzi()

    def _render(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        for _ in range(2):  # a slide closed by eviction between lookup and read is opened again once
            pyr = self.pyramid(slide_id)
            try:
                return pyr.tile(level, col, row, self.quality)
            except _SlideClosed:
                continue
        raise RuntimeError(f"slide '{slide_id}' was closed twice while being read; raise max_open")

    def cache_info(self) -> Any:
        return self.tile.cache_info()

    def close(self) -> None:
        with self._lock:
            pyramids, self._open = list(self._open.values()), OrderedDict()
        for pyr in pyramids:
            pyr.close()
