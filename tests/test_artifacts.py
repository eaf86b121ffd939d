"""Artifact flags: each rule on real H&E with a constructed artifact (flagged there and nowhere else), the pen rule
against HistoQC's own pen masks, and `slides tile` / `slides extract` writing, drawing and using the flags."""

from __future__ import annotations

import csv
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY2, TINY_NAME, one_line_error
from helpers import run_main as cli
from PIL import Image
from scipy import ndimage
from slide_fixtures import pyramid_levels, tissue_and_glass, write_pyramid_tiff

from pathotune import create_model
from pathotune.errors import ConfigError
from pathotune.slides import TilingConfig, open_slide, plan_tiles, sample_slide, tissue_mask
from pathotune.slides.artifacts import (
    ARTIFACT_CLASSES,
    ARTIFACTS,
    ArtifactConfig,
    artifact_masks,
    blur_mask,
    fold_mask,
    parse_kinds,
    pen_mask,
)
from pathotune.slides.extract import extract_slides, read_slide_features
from pathotune.slides.geojson import geojson_tissue_mask
from pathotune.slides.qc import qc_thumbnail

HISTOQC = files("pathotune") / "assets" / "histoqc"
GREEN_INK = (113, 194, 183)  # the median colour under HistoQC's pen_green mask
TILE = ["--target-mpp", "2.0", "--tile-size", "32", "--mask-size", "192"]  # 128 level-0 px tiles, 4 px per mask px


def histoqc_pen(name: str) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(Image.open(str(HISTOQC / f"pen_{name}.png")).convert("RGB"))
    return rgb, np.asarray(Image.open(str(HISTOQC / f"pen_{name}_mask.png")).convert("L")) > 0


def f1(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    p, r = tp / (tp + fp), tp / (tp + fn)
    return float(p), float(r), float(2 * p * r / (p + r))


@pytest.fixture(scope="module")
def cmu_thumb() -> tuple[np.ndarray, np.ndarray, float]:
    """The CMU slide at a mask grid's scale (256 px, 5.8 µm per pixel): RGB, its tissue mask, microns per pixel."""
    with open_slide(sample_slide()) as reader:
        rgb = np.asarray(reader.thumbnail(256)).copy()
        mpp = reader.mpp * reader.dimensions[1] / rgb.shape[0]
    return rgb, tissue_mask(rgb), mpp


def he_and_glass() -> np.ndarray:
    """96 x 192: H&E on the left half, glass on the right, at 2 µm per pixel (a 4x reduction of level 0)."""
    return pyramid_levels(tissue_and_glass(384, 768, seed=0), 3)[2].copy()


def square(shape: tuple[int, ...], y: int, x: int, side: int) -> np.ndarray:
    out = np.zeros(shape[:2], dtype=bool)
    out[y : y + side, x : x + side] = True
    return out


# -- the rules on real content ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "expected"), [("green", (0.805, 0.983, 0.885)), ("black", (1.0, 0.757, 0.862))])
def test_pen_rule_scores_on_histoqc_pen_thumbnails(name: str, expected: tuple[float, float, float]) -> None:
    """Pixel precision, recall and F1 against HistoQC's masks (benchmarks/pen_qc.py reports all three images)."""
    rgb, truth = histoqc_pen(name)
    assert f1(pen_mask(rgb), truth) == pytest.approx(expected, abs=0.001)


def test_pen_flags_an_ink_stroke_on_tissue_and_glass_and_nothing_else() -> None:
    """The black-ink rule reads the image at HistoQC's 8 µm per pixel, where the darkest nuclei are no ink."""
    rgb = he_and_glass()
    clean = pen_mask(rgb, mask_mpp=2.0)
    stroke = np.zeros(rgb.shape[:2], dtype=bool)
    stroke[40:46, 20:180] = True  # from H&E (columns < 96) across onto glass
    rgb[stroke] = GREEN_INK
    assert not clean.any() and pen_mask(rgb).sum() > stroke.sum()  # read pixel by pixel, nuclei pass for ink
    np.testing.assert_array_equal(pen_mask(rgb, mask_mpp=2.0), stroke)


def test_blur_flags_the_blurred_square_only(cmu_thumb) -> None:
    rgb, tissue, _ = cmu_thumb
    assert not blur_mask(rgb, tissue).any()  # the CC0 slide is in focus
    region = square(rgb.shape, 208, 96, 40)  # dense dermis and epidermis near the bottom
    blurred = rgb.copy()
    blurred[region] = np.round(ndimage.gaussian_filter(rgb.astype(np.float64), (2, 2, 0))[region]).astype(np.uint8)
    flagged = blur_mask(blurred, tissue)
    inner = ndimage.binary_erosion(region, iterations=4)
    assert flagged[inner & tissue].mean() > 0.9
    assert not (flagged & ~region).any()


def test_fold_flags_a_pleat_of_tissue_only(cmu_thumb) -> None:
    """A pleat lays tissue over itself three times; each layer multiplies the light that passes (Beer-Lambert)."""
    rgb, tissue, mpp = cmu_thumb
    clean = fold_mask(rgb, tissue, mask_mpp=mpp)
    assert clean.sum() / tissue.sum() < 0.002  # HistoQC's dark-tissue rule on a clean slide: 31 of 18k px
    y, x, side = 76, 112, 24  # the darkest fully tissue-covered square of the thumbnail (epidermis)
    region = square(rgb.shape, y, x, side)
    layer = rgb[y : y + side, x : x + side].astype(np.float64) / 255
    folded = rgb.copy()
    folded[region] = np.round(255 * layer * layer[::-1] * layer[:, ::-1]).reshape(-1, 3).astype(np.uint8)
    flagged = fold_mask(folded, tissue, mask_mpp=mpp)
    assert flagged[ndimage.binary_erosion(region, iterations=2)].all()
    assert not (flagged & ~ndimage.binary_dilation(region, iterations=3) & ~clean).any()  # within the average's reach


def test_blur_and_fold_leave_glass_and_coloured_ink_alone() -> None:
    """Glass inside a tissue mask (a filled hole) is flat but not blurred tissue; a coloured stroke is not a fold."""
    rgb = he_and_glass()
    rgb[40:46, 20:90] = (120, 10, 40)  # dark red ink over the tissue: grey below 0.15
    everything = np.ones(rgb.shape[:2], dtype=bool)
    blur = blur_mask(rgb, everything)
    assert not blur[:, 100:].any()  # the glass half
    assert not fold_mask(rgb, everything)[40:46, 20:90].any()


def test_artifact_masks_follow_the_tissue_grid_and_kinds() -> None:
    rgb = he_and_glass()
    rgb[40:46, 20:180] = GREEN_INK
    small = np.zeros((48, 96), dtype=bool)  # e.g. a tissue mask read from GeoJSON on a coarser grid
    small[:, :48] = True
    masks = artifact_masks(rgb, small, ArtifactConfig(kinds=("pen", "fold")))
    assert list(masks) == ["pen", "fold"] and all(m.shape == (48, 96) and m.dtype == bool for m in masks.values())
    assert masks["pen"][20:23, 10:90].all() and not masks["pen"][:18].any()
    assert artifact_masks(rgb, small, ArtifactConfig(kinds=())) == {}


# -- configuration --------------------------------------------------------------------------------------------
def test_parse_kinds() -> None:
    assert parse_kinds("fold, PEN", "--qc") == ("pen", "fold")
    assert parse_kinds("all", "--qc") == ARTIFACTS
    assert parse_kinds("none", "--qc") == parse_kinds("", "--qc") == ()
    with pytest.raises(ConfigError, match="--qc 'pen,smudge': unknown artifact 'smudge'; give a comma-separated"):
        parse_kinds("pen,smudge", "--qc")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ("pen",), "drop": ("blur",)}, "--drop-artifacts blur needs the blur flag computed; add it to --qc"),
        ({"blur_threshold": 1.5}, "blur_threshold (--blur-threshold) must lie between 0 and at most 1, got 1.5"),
        ({"fold_threshold": float("nan")}, "fold_threshold (--fold-threshold) must lie between 0 and at most 1"),
        ({"max_fraction": 1.0}, "max_fraction (--max-artifact) must lie between 0 and below 1, got 1.0"),
        ({"blur_sigma": 0.0}, "artifact blur_sigma must be a positive number, got 0.0"),
        ({"kinds": ("dust",)}, "artifact kinds 'dust' is unknown"),
    ],
)
def test_config_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ArtifactConfig(**kwargs)
    assert message in str(exc.value)


def test_dropped_tiles_are_above_max_fraction_of_a_dropped_kind() -> None:
    cfg = ArtifactConfig(drop=("pen", "fold"), max_fraction=0.25)
    fractions = {"pen": np.array([0.0, 0.25, 0.26, 0.0]), "blur": np.ones(4), "fold": np.array([0, 0, 0, 0.9])}
    np.testing.assert_array_equal(cfg.dropped(fractions, 4), [False, False, True, True])


# -- the commands ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 768x384 slide at 0.5 mpp: H&E on the left half, glass on the right, a green pen stroke from the tissue
    across the glass (level-0 rows 96-111, columns 160-703) and a blurred square in the tissue."""
    rgb = tissue_and_glass(384, 768, seed=0)
    blur = square(rgb.shape, 192, 32, 160)
    rgb[blur] = np.round(ndimage.gaussian_filter(rgb.astype(np.float64), (8, 8, 0))[blur]).astype(np.uint8)
    rgb[96:112, 160:704] = GREEN_INK
    d = tmp_path_factory.mktemp("artifact_slides")
    write_pyramid_tiff(d / "s1.tif", rgb, mpp=0.5, levels=3, tile=64)
    return d


def read_tiles(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tile_run(monkeypatch, capsys, slides: Path, out: Path, *extra: str) -> list[dict[str, str]]:
    code, _, err = cli(monkeypatch, capsys, "slides", "tile", "--slides", slides, "--out", out, *TILE, *extra)
    assert code == 0, err
    return read_tiles(out / "s1_tiles.csv")


def test_tile_writes_each_flag_as_mask_and_qupath_geojson(monkeypatch, capsys, slides_dir: Path, tmp_path) -> None:
    rows = tile_run(monkeypatch, capsys, slides_dir, tmp_path)
    expected_pen = np.zeros((96, 192), dtype=bool)
    expected_pen[24:28, 40:176] = True  # the stroke on the 4 px mask grid
    masks = {}
    for kind in ARTIFACTS:
        png = Image.open(tmp_path / f"s1_{kind}.png")
        arr = np.asarray(png)
        assert png.mode == "L" and png.size == (192, 96) and set(np.unique(arr)) <= {0, 255}
        masks[kind] = arr > 0
        path = tmp_path / f"s1_{kind}.geojson"
        fc = json.loads(path.read_text())
        assert fc["type"] == "FeatureCollection"
        for i, feature in enumerate(fc["features"]):
            props = feature["properties"]
            assert props == {
                "objectType": "annotation",
                "name": f"{kind} {i}",
                "classification": ARTIFACT_CLASSES[kind],
            }
        if fc["features"]:  # level-0 polygons: rasterised on the mask grid, the PNG back up to its own edge
            back = geojson_tissue_mask(path, (768, 384), (96, 192))
            edge = ndimage.binary_dilation(masks[kind]) & ~ndimage.binary_erosion(masks[kind])
            assert not ((back ^ masks[kind]) & ~edge).any()  # outlines are simplified within one mask pixel
    np.testing.assert_array_equal(masks["pen"], expected_pen)
    (ring,) = json.loads((tmp_path / "s1_pen.geojson").read_text())["features"][0]["geometry"]["coordinates"]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert (min(xs), min(ys), max(xs), max(ys)) == (160, 96, 704, 112)
    assert ARTIFACT_CLASSES["pen"]["name"] == "Pen" and ARTIFACT_CLASSES["fold"]["name"] == "Fold"
    assert masks["blur"][56:80, 16:40].mean() > 0.9 and not masks["blur"][:40].any()  # the square, and only there

    assert list(rows[0]) == ["x", "y", "tissue", "pen", "blur", "fold"]
    for r in rows:  # each column is the flag's share of the tile's 32 x 32 mask pixels
        x, y = int(r["x"]) // 4, int(r["y"]) // 4
        for kind in ARTIFACTS:
            assert float(r[kind]) == pytest.approx(masks[kind][y : y + 32, x : x + 32].mean(), abs=1e-4)
    pen = {(r["x"], r["y"]): float(r["pen"]) for r in rows}
    assert (pen[("128", "0")], pen[("256", "0")], pen[("0", "0")]) == (0.0938, 0.125, 0.0)  # 3/32, 4/32
    summary = read_tiles(tmp_path / "tiles_summary.csv")[0]
    assert float(summary["pen"]) > 0 and "dropped" not in summary


def test_qc_thumbnail_paints_the_flags(monkeypatch, capsys, slides_dir: Path, tmp_path: Path) -> None:
    with open_slide(slides_dir / "s1.tif") as reader:
        plan = plan_tiles(reader, TilingConfig(2.0, 32, mask_size=192), artifacts=ArtifactConfig())
        plain = plan_tiles(reader, TilingConfig(2.0, 32, mask_size=192))
        qc_thumbnail(reader, plan, tmp_path / "flags.png", max_size=384)
        qc_thumbnail(reader, plain, tmp_path / "plain.png", max_size=384)
    flags, bare = (np.asarray(Image.open(tmp_path / n), dtype=np.float64) for n in ("flags.png", "plain.png"))
    magenta = np.asarray(ARTIFACT_CLASSES["pen"]["color"], dtype=np.float64)
    # the stroke's middle row on the glass (level-0 y 104, x 600): half thumbnail, half magenta
    np.testing.assert_allclose(flags[52, 300], np.round(0.5 * bare[52, 300] + 0.5 * magenta), atol=0.5)
    np.testing.assert_array_equal(flags[120:180, 200:], bare[120:180, 200:])  # glass without flags: untouched


def test_qc_flags_only_what_is_asked(monkeypatch, capsys, slides_dir: Path, tmp_path: Path) -> None:
    base = [".pathotune-record.json", "s1_patches.h5", "s1_qc.png", "s1_tiles.csv", "s1_tissue.geojson"]
    base += ["tiles_summary.csv"]
    rows = tile_run(monkeypatch, capsys, slides_dir, tmp_path / "none", "--qc", "none")
    assert list(rows[0]) == ["x", "y", "tissue"]
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == base
    rows = tile_run(monkeypatch, capsys, slides_dir, tmp_path / "pen", "--qc", "pen")
    assert list(rows[0]) == ["x", "y", "tissue", "pen"]
    assert sorted(p.name for p in (tmp_path / "pen").iterdir()) == sorted([*base, "s1_pen.png", "s1_pen.geojson"])


def test_drop_artifacts_removes_exactly_the_flagged_tiles(monkeypatch, capsys, slides_dir: Path, tmp_path) -> None:
    every = tile_run(monkeypatch, capsys, slides_dir, tmp_path / "all")
    by_xy = {(r["x"], r["y"]): r for r in every}
    pen = ["--drop-artifacts", "pen", "--max-artifact", "0.1"]
    kept = tile_run(monkeypatch, capsys, slides_dir, tmp_path / "pen", *pen)
    assert {(r["x"], r["y"]) for r in kept} == {xy for xy, r in by_xy.items() if float(r["pen"]) <= 0.1}
    assert ("256", "0") not in {(r["x"], r["y"]) for r in kept} and ("128", "0") in {(r["x"], r["y"]) for r in kept}
    kept = tile_run(monkeypatch, capsys, slides_dir, tmp_path / "blur", "--drop-artifacts", "blur")
    dropped = {xy for xy, r in by_xy.items() if float(r["blur"]) > 0.25}
    assert dropped and {(r["x"], r["y"]) for r in kept} == set(by_xy) - dropped
    assert int(read_tiles(tmp_path / "blur" / "tiles_summary.csv")[0]["dropped"]) == len(dropped)


def test_extract_drops_the_same_tiles_and_a_rerun_must_match(slides_dir: Path, tmp_path: Path) -> None:
    model = create_model(TINY_NAME, "linear", 2, image_size=32, backbone_kwargs=dict(TINY2)).eval()
    tiling = TilingConfig(2.0, 32, mask_size=192)
    drop = ArtifactConfig(kinds=("blur",), drop=("blur",))
    slide = slides_dir / "s1.tif"
    with open_slide(slide) as reader:
        planned = plan_tiles(reader, tiling, artifacts=drop)
        every = plan_tiles(reader, tiling)
    assert planned.n_dropped > 0 and len(planned) + planned.n_dropped == len(every)
    extract_slides(model, [slide], tmp_path, tiling=tiling, num_workers=0, progress=False, artifacts=drop)
    feats = read_slide_features(tmp_path / "s1.h5")
    np.testing.assert_array_equal(feats.coords, planned.coords)
    assert "drop_artifacts" in feats.attrs["tissue_config"]
    with pytest.raises(ConfigError) as exc:  # the same folder without dropping would mix two tile sets
        extract_slides(model, [slide], tmp_path, tiling=tiling, num_workers=0, progress=False)
    assert "without the tiles flagged blur" in str(exc.value) and "--overwrite" in str(exc.value)


def test_cli_refuses_a_drop_without_its_flag(monkeypatch, capsys, slides_dir: Path, tmp_path: Path) -> None:
    code, _, err = cli(
        monkeypatch, capsys, "slides", "tile", "--slides", slides_dir, "--out", tmp_path / "o", "--qc", "pen",
        "--drop-artifacts", "pen,fold",
    )  # fmt: skip
    assert code == 2 and "--drop-artifacts fold needs the fold flag computed" in one_line_error(err)
    assert not (tmp_path / "o").exists()
