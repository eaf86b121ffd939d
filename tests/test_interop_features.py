"""Feature files both ways with TRIDENT and CLAM: ours carry TRIDENT's coords attributes, and their feature folders
go through `slides train`, `slides predict` and `slides heatmap`.

The foreign files here are written the way each tool writes them (dataset names, dtypes, chunking, attribute
names and types): TRIDENT's ``save_h5`` with the attributes of ``coords_to_h5`` and the ``features`` attributes of
``extract_patch_features`` (trident/IO.py, trident/wsi_objects/WSI.py); CLAM's ``save_hdf5`` of
``extract_features_fp.py`` (``h5_files/``: float32 features, int32 coords, no attributes) and its ``pt_files/``
(``torch.save(torch.from_numpy(features))``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import TINY2, TINY_NAME, one_line_error, run_main
from PIL import Image
from slide_fixtures import cmu_crop, tissue_and_glass, write_pyramid_tiff
from test_features import attrs_for

from pathotune import create_model
from pathotune.errors import DataError
from pathotune.features import (
    check_feature_compatibility,
    list_feature_files,
    read_feature_attrs,
    read_slide_features,
    tile_side,
    write_feature_file,
)
from pathotune.mil import predict_slides
from pathotune.slides import TilingConfig
from pathotune.slides.extract import extract_slides
from pathotune.slides.heatmap import COLORBAR_WIDTH

TRIDENT_COORDS_ATTRS = {
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "level0_width",
    "level0_height",
    "name",
    "savetodir",
}


# -- writers, as the other tools write ------------------------------------------------------------------------
def _save_h5(path: Path, assets: dict[str, np.ndarray], attributes: dict[str, dict], chunk: int) -> None:
    """TRIDENT's save_h5 / CLAM's save_hdf5: resizable datasets chunked along N, attributes per dataset."""
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            dset = f.create_dataset(
                key, shape=val.shape, maxshape=(None,) + val.shape[1:], chunks=(chunk,) + val.shape[1:], dtype=val.dtype
            )
            dset[:] = val
            for k, v in attributes.get(key, {}).items():
                dset.attrs[k] = "None" if v is None else v


def write_trident(
    folder: Path, name: str, features: np.ndarray, coords: np.ndarray, patch_size: int, src_mag: int, target_mag: int
) -> Path:
    """``<folder>/<name>.h5`` as TRIDENT's ``extract_patch_features`` writes it (coords attrs from coords_to_h5)."""
    folder.mkdir(parents=True, exist_ok=True)
    coords_attrs = {
        "patch_size": patch_size,
        "patch_size_level0": patch_size * src_mag // target_mag,
        "level0_magnification": src_mag,
        "target_magnification": target_mag,
        "overlap": 0,
        "name": name,
        "savetodir": str(folder.parent / "patches"),
        "level0_width": 256,
        "level0_height": 256,
    }
    path = folder / f"{name}.h5"
    attributes = {"features": {"name": name, "savetodir": str(folder), "encoder": "uni_v1"}, "coords": coords_attrs}
    _save_h5(path, {"features": features.astype(np.float32), "coords": coords.astype(np.int64)}, attributes, 1)
    return path


def write_clam(root: Path, name: str, features: np.ndarray, coords: np.ndarray) -> None:
    """CLAM's feature folder: ``h5_files/<name>.h5`` (no attributes) and ``pt_files/<name>.pt``."""
    (root / "h5_files").mkdir(parents=True, exist_ok=True)
    (root / "pt_files").mkdir(parents=True, exist_ok=True)
    assets = {"features": features.astype(np.float32), "coords": coords.astype(np.int32)}
    _save_h5(root / "h5_files" / f"{name}.h5", assets, {}, 32)
    torch.save(torch.from_numpy(features.astype(np.float32)), root / "pt_files" / f"{name}.pt")


def grid(step: int, side: int = 256) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(0, side, step), np.arange(0, side, step))
    return np.stack([xs.ravel(), ys.ravel()], 1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 256x256 slides at 0.25 mpp (40x) cut from the CMU slide, TRIDENT features at 20x with 64 px patches
    (128 level-0 px: four tiles a slide), the same features as CLAM writes them, and labels."""
    root = tmp_path_factory.mktemp("interop")
    rng = np.random.default_rng(0)
    lines = ["slide_id,label"]
    (root / "slides").mkdir()
    for k in range(6):
        name = f"t{k}"
        write_pyramid_tiff(
            root / "slides" / f"{name}.tif",
            cmu_crop(500 + 128 * (k % 3), 1500 + 256 * (k // 3), 256, 256),
            mpp=0.25,
            levels=2,
            tile=64,
        )
        coords = grid(128)
        feats = rng.normal(size=(len(coords), 8)) + 2.0 * (k % 2)
        write_trident(root / "trident" / "features_uni_v1", name, feats, coords, 64, 40, 20)
        write_clam(root / "clam", name, feats, coords)
        lines.append(f"{name},{'ab'[k % 2]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def geojson_sides(path: Path) -> set[float]:
    """Side lengths (level-0 px) of the tile squares in a GeoJSON."""
    sides = set()
    for feat in json.loads(path.read_text())["features"]:
        (ring,) = feat["geometry"]["coordinates"]
        sides.add(max(p[0] for p in ring) - min(p[0] for p in ring))
    return sides


# -- ours, as TRIDENT reads them ------------------------------------------------------------------------------
def test_extracted_files_carry_tridents_coords_attributes(tmp_path: Path) -> None:
    """A 0.25 mpp (40x) slide tiled at 0.5 mpp (20x), 32 px: TRIDENT's attributes with TRIDENT's arithmetic."""
    slide = tmp_path / "s40x.tif"
    write_pyramid_tiff(slide, tissue_and_glass(128, 256, seed=1), mpp=0.25, levels=2, tile=64)
    model = create_model(TINY_NAME, "linear", 2, image_size=32, backbone_kwargs=dict(TINY2))
    tiling = TilingConfig(target_mpp=0.5, tile_size=32, overlap=8, min_tissue=0.0)
    (r,) = extract_slides(model, [slide], tmp_path / "f", tiling=tiling, num_workers=0, progress=False)
    with h5py.File(r.path, "r") as f:
        a = dict(f["coords"].attrs)
        assert set(a) == TRIDENT_COORDS_ATTRS
        assert a["patch_size"] == 32 and a["patch_size_level0"] == 64 and a["overlap"] == 8
        assert isinstance(a["patch_size_level0"], np.integer) and isinstance(a["patch_size"], np.integer)
        assert a["level0_magnification"] == pytest.approx(40.0) and a["target_magnification"] == pytest.approx(20.0)
        assert (a["level0_width"], a["level0_height"]) == (256, 128)
        assert a["name"] == "s40x" and a["savetodir"] == str(tmp_path / "f")
        # TRIDENT's own relation between them (coords_to_h5), and what its slide encoders read
        assert a["patch_size"] * a["level0_magnification"] / a["target_magnification"] == a["patch_size_level0"]
        assert f["features"].attrs["encoder"] == TINY_NAME
        assert len(f["coords"]) > 0
    # our reader keeps reading our root attributes, not the coords ones
    assert read_slide_features(r.path).attrs["tile_size"] == 32


def test_native_resolution_and_unknown_mpp_magnifications(tmp_path: Path) -> None:
    """Native resolution: the target magnification is the slide's own; no mpp: NaN (as our files store None)."""
    for mpp, want in ((0.5, 20.0), (None, None)):
        path = tmp_path / f"{mpp}.h5"
        attrs = attrs_for(2, mpp=mpp, target_mpp=None, tile_size_level0=32.0)
        with write_feature_file(path, np.zeros((2, 2)), np.ones(2), 4, attrs) as w:
            w.write(0, np.ones((2, 4), dtype=np.float32))
        with h5py.File(path, "r") as f:
            a = f["coords"].attrs
            for key in ("level0_magnification", "target_magnification"):
                assert math.isnan(a[key]) if want is None else a[key] == pytest.approx(want)
            assert a["patch_size_level0"] == 32 and (a["level0_width"], a["level0_height"]) == (640, 480)


# -- theirs, as we read them ----------------------------------------------------------------------------------
def test_trident_h5_read_under_our_names(cohort: Path) -> None:
    path = cohort / "trident" / "features_uni_v1" / "t1.h5"
    sf = read_slide_features(path, bag=True)
    assert sf.features.shape == (4, 8) and sf.coords.dtype == np.int64 and sf.coords.shape == (4, 2)
    assert sf.tile_side == 128.0 and sf.slide_id == "t1"
    a = sf.attrs
    assert a["source_format"] == "trident" and a["backbone"] == "uni_v1" and a["tile_size"] == 64
    assert a["mpp"] == pytest.approx(0.25) and a["target_mpp"] == pytest.approx(0.5)  # mpp = 10 / magnification
    assert a["dimensions"] == [256, 256] and a["overlap"] == 0
    # the recorded side, never the grid's step (here tiles overlap: a 64 px step, 128 px tiles)
    dense = write_trident(cohort / "dense", "d", np.ones((16, 8)), grid(64), 64, 40, 20)
    assert read_slide_features(dense).tile_side == 128.0
    # two encoders are two feature spaces, even in TRIDENT files
    other = write_trident(cohort / "other", "t9", np.ones((4, 8)), grid(128), 64, 40, 20)
    with h5py.File(other, "a") as f:
        f["features"].attrs["encoder"] = "conch_v15"
    with pytest.raises(DataError, match="different extractors \\(backbone 'uni_v1' vs 'conch_v15'\\)"):
        check_feature_compatibility([path, other])


def test_clam_h5_and_pt_read(cohort: Path) -> None:
    h5 = read_slide_features(cohort / "clam" / "h5_files" / "t2.h5", bag=True)
    pt = read_slide_features(cohort / "clam" / "pt_files" / "t2.pt", bag=True)
    assert h5.attrs["source_format"] == "clam" and h5.coords.dtype == np.int64
    assert h5.tile_side == 128.0  # no attributes: the step of the coordinate grid
    assert pt.coords is None and pt.attrs["source_format"] == "pt"
    np.testing.assert_array_equal(pt.features, h5.features)
    assert read_feature_attrs(cohort / "clam" / "pt_files" / "t2.pt")["n_tiles"] == 4
    # a CLAM feature folder lists its h5_files (they hold the coordinates); pt_files lists its .pt files
    assert [p.name for p in list_feature_files(cohort / "clam")] == [f"t{k}.h5" for k in range(6)]
    assert list_feature_files(cohort / "clam")[0].parent.name == "h5_files"
    assert [p.suffix for p in list_feature_files(cohort / "clam" / "pt_files")] == [".pt"] * 6


def test_clam_patch_attributes_and_single_tile(tmp_path: Path) -> None:
    """coords attributes of CLAM's patch files (patch_size at patch_level, its downsample) give the tile side;
    a bare file with one tile gives none, and says so in one line."""
    feats = np.ones((3, 4), dtype=np.float32)
    _save_h5(
        tmp_path / "p.h5",
        {"features": feats, "coords": np.array([[0, 0], [1024, 0], [0, 1024]], dtype=np.int64)},
        {"coords": {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])}},
        32,
    )
    assert read_slide_features(tmp_path / "p.h5").tile_side == 1024.0
    _save_h5(tmp_path / "one.h5", {"features": feats[:1], "coords": np.zeros((1, 2), np.int32)}, {}, 32)
    with pytest.raises(DataError, match="features of slide 'one' record no tile size"):
        tile_side(read_feature_attrs(tmp_path / "one.h5"))


def test_pt_files_that_are_not_plain_tensors(tmp_path: Path) -> None:
    """TRIDENT's --saveas pt writes a numpy array: loading it would run pickled code, so it is refused."""
    torch.save(np.ones((3, 4), dtype=np.float32), tmp_path / "numpy.pt")
    with pytest.raises(DataError, match="numpy.pt is not a plain tensor"):
        read_slide_features(tmp_path / "numpy.pt")
    torch.save(torch.ones(3, 4, 2), tmp_path / "cube.pt")
    with pytest.raises(DataError, match=r"holds a \(3, 4, 2\) torch.float32 tensor, not an \(N, D\) float tensor"):
        read_feature_attrs(tmp_path / "cube.pt")
    torch.save(torch.ones(3, 4), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6
    assert read_feature_attrs(tmp_path / "legacy.pt")["n_tiles"] == 3  # cannot be memory-mapped: read whole
    (tmp_path / "junk.pt").write_bytes(b"\x00junk" * 10)
    with pytest.raises(DataError, match="junk.pt is not a readable torch file"):
        read_slide_features(tmp_path / "junk.pt")


# -- end to end through the CLI -------------------------------------------------------------------------------
def test_trident_folder_train_predict_heatmap(monkeypatch, capsys, cohort: Path, tmp_path: Path) -> None:
    """A TRIDENT features folder through all three commands; the heat map's tiles are patch_size_level0 wide
    (this stopped with a raw KeyError: 'tile_size' traceback, exit 1, before)."""
    feats, run = cohort / "trident" / "features_uni_v1", tmp_path / "run"
    args = ("--labels", cohort / "labels.csv", "--folds", "2", "--epochs", "1", "--out", run, "--quiet")
    code, out, err = run_main(monkeypatch, capsys, "slides", "train", "--features", feats, *args)
    assert code == 0, err
    assert json.loads((run / "fold_0" / "model.json").read_text())["feature_attrs"]["backbone"] == "uni_v1"
    preds = tmp_path / "p.csv"
    code, out, err = run_main(
        monkeypatch, capsys, "slides", "predict", "--model", run, "--features", feats, "--out", preds
    )
    assert code == 0, err
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == [f"t{k}" for k in range(6)] and {r["n_tiles"] for r in rows} == {"4"}
    heat = tmp_path / "heat"
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "slides",
        "heatmap",
        "--model",
        run,
        "--features",
        feats,
        "--slides",
        cohort / "slides",
        "--out",
        heat,
        "--max-size",
        "64",
    )
    assert code == 0, err
    assert Image.open(heat / "t0_heatmap.png").size == (64 + COLORBAR_WIDTH, 64)
    assert geojson_sides(heat / "t0.geojson") == {128.0}
    # TRIDENT files record no slide path: without --slides, one line that says to pass it
    code, _, err = run_main(
        monkeypatch, capsys, "slides", "heatmap", "--model", run, "--features", feats, "--out", tmp_path / "heat2"
    )
    assert code == 2 and "record no slide path" in one_line_error(err) and "pass --slides" in err


def test_clam_folders_train_predict_heatmap(monkeypatch, capsys, cohort: Path, tmp_path: Path) -> None:
    """CLAM's feature folder trains; its pt_files predict; a heat map needs the h5_files, and says so."""
    clam, run = cohort / "clam", tmp_path / "run"
    args = ("--labels", cohort / "labels.csv", "--folds", "2", "--epochs", "1", "--out", run, "--quiet")
    code, _, err = run_main(monkeypatch, capsys, "slides", "train", "--features", clam / "pt_files", *args)
    assert code == 0, err
    preds = tmp_path / "p.csv"
    code, _, err = run_main(
        monkeypatch, capsys, "slides", "predict", "--model", run, "--features", clam, "--out", preds
    )
    assert code == 0, err
    from_pt = predict_slides(run, clam / "pt_files")
    assert from_pt[0]["coords"] is None and from_pt[0]["n_tiles"] == 4
    with open(preds, newline="") as f:
        first = next(csv.DictReader(f))
    assert float(first["prob_a"]) == pytest.approx(float(from_pt[0]["probs"][0]), abs=1e-6)  # the same features
    heat = tmp_path / "heat"
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "slides",
        "heatmap",
        "--model",
        run,
        "--features",
        clam / "pt_files",
        "--slides",
        cohort / "slides",
        "--out",
        heat,
    )
    line = one_line_error(err)
    assert code == 2 and "t0.pt is a .pt feature file with no tile coordinates" in line
    assert f"pass the h5_files folder {clam / 'h5_files'} to --features" in line and not heat.exists()
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "slides",
        "heatmap",
        "--model",
        run,
        "--features",
        clam,
        "--slides",
        cohort / "slides",
        "--out",
        heat,
        "--max-size",
        "64",
    )
    assert code == 0, err
    assert geojson_sides(heat / "t3.geojson") == {128.0}
