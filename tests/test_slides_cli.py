"""`pathotune slides ...` end to end on tiny models and small real-content slides, plus heatmap and GeoJSON output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY2, TINY_NAME
from helpers import run_main as cli
from PIL import Image
from slide_fixtures import cmu_crop, tissue_and_glass, write_pyramid_tiff

from pathotune import create_model, save_bundle
from pathotune.bundle import read_manifest
from pathotune.slides import TilingConfig, open_slide
from pathotune.slides.extract import extract_slides, read_slide_features
from pathotune.slides.geojson import tiles_feature_collection, tiles_geojson
from pathotune.slides.heatmap import COLORBAR_WIDTH, bundle_heatmaps, score_heatmap

TINY = TINY2
NAME = TINY_NAME
COARSE = ["--target-mpp", "2.0", "--num-workers", "0"]


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[-1], lines[-1]


def check_geojson(path: Path, n_tiles: int) -> list[dict]:
    """The FeatureCollection QuPath imports: closed 5-point square rings, finite numbers, tile objects."""
    fc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-finite {c} in {path}"))
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == n_tiles
    for feat in fc["features"]:
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        (ring,) = feat["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for pt in ring for v in pt)
        xs, ys = {p[0] for p in ring}, {p[1] for p in ring}
        assert len(xs) == 2 and len(ys) == 2  # an axis-aligned square
        props = feat["properties"]
        assert props["objectType"] == "tile" and isinstance(props["name"], str)
        assert all(math.isfinite(v) for v in props["measurements"].values())
    return fc["features"]


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    write_pyramid_tiff(d / "s1.tif", tissue_and_glass(384, 768, seed=0), mpp=0.5, levels=3, tile=64)
    return d


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(123)
    text = (torch.randn(24, generator=g), torch.randn(7, 24, generator=g))
    model = create_model(NAME, "pathotune", 3, image_size=32, backbone_kwargs=dict(TINY), text_features=text)
    return save_bundle(model, tmp_path_factory.mktemp("b") / "bundle")


# -- units: GeoJSON and heatmap -------------------------------------------------------------------------------
def test_geojson_schema_and_qupath_fields(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [128, 0], [256, 384]], dtype=np.int64)
    scores = {"prob_tumour": [0.9, 0.1, float("nan")], "prob_normal": np.array([0.1, 0.9, 0.5])}
    path = tiles_geojson(
        coords,
        128.5,
        scores,
        tmp_path / "t.geojson",
        classification=["tumour", "normal", None],
        class_names=["normal", "tumour"],
    )
    feats = check_geojson(path, 3)
    assert feats[0]["geometry"]["coordinates"][0] == [[0, 0], [128.5, 0], [128.5, 128.5], [0, 128.5], [0, 0]]
    assert feats[0]["properties"]["measurements"] == {"prob_tumour": 0.9, "prob_normal": pytest.approx(0.1)}
    assert feats[2]["properties"]["measurements"] == {"prob_normal": 0.5}  # NaN left out, not written as NaN
    assert feats[0]["properties"]["classification"]["name"] == "tumour"
    assert feats[1]["properties"]["classification"]["color"] != feats[0]["properties"]["classification"]["color"]
    assert "classification" not in feats[2]["properties"]
    ann = tiles_feature_collection(coords, 10, None, object_type="annotation")
    assert {f["properties"]["objectType"] for f in ann["features"]} == {"annotation"}
    with pytest.raises(ValueError, match="2 values for 3 tiles"):
        tiles_feature_collection(coords, 10, {"x": [1, 2]})


def test_heatmap_png_blends_scores_over_thumbnail(slides_dir: Path, tmp_path: Path) -> None:
    with open_slide(slides_dir / "s1.tif") as reader:
        thumb = reader.thumbnail(192)  # 768x384 slide -> 192x96, 4 level-0 px per thumbnail px
        coords = np.array([[0, 0], [128, 0]])
        path = score_heatmap(
            reader, coords, np.array([0.0, 1.0]), 128, tmp_path / "h.png", max_size=192, alpha=0.5, cmap="inferno"
        )
        bare = score_heatmap(
            reader, coords, np.array([0.0, 1.0]), 128, tmp_path / "b.png", max_size=192, colorbar=False
        )
    img = Image.open(path)
    assert img.mode == "RGB" and img.size == (192 + COLORBAR_WIDTH, 96)
    assert Image.open(bare).size == (192, 96)
    got, base = np.asarray(img, dtype=np.float64), np.asarray(thumb, dtype=np.float64)
    from matplotlib import colormaps

    hot = np.array(colormaps["inferno"](1.0)[:3]) * 255
    np.testing.assert_allclose(got[10, 40], 0.5 * base[10, 40] + 0.5 * hot, atol=1.0)  # inside tile 2 (x 32..63)
    np.testing.assert_array_equal(got[60:, 100:192], base[60:, 100:192])  # no tile there: the slide untouched


# -- the commands ---------------------------------------------------------------------------------------------
def test_tile_writes_qc_and_coords(monkeypatch, capsys, slides_dir: Path, tmp_path: Path) -> None:
    code, out, err = cli(
        monkeypatch,
        capsys,
        "slides",
        "tile",
        "--slides",
        slides_dir,
        "--out",
        tmp_path,
        "--target-mpp",
        "2.0",
        "--tile-size",
        "32",
    )
    assert code == 0, err
    assert Image.open(tmp_path / "s1_qc.png").mode == "RGB"
    with open(tmp_path / "s1_tiles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["x", "y", "tissue", "pen", "blur", "fold"]  # the artifact flags by default
    assert all(float(r["tissue"]) >= 0.5 for r in rows)
    assert (tmp_path / "tiles_summary.csv").is_file()


def test_extract_with_bundle_then_class_heatmaps(
    monkeypatch, capsys, slides_dir: Path, bundle: Path, tmp_path: Path
) -> None:
    """The demo's path: extract with a patch bundle, then paint its per-tile class probabilities."""
    feats = tmp_path / "feats"
    args = ["slides", "extract", "--slides", slides_dir, "--bundle", bundle, "--out", feats, *COARSE, "--quiet"]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    sf = read_slide_features(feats / "s1.h5")
    assert sf.attrs["bundle_fingerprint"] == read_manifest(bundle)["sha256"] and sf.attrs["tile_size"] == 32
    mtime = (feats / "s1.h5").stat().st_mtime_ns
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0 and "skipped" in out and (feats / "s1.h5").stat().st_mtime_ns == mtime

    heat = tmp_path / "heat"
    code, out, err = cli(
        monkeypatch,
        capsys,
        "slides",
        "heatmap",
        "--bundle",
        bundle,
        "--features",
        feats,
        "--slides",
        slides_dir,
        "--out",
        heat,
        "--max-size",
        "256",
    )
    assert code == 0, err
    for c in ("class_0", "class_1", "class_2"):
        img = Image.open(heat / f"s1_{c}.png")
        assert img.mode == "RGB" and img.size == (256 + COLORBAR_WIDTH, 128)
    feats_json = check_geojson(heat / "s1.geojson", len(sf.coords))
    probs = np.array([[f["properties"]["measurements"][f"prob_class_{j}"] for j in range(3)] for f in feats_json])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    top = [f["properties"]["classification"]["name"] for f in feats_json]
    assert top == [f"class_{j}" for j in probs.argmax(1)]
    ring = feats_json[0]["geometry"]["coordinates"][0]
    assert ring[0] == [int(v) for v in sf.coords[0]] and ring[2][0] - ring[0][0] == pytest.approx(128.0)


def test_extract_errors_are_one_line(monkeypatch, capsys, slides_dir: Path, bundle: Path, tmp_path: Path) -> None:
    code, _, err = cli(
        monkeypatch,
        capsys,
        "slides",
        "extract",
        "--slides",
        slides_dir,
        "--bundle",
        bundle,
        "--backbone",
        "dinov2_vits14",
        "--out",
        tmp_path / "f",
        *COARSE,
    )
    assert code == 2
    one_line_error(err, "trained on backbone", NAME)
    png_dir = tmp_path / "png"
    png_dir.mkdir()
    Image.fromarray(tissue_and_glass(256, 512)).save(png_dir / "plain.png")
    code, _, err = cli(
        monkeypatch,
        capsys,
        "slides",
        "extract",
        "--slides",
        png_dir,
        "--bundle",
        bundle,
        "--out",
        tmp_path / "f",
        *COARSE,
    )
    assert code == 2
    one_line_error(err, "plain.png", "--mpp")
    code, _, err = cli(monkeypatch, capsys, "slides", "heatmap", "--features", tmp_path, "--out", tmp_path / "h")
    assert code == 2
    one_line_error(err, "--model", "--bundle")


def test_plain_backbone_features_refused_by_prompted_bundle(
    monkeypatch, capsys, slides_dir: Path, bundle: Path, tmp_path: Path
) -> None:
    feats = tmp_path / "feats"
    code, _, err = cli(
        monkeypatch,
        capsys,
        "slides",
        "extract",
        "--slides",
        slides_dir,
        "--backbone",
        NAME,
        "--weights",
        "random",
        "--image-size",
        "32",
        "--out",
        feats,
        *COARSE,
        "--quiet",
    )
    assert code == 0, err
    attrs = read_slide_features(feats / "s1.h5").attrs
    assert attrs["backbone"] == NAME and attrs["bundle_fingerprint"] == "" and attrs["feature_dim"] == 384
    code, _, err = cli(
        monkeypatch, capsys, "slides", "heatmap", "--bundle", bundle, "--features", feats, "--out", tmp_path / "h"
    )
    assert code == 2
    one_line_error(err, "not extracted with bundle")


def test_linear_probe_bundle_reads_plain_backbone_features(slides_dir: Path, tmp_path: Path) -> None:
    """A head-only bundle leaves the backbone as it was, so plain features of the same weights suit its head."""
    probe = create_model(NAME, "linear", 2, image_size=32, backbone_kwargs=dict(TINY))
    bundle = save_bundle(probe, tmp_path / "probe")
    extract_slides(
        probe,
        [slides_dir / "s1.tif"],
        tmp_path / "f",
        tiling=TilingConfig(target_mpp=2.0, tile_size=32),
        num_workers=0,
        progress=False,
    )
    (done,) = bundle_heatmaps(bundle, tmp_path / "f", tmp_path / "h", max_size=128)
    assert done["slide_id"] == "s1" and sum(done["class_share"].values()) == pytest.approx(1.0)
    assert [p.name for p in done["heatmaps"]] == ["s1_class_0.png", "s1_class_1.png"]
    check_geojson(done["geojson"], done["n_tiles"])


@pytest.fixture(scope="module")
def mil_features(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Eight small slides cut from different parts of the CMU slide, their tiny-model features and labels."""
    root = tmp_path_factory.mktemp("mil")
    slides = []
    for k in range(8):
        x, y = 500 + 128 * (k % 4), 1500 + 256 * (k // 4)
        path = root / "slides" / f"m{k}.tif"
        path.parent.mkdir(exist_ok=True)
        write_pyramid_tiff(path, cmu_crop(x, y, 256, 256), mpp=0.5, levels=2, tile=64)
        slides.append(path)
    model = create_model(NAME, "linear", 2, image_size=32, backbone_kwargs=dict(TINY))
    extract_slides(
        model,
        slides,
        root / "feats",
        tiling=TilingConfig(target_mpp=1.0, tile_size=32, min_tissue=0.0),
        num_workers=0,
        progress=False,
    )
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"m{k},{'ab'[k % 2]}\n" for k in range(8)))
    return root / "feats", labels


def test_mil_train_predict_heatmap(monkeypatch, capsys, mil_features: tuple[Path, Path], tmp_path: Path) -> None:
    feats, labels = mil_features
    run = tmp_path / "run"
    code, out, err = cli(
        monkeypatch,
        capsys,
        "slides",
        "train",
        "--features",
        feats,
        "--labels",
        labels,
        "--aggregator",
        "abmil",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--out",
        run,
        "--quiet",
    )
    assert code == 0, err
    assert "mean ± std" in out and (run / "metrics.json").is_file()
    preds = tmp_path / "preds.csv"
    code, out, err = cli(monkeypatch, capsys, "slides", "predict", "--model", run, "--features", feats, "--out", preds)
    assert code == 0, err
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["slide_id"] for r in rows) == [f"m{k}" for k in range(8)]
    assert all(abs(float(r["prob_a"]) + float(r["prob_b"]) - 1) < 1e-5 for r in rows)
    heat = tmp_path / "heat"
    code, out, err = cli(
        monkeypatch,
        capsys,
        "slides",
        "heatmap",
        "--model",
        run,
        "--features",
        feats,
        "--slides",
        feats.parent / "slides",
        "--out",
        heat,
        "--max-size",
        "128",
    )
    assert code == 0, err
    assert Image.open(heat / "m0_heatmap.png").size == (128 + COLORBAR_WIDTH, 128)
    n = len(read_slide_features(feats / "m0.h5").coords)
    att = [f["properties"]["measurements"]["attention"] for f in check_geojson(heat / "m0.geojson", n)]
    assert sum(att) == pytest.approx(1.0, abs=1e-4)
