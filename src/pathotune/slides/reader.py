"""One reader interface over OpenSlide, tiffslide, wsidicom and Pillow, so tiling code never cares which opened a
slide.

Coordinates follow OpenSlide: ``read_region`` takes the top-left corner in LEVEL-0 pixels and a size in
pixels of the requested level. Every read comes back as 8-bit RGB; transparent pixels (outside the scanned
area, or an alpha channel) are composited on white, the colour of empty glass.

About 550 lines on purpose: the interface, its four backends and the order ``open_slide`` tries them in are
read together (each backend is short; the fallback rules only make sense beside all of them). Where mpp and
objective power come from is ``slides.metadata``.
"""

from __future__ import annotations

import math
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import openslide
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data import to_rgb  # the one conversion: alpha on white, 16-bit grey rescaled, not clipped
from ..errors import ConfigError, DataError, one_line
from ..files import file_problem
from .metadata import UnusableMpp, mpp_from_properties, objective_from_properties, positive_float

__all__ = [
    "BACKENDS",
    "LEVEL_TOLERANCE",
    "SLIDE_EXTENSIONS",
    "DicomReader",
    "ImageReader",
    "OpenSlideReader",
    "SlideReader",
    "TiffSlideReader",
    "dicom_files",
    "is_dicom_file",
    "open_slide",
    "require_mpp",
]

BACKENDS = ("auto", "openslide", "tiffslide", "dicom", "image")
# Files of these extensions are slides of their own; any other file may be a DICOM instance (see is_dicom_file).
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".svslide",
    ".bif",
    ".vms",
    ".vmu",
    ".png",
    ".jpg",
    ".jpeg",
)
# Scanners store downsamples such as 4.000345; a level this close to the wanted downsample still counts as
# "not coarser than wanted", so rounding noise never pushes tiling one level finer (4x more pixels to read).
LEVEL_TOLERANCE = 0.01
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_THUMB_BLOCK = 512  # thumbnail pixels per block, so a thumbnail never needs a whole level in memory
# A DICOM file (Part 10) has a 128-byte preamble, then "DICM"; a folder of them is one DICOM WSI series.
_DICM_OFFSET, _DICM_MAGIC = 128, b"DICM"
_DICOM_SUFFIX, _DICOMDIR = ".dcm", "DICOMDIR"
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


class SlideReader(ABC):
    """A whole-slide image: a pyramid of levels, its physical pixel size, and region reads in RGB.

    Subclasses fill the level geometry in ``__init__`` and implement ``_read`` and ``_close``; clipping at the
    slide edge, RGB conversion, thumbnails and the mapping of backend failures to ``DataError`` live here once.
    """

    backend: str = ""
    # What a backend raises when the bytes under a region are missing or garbled; reported as a DataError.
    _read_errors: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, zlib.error, struct.error)

    def __init__(self, path: Path, mpp: float | None) -> None:
        self.path = path
        self._mpp_override = mpp
        self._level_dimensions: tuple[tuple[int, int], ...] = ()
        self._level_downsamples: tuple[float, ...] = ()
        self._native_mpp: float | None = None
        self._mpp_problem: str | None = None  # why metadata that states a pixel size cannot be used
        self._objective_power: float | None = None
        self._closed = False

    def _set_scale_from(self, props: Mapping[str, Any], prefix: str) -> None:
        """mpp (or the reason it is unusable) and objective power from a TIFF-like backend's properties, read by
        ``slides.metadata``."""
        try:
            self._native_mpp = mpp_from_properties(props, prefix, self.dimensions)
        except UnusableMpp as e:
            self._native_mpp, self._mpp_problem = None, str(e)
        self._objective_power = objective_from_properties(props, prefix, self.dimensions)

    # -- geometry and metadata -------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel: the ``mpp`` given to ``open_slide`` wins over the file's metadata."""
        return self._mpp_override if self._mpp_override is not None else self._native_mpp

    @property
    def mpp_problem(self) -> str | None:
        """Why the metadata's pixel size cannot be used, when it states one (a malformed OME PhysicalSizeX...)."""
        return self._mpp_problem

    @property
    def objective_power(self) -> float | None:
        return self._objective_power

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is not above ``downsample``, so reads only ever shrink."""
        limit = downsample * (1.0 + LEVEL_TOLERANCE)
        best = 0
        for i, ds in enumerate(self._level_downsamples):
            if ds <= limit and ds >= self._level_downsamples[best]:
                best = i
        return best

    # -- reading ---------------------------------------------------------------------------------------------
    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """Backend read of an in-bounds region; may raise the backend's own exceptions."""

    @abstractmethod
    def _close(self) -> None: ...

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGB region of ``level``; ``location`` is level-0 (x, y). Parts outside the slide come back white."""
        if self._closed:
            raise ValueError(f"slide {self.path} is closed")
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} outside 0..{self.level_count - 1} for slide {self.path}")
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        ds = self._level_downsamples[level]
        lw, lh = self._level_dimensions[level]
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        # Part of the request inside the level, in level pixels relative to the request's corner.
        ox0, oy0 = max(0, -lx), max(0, -ly)
        ox1, oy1 = min(w, lw - lx), min(h, lh - ly)
        if ox0 == 0 and oy0 == 0 and ox1 == w and oy1 == h:
            return self._checked_read((x, y), level, (w, h))
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        if ox1 > ox0 and oy1 > oy0:
            inner_loc = (x + round(ox0 * ds), y + round(oy0 * ds))
            canvas.paste(self._checked_read(inner_loc, level, (ox1 - ox0, oy1 - oy0)), (ox0, oy0))
        return canvas

    def _checked_read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        try:
            img = self._read(location, level, size)
        except self._read_errors as e:
            raise DataError(
                f"cannot read slide {self.path} (level {level} at {location}): the file is truncated or corrupt "
                f"({one_line(e, 200)}); re-copy or re-export the slide"
            ) from None
        img = to_rgb(img)
        if img.size != size:  # a backend that silently returned less data is as broken as one that raised
            raise DataError(
                f"cannot read slide {self.path} (level {level} at {location}): got {img.size} pixels instead of "
                f"{size}, the file is truncated or corrupt; re-copy or re-export the slide"
            )
        return img

    def thumbnail(self, max_size: int = 1024) -> Image.Image:
        """Whole slide as RGB with the longer side at most ``max_size`` (never upscaled), aspect kept.

        Read block by block from the coarsest level that is still at least as fine as the thumbnail, so a
        slide with a poor pyramid does not need a full level in memory.
        """
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        width, height = self.dimensions
        factor = max(width, height) / max_size
        if factor <= 1:
            tw, th = width, height
        else:
            tw, th = max(1, round(width / factor)), max(1, round(height / factor))
        sx, sy = width / tw, height / th
        level = self.best_level_for_downsample(min(sx, sy))
        ds = self._level_downsamples[level]
        out = Image.new("RGB", (tw, th), (255, 255, 255))
        for ty0 in range(0, th, _THUMB_BLOCK):
            ty1 = min(th, ty0 + _THUMB_BLOCK)
            ly0, ly1 = math.floor(ty0 * sy / ds), math.ceil(ty1 * sy / ds)
            for tx0 in range(0, tw, _THUMB_BLOCK):
                tx1 = min(tw, tx0 + _THUMB_BLOCK)
                lx0, lx1 = math.floor(tx0 * sx / ds), math.ceil(tx1 * sx / ds)
                block = self.read_region((round(lx0 * ds), round(ly0 * ds)), level, (lx1 - lx0, ly1 - ly0))
                if block.size != (tx1 - tx0, ty1 - ty0):
                    block = block.resize((tx1 - tx0, ty1 - ty0), Image.Resampling.BOX)
                out.paste(block, (tx0, ty0))
        return out

    # -- lifetime --------------------------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, levels={self.level_count}, "
            f"mpp={self.mpp}, objective={self.objective_power})"
        )


class OpenSlideReader(SlideReader):
    """OpenSlide (openslide-bin wheel): Aperio, Hamamatsu, MIRAX, generic tiled TIFF and more."""

    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        self._read_errors = (openslide.OpenSlideError, *SlideReader._read_errors)
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        self.vendor = str(props.get("openslide.vendor", ""))
        self._level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self._set_scale_from(props, "openslide")

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        return self._slide.read_region(location, level, size)

    def _close(self) -> None:
        self._slide.close()


class TiffSlideReader(SlideReader):
    """tiffslide (tifffile + zarr): the fallback for TIFF variants OpenSlide rejects, e.g. SubIFD pyramids."""

    backend = "tiffslide"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        # kept here: the fallback backend costs about 0.2 s to import (zarr, fsspec); most slides never need it
        import tifffile
        import tiffslide

        super().__init__(path, mpp)
        self._read_errors = (tifffile.TiffFileError, IndexError, KeyError, *SlideReader._read_errors)
        self._slide = tiffslide.TiffSlide(str(path))
        try:
            props = self._slide.properties
            self._level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
            self._level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        except BaseException:
            self._slide.close()
            raise
        self._set_scale_from(props, "tiffslide")

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        return self._slide.read_region(location, level, size, padding=False)

    def _close(self) -> None:
        self._slide.close()


class DicomReader(SlideReader):
    """wsidicom: a DICOM WSI series, the folder of its instances (one file per level, plus label and overview).

    The slide is the folder; a ``.dcm`` file stands for the folder it lies in. wsidicom places each level at a
    power-of-two scale of the base level (from the pixel spacing), so level ``k`` of its pyramid has downsample
    ``2**k`` exactly and is read in its own pixels. Every instance is checked at open time: a file that is no
    readable instance, and a level whose last tile does not decode (a cut copy), fail here rather than mid-run.
    """

    backend = "dicom"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        # kept here: wsidicom (with pydicom) costs about 0.8 s to import; only DICOM slides need it
        import pydicom.errors
        import wsidicom
        import wsidicom.errors as wsi_errors

        folder = path if path.is_dir() else path.parent
        super().__init__(folder, mpp)
        self._read_errors = (
            pydicom.errors.InvalidDicomError,
            wsi_errors.WsiDicomError,
            wsi_errors.WsiDicomFileError,
            wsi_errors.WsiDicomNotFoundError,
            wsi_errors.WsiDicomOutOfBoundsError,
            wsi_errors.WsiDicomNoResolutionError,
            wsi_errors.WsiDicomNotSupportedError,
            wsi_errors.WsiDicomMatchError,
            wsi_errors.WsiDicomUidDuplicateError,
            wsi_errors.WsiDicomBotOverflow,
            EOFError,
            KeyError,
            IndexError,
            *SlideReader._read_errors,
        )
        instances = self._wsi_instances(folder)
        try:
            self._wsi = wsidicom.WsiDicom.open(instances)
        except (*self._read_errors, NotImplementedError) as e:  # NotImplementedError: levels off a 2**k scale
            raise DataError(
                f"cannot open slide {folder}: its DICOM files do not form a whole-slide image ({one_line(e, 200)}); "
                "re-copy or re-export the slide"
            ) from None
        try:
            self._open_levels(instances)
        except BaseException:
            self._wsi.close()
            raise

    def _wsi_instances(self, folder: Path) -> list[Path]:
        """The folder's whole-slide image instances, all of one series; any other DICOM file is left out. Their
        headers also give the objective (ObjectiveLensPower of the optical path)."""
        import pydicom

        files = dicom_files(folder)
        if not files:
            raise DataError(
                f"slide {folder} is a folder without DICOM files; pass a slide file, or a folder holding one "
                "DICOM WSI series"
            )
        found, volume_series = [], set()
        tags = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "OpticalPathSequence"]
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
            except self._read_errors as e:
                raise self._corrupt(f.name, one_line(e, 200)) from None
            meta = getattr(ds, "file_meta", None)  # the File Meta's class, for files whose dataset lacks one
            sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
            if sop_class is None:
                raise self._corrupt(f.name, "it has no SOP Class UID")
            if sop_class != _WSI_SOP_CLASS:
                continue
            found.append(f)
            image_type = list(ds.get("ImageType") or [])
            if len(image_type) > 2 and image_type[2] == "VOLUME":  # labels and overviews may be series of their own
                volume_series.add(str(ds.get("SeriesInstanceUID", "")))
                powers = (positive_float(p.get("ObjectiveLensPower")) for p in ds.get("OpticalPathSequence", []))
                self._objective_power = self._objective_power or next((p for p in powers if p is not None), None)
        if not found:
            raise DataError(
                f"slide {folder} holds no DICOM whole-slide image instances (VL Whole Slide Microscopy Image) "
                f"among its {len(files)} DICOM files; export the slide as DICOM WSI"
            )
        if len(volume_series) > 1:
            raise DataError(
                f"slide {folder} holds {len(volume_series)} DICOM WSI series; put each series (one slide) in a "
                "folder of its own"
            )
        return found

    def _corrupt(self, name: str, detail: str) -> DataError:
        return DataError(
            f"cannot open slide {self.path}: DICOM file {name} is truncated or corrupt ({detail}); "
            "re-copy or re-export the slide"
        )

    def _open_levels(self, instances: list[Path]) -> None:
        """Level geometry and mpp, once every instance is known to be read and each level's last tile decodes."""
        from wsidicom.errors import WsiDicomNoResolutionError

        read = {Path(str(f)).resolve() for f in self._wsi.files or []}
        for f in instances:
            if f.resolve() not in read:
                raise self._corrupt(f.name, "wsidicom cannot read it as a whole-slide image instance")
        self._levels = sorted(self._wsi.levels.levels, key=lambda lvl: lvl.level)
        self._level_dimensions = tuple((lvl.size.width, lvl.size.height) for lvl in self._levels)
        self._level_downsamples = tuple(float(2**lvl.level) for lvl in self._levels)
        for lvl in self._levels:  # the last tile sits at the end of its file: a cut copy fails to decode it
            tiles_x = math.ceil(lvl.size.width / lvl.tile_size.width)
            tiles_y = math.ceil(lvl.size.height / lvl.tile_size.height)
            try:
                self._wsi.read_tile(lvl.level, (tiles_x - 1, tiles_y - 1))
            except self._read_errors as e:
                last_file = lvl.default_instance.image_data.files[-1].name
                raise self._corrupt(last_file, f"its last tile of level {lvl.level}: {one_line(e, 200)}") from None
        try:
            spacing = self._wsi.mpp
        except WsiDicomNoResolutionError:
            self._mpp_problem = "its DICOM instances carry no pixel spacing"
        else:
            found = [v for v in (positive_float(spacing.width), positive_float(spacing.height)) if v is not None]
            self._native_mpp = sum(found) / len(found) if found else None
            if not found:
                self._mpp_problem = f"its DICOM pixel spacing is {spacing.width} x {spacing.height} \u00b5m"

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        ds = self._level_downsamples[level]
        at = (math.floor(location[0] / ds), math.floor(location[1] / ds))  # wsidicom reads in the level's pixels
        return self._wsi.read_region(at, self._levels[level].level, size)

    def _close(self) -> None:
        self._wsi.close()


class ImageReader(SlideReader):
    """A plain PNG/JPEG/TIFF as a one-level slide; such files carry no trustworthy mpp, so only the argument counts.

    The image is decoded fully at open time: truncation shows up here as one clear error, not mid-tiling.
    """

    backend = "image"

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        try:
            with Image.open(path) as img:
                img.load()
                self._image = to_rgb(ImageOps.exif_transpose(img))
                self._image.load()
        except UnidentifiedImageError:
            raise
        except Image.DecompressionBombError:
            raise DataError(
                f"cannot open slide {path}: too large for a plain image; convert it to a tiled pyramidal TIFF"
            ) from None
        except (OSError, ValueError, SyntaxError, struct.error, zlib.error) as e:
            detail = one_line(e, 200)
            raise DataError(
                f"cannot open slide {path}: the image is truncated or corrupt ({detail}); re-copy or re-export it"
            ) from None
        self._level_dimensions = (self._image.size,)
        self._level_downsamples = (1.0,)

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        x, y = location
        return self._image.crop((x, y, x + size[0], y + size[1]))

    def _close(self) -> None:
        self._image.close()


def _try_openslide(path: Path, mpp: float | None) -> SlideReader | None:
    try:
        return OpenSlideReader(path, mpp)
    except openslide.OpenSlideError:  # includes OpenSlideUnsupportedFormatError
        return None


def _try_openslide_then_pyramid(path: Path, mpp: float | None) -> SlideReader | None:
    """OpenSlide first, except for a TIFF whose pyramid only tiffslide sees.

    OpenSlide's generic-TIFF driver ignores SubIFD pyramids (as written by tifffile, bfconvert or QuPath) and
    reports one level, which would make every coarse tile a full-resolution read.
    """
    reader = _try_openslide(path, mpp)
    if not isinstance(reader, OpenSlideReader) or reader.level_count > 1 or reader.vendor != "generic-tiff":
        return reader
    other = _try_tiffslide(path, mpp)
    if other is not None and other.level_count > 1:
        reader.close()
        return other
    if other is not None:
        other.close()
    return reader


def _try_tiffslide(path: Path, mpp: float | None) -> SlideReader | None:
    import tifffile  # kept here, with the tiffslide fallback it serves (see TiffSlideReader)

    try:
        return TiffSlideReader(path, mpp)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, RuntimeError, struct.error):
        return None


def _try_image(path: Path, mpp: float | None) -> SlideReader | None:
    try:
        return ImageReader(path, mpp)
    except UnidentifiedImageError:
        return None


def _looks_like_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM instance file: named ``*.dcm``, or (DICOM files often have no extension, or a UID for a name) any
    file but a slide extension's with "DICM" after the 128-byte preamble; a ``DICOMDIR`` (an export's index) is
    none. The one rule for discovery and opening alike."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.name.upper() == _DICOMDIR:
        return False
    if suffix == _DICOM_SUFFIX:
        return True
    if suffix in SLIDE_EXTENSIONS or file_problem(path) is not None:  # never open a FIFO or device to sniff it
        return False
    try:
        with open(path, "rb") as f:
            f.seek(_DICM_OFFSET)
            return f.read(len(_DICM_MAGIC)) == _DICM_MAGIC
    except OSError:
        return False


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (hidden files skipped), sorted: the instances of a DICOM slide."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".") and p.is_file() and is_dicom_file(p))


def open_slide(path: str | Path, mpp: float | None = None, backend: str = "auto") -> SlideReader:
    """Open a slide; ``auto`` tries OpenSlide, then tiffslide, then Pillow, taking the first that opens it.

    A folder, or a DICOM file (:func:`is_dicom_file`), is a DICOM WSI series and goes to wsidicom. A generic
    TIFF that OpenSlide sees as one level but tiffslide as a pyramid (SubIFDs: OME-TIFF, bfconvert, QuPath) goes
    to tiffslide, so coarse tiles come from the pyramid.

    ``mpp`` (microns per level-0 pixel) overrides whatever the file says, for slides whose metadata is missing
    or wrong.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown slide backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if mpp is not None and positive_float(mpp) is None:
        raise ConfigError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    problem = None if path.is_dir() else file_problem(path)
    if problem == "missing":
        raise DataError(f"slide {path} not found; check the path")
    if problem is not None:  # a FIFO would block the reader forever; a broken link is a slide that vanished
        raise DataError(f"slide {path} is {problem}; pass the slide file itself (e.g. the .svs or .mrxs)")
    try:
        if path.is_dir():
            next(path.iterdir(), None)
        else:
            with open(path, "rb"):
                pass
    except OSError as e:
        raise DataError(f"cannot read slide {path}: {e.strerror or one_line(e, 200)}; check its permissions") from None
    mpp = None if mpp is None else float(mpp)
    if backend == "dicom" or (backend == "auto" and (path.is_dir() or is_dicom_file(path))):
        return DicomReader(path, mpp)
    if path.is_dir():
        raise DataError(
            f"slide {path} is a folder, which only the dicom backend reads (a DICOM WSI series); pass the slide "
            "file itself"
        )
    single = {"openslide": _try_openslide, "tiffslide": _try_tiffslide, "image": _try_image}
    chain = [_try_openslide_then_pyramid, _try_tiffslide, _try_image] if backend == "auto" else [single[backend]]
    for attempt in chain:
        reader = attempt(path, mpp)
        if reader is not None:
            return reader
    if backend != "auto":
        raise DataError(f"cannot open slide {path} with the {backend} backend; try backend 'auto'")
    if _looks_like_tiff(path):
        raise DataError(
            f"cannot open slide {path}: it starts like a TIFF but its structure is unreadable, so it is truncated "
            "or corrupt; re-copy or re-export the slide"
        )
    raise DataError(f"cannot open slide {path}: not a slide format that OpenSlide, tiffslide or Pillow reads")


def require_mpp(reader: SlideReader) -> float:
    """The slide's mpp, or a DataError telling the user to supply it, since tiling at a physical scale needs it."""
    if reader.mpp is None:
        if reader.mpp_problem is not None:
            raise DataError(
                f"slide {reader.path} has no usable mpp (microns per pixel): {reader.mpp_problem}; pass --mpp"
            )
        raise DataError(f"slide {reader.path} has no mpp (microns per pixel) in its metadata; pass --mpp")
    return reader.mpp
