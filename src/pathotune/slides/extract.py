"""Tile features for whole slides: one HDF5 per slide, written so an interrupted run resumes where it stopped.

Each ``<slide_id>.h5`` holds ``coords`` (N, 2 int64, level-0 top-left corners, the plan's), ``features``
(N, D float32) and ``tissue`` (N, float32), plus attributes that say exactly which model, weights, prompts,
scale and normalisation made them. A file only gets its final name once complete (written as
``<slide_id>.h5.tmp``, then renamed), so a finished-looking file is always a finished file; a rerun skips
slides whose file exists and matches the request, and refuses to mix in one made by another request.

Tiles are decoded and resized in DataLoader workers (slide readers are not picklable, so each worker opens
its own), while the main process only runs the model, under ``torch.inference_mode`` and, on a GPU, the
Fabric's autocast.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..errors import ConfigError, DataError, PathoTuneError
from ..report.io import atomic_write_text
from .reader import SlideReader, open_slide, require_mpp
from .tiling import TilePlan, TilingConfig, plan_tiles, read_tile
from .tissue import TissueConfig

__all__ = [
    "MATCH_KEYS",
    "SLIDE_EXTENSIONS",
    "FeatureExtractor",
    "SlideFeatures",
    "SlideResult",
    "SlideTileDataset",
    "TileTransform",
    "as_extractor",
    "default_num_workers",
    "extract_slide",
    "extract_slides",
    "find_slides",
    "load_extractor",
    "make_extract_fabric",
    "read_slide_features",
    "slide_id",
]

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
# Hamamatsu VMS/VMU slides keep their image data in sibling JPEGs, which are not slides of their own.
_VMS_COMPANIONS = (".jpg", ".jpeg")
# Attributes that must agree for an existing file to count as this request's result.
MATCH_KEYS = (
    "backbone",
    "backbone_fingerprint",
    "bundle_fingerprint",
    "target_mpp",
    "tile_size",
    "image_size",
    "overlap",
    "min_tissue",
)
LOG_NAME = "extract_log.csv"
LOG_FIELDS = (
    "slide_id",
    "slide_path",
    "n_tiles",
    "seconds",
    "tiles_per_s",
    "plan_seconds",
    "rank",
    "device",
    "finished_at",
)


# -- slides in, ids out ---------------------------------------------------------------------------------------
def slide_id(path: str | Path) -> str:
    """A slide's id is its file stem: the name its features, heatmaps and labels rows go by."""
    return Path(path).stem


def _slides_in_folder(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = [n for n in filenames if not n.startswith(".")]
        has_vms = any(Path(n).suffix.lower() in (".vms", ".vmu") for n in names)
        for name in sorted(names):
            ext = Path(name).suffix.lower()
            if ext in SLIDE_EXTENSIONS and not (has_vms and ext in _VMS_COMPANIONS):
                found.append(Path(dirpath) / name)
    return found


def _slides_in_csv(path: Path) -> list[Path]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read slide list {path}: {e}") from None
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else []) if c}
    key = columns.get("slide_path") or columns.get("path")
    if key is None:
        raise DataError(f"slide list {path} needs a 'slide_path' (or 'path') column; it has {sorted(columns)}")
    out = []
    for i, row in enumerate(rows, start=2):
        value = (row.get(key) or "").strip()
        if not value:
            raise DataError(f"slide list {path} line {i} has an empty '{key}'")
        p = Path(value).expanduser()
        out.append(p if p.is_absolute() else path.parent / p)
    return out


def find_slides(source: str | Path) -> list[Path]:
    """Slides from a folder (searched recursively for slide extensions) or a CSV with a slide_path/path column.

    CSV paths may be relative to the CSV's folder. Slide ids (file stems) must be unique, since each names
    one output file.
    """
    source = Path(source)
    if source.is_dir():
        slides = _slides_in_folder(source)
        if not slides:
            raise DataError(f"no slides in {source}; slide extensions are {' '.join(SLIDE_EXTENSIONS)}")
    elif source.is_file() and source.suffix.lower() == ".csv":
        slides = _slides_in_csv(source)
        if not slides:
            raise DataError(f"slide list {source} has no rows")
    elif source.is_file():
        slides = [source]
    else:
        raise DataError(f"slides {source} not found; pass a folder of slides, a slide, or a CSV with slide_path")
    seen: dict[str, Path] = {}
    for p in slides:
        sid = slide_id(p)
        if sid in seen and seen[sid] != p:
            raise DataError(
                f"slides {seen[sid]} and {p} share the id '{sid}' (file stem), so their outputs would collide; "
                "rename one or list them in separate runs"
            )
        seen[sid] = p
    return list(seen.values())


# -- the model ------------------------------------------------------------------------------------------------
@dataclass
class FeatureExtractor:
    """A frozen module mapping normalised images to pooled features, with what identifies its output."""

    module: nn.Module
    backbone: str
    backbone_fingerprint: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    feature_dim: int
    bundle_fingerprint: str = ""
    bundle_path: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.module, "forward_features", None)
        return fn(x) if fn is not None else self.module(x)


def as_extractor(model: Any) -> FeatureExtractor:
    """Wrap a PathoTuneModel (its ``forward_features``) or a TokenViT (its pooled output) for extraction."""
    from ..backbones import TokenViT
    from ..backbones.loading import fingerprint
    from ..model import PathoTuneModel

    if isinstance(model, FeatureExtractor):
        return model
    if isinstance(model, PathoTuneModel):
        bb = model.backbone
        return FeatureExtractor(
            model,
            model.provenance.backbone,
            model.provenance.fingerprint,
            tuple(bb.spec.mean),
            tuple(bb.spec.std),
            bb.img_size,
            bb.feature_dim,
        )
    if isinstance(model, TokenViT):
        return FeatureExtractor(
            model,
            model.spec.name,
            fingerprint(model.vit),
            tuple(model.spec.mean),
            tuple(model.spec.std),
            model.img_size,
            model.feature_dim,
        )
    raise ConfigError(f"cannot extract features with a {type(model).__name__}; pass a PathoTuneModel or TokenViT")


def load_extractor(
    backbone: str | None = None,
    weights: str | None = None,
    bundle: str | Path | None = None,
    image_size: int | None = None,
) -> FeatureExtractor:
    """A plain frozen backbone, or with ``bundle`` the prompt-tuned model it holds (TVP/TTP/IVP active).

    A bundle fixes its own backbone and input size; a different ``backbone`` or ``image_size`` is an error
    rather than silently ignored.
    """
    if bundle is not None:
        from ..bundle import load_bundle, read_manifest
        from ..engine.infer import resolve_bundle

        path = resolve_bundle(bundle)
        manifest = read_manifest(path)
        size = int(manifest["provenance"]["img_size"])
        if image_size is not None and image_size != size:
            raise ConfigError(f"bundle {path} was trained at {size} px; drop --image-size {image_size} or use {size}")
        ex = as_extractor(load_bundle(path, weights=weights, backbone=backbone))
        ex.bundle_fingerprint = str(manifest.get("sha256", ""))
        ex.bundle_path = str(path)
        return ex
    if backbone is None:
        raise ConfigError("pass --backbone (a backbone id) or --bundle (a prompt bundle) to extract features")
    from ..backbones import create_backbone
    from ..engine.run import resolve_weights

    return as_extractor(create_backbone(backbone, weights=resolve_weights(backbone, weights), img_size=image_size))


class TileTransform:
    """Tile -> model input, split in two so the cheap-to-ship part runs in the workers.

    ``to_uint8`` (in DataLoader workers) turns a tile into a (3, S, S) uint8 tensor at the model's input size,
    resizing with antialiasing when the tile is another size; ``normalize`` (on the model's device, a whole
    batch at once) scales to [0, 1] and applies the backbone's mean/std. Shipping uint8 moves a quarter of the
    bytes float32 would between processes. ``__call__`` does both for one tile, for reference use.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int) -> None:
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        self.mean, self.std, self.image_size = tuple(mean), tuple(std), int(image_size)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        t = F.pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB"))
        if t.shape[-2:] != (self.image_size, self.image_size):
            t = F.resize(t, [self.image_size, self.image_size], antialias=True)
        return t

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(img)[None])[0]


class SlideTileDataset(Dataset):
    """The tiles of one plan as (tensor, index); each process opens its own reader on first use.

    Readers wrap C handles that cannot be pickled or shared across a fork, so the dataset carries only the
    path and the plan, and reopens whenever it finds itself in a new process.
    """

    def __init__(
        self,
        slide_path: str | Path,
        plan: TilePlan,
        transform: Callable[[Image.Image], torch.Tensor],
        mpp: float | None = None,
        backend: str = "auto",
    ) -> None:
        self.slide_path = Path(slide_path)
        self.plan, self.transform, self.mpp, self.backend = plan, transform, mpp, backend
        self._reader: SlideReader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.plan)

    def reader(self) -> SlideReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = open_slide(self.slide_path, mpp=self.mpp, backend=self.backend)
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_tile(self.reader(), self.plan, i)), i

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader, self._pid = None, None


# -- where the model runs -------------------------------------------------------------------------------------
def default_num_workers() -> int:
    """min(4, usable CPUs): decoding rarely needs more, and more would starve the model on small machines."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def make_extract_fabric(
    accelerator: str = "auto", devices: int | str = 1, strategy: str = "auto", precision: str = "auto"
) -> Any:
    """A launched Fabric for extraction; precision ``auto`` is 32-bit on CPU and bf16 (else fp16) autocast on CUDA."""
    from lightning_fabric import Fabric

    if precision == "auto":
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if gpu else "32-true"
    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision)
    except (ValueError, RuntimeError, TypeError, ImportError) as e:
        raise ConfigError(f"cannot set up devices ({' '.join(str(e).split())})") from None
    fabric.launch()
    return fabric


@dataclass
class _Runner:
    """Device, rank and autocast, from a Fabric or from a bare device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast: Callable[[], AbstractContextManager] = nullcontext
    barrier: Callable[[], None] = field(default=lambda: None)
    precision: str = "32-true"

    @classmethod
    def build(cls, fabric: Any = None, device: str | torch.device | None = None) -> _Runner:
        if fabric is None:
            dev = torch.device(device or "cpu")
            return cls(dev)
        dev = fabric.device
        on_gpu = dev.type != "cpu"
        strategy = getattr(fabric, "strategy", None)
        plugin = getattr(strategy, "precision", None)
        precision = str(getattr(plugin, "precision", "32-true"))
        return cls(
            dev,
            int(fabric.global_rank),
            int(fabric.world_size),
            fabric.autocast if on_gpu else nullcontext,
            fabric.barrier,
            precision if on_gpu else "32-true",
        )


# -- one slide ------------------------------------------------------------------------------------------------
@dataclass
class SlideResult:
    """What happened to one slide: extracted (with timing) or skipped as already done."""

    slide_id: str
    slide_path: str
    path: Path
    status: str
    n_tiles: int
    seconds: float = 0.0
    plan_seconds: float = 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")


def _nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _request_attrs(ex: FeatureExtractor, tiling: TilingConfig) -> dict[str, Any]:
    return {
        "backbone": ex.backbone,
        "backbone_fingerprint": ex.backbone_fingerprint,
        "bundle_fingerprint": ex.bundle_fingerprint,
        "target_mpp": _nan_if_none(tiling.target_mpp),
        "tile_size": int(tiling.tile_size),
        "image_size": int(ex.image_size),
        "overlap": int(tiling.overlap),
        "min_tissue": float(tiling.min_tissue),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (float, np.floating)) or isinstance(b, (float, np.floating)):
        try:
            fa, fb = float(a), float(b)
        except (TypeError, ValueError):
            return False
        return (math.isnan(fa) and math.isnan(fb)) or math.isclose(fa, fb, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, bytes):
        a = a.decode()
    if isinstance(b, bytes):
        b = b.decode()
    if isinstance(a, np.generic):
        a = a.item()
    return a == b


def _check_existing(path: Path, want: dict[str, Any]) -> int | None:
    """The finished file's tile count; None when it is no readable HDF5 file at all (garbage or truncated: it
    is redone, like a stale temporary file); raises unless ``path`` was made by this very request."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            complete = "features" in f and "coords" in f
            if complete:
                f["coords"].shape, f["features"].shape  # noqa: B018 (the dataset headers must be readable too)
    except OSError:
        return None
    if not complete:
        raise DataError(f"existing file {path} has no coords/features; delete it or pass --overwrite")
    for key, value in want.items():
        if key not in attrs or not _same(attrs[key], value):
            old = attrs.get(key, "<missing>")
            old = old.decode() if isinstance(old, bytes) else old.item() if isinstance(old, np.generic) else old
            raise ConfigError(
                f"{path} holds features made with {key}={old!r}, not {value!r}; pass another --out or --overwrite"
            )
    return int(attrs.get("n_tiles", -1))


_Planned = tuple[TilePlan, str, float]  # plan, reader backend, seconds spent planning


def _plan(slide: Path, tiling: TilingConfig, tissue: TissueConfig | None, mpp: float | None) -> _Planned:
    t0 = time.perf_counter()
    with open_slide(slide, mpp=mpp) as reader:
        if tiling.target_mpp is not None:
            require_mpp(reader)
        return plan_tiles(reader, tiling, tissue=tissue), reader.backend, time.perf_counter() - t0


class _PlanAhead:
    """Plans the next slide in a thread while the current one runs through the model.

    Planning (thumbnail and tissue mask) costs a fixed time per slide; with the model on a GPU the CPU is
    otherwise idle meanwhile. The thread is started only after the current slide's DataLoader workers have
    been forked and is joined before the next slide's are, so no fork ever copies a process mid-way through
    a reader call of another thread.
    """

    def __init__(self, slide: Path, args: tuple) -> None:
        self.slide = slide
        self._result: _Planned | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(slide, *args), daemon=True)
        self._thread.start()

    def _run(self, *args: Any) -> None:
        try:
            self._result = _plan(*args)
        except BaseException as e:  # handed to the main thread by result()
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def result(self) -> _Planned:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _batches(loader: DataLoader, n: int, desc: str, progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from tqdm.auto import tqdm

    with tqdm(total=n, desc=desc, unit="tile", leave=False, disable=not progress, dynamic_ncols=True) as bar:
        batches = iter(loader)
        failure: PathoTuneError | None = None
        try:
            for x, idx in batches:
                yield x, idx
                bar.update(len(idx))
        except PathoTuneError as e:
            failure = type(e)(_worker_message(str(e)))
        finally:
            # Stop the worker pool now, also after an error or an early close. The worker's re-raised exception
            # sits in a reference cycle with the loader iterator, so without this the pool would only be torn
            # down by a later garbage collection, which then waits out the workers' timeouts (seconds each).
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del batches
        if failure is not None:
            raise failure


def _worker_message(text: str) -> str:
    """A worker's error as the one line it started as.

    DataLoader re-raises a worker's exception in the main process with the worker's whole traceback as
    its message; the CLI prints errors on one line, so keep just the original message (the last line).
    """
    if not text.startswith("Caught "):
        return text
    last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), text)
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _extract_one(
    ex: FeatureExtractor,
    slide: Path,
    out_dir: Path,
    tiling: TilingConfig,
    tissue: TissueConfig | None,
    mpp: float | None,
    batch_size: int,
    num_workers: int,
    runner: _Runner,
    progress: bool,
    planned: _Planned | None = None,
    on_started: Callable[[], None] | None = None,
) -> SlideResult:
    """Extract one slide; ``planned`` is its plan if made already, ``on_started`` runs once workers are forked."""
    import h5py

    sid = slide_id(slide)
    final = out_dir / f"{sid}.h5"
    tmp = out_dir / f"{sid}.h5.tmp"
    plan, backend, t_plan = planned if planned is not None else _plan(slide, tiling, tissue, mpp)
    transform = TileTransform(ex.mean, ex.std, ex.image_size)
    dataset = SlideTileDataset(slide, plan, transform.to_uint8, mpp=mpp, backend=backend)
    n, dim = len(plan), ex.feature_dim
    workers = num_workers if n > batch_size else 0  # a pool for one batch costs more than it saves
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=runner.device.type == "cuda",
        persistent_workers=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    # Workers start (fork) when iteration begins: start them before the HDF5 file is open, so no child
    # process ever inherits, and on exit flushes, the handle of the file being written.
    batches = _batches(loader, n, sid, progress)
    try:
        first = next(batches, None) if n else None
        if on_started is not None:
            on_started()
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=np.ascontiguousarray(plan.coords, dtype=np.int64))
            f.create_dataset("tissue", data=np.ascontiguousarray(plan.tissue, dtype=np.float32))
            feats = f.create_dataset(
                "features", shape=(n, dim), dtype="float32", chunks=(max(1, min(n, 256)), dim) if n else None
            )
            with torch.inference_mode():
                pending = [first] if first is not None else []
                for x, idx in _chain(pending, batches):
                    x = transform.normalize(x.to(runner.device, non_blocking=True))
                    with runner.autocast():
                        y = ex.forward(x)
                    y = y.float().cpu().numpy()
                    if y.shape != (len(idx), dim):
                        raise ConfigError(
                            f"model gave features of shape {y.shape} for {len(idx)} tiles; expected dim {dim}"
                        )
                    i0 = int(idx[0])
                    feats[i0 : i0 + len(idx)] = y  # sequential loader: indices are contiguous and in order
            seconds = time.perf_counter() - t1
            attrs = {
                **_request_attrs(ex, tiling),
                "feature_dim": dim,
                "mpp": _nan_if_none(plan.slide_mpp),
                "level": int(plan.level),
                "downsample": float(plan.downsample),
                "read_size": int(plan.read_size),
                "stride": int(plan.stride),
                "tile_size_level0": float(plan.tile_size_level0),
                "dimensions": np.asarray(plan.dimensions, dtype=np.int64),
                "n_tiles": n,
                "n_candidates": int(plan.n_candidates),
                "slide_id": sid,
                "slide_path": str(slide),
                "slide_backend": backend,
                "bundle_path": ex.bundle_path,
                "norm_mean": np.asarray(ex.mean, dtype=np.float64),
                "norm_std": np.asarray(ex.std, dtype=np.float64),
                "normalization": f"RGB tile at {ex.image_size} px (antialiased resize if needed), x / 255, "
                "then (x - norm_mean) / norm_std per channel",
                "precision": runner.precision,
                "tissue_config": repr(asdict(tissue or TissueConfig())),
                "pathotune_version": __version__,
            }
            f.attrs.update(attrs)
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        batches.close()  # shuts the worker pool down now, also on error, rather than at garbage collection
        dataset.close()
    return SlideResult(sid, str(slide), final, "extracted", n, seconds, t_plan)


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def extract_slide(
    model_or_backbone: Any,
    slide_path: str | Path,
    out_dir: str | Path,
    tiling: TilingConfig | None = None,
    tissue: TissueConfig | None = None,
    mpp_override: float | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    fabric: Any = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Path:
    """Extract one slide into ``out_dir/<slide_id>.h5`` (always recomputed) and return that path."""
    ex = as_extractor(model_or_backbone)
    tiling = tiling or TilingConfig(tile_size=ex.image_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    runner = _Runner.build(fabric, device)
    ex.module.eval().to(runner.device)
    workers = default_num_workers() if num_workers is None else num_workers
    return _extract_one(
        ex, Path(slide_path), Path(out_dir), tiling, tissue, mpp_override, batch_size, workers, runner, progress
    ).path


# -- many slides ----------------------------------------------------------------------------------------------
def _log_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return out_dir / (LOG_NAME if world_size == 1 else f"{Path(LOG_NAME).stem}.rank{rank}.csv")


def _read_log(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {r["slide_id"]: r for r in csv.DictReader(f) if r.get("slide_id")}
    except (OSError, csv.Error, UnicodeDecodeError, KeyError):
        return {}  # a log is a convenience; an unreadable one is rebuilt from this run


def _write_log(path: Path, rows: dict[str, dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    w.writeheader()
    for sid in sorted(rows):
        w.writerow(rows[sid])
    atomic_write_text(path, buf.getvalue())


def _log_row(r: SlideResult, rank: int, device: torch.device) -> dict:
    return {
        "slide_id": r.slide_id,
        "slide_path": r.slide_path,
        "n_tiles": r.n_tiles,
        "seconds": f"{r.seconds:.3f}",
        "tiles_per_s": f"{r.tiles_per_s:.2f}",
        "plan_seconds": f"{r.plan_seconds:.3f}",
        "rank": rank,
        "device": str(device),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def extract_slides(
    model_or_backbone: Any,
    slides: Sequence[str | Path],
    out_dir: str | Path,
    tiling: TilingConfig | None = None,
    tissue: TissueConfig | None = None,
    mpp_override: float | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    fabric: Any = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    plan_ahead: bool | None = None,
) -> list[SlideResult]:
    """Extract every slide of this rank's share (``slides[rank::world_size]``), resuming a previous run.

    Finished files whose attributes match the request are skipped; a finished file from another request is
    an error (nothing is mixed into one folder), unless ``overwrite``. Stale ``.h5.tmp`` files from an
    interrupted run are never taken as finished, and a final file that is no readable HDF5 (garbage, truncated)
    is redone like one. Every slide is opened (and its mpp checked) before the first one is extracted, so a
    missing mpp stops the run at once rather than hours in. ``plan_ahead`` plans the next slide while the
    current one is in the model (default: when the model is on an accelerator; on a CPU the model already has
    every core). Returns one result per slide of this rank, in input order.
    """
    from tqdm.auto import tqdm

    ex = as_extractor(model_or_backbone)
    tiling = tiling or TilingConfig(tile_size=ex.image_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    ids: dict[str, Path] = {}
    for s in map(Path, slides):
        if ids.setdefault(slide_id(s), s) != s:
            raise DataError(f"slides {ids[slide_id(s)]} and {s} share the id '{slide_id(s)}'; their outputs collide")
    runner = _Runner.build(fabric, device)
    want = _request_attrs(ex, tiling)
    # Every rank checks every slide, so a bad slide or a clashing file stops all ranks alike instead of
    # leaving the others waiting at the final barrier.
    done: dict[Path, int] = {}
    for slide in ids.values():
        final = out_dir / f"{slide_id(slide)}.h5"
        if final.exists() and not overwrite:
            n = _check_existing(final, want)
            if n is not None:
                done[slide] = n
                continue
            if runner.rank == 0:
                print(f"note: {final} is not a readable HDF5 file (truncated or foreign); extracting it again")
        with open_slide(slide, mpp=mpp_override) as reader:
            if tiling.target_mpp is not None:
                require_mpp(reader)
    mine = list(ids.values())[runner.rank :: runner.world_size]
    todo = [s for s in mine if s not in done]
    results = [
        SlideResult(slide_id(s), str(s), out_dir / f"{slide_id(s)}.h5", "skipped", done[s]) for s in mine if s in done
    ]
    workers = default_num_workers() if num_workers is None else num_workers
    ex.module.eval().to(runner.device)
    log_path = _log_path(out_dir, runner.rank, runner.world_size)
    log = _read_log(log_path)
    show = progress and runner.rank == 0
    ahead = runner.device.type != "cpu" if plan_ahead is None else plan_ahead
    pending: list[_PlanAhead] = []
    tiles = seconds = 0.0
    with tqdm(todo, desc="slides", unit="slide", disable=not show, dynamic_ncols=True) as bar:
        for k, slide in enumerate(bar):
            planned = pending.pop().result() if pending else None
            after = todo[k + 1] if ahead and k + 1 < len(todo) else None

            def plan_next(nxt: Path | None = after) -> None:
                if nxt is not None:
                    pending.append(_PlanAhead(nxt, (tiling, tissue, mpp_override)))

            try:
                r = _extract_one(
                    ex,
                    slide,
                    out_dir,
                    tiling,
                    tissue,
                    mpp_override,
                    batch_size,
                    workers,
                    runner,
                    show,
                    planned=planned,
                    on_started=plan_next,
                )
            except BaseException:
                for p in pending:
                    p.join()
                raise
            results.append(r)
            tiles, seconds = tiles + r.n_tiles, seconds + r.seconds
            bar.set_postfix(tiles=r.n_tiles, tiles_s=f"{tiles / max(seconds, 1e-9):.1f}")
            log[r.slide_id] = _log_row(r, runner.rank, runner.device)
            _write_log(log_path, log)
    if runner.world_size > 1:
        runner.barrier()
        if runner.rank == 0:
            merged = _read_log(out_dir / LOG_NAME)
            for k in range(runner.world_size):
                part = _log_path(out_dir, k, runner.world_size)
                merged.update(_read_log(part))
            _write_log(out_dir / LOG_NAME, merged)
            for k in range(runner.world_size):
                _log_path(out_dir, k, runner.world_size).unlink(missing_ok=True)
        runner.barrier()
    order = {s: i for i, s in enumerate(mine)}
    return sorted(results, key=lambda r: order[Path(r.slide_path)])


# -- reading back ---------------------------------------------------------------------------------------------
@dataclass
class SlideFeatures:
    """One slide's extracted coords, features and attributes."""

    path: Path
    coords: np.ndarray
    features: np.ndarray
    attrs: dict[str, Any]

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id") or self.path.stem)


def read_slide_features(path: str | Path) -> SlideFeatures:
    """Load ``<slide_id>.h5``; attribute bytes become str and numpy scalars Python values."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f or "features" not in f:
                raise DataError(f"{path} has no coords/features; it was not written by `pathotune slides extract`")
            coords, features = f["coords"][()], f["features"][()]
            attrs = {}
            for k, v in f.attrs.items():
                attrs[k] = v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
    except OSError as e:
        raise DataError(f"cannot read features {path} ({' '.join(str(e).split())}); re-extract the slide") from None
    return SlideFeatures(path, np.asarray(coords, dtype=np.int64), np.asarray(features, dtype=np.float32), attrs)
