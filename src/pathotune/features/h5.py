"""The slide feature file, ``<slide_id>.h5``: its schema, writer, reader, compatibility rules and listing.

This module is the only code that knows the file's layout; extraction (``slides``) writes through it and MIL,
heat maps and resume checks read through it. About 450 lines on purpose: the layout's one owner (schema,
writer, reader, compatibility rules) in one file, so a format change is one diff; foreign layouts are in
``foreign.py``.

Datasets:

- ``coords`` (N, 2) int64: level-0 top-left corner of each tile, exactly as the tile plan holds it;
- ``features`` (N, D) float32: one row per tile;
- ``tissue`` (N,) float32: the tissue fraction of each tile (optional on read: hand-made files may lack it).

Attributes: :data:`ATTRIBUTES` names every one the writer records. ``None`` is stored as NaN (HDF5 attributes
have no null) and read back as ``None``; bytes become ``str``, numpy values Python ones, arrays lists, so the
attributes read are JSON-ready and compare equal whatever numpy type wrote them. A file gets its final name
only once complete (it is written under a temporary name, then renamed), so a finished-looking file is always
a finished file. N may be 0: a slide without tissue still gets its (empty) file.

``coords`` also carries TRIDENT's attributes (``patch_size``, ``patch_size_level0``, magnifications as ``10 /
mpp``, ``overlap``, ``level0_width``, ``level0_height``, ``name``, ``savetodir``) so TRIDENT's slide encoders read
our files. The readers take TRIDENT's and CLAM's feature files too (:mod:`.foreign`): their attributes come back
under PathoTune's names, and ``.pt`` files (CLAM's ``pt_files``) come back without coordinates.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ConfigError, DataError, one_line
from ..files import file_problem
from ..report.io import atomic_path
from ..version import __version__
from .foreign import PATHOTUNE, PT, PT_SUFFIX, foreign_attrs, layout_of, read_pt_features, trident_coords_attrs

SUFFIX = ".h5"
COORDS, FEATURES, TISSUE = "coords", "features", "tissue"

# Which model made the features, in the order they are checked. Files that differ in one of these live in
# different feature spaces: MIL never pools them, and a MIL model never scores files of another extractor.
EXTRACTOR_KEYS: tuple[str, ...] = ("backbone", "feature_dim", "bundle_fingerprint", "backbone_fingerprint")
# Compared only where both sides record it (files made by other tools, or before it was recorded, lack it).
_RECORDED_ONLY = frozenset({"backbone_fingerprint"})
# What a request for features is: an existing file counts as a request's finished result only when all of these
# agree (the same extractor on the same tiles); a rerun skips it, and refuses a file made by another request.
REQUEST_KEYS: tuple[str, ...] = (
    "backbone",
    "backbone_fingerprint",
    "bundle_fingerprint",
    "target_mpp",
    "tile_size",
    "image_size",
    "overlap",
    "min_tissue",
)
# Attributes that describe one slide, never the extractor, even when a cohort has a single slide.
PER_SLIDE_KEYS: frozenset[str] = frozenset({"slide_path", "slide_id", "n_tiles", "n_candidates", "dimensions"})

# Every attribute the writer records (and must be given, but for the version, which it adds itself).
ATTRIBUTES: dict[str, str] = {
    "backbone": "backbone id",
    "backbone_fingerprint": "blake2b fingerprint of the backbone weights",
    "bundle_fingerprint": "sha256 of the prompt bundle's manifest; empty for a plain backbone",
    "bundle_path": "where that bundle was read from; empty for a plain backbone",
    "target_mpp": "microns per pixel of the tiles; NaN: the slide's native resolution",
    "tile_size": "tile side in target pixels",
    "image_size": "model input side in pixels",
    "overlap": "target pixels shared by neighbouring tiles",
    "min_tissue": "tissue fraction a tile needed to be kept",
    "feature_dim": "D",
    "mpp": "the slide's microns per pixel; NaN when unknown",
    "level": "pyramid level read",
    "downsample": "that level's downsample",
    "read_size": "pixels read per tile at that level",
    "stride": "tile stride in target pixels",
    "tile_size_level0": "tile side in level-0 pixels",
    "dimensions": "the slide's level-0 (width, height)",
    "n_tiles": "N",
    "n_candidates": "tiles on the grid before the tissue filter",
    "slide_id": "file stem of the slide",
    "slide_path": "the slide read",
    "slide_backend": "reader backend (openslide, tiffslide, image)",
    "norm_mean": "per-channel mean the tiles were normalised with",
    "norm_std": "per-channel std the tiles were normalised with",
    "normalization": "how a tile became model input, in words",
    "precision": "the Fabric precision the model ran at",
    "tissue_config": "where the tiles and tissue came from, as JSON (Otsu settings or tissue GeoJSON, coords file)",
    "pathotune_version": "the version that wrote the file",
}


def _py(value: Any) -> Any:
    """An attribute value as plain Python: str for bytes, lists for arrays, Python scalars, None for NaN."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _py(value.item())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _h5(value: Any) -> Any:
    """A Python attribute value as HDF5 stores it: None as NaN, sequences as arrays."""
    if value is None:
        return float("nan")
    if isinstance(value, (tuple, list)):
        return np.asarray(value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal as attribute values: floats to 1e-9 relative, None equal to None (both as read by :func:`_py`)."""
    a, b = _py(a), _py(b)
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


# -- listing --------------------------------------------------------------------------------------------------
def feature_path(features_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """Where the feature file of ``slide_id`` lives."""
    return Path(features_dir) / f"{slide_id}{SUFFIX}"


def _folder_files(root: Path) -> list[Path]:
    """A folder's ``*.h5`` files, else its ``*.pt`` files, else those of CLAM's ``h5_files/`` (which hold the
    coordinates) or ``pt_files/`` inside it; sorted, hidden files (a writer's temporary ones) left out."""
    for folder in (root, root / "h5_files", root / "pt_files"):
        for suffix in (SUFFIX, PT_SUFFIX):
            files = sorted(p for p in folder.glob(f"*{suffix}") if not p.name.startswith(".") and not p.is_dir())
            for p in files:  # a FIFO would block its reader; a broken link is a file that vanished
                problem = file_problem(p)
                if problem is not None:
                    raise DataError(f"slide feature file {p} is {problem}; replace it with the .h5 file or remove it")
            if files:
                return files
    return []


def list_feature_files(features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """A folder's ``<slide_id>.h5`` files (PathoTune, TRIDENT or CLAM; else its ``<slide_id>.pt`` files, else a
    CLAM feature folder's ``h5_files/`` or ``pt_files/``), one file, or an explicit list of files; sorted, hidden
    files (a writer's temporary ones) not listed; an empty selection fails."""
    if isinstance(features, (str, os.PathLike)):
        root = Path(features)
        if root.is_dir():
            files = _folder_files(root)
            if not files:
                raise DataError(
                    f"no slide feature files (*.h5) in {root} (nor *.pt, nor CLAM's h5_files/ or pt_files/); "
                    "run `pathotune slides extract` first"
                )
            return files
        if not root.is_file():
            raise DataError(f"slide features {root} not found; pass a folder of <slide_id>.h5 files or one file")
        return [root]
    files = [Path(f) for f in features]
    if not files:
        raise DataError("no slide feature files given; pass a folder of <slide_id>.h5 files or a list of them")
    return files


def slide_feature_files(features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[str, Path]:
    """Slide id (file stem) -> feature file, for :func:`list_feature_files` of ``features``; two files that
    record the same slide are refused (:func:`check_unique_slides`), since their outputs would overwrite each
    other."""
    files = list_feature_files(features)
    check_unique_slides(files)
    return {p.stem: p for p in files}


def check_unique_slides(files: Sequence[str | os.PathLike[str]]) -> None:
    """Fail on one line when two feature files belong to one slide: the same stem in two folders, or two files
    whose recorded ``slide_id`` (or, for TRIDENT's files, ``name``) is the same."""
    seen: dict[str, Path] = {}
    for f in map(Path, files):
        ids = {f.stem}
        if f.suffix == SUFFIX:
            with contextlib.suppress(DataError, OSError):
                recorded = _recorded_slide_id(f)
                if recorded:
                    ids.add(recorded)
        for sid in ids:
            if sid in seen and seen[sid] != f:
                raise DataError(
                    f"feature files {seen[sid]} and {f} both belong to slide '{sid}', so their outputs would "
                    "overwrite each other; keep one of them"
                )
            seen[sid] = f


def _recorded_slide_id(path: Path) -> str | None:
    """The slide id a file records (ours: ``slide_id``; TRIDENT's: the coords' ``name``), read without its data."""
    with h5py.File(path, "r") as f:
        value = f.attrs.get("slide_id")
        if value is None and COORDS in f:
            value = f[COORDS].attrs.get("name")
    value = _py(value)
    return str(value) if isinstance(value, str) and value else None


def require_coords(files: Sequence[str | os.PathLike[str]]) -> None:
    """Fail on the first ``.pt`` file: it holds no tile coordinates, so nothing can be placed on the slide."""
    for f in map(Path, files):
        if f.suffix == PT_SUFFIX:
            beside = f.parent.parent / "h5_files"
            where = f"the h5_files folder {beside}" if beside.is_dir() else "CLAM's h5_files or the .h5 features"
            raise DataError(f"{f} is a .pt feature file with no tile coordinates; pass {where} to --features")


# -- reading --------------------------------------------------------------------------------------------------
@dataclass
class SlideFeatures:
    """One slide's tiles: ``coords`` (N, 2) int64 (None for a ``.pt`` file, which has none), ``features`` (N, D)
    float32, ``attrs`` (JSON-ready) and ``tissue`` (N,) float32 when the file has it."""

    path: Path
    coords: np.ndarray | None
    features: np.ndarray
    attrs: dict[str, Any]
    tissue: np.ndarray | None = None

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id") or self.path.stem)

    @property
    def tile_side(self) -> float:
        """Tile side in level-0 pixels: :func:`tile_side` of the attributes."""
        return tile_side(self.attrs)


def tile_side(attrs: Mapping[str, Any]) -> float:
    """Tile side in level-0 pixels, as recorded, or rebuilt from the tile size and the two mpps for files that
    do not record it."""
    side = attrs.get("tile_size_level0")
    if side is not None:
        return float(side)
    if attrs.get("tile_size") is None:
        raise DataError(
            f"the features of slide '{attrs.get('slide_id', '?')}' record no tile size (no tile_size attribute, no "
            "coords.attrs['patch_size_level0'], a single tile); pass TRIDENT or PathoTune .h5 features"
        )
    target, mpp = attrs.get("target_mpp"), attrs.get("mpp")
    scale = 1.0 if target is None or mpp is None else float(target) / float(mpp)
    return float(attrs["tile_size"]) * scale


def _unreadable(path: Path, e: BaseException) -> DataError:
    detail = one_line(e)
    return DataError(f"slide feature file {path} is not a readable HDF5 file ({detail}); re-extract this slide")


def _check_features_shape(path: Path, shape: tuple[int, ...], require_tiles: bool) -> None:
    if len(shape) != 2 or shape[1] == 0:
        raise DataError(f"slide feature file {path}: 'features' must be an (N, D) matrix, got shape {shape}")
    if require_tiles and shape[0] == 0:
        raise DataError(
            f"slide feature file {path} has no tiles (no tissue found); drop the slide from the labels CSV "
            "or re-extract it with looser tissue settings"
        )


def _pt_attrs(path: Path, shape: tuple[int, ...], require_tiles: bool) -> dict[str, Any]:
    """What a ``.pt`` file says: its shape (and that it came as a bare tensor)."""
    _check_features_shape(path, shape, require_tiles)
    return {
        "source_format": PT,
        "slide_id": path.stem,
        "feature_dim": int(shape[1]),
        "n_tiles": int(shape[0]),
        "bundle_fingerprint": "",
    }


def _attrs_of(obj: h5py.HLObject) -> dict[str, Any]:
    return {str(k): _py(v) for k, v in obj.attrs.items()}


def _header(f: h5py.File, path: Path, require_tiles: bool) -> dict[str, Any]:
    """Attributes plus the checked shapes of an open file (``feature_dim``, ``n_tiles`` from the data); a TRIDENT
    or CLAM file's attributes under PathoTune's names (:func:`.foreign.foreign_attrs`)."""
    for name in (FEATURES, COORDS):
        if name not in f:
            raise DataError(
                f"slide feature file {path} has no dataset '{name}'; it needs 'coords' (N,2) and 'features' (N,D)"
            )
    shape, cshape = tuple(f[FEATURES].shape), tuple(f[COORDS].shape)
    _check_features_shape(path, shape, require_tiles)
    if cshape != (shape[0], 2):
        raise DataError(f"slide feature file {path}: 'coords' has shape {cshape}, expected ({shape[0]}, 2)")
    attrs = _attrs_of(f)
    coords_attrs = _attrs_of(f[COORDS])
    layout = layout_of(attrs, coords_attrs)
    if layout != PATHOTUNE:
        features_attrs = _attrs_of(f[FEATURES])
        attrs = foreign_attrs(layout, path, coords_attrs, features_attrs, lambda: np.asarray(f[COORDS][()]))
    declared = attrs.get("feature_dim")
    if declared is not None and int(declared) != shape[1]:
        raise DataError(
            f"slide feature file {path}: attribute feature_dim={declared} but 'features' has {shape[1]} columns; "
            "re-extract this slide"
        )
    recorded_tiles = attrs.get("n_tiles")
    if layout == PATHOTUNE and recorded_tiles is not None and _int_or(recorded_tiles) != shape[0]:
        raise DataError(
            f"slide feature file {path}: attribute n_tiles={recorded_tiles!r} but 'features' has {shape[0]} rows; "
            "re-extract this slide"
        )
    for key in _POSITIVE:
        value = attrs.get(key)
        if value is not None and not _positive(value):
            raise DataError(
                f"slide feature file {path}: attribute {key}={value!r} is not a positive number; re-extract this "
                "slide or fix the attribute"
            )
    dims = attrs.get("dimensions")
    if dims is not None and not (isinstance(dims, list) and len(dims) == 2 and all(_positive(v) for v in dims)):
        raise DataError(f"slide feature file {path}: attribute dimensions={dims!r} is not a (width, height) in pixels")
    attrs["feature_dim"] = int(shape[1])
    attrs["n_tiles"] = int(shape[0])
    attrs.setdefault("bundle_fingerprint", "")
    return attrs


# Sizes and resolutions that must be positive wherever a file records them (ours, or TRIDENT's under our names).
_POSITIVE = ("tile_size", "tile_size_level0", "image_size", "target_mpp", "mpp", "read_size", "downsample")


def _positive(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def _int_or(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@contextmanager
def _open(path: str | os.PathLike[str]) -> Iterator[tuple[h5py.File, Path]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"slide feature file {p} not found; extract features for this slide first")
    try:
        with h5py.File(p, "r") as f:
            yield f, p
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise _unreadable(p, e) from None


def read_feature_attrs(path: str | os.PathLike[str], require_tiles: bool = False) -> dict[str, Any]:
    """A file's attributes (``feature_dim`` and ``n_tiles`` from the data's shape) without loading the data."""
    if Path(path).suffix == PT_SUFFIX:
        return _pt_attrs(Path(path), tuple(read_pt_features(path, mmap=True).shape), require_tiles)
    with _open(path) as (f, p):
        return _header(f, p, require_tiles)


def read_slide_features(path: str | os.PathLike[str], bag: bool = False) -> SlideFeatures:
    """Load one ``<slide_id>.h5``, opened once and checked at its contract, the same for every consumer (MIL, heat
    maps, prediction, the viewer): shapes, numeric and finite features, positive tile sizes and magnifications
    (:func:`_header`), tiles listed once, corners inside the slide where its size is recorded.

    ``bag`` adds what a MIL bag needs: at least one tile. A ``.pt`` file (CLAM's ``pt_files``) comes back with
    ``coords`` None.
    """
    p = Path(path)
    coords: np.ndarray | None = None
    tissue = None
    if p.suffix == PT_SUFFIX:
        tensor = read_pt_features(p)
        attrs = _pt_attrs(p, tuple(tensor.shape), require_tiles=bag)
        features = tensor.float().numpy()
    else:
        with _open(p) as (f, p):
            attrs = _header(f, p, require_tiles=bag)
            raw_coords, features = f[COORDS][()], f[FEATURES][()]
            tissue = np.asarray(f[TISSUE][()], dtype=np.float32) if TISSUE in f else None
        coords = _checked_coords(p, raw_coords, attrs)
    if not np.issubdtype(np.asarray(features).dtype, np.number) or np.asarray(features).dtype == np.bool_:
        raise DataError(
            f"slide feature file {p}: 'features' holds {np.asarray(features).dtype} values, not numbers; re-extract "
            "this slide"
        )
    features = np.asarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features).all(axis=1)).sum())
        raise DataError(
            f"slide feature file {p}: 'features' has NaN or infinite values in {bad} of {len(features)} tiles; "
            "re-extract this slide"
        )
    return SlideFeatures(p, coords, features, attrs, tissue)


def _checked_coords(path: Path, raw: Any, attrs: Mapping[str, Any]) -> np.ndarray:
    """``coords`` as (N, 2) int64 level-0 corners, each tile listed once and inside the slide where its size is
    recorded: a tile listed twice would weigh twice in a bag and paint twice in a heat map."""
    raw = np.asarray(raw)
    if raw.size and (not np.issubdtype(raw.dtype, np.number) or not np.isfinite(raw).all()):
        raise DataError(f"slide feature file {path}: 'coords' must be finite numbers (x, y); re-extract this slide")
    coords = np.asarray(raw, dtype=np.int64).reshape(-1, 2)
    unique = np.unique(coords, axis=0) if len(coords) else coords
    if len(unique) != len(coords):
        raise DataError(
            f"slide feature file {path} lists {len(coords) - len(unique)} tile corner(s) more than once; "
            "re-extract this slide (each tile must be listed once)"
        )
    dims = attrs.get("dimensions")
    if dims is not None and len(coords):
        width, height = (int(v) for v in dims)
        if (coords < 0).any() or (coords[:, 0] >= width).any() or (coords[:, 1] >= height).any():
            raise DataError(
                f"slide feature file {path} has tiles outside its {width}x{height} slide; re-extract this slide"
            )
    return coords


# -- compatibility --------------------------------------------------------------------------------------------
def extractor_mismatch(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first of :data:`EXTRACTOR_KEYS` on which two sets of attributes disagree, or None."""
    for key in EXTRACTOR_KEYS:
        if key in _RECORDED_ONLY and (key not in a or key not in b):
            continue
        if not _same(a.get(key), b.get(key)):
            return key
    return None


def tiles_source_text(source: Mapping[str, Any]) -> str:
    """A slide's tile source (the Otsu settings or its tissue GeoJSON, the coords file another tool gave, the
    artifact-drop settings) as the ``tissue_config`` attribute holds it: canonical JSON."""
    return json.dumps(dict(source), sort_keys=True, separators=(",", ":"), default=str)


def read_tiles_source(text: str) -> dict[str, Any]:
    """The tile source a file records (:func:`tiles_source_text`); files written before it was JSON hold a Python
    literal, read with ``ast.literal_eval`` (literals only, no code), and files older still a TissueConfig repr,
    which means the Otsu mask on our grid ({})."""
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = {}
    return value if isinstance(value, dict) else {}


def tiles_source_mismatch(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """Why a finished file's tiles are not the ones ``wanted`` (other tissue GeoJSON, coords file or dropped
    artifact tiles: what the request keys cannot tell apart), in words; None when they are the same."""

    def parts(source: Mapping[str, Any]) -> tuple:
        return source.get("tissue_geojson"), source.get("coords"), source.get("drop_artifacts")

    def name(source: tuple) -> str:
        geojson, coords, dropped = source
        mask = f"tissue GeoJSON {geojson}" if geojson else "the Otsu mask"
        flags = f", without the tiles flagged {','.join(dropped.get('drop', ()))}" if dropped else ""
        return f"{mask} and {f'coords {coords}' if coords else 'our grid'}{flags}"

    old, new = parts(recorded), parts(wanted)
    if old != new:
        return f"tiles from {name(old)}, not {name(new)}"
    otsu = [k for k in sorted(set(recorded) | set(wanted)) if k not in ("tissue_geojson", "coords", "drop_artifacts")]
    if "method" in recorded and "method" in wanted:  # both Otsu masks: their settings must agree too
        changed = [f"{k} {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in otsu if recorded.get(k) != wanted.get(k)]
        if changed:
            return f"tiles from the Otsu mask with other settings ({'; '.join(changed[:3])})"
    return None


def bundle_mismatch(
    attrs: Mapping[str, Any], bundle_fingerprint: str, probe_of: tuple[str, int] | None = None
) -> str | None:
    """Why features with ``attrs`` cannot feed the head of a bundle (its manifest ``sha256``), or None: a head only
    means something on its own model's features. ``probe_of``: (backbone fingerprint, input size) when the bundle
    is a linear probe, whose own features are its plain backbone's."""
    if attrs.get("bundle_fingerprint") == bundle_fingerprint:
        return None
    if probe_of is not None and not attrs.get("bundle_fingerprint"):
        fingerprint, image_size = probe_of
        if attrs.get("backbone_fingerprint") == fingerprint and _int_or(attrs.get("image_size")) == image_size:
            return None
    return "they were not extracted with it"


def check_feature_compatibility(
    paths: Sequence[str | os.PathLike[str]], trained_on: Mapping[str, Any] | None = None, model: str = ""
) -> dict[str, Any]:
    """Attributes every file agrees on (the extractor's settings); files of two extractors fail naming both.

    Every file must hold at least one tile (these are bags to pool). With ``trained_on``, the feature attributes
    a MIL model was trained on (``model`` names it in the message), every file must match those instead.
    """
    if not paths:
        raise DataError("no slide feature files to check")
    first = Path(paths[0])
    ref = dict(trained_on) if trained_on is not None else read_feature_attrs(first, require_tiles=True)
    shared = {k: v for k, v in ref.items() if k not in PER_SLIDE_KEYS}
    for p in paths if trained_on is not None else paths[1:]:
        attrs = read_feature_attrs(p, require_tiles=True)
        key = extractor_mismatch(ref, attrs)
        if key is not None and trained_on is not None:
            raise DataError(
                f"slide features {p} have {key} {attrs.get(key)!r} but the model in {model} was trained on "
                f"{ref.get(key)!r}; extract features with the same backbone and bundle"
            )
        if key is not None:
            raise DataError(
                f"slide features {first} and {Path(p)} come from different extractors ({key} "
                f"{ref.get(key)!r} vs {attrs.get(key)!r}); re-extract all slides with one backbone and bundle"
            )
        shared = {k: v for k, v in shared.items() if k in attrs and attrs[k] == v}
    return shared


def finished_tiles(path: str | os.PathLike[str], request: Mapping[str, Any]) -> int | None:
    """Whether ``path`` is the finished result of ``request`` (its :data:`REQUEST_KEYS` values): its tile count.

    None when the file is no readable HDF5 at all (garbage, or cut short): it is to be made again, like a
    temporary file an interrupted run left. A readable file made by another request raises, naming the key.
    """
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            attrs = {str(k): v for k, v in f.attrs.items()}
            complete = FEATURES in f and COORDS in f
            if complete:
                f[COORDS].shape, f[FEATURES].shape  # noqa: B018 (the dataset headers must be readable too)
    except OSError:
        return None
    if not complete:
        raise DataError(f"existing file {p} has no coords/features; delete it or pass --overwrite")
    for key in REQUEST_KEYS:
        value = request[key]
        if key not in attrs or not _same(attrs[key], value):
            old = _py(attrs.get(key, "<missing>"))
            raise ConfigError(
                f"{p} holds features made with {key}={old!r}, not {_py(value)!r}; pass another --out or --overwrite"
            )
    return int(_py(attrs.get("n_tiles", -1)))


# -- writing --------------------------------------------------------------------------------------------------
class FeatureFileWriter:
    """The open temporary file of :func:`write_feature_file`: features go in block by block, in tile order."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self._dataset = dataset
        self.n, self.dim = dataset.shape

    def write(self, start: int, block: np.ndarray) -> None:
        """Rows ``start .. start + len(block)`` of ``features``."""
        if block.shape[1:] != (self.dim,) or not 0 <= start <= self.n - len(block):
            raise ValueError(f"block {tuple(block.shape)} at row {start} does not fit features ({self.n}, {self.dim})")
        self._dataset[start : start + len(block)] = block


@contextmanager
def write_feature_file(
    path: str | os.PathLike[str], coords: np.ndarray, tissue: np.ndarray, feature_dim: int, attrs: Mapping[str, Any]
) -> Iterator[FeatureFileWriter]:
    """Write ``path`` all-or-nothing: coords and tissue now, features through the writer, then ``attrs``.

    ``attrs`` must hold every name in :data:`ATTRIBUTES` but ``pathotune_version`` (added here); ``coords`` gets
    TRIDENT's attributes from them (:func:`.foreign.trident_coords_attrs`). The file is written under a temporary
    name beside ``path`` and renamed once the block finishes; on any error the temporary file is removed and
    ``path`` left as it was.
    """
    missing = sorted(set(ATTRIBUTES) - {"pathotune_version"} - set(attrs))
    unknown = sorted(set(attrs) - set(ATTRIBUTES))
    if missing or unknown:
        raise ValueError(f"feature file attributes: missing {missing}, unknown {unknown}")
    coords = np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2)
    n = len(coords)
    trident = trident_coords_attrs(attrs, Path(path).parent)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(COORDS, data=coords).attrs.update(trident)
        f.create_dataset(TISSUE, data=np.ascontiguousarray(tissue, dtype=np.float32))
        chunks = (max(1, min(n, 256)), feature_dim) if n else None
        dataset = f.create_dataset(FEATURES, shape=(n, feature_dim), dtype="float32", chunks=chunks)
        dataset.attrs.update({"name": trident["name"], "savetodir": trident["savetodir"], "encoder": attrs["backbone"]})
        yield FeatureFileWriter(dataset)
        f.attrs.update({k: _h5(v) for k, v in {**attrs, "pathotune_version": __version__}.items()})


def remove_partial_files(folder: str | os.PathLike[str], slide_id: str) -> None:
    """Delete what an interrupted writer of ``slide_id`` may have left in ``folder``: ``<id>.h5.tmp`` (the name
    pathotune 0.1.0 wrote to) and the hidden temporary files of :func:`report.io.atomic_path`."""
    folder = Path(folder)
    for p in (folder / f"{slide_id}{SUFFIX}.tmp", *folder.glob(f".{slide_id}{SUFFIX}.*.tmp{SUFFIX}")):
        p.unlink(missing_ok=True)
