"""Fault cases of the slide-level surfaces: every output folder is a record (refused, never mixed, a failed
replacement leaves the old one whole), every input is checked at its contract (feature files, coords, GeoJSON,
slide lists, only regular files), and each bad input ends in one line and exit code 2 with every earlier file
byte-identical.

Each case is a row: a name, a setup that writes what it needs into the case's folder and returns the command,
and the words the error line must hold. Run one alone: ``pytest tests/faults -k <name>``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fault_kit import Base, sha_tree
from helpers import TINY2, TINY_NAME, one_line_error, run_main, toy_slide, write_image
from slide_fixtures import tissue_and_glass, write_pyramid_tiff

from pathotune import create_model, save_bundle
from pathotune.mil import MILConfig, train_mil
from pathotune.records import JOURNAL, MARKER, STAGING, TRASH, recover
from pathotune.slides import TilingConfig, tile_slides
from pathotune.slides.extract import extract_slides
from pathotune.slides.extractor import load_extractor

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DIM = 8
TILE = ["--target-mpp", "2.0", "--tile-size", "32"]
EXTRACT = ["--target-mpp", "2.0", "--num-workers", "0", "--quiet"]


@dataclass(frozen=True)
class Shared:
    """Built once, copied by cases, never written: slides, a bundle, its features, a toy cohort, a MIL run."""

    root: Path
    slides: Path
    bundle: Path
    features: Path
    toy: Path
    labels: Path
    mil: Path
    tiles: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    root = tmp_path_factory.mktemp("records_shared")
    slides = root / "slides"
    slides.mkdir()
    for k in range(2):
        write_pyramid_tiff(slides / f"s{k}.tif", tissue_and_glass(256, 512, seed=k), mpp=0.5, levels=2, tile=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model(TINY_NAME, "vpt-deep", num_classes=2, image_size=32, backbone_kwargs=TINY2)
        bundle = save_bundle(model, root / "bundle")
        features = root / "features"
        extract_slides(
            load_extractor(bundle=bundle),
            sorted(slides.glob("*.tif")),
            features,
            TilingConfig(2.0, 32),
            num_workers=0,
            progress=False,
        )
        tiles = root / "tiles"
        tile_slides(str(slides), tiles, TilingConfig(2.0, 32))
        rng = np.random.default_rng(0)
        toy = root / "toy"
        rows = ["slide_id,label"]
        for i in range(12):
            toy_slide(toy / f"t{i:02d}.h5", (rng.normal(size=(6, DIM)) + (i % 2)).astype(np.float32))
            rows.append(f"t{i:02d},{'tumor' if i % 2 else 'normal'}")
        labels = root / "labels.csv"
        labels.write_text("\n".join(rows) + "\n")
        mil = root / "mil"
        train_mil(
            MILConfig(features=str(toy), labels=str(labels), out=str(mil), folds=3, epochs=2, bootstrap=0),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return Shared(root, slides, bundle, features, toy, labels, mil, tiles)


@dataclass
class Ctx:
    root: Path
    shared: Shared
    base: Base

    def copy(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.root / name))


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Ctx], list]
    expect: tuple[str, ...]
    check: Callable[[Ctx], None] | None = None


def absent(name: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert not (ctx.root / name).exists(), f"{name} was created"

    return check


def no_staging(name: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        left = [p.name for p in (ctx.root / name).iterdir() if p.name.startswith(".") and p.name != MARKER]
        assert not left, f"left behind: {left}"

    return check


# -- setups ---------------------------------------------------------------------------------------------------
def heatmap(ctx: Ctx, features: Path, out: str = "heat", *extra) -> list:
    return [
        "slides",
        "heatmap",
        "--bundle",
        ctx.shared.bundle,
        "--features",
        features,
        "--slides",
        ctx.shared.slides,
        "--out",
        ctx.root / out,
        "--max-size",
        "64",
        *extra,
    ]


def mil_train(ctx: Ctx, out: Path, features: Path | None = None, *extra) -> list:
    return [
        "slides",
        "train",
        "--features",
        features or ctx.shared.toy,
        "--labels",
        ctx.shared.labels,
        "--folds",
        "2",
        "--epochs",
        "1",
        "--out",
        out,
        "--quiet",
        *extra,
    ]


def features_with(ctx: Ctx, change: Callable[[Path], None]) -> Path:
    feats = ctx.copy(ctx.shared.features, "feats")
    change(feats / "s0.h5")
    return feats


def set_nan(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f["features"][...] = np.nan


def set_attr(key: str, value) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            f.attrs[key] = value

    return change


def duplicate_coords(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        coords = f["coords"][()]
        coords[1] = coords[0]
        f["coords"][...] = coords


def toy_with(ctx: Ctx, change: Callable[[Path], None]) -> Path:
    toy = ctx.copy(ctx.shared.toy, "toy")
    change(toy / "t00.h5")
    return toy


def trident_file(ctx: Ctx, patch_level0: int, features: np.ndarray | None = None) -> Path:
    folder = ctx.root / "trident"
    folder.mkdir()
    with h5py.File(folder / "s0.h5", "w") as f:
        f["features"] = np.ones((2, DIM), np.float32) if features is None else features
        coords = f.create_dataset("coords", data=np.array([[0, 0], [64, 0]], dtype=np.int64))
        coords.attrs.update(
            {
                "patch_size": 32,
                "patch_size_level0": patch_level0,
                "level0_magnification": 20,
                "target_magnification": 5,
                "overlap": 0,
                "level0_width": 512,
                "level0_height": 256,
            }
        )
    return folder


def geojson_folder(ctx: Ctx, doc: str | dict) -> Path:
    folder = ctx.root / "gj"
    folder.mkdir()
    (folder / "s0.geojson").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return folder


def hole_outside() -> dict:
    shell = [[0, 0], [256, 0], [256, 256], [0, 256], [0, 0]]
    hole = [[300, 10], [400, 10], [400, 100], [300, 100], [300, 10]]
    return {"type": "Polygon", "coordinates": [shell, hole]}


def nested_deep() -> str:
    return '{"type": "Polygon", "coordinates": ' + "[" * 100_000 + "]" * 100_000 + "}"


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def slides_with(ctx: Ctx, extra: Callable[[Path], None]) -> Path:
    folder = ctx.copy(ctx.shared.slides, "slides")
    extra(folder)
    return folder


def patch_data(ctx: Ctx, bad: Callable[[Path], None]) -> Path:
    data = Path(shutil.copytree(ctx.base.tiles, ctx.root / "tiles"))
    bad(data / "train" / "red")
    return data


def patch_train(ctx: Ctx, data: Path) -> list:
    return [
        "train",
        "--data",
        data,
        "--config",
        ctx.base.cfg,
        "--out",
        ctx.root / "run",
        "--steps",
        "1",
        "--method",
        "linear",
        "--quiet",
        "--accelerator",
        "cpu",
    ]


def slide_list(ctx: Ctx) -> Path:
    s0 = ctx.shared.slides / "s0.tif"
    path = ctx.root / "slides.csv"
    path.write_text(f"slide_path,mpp\n{s0},0.5\n{ctx.shared.slides / 's1.tif'},\n{s0},0.25\n")
    return path


def broken_extra_slide(folder: Path) -> None:
    (folder / "zz_broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)


def half_swapped(ctx: Ctx) -> list:
    """A MIL run whose --overwrite was killed mid-swap: the journal says what moved, half the old entries are in
    the trash, half the new ones in place. Any command that opens the folder first restores the old run whole."""
    run = ctx.copy(ctx.shared.mil, "mil")
    staging, trash = run / STAGING, run / TRASH
    staging.mkdir()
    trash.mkdir()
    old = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    new = ["metrics.json", "report.md", "fold_9"]
    (run / JOURNAL).write_text(json.dumps({"old": old, "new": new}))
    os.replace(run / "metrics.json", trash / "metrics.json")
    os.replace(run / "report.md", trash / "report.md")
    (run / "metrics.json").write_text('{"half": "new"}')
    (staging / "report.md").write_text("new")
    (staging / "fold_9").mkdir()
    return mil_train(ctx, run)


def restored(ctx: Ctx) -> None:
    run = ctx.root / "mil"
    assert json.loads((run / "metrics.json").read_text()) == json.loads((ctx.shared.mil / "metrics.json").read_text())
    assert not any((run / n).exists() for n in (STAGING, TRASH, JOURNAL, "fold_9"))


CASES: list[Case] = [
    # records refused, never mixed
    Case(
        "mil_train_onto_patch_run",
        lambda c: mil_train(c, c.copy(c.base.run, "run")),
        ("already holds a training run", "--overwrite"),
    ),
    Case(
        "mil_train_onto_own_run",
        lambda c: mil_train(c, c.copy(c.shared.mil, "mil")),
        ("slide-level MIL run", "--overwrite"),
    ),
    Case(
        "tile_onto_mil_run",
        lambda c: ["slides", "tile", "--slides", c.shared.slides, "--out", c.copy(c.shared.mil, "mil"), *TILE],
        ("slide-level MIL run",),
    ),
    Case(
        "heatmap_onto_features",
        lambda c: heatmap(c, c.shared.features, "f") if c.copy(c.shared.features, "f") else [],
        ("already holds slide features",),
    ),
    Case(
        "extract_onto_patch_run",
        lambda c: [
            "slides",
            "extract",
            "--slides",
            c.shared.slides,
            "--bundle",
            c.shared.bundle,
            "--out",
            c.copy(c.base.run, "run"),
            *EXTRACT,
        ],
        ("already holds a training run",),
    ),
    Case(
        "tile_rerun_other_settings",
        lambda c: [
            "slides",
            "tile",
            "--slides",
            c.shared.slides,
            "--out",
            c.copy(c.shared.tiles, "t"),
            "--target-mpp",
            "2.0",
            "--tile-size",
            "64",
            "--qc",
            "none",
        ],
        ("made by another request", "tile_size"),
    ),
    Case(
        "tile_onto_patch_run",
        lambda c: ["slides", "tile", "--slides", c.shared.slides, "--out", c.copy(c.base.run, "run"), *TILE],
        ("already holds a training run",),
    ),
    Case(
        "predict_over_unknown_csv",
        lambda c: [
            "slides",
            "predict",
            "--model",
            c.shared.mil,
            "--features",
            c.shared.toy,
            "--out",
            _file(c.root / "p.csv", "slide_id\n"),
        ],
        ("p.csv already exists", "--overwrite"),
    ),
    Case("mid_swap_run_is_restored_first", half_swapped, ("slide-level MIL run", "--overwrite"), restored),
    # features checked where they are read
    Case(
        "heatmap_nan_features",
        lambda c: heatmap(c, features_with(c, set_nan)),
        ("s0.h5", "NaN or infinite", "re-extract"),
        absent("heat"),
    ),
    Case(
        "mil_train_nan_features",
        lambda c: mil_train(c, c.root / "m", toy_with(c, set_nan)),
        ("t00.h5", "NaN or infinite"),
        absent("m"),
    ),
    Case("heatmap_one_slide_twice", lambda c: heatmap(c, _twin(c)), ("both belong to slide 's0'",), absent("heat")),
    Case(
        "mil_train_duplicate_tiles",
        lambda c: mil_train(c, c.root / "m", toy_with(c, duplicate_coords)),
        ("t00.h5", "more than once"),
        absent("m"),
    ),
    Case(
        "heatmap_non_numeric_features",
        lambda c: heatmap(c, trident_file(c, 64, np.array([[b"a"] * DIM] * 2))),
        ("s0.h5", "not numbers"),
    ),
    Case(
        "heatmap_negative_patch_size",
        lambda c: heatmap(c, trident_file(c, -64)),
        ("s0.h5", "tile_size_level0=-64.0", "not a positive number"),
        absent("heat"),
    ),
    Case(
        "heatmap_n_tiles_mismatch",
        lambda c: heatmap(c, features_with(c, set_attr("n_tiles", 999))),
        ("n_tiles=999", "re-extract"),
    ),
    Case(
        "heatmap_zero_tile_size",
        lambda c: heatmap(c, features_with(c, set_attr("tile_size_level0", 0.0))),
        ("tile_size_level0=0.0", "not a positive number"),
    ),
    Case(
        "mil_train_tiles_outside_slide",
        lambda c: mil_train(c, c.root / "m", toy_with(c, set_attr("dimensions", [100, 100]))),
        ("t00.h5", "outside its 100x100 slide"),
    ),
    # GeoJSON, coords and slide lists
    Case(
        "extract_geojson_hole_outside_shell",
        lambda c: [
            "slides",
            "extract",
            "--slides",
            c.shared.slides / "s0.tif",
            "--bundle",
            c.shared.bundle,
            "--out",
            c.root / "f",
            *EXTRACT,
            "--tissue-geojson",
            geojson_folder(c, hole_outside()),
        ],
        ("s0.geojson", "Hole lies outside shell", "--repair-geojson"),
        absent("f"),
    ),
    Case(
        "tile_geojson_nested_too_deep",
        lambda c: [
            "slides",
            "tile",
            "--slides",
            c.shared.slides / "s0.tif",
            "--out",
            c.root / "t",
            *TILE,
            "--tissue-geojson",
            geojson_folder(c, nested_deep()),
        ],
        ("s0.geojson", "nested too deeply"),
    ),
    Case(
        "tile_geojson_is_a_fifo",
        lambda c: [
            "slides",
            "tile",
            "--slides",
            c.shared.slides / "s0.tif",
            "--out",
            c.root / "t",
            *TILE,
            "--tissue-geojson",
            fifo(c.root / "gj" / "s0.geojson"),
        ],
        ("not a regular file",),
    ),
    Case(
        "tile_slide_list_names_a_slide_twice",
        lambda c: ["slides", "tile", "--slides", slide_list(c), "--out", c.root / "t", *TILE],
        ("names slide", "lines 2 and 4", "keep one row per slide"),
        absent("t"),
    ),
    Case(
        "extract_coords_negative_size",
        lambda c: [
            "slides",
            "extract",
            "--slides",
            c.shared.slides / "s0.tif",
            "--bundle",
            c.shared.bundle,
            "--out",
            c.root / "f",
            "--num-workers",
            "0",
            "--coords",
            _coords(c, -32),
        ],
        ("patch_size=-32", "not a number >= 0"),
    ),
    # only regular files are read
    Case(
        "tile_fifo_named_like_a_slide",
        lambda c: [
            "slides",
            "tile",
            "--slides",
            slides_with(c, lambda d: fifo(d / "a_pipe.svs")),
            "--out",
            c.root / "t",
            *TILE,
        ],
        ("a_pipe.svs", "FIFO"),
    ),
    Case("heatmap_fifo_named_like_features", lambda c: heatmap(c, _fifo_features(c)), ("zz.h5", "FIFO")),
    Case(
        "train_fifo_named_like_an_image",
        lambda c: patch_train(c, patch_data(c, lambda d: fifo(d / "pipe.png"))),
        ("pipe.png", "FIFO"),
    ),
    Case(
        "train_broken_link_image",
        lambda c: patch_train(c, patch_data(c, lambda d: (d / "gone.png").symlink_to(d / "nowhere.png"))),
        ("gone.png", "broken symbolic link"),
    ),
    # a replacement that fails leaves the old record whole
    Case(
        "extract_overwrite_with_a_bad_slide",
        lambda c: [
            "slides",
            "extract",
            "--slides",
            slides_with(c, broken_extra_slide),
            "--bundle",
            c.shared.bundle,
            "--out",
            c.copy(c.shared.features, "f"),
            *EXTRACT,
            "--overwrite",
        ],
        ("zz_broken.svs",),
        no_staging("f"),
    ),
    Case(
        "tile_overwrite_with_a_bad_slide",
        lambda c: [
            "slides",
            "tile",
            "--slides",
            slides_with(c, broken_extra_slide),
            "--out",
            c.copy(c.shared.tiles, "t"),
            *TILE,
            "--overwrite",
        ],
        ("zz_broken.svs",),
        no_staging("t"),
    ),
    # flags
    Case(
        "extract_chunk_tiles_zero",
        lambda c: [
            "slides",
            "extract",
            "--slides",
            c.shared.slides,
            "--bundle",
            c.shared.bundle,
            "--out",
            c.root / "f",
            "--chunk-tiles",
            "0",
        ],
        ("--chunk-tiles",),
    ),
    Case(
        "mil_train_unknown_logger",
        lambda c: mil_train(c, c.root / "m", None, "--logger", "neptune"),
        ("unknown logger 'neptune'",),
        absent("m"),
    ),
    Case(
        "heatmap_needs_one_model",
        lambda c: ["slides", "heatmap", "--features", c.shared.features, "--out", c.root / "h"],
        ("exactly one of --model",),
    ),
]


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _twin(ctx: Ctx) -> Path:
    feats = ctx.copy(ctx.shared.features, "feats")
    shutil.copy(feats / "s0.h5", feats / "s0_copy.h5")  # records slide_id s0 too
    return feats


def _fifo_features(ctx: Ctx) -> Path:
    feats = ctx.copy(ctx.shared.features, "feats")
    fifo(feats / "zz.h5")
    return feats


def _coords(ctx: Ctx, size: int) -> Path:
    folder = ctx.root / "coords"
    folder.mkdir()
    with h5py.File(folder / "s0_patches.h5", "w") as f:
        c = f.create_dataset("coords", data=np.array([[0, 0]], dtype=np.int64))
        c.attrs.update({"patch_size": size, "patch_size_level0": 64})
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, shared: Shared, base: Base, tmp_path: Path, monkeypatch, capsys) -> None:
    root = tmp_path / "case"
    root.mkdir()
    ctx = Ctx(root, shared, base)
    command = case.setup(ctx)
    before = sha_tree(ctx.root, shared.root, base.root)
    code, out, err = run_main(monkeypatch, capsys, *command)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    line = one_line_error(err)
    assert "Traceback" not in out
    for word in case.expect:
        assert word in line, f"{word!r} not in: {line}"
    after = sha_tree(ctx.root, shared.root, base.root)
    if case.name == "mid_swap_run_is_restored_first":
        before = {k: v for k, v in before.items() if "/mil/" not in k}  # the half-swapped folder was repaired
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"files changed or lost: {changed}"
    if case.check is not None:
        case.check(ctx)


def test_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


def test_recover_without_a_journal_leaves_a_finished_swap_alone(tmp_path: Path) -> None:
    (tmp_path / TRASH).mkdir()
    (tmp_path / TRASH / "old.txt").write_text("old")
    (tmp_path / "metrics.json").write_text("{}")
    assert recover(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    write_image(tmp_path / "x.png", (1, 2, 3), np.random.default_rng(0))
