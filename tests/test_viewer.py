"""The slide viewer's library: Deep Zoom over the slide reader, overlays, the catalog's data and the static export.

The server and the page in a real browser are in test_viewer_browser.py; bad input and hostile requests in
faults/test_viewer_faults.py.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from helpers import run_main
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image
from slide_fixtures import cmu_crop, write_pyramid_tiff
from vendor_slides import write_dicom_wsi, write_ome_tiff
from viewer_fixtures import HOT, SIDE, SIZE, SLIDE_ID, HotCase, build_hot_case, hot_features, is_hot, tile_coords

from pathotune.heatmaps import mil_heatmaps
from pathotune.slides import sample_slide
from pathotune.slides.geojson import read_geojson_polygons, read_tiles_geojson, tiles_geojson
from pathotune.slides.heatmap import bundle_heatmaps
from pathotune.viewer import PyramidPool, SlidePyramid, SlideSource, TileNotFound, build_catalog, export_viewer
from pathotune.viewer.catalog import EMPTY_CELL, lattice_step, score_grid
from pathotune.viewer.export import folder_bytes
from pathotune.viewer.overlays import region_layers, tile_overlays


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> HotCase:
    return build_hot_case(tmp_path_factory.mktemp("viewer"))


def script_payload(text: str, call: str) -> dict:
    """The JSON a data script hands to the page: ``PathotuneViewer.<call>({...});``."""
    head = f"PathotuneViewer.{call}("
    assert text.startswith(head) and text.endswith(");\n"), text[:80]
    return json.loads(text[len(head) : -3])


def levels_of(grid: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(grid["levels"]), dtype=np.uint8).reshape(grid["rows"], grid["cols"])


# -- Deep Zoom over the reader --------------------------------------------------------------------------------
def test_deep_zoom_over_the_reader_equals_openslides_own() -> None:
    """The adapter gives DeepZoomGenerator what OpenSlide would: the same levels, descriptor and tile pixels."""
    path = sample_slide()
    ours = SlidePyramid(SlideSource("cmu", path))
    theirs = DeepZoomGenerator(openslide.OpenSlide(str(path)), 254, 1)
    try:
        assert ours.reader.backend == "openslide"
        assert ours.level_dimensions == theirs.level_dimensions and ours.level_tiles == theirs.level_tiles
        assert ours.dzi() == theirs.get_dzi("jpeg")
        top = ours.max_level
        cols, rows = ours.level_tiles[top]
        for level, col, row in [(top, 0, 0), (top, 3, 5), (top, cols - 1, rows - 1), (top - 1, 1, 2), (top - 4, 0, 0)]:
            a = np.asarray(ours.generator.get_tile(level, (col, row)))
            b = np.asarray(theirs.get_tile(level, (col, row)))
            np.testing.assert_array_equal(a, b)
    finally:
        ours.close()


BACKEND_OF = {"pages": "openslide", "subifds": "tiffslide", "ome": "tiffslide", "dicom": "dicom", "png": "image"}


@pytest.mark.parametrize("layout", list(BACKEND_OF))
def test_deep_zoom_tiles_for_every_backend(tmp_path: Path, layout: str) -> None:
    """One Deep Zoom path over OpenSlide, tiffslide, wsidicom and Pillow: full-size tiles are the slide's pixels,
    with the 1 px overlap; a Deep Zoom level on a pyramid level is that level's pixels, not a resampled finer one."""
    rgb = cmu_crop(400, 600, 700, 520)
    if layout == "png":
        path = tmp_path / "s.png"
        Image.fromarray(rgb).save(path)
        levels = [rgb]
    elif layout == "dicom":
        path = tmp_path / "s"
        levels = write_dicom_wsi(path, rgb, mpp=0.5, levels=2, tile=64)
    elif layout == "ome":
        path = tmp_path / "s.ome.tif"
        levels = write_ome_tiff(path, rgb, 0.5, levels=2, tile=64)
    else:
        path = tmp_path / "s.tif"
        levels = write_pyramid_tiff(path, rgb, mpp=0.5, levels=2, tile=64, subifds=layout == "subifds")
    pyr = SlidePyramid(SlideSource("s", path))
    try:
        assert pyr.reader.backend == BACKEND_OF[layout]
        top = pyr.max_level
        assert pyr.level_dimensions[top] == (700, 520) and pyr.level_tiles[top] == (3, 3)
        tile = np.asarray(Image.open(io.BytesIO(pyr.tile(top, 1, 1, 95))))
        assert tile.shape == (256, 256, 3)
        full = np.asarray(pyr.generator.get_tile(top, (1, 1)))
        np.testing.assert_array_equal(full, rgb[253:509, 253:509])
        edge = np.asarray(pyr.generator.get_tile(top, (2, 2)))
        np.testing.assert_array_equal(edge, rgb[507:520, 507:700])
        if layout != "png":
            half = np.asarray(pyr.generator.get_tile(top - 1, (0, 0)))
            np.testing.assert_array_equal(half, levels[1][:255, :255])
    finally:
        pyr.close()


def test_pool_serves_known_slides_only_caches_tiles_and_bounds_open_slides(case: HotCase) -> None:
    sources = {"hot": SlideSource("hot", case.slide), "plain": SlideSource("plain", case.slides / "plain.png")}
    pool = PyramidPool(sources, quality=80, cache_tiles=8, max_open=1)
    try:
        first = pool.tile("hot", 11, 2, 1)
        assert pool.tile("hot", 11, 2, 1) == first and pool.cache_info().hits == 1
        assert Image.open(io.BytesIO(first)).format == "JPEG"
        hot = pool.pyramid("hot")
        pool.tile("plain", 10, 0, 0)  # opening a second slide closes the first (max_open=1)
        assert hot.closed and list(pool._open) == ["plain"]
        assert pool.tile("hot", 11, 3, 1)  # and it opens again on demand
        for sid, level, col, row, words in [
            ("nope", 0, 0, 0, "no slide 'nope'"),
            ("../hot", 0, 0, 0, "no slide '../hot'"),
            ("hot", 12, 0, 0, "levels 0..11, not 12"),
            ("hot", 11, 7, 0, "7x5 tiles; no tile 7_0"),
            ("hot", 11, 0, -1, "no tile 0_-1"),
        ]:
            with pytest.raises(TileNotFound, match=words.replace("(", r"\(").replace(".", r"\.")):
                pool.tile(sid, level, col, row)
    finally:
        pool.close()


# -- overlays -------------------------------------------------------------------------------------------------
def test_score_grid_puts_each_tile_on_its_cells() -> None:
    coords = tile_coords()
    keep = ~((coords[:, 0] == 0) & (coords[:, 1] == 0))  # one tile missing: its cell stays empty
    grid = score_grid(coords[keep], SIDE, np.where(is_hot(coords), 1.0, 0.25)[keep], 0.0, 1.0)
    assert (grid["x"], grid["y"], grid["step"], grid["cols"], grid["rows"]) == (0, 0, 128.0, 12, 8)
    expect = np.full((8, 12), round(0.25 * 254), dtype=np.uint8)
    expect[HOT[1] // SIDE : HOT[3] // SIDE, HOT[0] // SIDE : HOT[2] // SIDE] = 254
    expect[0, 0] = EMPTY_CELL
    np.testing.assert_array_equal(levels_of(grid), expect)
    shifted = score_grid(coords + 64, SIDE, np.where(is_hot(coords), 1.0, 0.0), 0.0, 1.0)
    assert (shifted["x"], shifted["y"], shifted["cols"], shifted["rows"]) == (64, 64, 12, 8)  # from the first corner
    np.testing.assert_array_equal(levels_of(shifted) == 254, expect == 254)
    overlapping = np.array([[0, 0], [64, 0], [128, 0]])  # stride 64, side 128: averaged where two overlap
    g3 = score_grid(overlapping, SIDE, np.array([0.0, 1.0, 1.0]), 0.0, 1.0)
    assert g3["step"] == 64.0 and levels_of(g3).tolist() == [[0, 127, 254, 254]] * 2
    assert lattice_step(np.array([[0, 0], [3, 0]]), 128) == 32  # off any grid: at least a quarter tile


def test_bundle_overlay_is_what_slides_heatmap_paints(case: HotCase, tmp_path: Path) -> None:
    """The viewer scores with `slides heatmap`'s own code: equal probabilities and classes, from the features
    and bundle or read back from the heat map folder that command wrote."""
    (done,) = bundle_heatmaps(case.bundle, case.features, tmp_path / "heat", slides=case.slides, max_size=64)
    geo = json.loads(Path(done["geojson"]).read_text())["features"]
    geo_probs = np.array([f["properties"]["measurements"]["prob_hot"] for f in geo])
    geo_top = [f["properties"]["classification"]["name"] for f in geo]
    live = tile_overlays(features=case.features, bundle=case.bundle)[SLIDE_ID]
    again = tile_overlays(heatmap=tmp_path / "heat")[SLIDE_ID]
    for o in (live, again):
        assert [layer.name for layer in o.layers] == ["prob_cold", "prob_hot"]
        hot = o.layers[1]
        assert (hot.label, hot.vmin, hot.vmax, hot.cmap) == ("hot", 0.0, 1.0, "RdBu_r")
        np.testing.assert_allclose(hot.values, geo_probs, atol=1e-7)
        assert o.top_class == geo_top and o.side == SIDE
        np.testing.assert_array_equal(o.coords, tile_coords())
    assert (geo_probs > 0.999)[is_hot(tile_coords())].all() and (geo_probs < 0.001)[~is_hot(tile_coords())].all()
    assert live.dimensions == SIZE and again.dimensions is None


def test_tiles_geojson_reads_back_fractional_tiles(tmp_path: Path) -> None:
    """Tiles of 256.513 px (32 px at 4 mpp on a 0.499 mpp slide, as the demo makes them): corners and sides are
    written to 1/1000 px, so a tile's width and height differ in the last digit; they read back as written."""
    coords = np.array([[0, 0], [257, 0], [513, 257], [0, 513]])
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    path = tiles_geojson(coords, 256.513, {"prob_tissue": probs}, tmp_path / "s.geojson", classification=list("abab"))
    tiles = read_tiles_geojson(path)
    np.testing.assert_array_equal(tiles.coords, coords)
    assert tiles.side == 256.513 and tiles.classification == list("abab")
    np.testing.assert_array_equal(tiles.scores["prob_tissue"], probs)


def test_mil_overlay_is_what_slides_heatmap_paints(case: HotCase, tmp_path: Path, monkeypatch, capsys) -> None:
    feats = tmp_path / "feats"
    feats.mkdir()
    ids = [SLIDE_ID, *(f"s{k}" for k in range(1, 6))]
    for k, sid in enumerate(ids):  # the hot slide and noised copies of its features: a small cohort
        hot_features(feats / f"{sid}.h5", case.slide, case.bundle, noise_seed=k or None)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide_id,label\n"
        + "".join(f"{s},{'ab'[k % 2]}\n" for k, s in enumerate(["hot", *[f"s{k}" for k in range(1, 6)]]))
    )
    run = tmp_path / "run"
    args = ["slides", "train", "--features", feats, "--labels", labels, "--folds", "2", "--epochs", "1", "--out", run]
    code, _, err = run_main(monkeypatch, capsys, *args, "--quiet")
    assert code == 0, err
    done = {d["slide_id"]: d for d in mil_heatmaps(run, feats, tmp_path / "heat", max_size=64)}
    geo = json.loads(Path(done[SLIDE_ID]["geojson"]).read_text())["features"]
    o = tile_overlays(features=feats, model=run)[SLIDE_ID]
    (layer,) = o.layers
    assert layer.name == "attention" and layer.cmap == "inferno"
    np.testing.assert_allclose(layer.values, [f["properties"]["measurements"]["attention"] for f in geo], atol=1e-7)
    assert (layer.vmin, layer.vmax) == (layer.values.min(), layer.values.max())
    assert o.prediction["label"] == done[SLIDE_ID]["pred"] and o.top_class is None
    assert sum(o.prediction["probs"].values()) == pytest.approx(1.0)


def test_region_layers_read_what_slides_tile_writes(case: HotCase) -> None:
    layers = {r.name: r for r in region_layers(case.tiles, SLIDE_ID)}
    assert list(layers) == ["tissue", "pen", "blur"]  # no fold file: no fold layer
    for name, layer in layers.items():
        expect = read_geojson_polygons(case.tiles / f"{SLIDE_ID}_{name}.geojson", allow_empty=True)
        assert len(layer.polygons) == len(expect)
        for got, want in zip(layer.polygons, expect, strict=True):
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
    (tissue,) = layers["tissue"].polygons
    assert len(tissue) == 2  # the exterior and its hole
    assert len(layers["pen"].polygons) == 1 and layers["blur"].polygons == []
    assert layers["tissue"].colour == (0, 200, 0) and layers["pen"].colour == (255, 0, 255)
    assert region_layers(None, SLIDE_ID) == []


# -- the catalog and the export -------------------------------------------------------------------------------
def test_catalog_data_scripts(case: HotCase) -> None:
    catalog = build_catalog(case.slides, features=case.features, bundle=case.bundle, tiles=case.tiles)
    index = script_payload(catalog.catalog_script(), "catalog")
    assert [s["id"] for s in index["slides"]] == ["hot", "plain"]
    hot, plain = index["slides"]
    assert (hot["width"], hot["height"], hot["mpp"], hot["tiles"]) == (1536, 1024, 0.5, 96)
    assert hot["dzi"] == {
        "width": 1536,
        "height": 1024,
        "tileSize": 254,
        "overlap": 1,
        "format": "jpeg",
        "maxLevel": 11,
    }
    assert hot["layers"] == ["cold", "hot"] and hot["regions"] == ["tissue", "pen", "blur"]
    assert plain["mpp"] is None and plain["tiles"] == 0 and plain["backend"] == "image"
    assert len(base64.b64decode(index["colormaps"]["inferno"])) == 256 * 3
    data = script_payload(catalog.slide_script("hot"), "slide")
    assert data["tiles"]["xy"] == tile_coords().reshape(-1).tolist() and data["tiles"]["side"] == SIDE
    top = [data["tiles"]["classes"][i] for i in data["tiles"]["top"]]
    assert top == ["hot" if h else "cold" for h in is_hot(tile_coords())]
    layer = data["layers"][1]
    assert layer["values"][int(np.flatnonzero(is_hot(tile_coords()))[0])] == 0.9997
    assert levels_of(layer["grid"])[2:4, 6:8].tolist() == [[254, 254], [254, 254]]
    assert [len(p) for p in data["regions"][0]["polygons"]] == [2]
    assert script_payload(catalog.slide_script("plain"), "slide")["layers"] == []


def test_export_writes_dzi_pyramids_the_page_and_its_data(case: HotCase, tmp_path: Path) -> None:
    catalog = build_catalog(case.slides, features=case.features, bundle=case.bundle, tiles=case.tiles)
    out = tmp_path / "export"
    rows = export_viewer(catalog, out, max_level=10, quality=70, progress=False)
    assert [(r.slide_id, r.max_level, r.full_level, r.width, r.height) for r in rows] == [
        ("hot", 10, 11, 768, 512),
        ("plain", 10, 10, 600, 400),
    ]
    assert rows[0].tiles == sum(c * r for c, r in SlidePyramid(SlideSource("hot", case.slide)).level_tiles[:11])
    assert (out / "index.html").read_bytes() == (
        Path(__file__).parents[1] / "src/pathotune/viewer/static/index.html"
    ).read_bytes()
    for name in ("viewer.js", "viewer.css", "openseadragon/openseadragon.min.js", "openseadragon/LICENSE.txt"):
        assert (out / "static" / name).is_file()
    assert (
        not (out / "slides" / "hot_files" / "11").exists()
        and (out / "slides" / "hot_files" / "10" / "2_1.jpeg").is_file()
    )
    assert '<Size Width="768" Height="512"/>' in (out / "slides" / "hot.dzi").read_text()
    index = script_payload((out / "data" / "catalog.js").read_text(), "catalog")
    assert index["slides"][0]["dzi"]["maxLevel"] == 10 and index["slides"][0]["width"] == 1536
    pool = PyramidPool(catalog.sources, quality=70)
    try:  # the export's tiles are byte for byte what the server sends
        assert (out / "slides" / "hot_files" / "10" / "2_1.jpeg").read_bytes() == pool.tile("hot", 10, 2, 1)
    finally:
        pool.close()
    per_slide = sum(r.bytes for r in rows)
    assert per_slide < folder_bytes(out) == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def test_export_viewer_command_reports_its_size(case: HotCase, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "export"
    args = ["slides", "export-viewer", case.slide, "--heatmap", case.root / "nothing"]
    code, _, err = run_main(monkeypatch, capsys, *args, "--out", out)
    assert code == 2 and "heatmap folder" in err and not out.exists()
    heat = tmp_path / "heat"
    bundle_heatmaps(case.bundle, case.features, heat, slides=case.slides, max_size=64)
    code, stdout, err = run_main(
        monkeypatch,
        capsys,
        "slides",
        "export-viewer",
        case.slide,
        "--heatmap",
        heat,
        "--out",
        out,
        "--max-level",
        "9",
        "--quality",
        "60",
        "--quiet",
    )
    assert code == 0, err
    total = folder_bytes(out)
    assert f"({total:,} bytes)" in stdout and "9 of 11" in stdout and "scored tiles for 1 of 1 slides" in stdout
    code, _, err = run_main(
        monkeypatch, capsys, "slides", "export-viewer", case.slide, "--out", out, "--overwrite", "--quiet"
    )
    assert code == 0, err  # replaced: full size now, and no scores
    assert (out / "slides" / "hot_files" / "11" / "0_0.jpeg").is_file()
    assert script_payload((out / "data" / "slides" / "hot.js").read_text(), "slide")["layers"] == []
