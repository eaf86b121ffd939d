"""A benchmark grid's configuration: datasets, methods and variants, splits and seeds, the strongest-of
baselines, comparisons, the few-shot protocol, and the training config of each cell (grid defaults < common <
the method's overrides < the variant's own keys).

Every cell's TrainConfig is built when the file loads, so a bad key fails before anything trains.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..data.demo import build_slide_qc_tiles
from ..errors import ConfigError
from ..methods import list_methods
from .config import TrainConfig

BENCH_KEYS = ("balanced_accuracy", "macro_f1", "auroc")
BUILTIN_DATA = ("slide_qc",)
RESERVED_VARIANT_KEYS = ("data", "out", "seed", "split_seed")  # the grid sets these per cell
FEWSHOT_DIR = "_fewshot"  # under a dataset's folder; no method slug starts with "_", so it never collides
TTA_SUFFIX = " +tta"  # a cell trained with tta: its test-time-augmented result, reported as its own row


class DatasetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str  # a path accepted by --data, or builtin:<name>
    task: dict = Field(default_factory=dict)
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    methods: list[str] | None = None  # the grid's methods this dataset runs (None: all of them)


class FewShotConfig(BaseModel):
    """k tiles per class for train and for val, several seeded episodes per k, the full test split."""

    model_config = ConfigDict(extra="forbid")
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    episodes: int = 5
    methods: list[str]  # method or variant names
    seed: int = 0  # seeds the episode draws (with k and the episode number) and the dataset's own split
    datasets: list[str] | None = None  # None: every dataset of the grid
    comparisons: list[list[str]] = Field(default_factory=list)  # [method, baseline]: paired over episodes

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v) or len(set(v)) != len(v):
            raise ValueError("must be distinct integers >= 1")
        return sorted(v)

    @field_validator("episodes")
    @classmethod
    def _episodes(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one method")
        return v


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    backbone: str = "dinov2_vits14"
    weights: str | None = None
    image_size: int | None = None
    datasets: dict[str, DatasetEntry]
    methods: list[str] = Field(default_factory=list)  # method or variant names; may be empty with fewshot
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    splits: list[int] | None = None  # split seeds (a group k-fold split each); None: the data's own split
    # name -> candidates (methods, variants, or "<name> +tta"): per split, the one with the best validation score
    strongest: dict[str, list[str]] = Field(default_factory=dict)
    common: dict = Field(default_factory=dict)  # TrainConfig keys for every cell
    overrides: dict[str, dict] = Field(default_factory=dict)  # method -> TrainConfig keys (its recipe)
    variants: dict[str, dict] = Field(default_factory=dict)  # display name -> {method: ..., **TrainConfig keys}
    comparisons: list[list[str]] = Field(default_factory=list)  # [method_or_variant, baseline] pairs
    fewshot: FewShotConfig | None = None
    runs_dir: str = "runs/bench"
    output: str = "BENCHMARKS.md"
    note: str = ""


def slug(name: str) -> str:
    """A folder name for a method or variant; plain method names map to themselves, so old grids resume."""
    s = re.sub(r"[^a-z0-9.+-]+", "-", name.lower()).strip("-.")
    return s or "method"


def base_method(cfg: BenchConfig, name: str) -> str:
    """The engine method behind a grid entry (a variant's ``method``, else the name itself)."""
    return cfg.variants[name]["method"] if name in cfg.variants else name


def load_bench_config(path: str | Path) -> BenchConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"benchmark config {p} not found")
    try:
        cfg = BenchConfig(**(yaml.safe_load(p.read_text()) or {}))
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{p}: key '{'.'.join(map(str, err['loc']))}': {err['msg']}") from None
    known = list_methods()
    for name, keys in cfg.variants.items():
        if name in known:
            raise ConfigError(f"{p}: variant '{name}' has a method's name; give the variant its own name")
        if "method" not in keys:
            raise ConfigError(f"{p}: key 'variants.{name}.method' is missing; a variant names the method it runs")
        if keys["method"] not in known:
            raise ConfigError(f"{p}: key 'variants.{name}.method': unknown method '{keys['method']}'; use {known}")
        reserved = sorted(set(keys) & set(RESERVED_VARIANT_KEYS))
        if reserved:
            raise ConfigError(f"{p}: key 'variants.{name}.{reserved[0]}': set by the benchmark for each cell")
    names = list(dict.fromkeys([*cfg.methods, *(cfg.fewshot.methods if cfg.fewshot else [])]))
    unknown = sorted(n for n in names if n not in known and n not in cfg.variants)
    if unknown:
        extra = f" or variants {sorted(cfg.variants)}" if cfg.variants else ""
        raise ConfigError(f"{p}: unknown method(s) {unknown}; use {known}{extra}")
    if not cfg.methods and not cfg.fewshot:
        raise ConfigError(f"{p}: key 'methods': name at least one method (or add a fewshot section)")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"{p}: key 'methods': a name is listed twice")
    slugs: dict[str, str] = {}
    for n in names:
        if slugs.setdefault(slug(n), n) != n:
            raise ConfigError(f"{p}: '{n}' and '{slugs[slug(n)]}' would share the run folder '{slug(n)}'; rename one")
    used = {base_method(cfg, n) for n in names}
    stray = sorted(set(cfg.overrides) - used)
    if stray:
        raise ConfigError(f"{p}: overrides for methods not in the grid: {stray}")
    for key, values in (("seeds", cfg.seeds), ("splits", cfg.splits or [])):
        if len(set(values)) != len(values):
            twice = next(v for v in values if values.count(v) > 1)
            raise ConfigError(f"{p}: key '{key}': {twice} is listed twice; each {key[:-1]} runs once")
        if any(v < 0 for v in values):
            raise ConfigError(f"{p}: key '{key}': values must be >= 0")
    rows = reported_names(cfg)
    for name, members in cfg.strongest.items():
        if name in rows:
            raise ConfigError(f"{p}: key 'strongest.{name}': the name of a method or variant; give it its own name")
        bad = [m for m in members if m not in rows]
        if not members or bad:
            what = f"{bad[0]!r} is not in methods (with tta: '<name>{TTA_SUFFIX}')" if bad else "name candidates"
            raise ConfigError(f"{p}: key 'strongest.{name}': {what}")
    for i, pair in enumerate(cfg.comparisons):
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ConfigError(f"{p}: key 'comparisons.{i}': give two different names, [method, baseline]")
        missing = [n for n in pair if n not in rows and n not in cfg.strongest]
        if missing:
            raise ConfigError(f"{p}: key 'comparisons.{i}': {missing[0]!r} is not in methods or strongest")
    for i, pair in enumerate(cfg.fewshot.comparisons if cfg.fewshot else []):
        if len(pair) != 2 or pair[0] == pair[1] or any(n not in cfg.fewshot.methods for n in pair):
            raise ConfigError(f"{p}: key 'fewshot.comparisons.{i}': give two different few-shot methods")
    if cfg.fewshot and cfg.fewshot.datasets:
        missing = [d for d in cfg.fewshot.datasets if d not in cfg.datasets]
        if missing:
            raise ConfigError(f"{p}: key 'fewshot.datasets': {missing[0]!r} is not in datasets")
    for dataset, entry in cfg.datasets.items():
        stray = [m for m in entry.methods or [] if m not in cfg.methods]
        if stray:
            raise ConfigError(f"{p}: key 'datasets.{dataset}.methods': {stray[0]!r} is not in methods")
        for n in names:
            _check_cell(p, cfg, dataset, n)
    return cfg


def dataset_methods(cfg: BenchConfig, dataset: str) -> list[str]:
    """The grid methods a dataset runs."""
    chosen = cfg.datasets[dataset].methods
    return [m for m in cfg.methods if chosen is None or m in chosen]


def reported_names(cfg: BenchConfig) -> list[str]:
    """Every row a grid reports: its methods and variants, and ``<name> +tta`` for those trained with tta."""
    out = list(cfg.methods)
    for name in cfg.methods:
        if any(cell_config(cfg, d, "<data>", name, 0, Path("<out>")).get("tta") for d in cfg.datasets):
            out.append(name + TTA_SUFFIX)
    return out


def _check_cell(p: Path, cfg: BenchConfig, dataset: str, name: str) -> None:
    """Build the cell's TrainConfig now, so a bad key fails before any cell trains, naming where it came from."""
    cell = cell_config(cfg, dataset, "<data>", name, 0, Path("<out>"))
    try:
        TrainConfig(**cell)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        top = loc[0] if loc else ""
        if top in cfg.variants.get(name, {}):
            origin = f"variants.{name}."
        elif top == "task" and cfg.datasets[dataset].task:
            origin = f"datasets.{dataset}."
        elif top in cfg.overrides.get(base_method(cfg, name), {}):
            origin = f"overrides.{base_method(cfg, name)}."
        elif top in cfg.common:
            origin = "common."
        else:
            origin = ""
        what = "unknown training key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"{p}: key '{origin}{'.'.join(loc)}': {what}") from None


def resolve_data(entry: DatasetEntry, root: Path, split: int | None = None) -> tuple[str, int | None]:
    """(the ``data`` of a cell, its ``split_seed``). A builtin dataset is built here, one folder per split (its
    builder draws the split; the cell reads the manifest, which names the groups); any other data is re-split by
    the cell itself with ``split_seed``."""
    if not entry.data.startswith("builtin:"):
        return entry.data, split
    name = entry.data.split(":", 1)[1]
    if name not in BUILTIN_DATA:
        raise ConfigError(f"unknown builtin dataset '{name}'; available: {list(BUILTIN_DATA)}")
    out = root / "data" / (name if split is None else f"{name}_split{split}")
    build_slide_qc_tiles(out, split_seed=split)
    return str(out / "manifest.csv"), None


def cell_config(
    cfg: BenchConfig, dataset: str, data: str, method: str, seed: int, out: Path, split_seed: int | None = None
) -> dict:
    """A cell's TrainConfig keys: grid defaults < common < the method's overrides < the variant's own keys.

    ``method`` may be a variant name. ``task`` mappings merge key by key in the same order, with the dataset's
    task between the overrides and the variant (a variant can change one task key and keep the dataset's rest).
    """
    entry = cfg.datasets[dataset]
    base = base_method(cfg, method)
    variant = {k: v for k, v in cfg.variants.get(method, {}).items() if k != "method"}
    layers = [cfg.common, cfg.overrides.get(base, {}), variant]
    cell = {
        "data": data,
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "image_size": cfg.image_size,
        "method": base,
        "seed": seed,
        "split_seed": split_seed,
        "val_fraction": entry.val_fraction,
        "test_fraction": entry.test_fraction,
        "out": str(out),
        "resume": True,  # a cell killed mid-run continues from its checkpoint when the grid is rerun
    }
    for layer in layers:
        cell.update(layer)
    task: dict = {}
    for part in (cfg.common.get("task"), cfg.overrides.get(base, {}).get("task"), entry.task, variant.get("task")):
        if isinstance(part, dict):
            task.update(part)
        elif part is not None:
            task = part  # not a mapping: let TrainConfig reject it with the key's name
    if task:
        cell["task"] = task
    return {k: v for k, v in cell.items() if v is not None}


def fewshot_cell_config(cfg: BenchConfig, dataset: str, manifest: Path, method: str, episode: int, out: Path) -> dict:
    """A few-shot cell: the episode's manifest holds every split, so nothing is carved and the seed is the episode."""
    cell = cell_config(cfg, dataset, str(manifest), method, episode, out)
    cell.update({"data": str(manifest), "val_fraction": 0.0, "test_fraction": 0.0, "seed": episode, "out": str(out)})
    return cell
