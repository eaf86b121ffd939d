"""What comes with each slide from outside the slide file: its mpp, another tool's tiles, a tissue GeoJSON.

:func:`slide_inputs` matches all of them to the slides once, before any work, so a slide without its coords or
GeoJSON file stops the run at once with the slide and the folder named, rather than hours into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError, DataError
from ..files import file_problem
from .coords import match_coords
from .discover import listed_slides, slide_id, unique_ids

__all__ = ["GEOJSON_SUFFIXES", "SlideInput", "as_inputs", "match_geojson", "slide_inputs"]

GEOJSON_SUFFIXES = ("_tissue.geojson", ".geojson", ".json")  # "_tissue.geojson": what `slides tile` writes


@dataclass(frozen=True)
class SlideInput:
    """One slide and what goes with it.

    mpp: microns per level-0 pixel overriding the file's metadata (a slide list's ``mpp`` column, else --mpp).
    coords: a TRIDENT or CLAM patch file whose tiles replace the grid.
    tissue_geojson: polygons (level-0 pixels) that replace the Otsu tissue mask.
    repair_geojson: make invalid polygons of ``tissue_geojson`` valid (shapely's make_valid) instead of refusing.
    """

    path: Path
    mpp: float | None = None
    coords: Path | None = None
    tissue_geojson: Path | None = None
    repair_geojson: bool = False

    @property
    def slide_id(self) -> str:
        return slide_id(self.path)


def as_inputs(slides: Sequence[str | Path | SlideInput], mpp: float | None = None) -> list[SlideInput]:
    """Slides (paths or :class:`SlideInput`) as inputs without repeats; ``mpp`` fills in where none is set."""
    inputs = [s if isinstance(s, SlideInput) else SlideInput(Path(s)) for s in slides]
    inputs = [s if s.mpp is not None or mpp is None else replace(s, mpp=mpp) for s in inputs]
    first: dict[Path, SlideInput] = {}
    for s in inputs:
        first.setdefault(s.path, s)
    return [first[p] for p in unique_ids(list(first))]


def match_geojson(slides: Sequence[Path], source: str | Path) -> dict[Path, Path]:
    """Each slide's tissue GeoJSON: ``<slide_id>_tissue.geojson`` (as ``slides tile`` writes it), else
    ``<slide_id>.geojson`` (or ``.json``, as QuPath and TRIDENT export) in the folder ``source``, or ``source``
    itself when it is a file and there is one slide; a slide without one is an error."""
    source = Path(source)
    problem = None if source.is_dir() else file_problem(source)
    if problem not in (None, "missing"):
        raise DataError(f"tissue GeoJSON {source} is {problem}; pass the exported .geojson file or its folder")
    if source.is_file():
        if len(slides) != 1:
            raise ConfigError(
                f"tissue GeoJSON {source} is one file for {len(slides)} slides; pass a folder of <slide_id>.geojson"
            )
        return {slides[0]: source}
    if not source.is_dir():
        raise DataError(f"tissue GeoJSON {source} not found; pass a folder of <slide_id>.geojson files (or one file)")
    out = {}
    for s in slides:
        sid = slide_id(s)
        candidates = [source / f"{sid}{suffix}" for suffix in GEOJSON_SUFFIXES]
        found = [p for p in candidates if p.exists() or p.is_symlink()]
        problem = file_problem(found[0]) if found else None
        if problem is not None:  # a FIFO would block the reader; a broken link is an export that vanished
            raise DataError(f"tissue GeoJSON {found[0]} is {problem}; export the slide's tissue there as a file")
        if not found:
            raise DataError(
                f"slide '{sid}' has no tissue GeoJSON in {source} (looked for {sid}_tissue.geojson, {sid}.geojson "
                f"or {sid}.json); "
                "export its tissue annotations from QuPath there"
            )
        out[s] = found[0]
    return out


def slide_inputs(
    source: str | Path,
    mpp: float | None = None,
    coords: str | Path | None = None,
    tissue_geojson: str | Path | None = None,
    repair_geojson: bool = False,
) -> list[SlideInput]:
    """The slides of ``source`` (a folder, one slide, or a CSV, see :func:`find_slides`) with their inputs.

    mpp: a CSV's per-slide ``mpp`` column wins; ``mpp`` applies to every other slide.
    coords: a TRIDENT or CLAM output folder; every slide needs its patch file there.
    tissue_geojson: a folder of ``<slide_id>.geojson`` (or one file for one slide); every slide needs one.
    repair_geojson: repair invalid tissue polygons instead of refusing them.
    """
    listed = listed_slides(source)
    paths = [p for p, _ in listed]
    coord_files = match_coords(paths, coords) if coords is not None else {}
    masks = match_geojson(paths, tissue_geojson) if tissue_geojson is not None else {}
    return [
        SlideInput(p, listed_mpp if listed_mpp is not None else mpp, coord_files.get(p), masks.get(p), repair_geojson)
        for p, listed_mpp in listed
    ]
