"""Tiles and tissue shared with other tools: TRIDENT/CLAM coordinates, QuPath/TRIDENT tissue GeoJSON (read and
written), per-slide mpp from a slide list, magnification for the tile resolution, the Otsu settings as flags."""

from __future__ import annotations

import csv
import inspect
import json
from dataclasses import fields
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import TINY2, TINY_NAME
from helpers import run_main as cli
from scipy import ndimage
from slide_fixtures import tissue_and_glass, write_pyramid_tiff

from pathotune import create_model, save_bundle
from pathotune.errors import DataError
from pathotune.slides import TilingConfig, open_slide, plan_tiles
from pathotune.slides.coords import read_patch_coords
from pathotune.slides.dataset import TileTransform
from pathotune.slides.extract import as_extractor, extract_slides, read_slide_features
from pathotune.slides.geojson import geojson_tissue_mask, tissue_feature_collection
from pathotune.slides.inputs import SlideInput
from pathotune.slides.polygons import fill_polygons, mask_polygons, ring_area
from pathotune.slides.tissue import TissueConfig

try:  # shapely (the [test] extra) adds OGC validity to the checks of the polygons written
    from shapely.geometry import shape
except ImportError:  # pragma: no cover
    shape = None

W, H = 768, 384  # the test slide: tissue left of x = 384, glass right of it, 0.5 mpp, 3 levels
COARSE = ["--target-mpp", "2.0", "--num-workers", "0", "--quiet"]  # 32 px tiles = 128 level-0 px


def error_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    write_pyramid_tiff(d / "s1.tif", tissue_and_glass(H, W, seed=0), mpp=0.5, levels=3, tile=64)
    return d


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_model(TINY_NAME, "linear", 2, image_size=32, backbone_kwargs=dict(TINY2)).eval()


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bundle(model, tmp_path_factory.mktemp("b") / "bundle")


def tiles_of(h5: Path) -> set[tuple[int, int]]:
    return {(int(x), int(y)) for x, y in read_slide_features(h5).coords}


# -- GeoJSON: the tissue mask both ways -----------------------------------------------------------------------
def check_qupath_polygons(fc: dict) -> list[dict]:
    """A FeatureCollection of QuPath tissue annotations: Polygons with closed rings of >= 4 finite positions,
    exteriors counterclockwise and holes clockwise (RFC 7946), each valid as shapely sees it."""
    assert fc["type"] == "FeatureCollection" and fc["features"]
    for f in fc["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tissue"
        rings = f["geometry"]["coordinates"]
        for k, ring in enumerate(rings):
            assert len(ring) >= 4 and ring[0] == ring[-1], ring
            assert all(np.isfinite(v) for pt in ring for v in pt)
            area = ring_area(np.asarray(ring[:-1], dtype=np.float64))
            assert (area > 0) if k == 0 else (area < 0)
        assert shape is None or shape(f["geometry"]).is_valid
    return fc["features"]


def test_mask_to_geojson_and_back_is_the_same_mask(tmp_path: Path) -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[2:30, 3:40] = True
    mask[8:20, 10:25] = False  # a hole...
    mask[12:15, 15:18] = True  # ...with an island in it
    mask[28, 38] = mask[29, 39] = False  # a hole that meets the outside at one corner only
    mask[30, 39] = True  # touches the big piece only at a corner: a piece of its own
    mask[35:40, 50:60] = True  # on the mask's edge
    fc = json.loads(json.dumps(tissue_feature_collection(mask, (600, 200), tolerance=0), allow_nan=False))
    feats = check_qupath_polygons(fc)
    assert sorted(len(f["geometry"]["coordinates"]) for f in feats) == [1, 1, 1, 3]
    xs = [p[0] for f in feats for r in f["geometry"]["coordinates"] for p in r]
    assert min(xs) == 30 and max(xs) == 600  # level-0 pixels: 10 per mask column, the right edge included
    (tmp_path / "t.geojson").write_text(json.dumps(fc))
    np.testing.assert_array_equal(geojson_tissue_mask(tmp_path / "t.geojson", (600, 200), mask.shape), mask)


def test_exported_outlines_are_simplified_within_one_pixel_of_the_mask(tmp_path: Path) -> None:
    """The default export drops the staircase's vertices; read back, the mask moves only along its own edge."""
    from scipy import ndimage

    yy, xx = np.mgrid[:120, :160]
    mask = (xx - 70) ** 2 / 55**2 + (yy - 60) ** 2 / 40**2 <= 1  # a disc: every step of its edge is a vertex
    mask &= (xx - 80) ** 2 + (yy - 60) ** 2 > 12**2  # with a round hole
    exact = tissue_feature_collection(mask, (1600, 1200), tolerance=0)
    simple = tissue_feature_collection(mask, (1600, 1200))
    check_qupath_polygons(simple)
    count = lambda fc: sum(len(r) for f in fc["features"] for r in f["geometry"]["coordinates"])  # noqa: E731
    assert count(simple) < count(exact) / 3
    (tmp_path / "s.geojson").write_text(json.dumps(simple))
    back = geojson_tissue_mask(tmp_path / "s.geojson", (1600, 1200), mask.shape)
    edge = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    assert not ((back ^ mask) & ~edge).any()  # every changed pixel lies on the mask's edge
    assert (back ^ mask).sum() < 0.2 * edge.sum()


def test_invalid_tissue_polygons_are_refused_unless_repaired(tmp_path: Path) -> None:
    """A hole outside its shell is not tissue, whatever an even-odd fill would make of it (shapely's validity)."""
    shell = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    outside = [[150, 150], [180, 150], [180, 180], [150, 180], [150, 150]]
    (tmp_path / "bad.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [shell, outside]}))
    with pytest.raises(DataError, match=r"polygon 0 is not valid \(Hole lies outside shell.*--repair-geojson"):
        geojson_tissue_mask(tmp_path / "bad.geojson", (200, 200), (20, 20))
    repaired = geojson_tissue_mask(tmp_path / "bad.geojson", (200, 200), (20, 20), repair=True)
    want = np.zeros((20, 20), dtype=bool)
    want[:10, :10] = want[15:18, 15:18] = True  # make_valid reads a ring outside its shell as an area of its own
    np.testing.assert_array_equal(repaired, want)


def test_random_masks_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = rng.random(tuple(rng.integers(1, 30, 2))) < rng.uniform(0.2, 0.8)
        np.testing.assert_array_equal(fill_polygons(mask_polygons(mask), mask.shape), mask)


def test_qupath_feature_list_multipolygon_with_holes(tmp_path: Path) -> None:
    """QuPath without "Export as FeatureCollection" writes a bare list; points and lines bound no tissue."""
    outer = [[0, 0], [80, 0], [80, 80], [0, 80], [0, 0]]
    hole = [[20, 20], [20, 60], [60, 60], [60, 20], [20, 20]]
    far = [[120, 40], [160, 40], [160, 80], [120, 80], [120, 40]]
    doc = [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[outer, hole], [far]]}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}},
        {"type": "Feature", "geometry": None, "properties": {}},
    ]
    (tmp_path / "a.geojson").write_text(json.dumps(doc))
    got = geojson_tissue_mask(tmp_path / "a.geojson", (200, 100), (10, 20))  # 10 level-0 px per mask pixel
    want = np.zeros((10, 20), dtype=bool)
    want[0:8, 0:8] = True
    want[2:6, 2:6] = False
    want[4:8, 12:16] = True
    np.testing.assert_array_equal(got, want)
    # the same polygons as a FeatureCollection, one Feature, or a bare geometry
    for form in (
        {"type": "FeatureCollection", "features": doc},
        doc[0],
        doc[0]["geometry"],
    ):
        (tmp_path / "b.json").write_text(json.dumps(form))
        np.testing.assert_array_equal(geojson_tissue_mask(tmp_path / "b.json", (200, 100), (10, 20)), want)


def test_bad_geojson_is_one_clear_error(tmp_path: Path) -> None:
    cases = {
        "points.geojson": ([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}], "no Polygon"),
        "thumb.geojson": (
            {"type": "Polygon", "coordinates": [[[0, 0], [5000, 0], [5000, 50], [0, 0]]]},
            "level-0 pixel coordinates",
        ),
        "garbage.geojson": ("{not json", "cannot read"),
    }
    for name, (doc, needle) in cases.items():
        (tmp_path / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(DataError, match=needle) as e:
            geojson_tissue_mask(tmp_path / name, (200, 100), (10, 20))
        assert name in str(e.value) and "\n" not in str(e.value)


def test_qupath_geojson_restricts_extract(monkeypatch, capsys, slides_dir: Path, bundle: Path, tmp_path: Path) -> None:
    """Polygons with a hole replace Otsu's mask: glass inside them is kept, tissue in the hole or outside is not."""
    part_a = [[[0, 0], [512, 0], [512, 256], [0, 256], [0, 0]], [[128, 0], [128, 128], [256, 128], [256, 0], [128, 0]]]
    part_b = [[[640, 256], [768, 256], [768, 384], [640, 384], [640, 256]]]
    gj = tmp_path / "gj"
    gj.mkdir()
    feature = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [part_a, part_b]}}
    (gj / "s1.geojson").write_text(json.dumps([feature]))
    out = tmp_path / "f"
    args = ["slides", "extract", "--slides", slides_dir, "--bundle", bundle, "--out", out, *COARSE]
    code, _, err = cli(monkeypatch, capsys, *args, "--tissue-geojson", gj)  # the hole touches the shell's edge
    error_line(code, err, "s1.geojson", "polygon 0 is not valid", "Self-intersection", "--repair-geojson")
    assert not out.exists()
    args += ["--repair-geojson"]
    code, _, err = cli(monkeypatch, capsys, *args, "--tissue-geojson", gj)
    assert code == 0, err
    want = {(0, 0), (256, 0), (384, 0), (0, 128), (128, 128), (256, 128), (384, 128), (640, 256)}
    assert tiles_of(out / "s1.h5") == want
    assert "s1.geojson" in read_slide_features(out / "s1.h5").attrs["tissue_config"]
    code, _, err = cli(monkeypatch, capsys, *args, "--tissue-geojson", gj)  # the same request: kept as it is
    assert code == 0, err
    assert tiles_of(out / "s1.h5") == want
    code, _, err = cli(monkeypatch, capsys, *args)  # Otsu now: the file was cut from the GeoJSON, so refused
    error_line(code, err, str(out / "s1.h5"), "tissue GeoJSON", "the Otsu mask", "--overwrite")
    assert tiles_of(out / "s1.h5") == want
    code, _, err = cli(monkeypatch, capsys, *args, "--overwrite")  # Otsu: the tissue half, 3 columns x 3 rows
    assert code == 0, err
    assert tiles_of(out / "s1.h5") == {(x, y) for x in (0, 128, 256) for y in (0, 128, 256)}
    (gj / "s1.geojson").unlink()
    code, _, err = cli(monkeypatch, capsys, *args, "--tissue-geojson", gj)
    error_line(code, err, "'s1'", str(gj))


def test_tile_exports_tissue_that_reimports_as_the_mask(monkeypatch, capsys, slides_dir: Path, tmp_path: Path) -> None:
    args = ["slides", "tile", "--slides", slides_dir, "--target-mpp", "2.0", "--tile-size", "32"]
    code, _, err = cli(monkeypatch, capsys, *args, "--out", tmp_path / "a")
    assert code == 0, err
    fc = json.loads((tmp_path / "a" / "s1_tissue.geojson").read_text())
    check_qupath_polygons(fc)
    with open_slide(slides_dir / "s1.tif") as reader:
        otsu = plan_tiles(reader, TilingConfig(target_mpp=2.0, tile_size=32)).mask
    back = geojson_tissue_mask(tmp_path / "a" / "s1_tissue.geojson", (W, H), otsu.shape)
    edge = ndimage.binary_dilation(otsu) & ~ndimage.binary_erosion(otsu)
    assert not ((back ^ otsu) & ~edge).any()  # simplified within one pixel of the mask
    # fed back as the tissue mask, it gives the same tiles
    code, _, err = cli(
        monkeypatch, capsys, *args, "--out", tmp_path / "b", "--tissue-geojson", tmp_path / "a" / "s1_tissue.geojson"
    )
    assert code == 0, err
    coords = lambda d: [r.split(",")[:2] for r in (tmp_path / d / "s1_tiles.csv").read_text().splitlines()]  # noqa: E731
    assert coords("b") == coords("a")  # the same tiles (their tissue fractions move by at most a pixel's worth)


# -- Otsu's settings on the command line ----------------------------------------------------------------------
def test_tissue_flags_reach_the_mask(monkeypatch, capsys, slides_dir: Path, tmp_path: Path) -> None:
    from pathotune.cli.slides import extract, tile

    defaults = {f.name: f.default for f in fields(TissueConfig)}
    flag_of = {
        "method": "tissue_method",
        "channel": "tissue_channel",
        "threshold": "tissue_threshold",
        "min_threshold": "tissue_min_threshold",
        "close_radius": "tissue_close",
        "open_radius": "tissue_open",
        "fill_holes": "fill_holes",
        "max_hole_frac": "max_hole_frac",
        "min_area_frac": "min_area_frac",
    }
    for command in (tile, extract):
        params = inspect.signature(command).parameters
        assert {k: params[v].default for k, v in flag_of.items()} == defaults
    args = ["slides", "tile", "--slides", slides_dir, "--target-mpp", "2.0", "--tile-size", "32"]
    code, _, err = cli(
        monkeypatch, capsys, *args, "--out", tmp_path / "a", "--tissue-method", "fixed", "--tissue-threshold", "0.99"
    )
    assert code == 0, err
    with open(tmp_path / "a" / "tiles_summary.csv", newline="") as f:
        assert next(csv.DictReader(f))["tiles"] == "0"
    code, _, err = cli(monkeypatch, capsys, *args, "--out", tmp_path / "b", "--tissue-channel", "colour")
    error_line(code, err, "colour")


# -- resolution: per-slide mpp from the slide list, magnification ----------------------------------------------
def test_mpp_column_and_mag(monkeypatch, capsys, bundle: Path, tmp_path: Path) -> None:
    write_pyramid_tiff(tmp_path / "bare.tif", tissue_and_glass(H, W, seed=2), mpp=None, levels=3, tile=64)
    listing = tmp_path / "list.csv"
    base = ["slides", "extract", "--bundle", bundle, "--num-workers", "0", "--quiet"]
    listing.write_text("slide_path\nbare.tif\n")
    code, _, err = cli(monkeypatch, capsys, *base, "--slides", listing, "--out", tmp_path / "f", "--mag", "5")
    error_line(code, err, "bare.tif", "--mpp")
    listing.write_text("slide_path,mpp\nbare.tif,0.5\n")
    code, _, err = cli(monkeypatch, capsys, *base, "--slides", listing, "--out", tmp_path / "f", "--mag", "5")
    assert code == 0, err
    sf = read_slide_features(tmp_path / "f" / "bare.h5")
    assert sf.attrs["mpp"] == 0.5 and sf.attrs["target_mpp"] == 2.0 and sf.attrs["tile_size_level0"] == 128.0
    assert len(sf.coords) == 9  # the tissue half at 128 level-0 px per tile, as at --target-mpp 2
    listing.write_text("wsi,mpp\nbare.tif,abc\n")  # TRIDENT's column name
    code, _, err = cli(monkeypatch, capsys, *base, "--slides", listing, "--out", tmp_path / "g")
    error_line(code, err, str(listing), "line 2", "'abc'")
    code, _, err = cli(
        monkeypatch, capsys, *base, "--slides", listing, "--out", tmp_path / "g", "--mag", "20", "--target-mpp", "0.5"
    )
    error_line(code, err, "--target-mpp", "--mag")


# -- TRIDENT and CLAM coordinates -----------------------------------------------------------------------------
def write_coords(path: Path, coords: list[list[int]], **attrs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        d.attrs.update(attrs)
    return path


TRIDENT = {
    "patch_size": 32,
    "patch_size_level0": 64,
    "level0_magnification": 20,
    "target_magnification": 10,
    "overlap": 0,
    "level0_width": W,
    "level0_height": H,
}


def test_trident_and_clam_coords_replace_the_grid(
    monkeypatch, capsys, model, slides_dir: Path, bundle: Path, tmp_path: Path
) -> None:
    xy = [[0, 0], [64, 64], [600, 300]]  # the last on glass: another tool's tiles are all kept by default
    write_coords(tmp_path / "trident" / "patches" / "s1_patches.h5", xy, **TRIDENT)
    base = ["slides", "extract", "--slides", slides_dir, "--bundle", bundle, "--num-workers", "0", "--quiet"]
    code, _, err = cli(monkeypatch, capsys, *base, "--out", tmp_path / "t", "--coords", tmp_path / "trident")
    assert code == 0, err
    sf = read_slide_features(tmp_path / "t" / "s1.h5")
    np.testing.assert_array_equal(sf.coords, xy)
    assert (sf.attrs["tile_size"], sf.attrs["tile_size_level0"], sf.attrs["target_mpp"]) == (32, 64.0, 1.0)
    assert sf.attrs["level"] == 1 and sf.attrs["read_size"] == 32 and sf.attrs["min_tissue"] == 0.0
    assert sf.tissue[0] > 0.5 and sf.tissue[2] == 0.0  # tissue fractions from the Otsu mask, for the record
    # the features are the model's on exactly those regions (level 1, 32 px)
    ex = as_extractor(model)
    transform = TileTransform(ex.mean, ex.std, ex.image_size)
    with open_slide(slides_dir / "s1.tif") as reader:
        x = torch.stack([transform(reader.read_region((x, y), 1, (32, 32))) for x, y in xy])
    with torch.inference_mode():
        np.testing.assert_allclose(sf.features, ex.forward(x).numpy(), rtol=1e-4, atol=1e-5)
    # the library takes the same tiles per slide
    trident = SlideInput(slides_dir / "s1.tif", coords=tmp_path / "trident" / "patches" / "s1_patches.h5")
    (r,) = extract_slides(
        model, [trident], tmp_path / "lib", TilingConfig(min_tissue=0.0), num_workers=0, progress=False
    )
    np.testing.assert_array_equal(read_slide_features(r.path).coords, xy)

    # CLAM: patches/<slide>.h5, patch_size pixels at patch_level (its downsample from the slide)
    write_coords(tmp_path / "clam" / "patches" / "s1.h5", [[0, 0], [128, 128]], patch_size=64, patch_level=0)
    code, _, err = cli(monkeypatch, capsys, *base, "--out", tmp_path / "c", "--coords", tmp_path / "clam")
    assert code == 0, err
    sf = read_slide_features(tmp_path / "c" / "s1.h5")
    np.testing.assert_array_equal(sf.coords, [[0, 0], [128, 128]])
    assert (sf.attrs["tile_size"], sf.attrs["tile_size_level0"], sf.attrs["target_mpp"]) == (64, 64.0, 0.5)

    code, _, err = cli(monkeypatch, capsys, *base, "--out", tmp_path / "x", "--coords", tmp_path / "none")
    error_line(code, err, str(tmp_path / "none"))
    (tmp_path / "other").mkdir()
    write_coords(tmp_path / "other" / "s2_patches.h5", xy, **TRIDENT)
    code, _, err = cli(monkeypatch, capsys, *base, "--out", tmp_path / "x", "--coords", tmp_path / "other")
    error_line(code, err, "'s1'", str(tmp_path / "other"))
    code, _, err = cli(
        monkeypatch, capsys, *base, "--out", tmp_path / "x", "--coords", tmp_path / "trident", "--target-mpp", "1"
    )
    error_line(code, err, "--coords", "--target-mpp")


def test_coords_files_are_checked_against_the_slide(slides_dir: Path, tmp_path: Path) -> None:
    cases = {
        "other_size": ([[0, 0]], {**TRIDENT, "level0_width": 1000}, "1000x384"),
        "outside": ([[0, 0], [900, 10]], TRIDENT, "outside the 768x384"),
        "no_size": ([[0, 0]], {"patch_size": 32}, "patch_level"),
        "level": ([[0, 0]], {"patch_size": 32, "patch_level": 5}, "patch_level 5"),
    }
    with open_slide(slides_dir / "s1.tif") as reader:
        for name, (xy, attrs, needle) in cases.items():
            path = write_coords(tmp_path / f"{name}.h5", xy, **attrs)
            with pytest.raises(DataError, match=needle) as e:
                read_patch_coords(path, reader)
            assert str(path) in str(e.value)
        (tmp_path / "junk_patches.h5").write_bytes(b"not hdf5")
        with pytest.raises(DataError, match="not a readable HDF5"):
            read_patch_coords(tmp_path / "junk_patches.h5", reader)
