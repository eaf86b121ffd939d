"""Every slide format the readers claim, on files written here from real H&E (tests/vendor_slides.py): geometry,
mpp and objective from each format's own metadata, reads equal to the pixels written at level 0 and a coarser
level, thumbnails, a clean close; DICOM series found as one slide per folder; the CLI over a mixed folder."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from helpers import TINY2, TINY_NAME, run_main
from PIL import Image
from pydicom.uid import MediaStorageDirectoryStorage
from slide_fixtures import cmu_crop, pyramid_levels
from vendor_slides import (
    DICOM_TRANSFER_SYNTAXES,
    dicom_level_files,
    write_dicom_file,
    write_dicom_wsi,
    write_mrxs,
    write_ndpi,
    write_ome_tiff,
    write_scn,
)

from pathotune import create_model, save_bundle
from pathotune.errors import DataError
from pathotune.features.h5 import read_slide_features
from pathotune.slides import TilingConfig, find_slides, open_slide, plan_tiles, read_tile, require_mpp, sample_slide
from pathotune.slides.dataset import SlideTileDataset
from pathotune.slides.discover import listed_slides, slide_id
from pathotune.slides.metadata import UnusableMpp, ome_mpp, ome_objective
from pathotune.slides.reader import is_dicom_file

REGION = (700, 1500, 512, 384)  # dense dermis of the CMU slide, level-0 x, y, width, height


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    return cmu_crop(*REGION)


def arr(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def open_fds_under(path: Path) -> list[str]:
    """Files under ``path`` this process holds open (Linux), to show a reader leaves none behind."""
    root = str(path.resolve())
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            out.append(target)
    return out


def check_reads(reader, levels: list[np.ndarray], offset: tuple[int, int] = (0, 0), exact: bool = True) -> None:
    """Level 0 and the coarsest written level read back as written (regions given in level pixels, placed at
    level-0 coordinates as OpenSlide takes them); ``offset`` is where the image starts in level-0 pixels."""
    for level in (0, len(levels) - 1):
        ds = int(reader.level_downsamples[level])
        lx, ly, w, h = 13, 7, 50, 41
        got = arr(reader.read_region((offset[0] + lx * ds, offset[1] + ly * ds), level, (w, h)))
        want = levels[level][ly : ly + h, lx : lx + w]
        assert got.shape == want.shape
        if exact:
            np.testing.assert_array_equal(got, want)
        else:  # a JPEG read by another decoder: within one grey level
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def check_close(reader, path: Path) -> None:
    reader.close()
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read_region((0, 0), 0, (4, 4))
    if Path("/proc/self/fd").is_dir():
        assert open_fds_under(path) == []


# -- OME-TIFF --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "unit"),
    [(0.25, "\u00b5m"), (250, "nm"), (0.00025, "mm"), (2500, "\u00c5"), (0.25, None), ("0.25", "\u03bcm")],
    ids=["um", "nm", "mm", "angstrom", "default-unit", "greek-mu"],
)
def test_ome_pyramid_mpp_in_any_unit(tmp_path, he, size, unit) -> None:
    path = tmp_path / "cmu.ome.tif"
    levels = write_ome_tiff(path, he, size, unit)
    with open_slide(path) as r:
        assert r.backend == "tiffslide"  # the SubIFD pyramid: OpenSlide would see one level
        assert r.dimensions == (512, 384)
        assert r.level_count == 3
        assert r.level_dimensions == ((512, 384), (256, 192), (128, 96))
        assert r.level_downsamples == (1.0, 2.0, 4.0)
        assert r.mpp == pytest.approx(0.25)
        assert r.objective_power is None
        check_reads(r, levels)
        np.testing.assert_array_equal(arr(r.thumbnail(128)), levels[2])
    check_close(r, tmp_path)


def test_ome_single_level_through_openslide(tmp_path, he) -> None:
    path = tmp_path / "flat.ome.tif"
    levels = write_ome_tiff(path, he, 500, "nm", levels=1)
    with open_slide(path) as r:
        assert (r.backend, r.level_count, r.mpp) == ("openslide", 1, pytest.approx(0.5))
        check_reads(r, levels)
    with open_slide(path, backend="tiffslide") as r:
        assert r.mpp == pytest.approx(0.5)


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_ome_objective_from_the_instrument(tmp_path, he, backend: str) -> None:
    path = tmp_path / "scanner.ome.tif"
    levels = write_ome_tiff(path, he, 0.25, objective=40.0)
    with open_slide(path, backend=backend) as r:
        assert (r.objective_power, r.mpp) == (40.0, pytest.approx(0.25))
        assert r.level_count == (1 if backend == "openslide" else 3)  # OpenSlide ignores SubIFDs
        check_reads(r, levels[: r.level_count])


def test_ome_anisotropic_pixels_average(tmp_path, he) -> None:
    path = tmp_path / "aniso.ome.tif"
    write_ome_tiff(path, he, 0.24, "\u00b5m", size_y=0.26, levels=2)
    with open_slide(path) as r:
        assert r.mpp == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("size", "unit", "problem"),
    [
        ("abc", "\u00b5m", "its OME-XML PhysicalSizeX is 'abc', not a positive number"),
        (-0.25, "\u00b5m", "its OME-XML PhysicalSizeX is '-0.25', not a positive number"),
        (0.25, "pixel", "its OME-XML gives PhysicalSizeX in 'pixel', which is no length a pixel can be converted"),
    ],
    ids=["not-a-number", "negative", "pixel-unit"],
)
def test_ome_unusable_size_asks_for_mpp(tmp_path, he, size, unit, problem) -> None:
    path = tmp_path / "bad.ome.tif"
    write_ome_tiff(path, he, size, unit, levels=2)
    with open_slide(path) as r:
        assert r.mpp is None and r.mpp_problem is not None and r.mpp_problem.startswith(problem)
        with pytest.raises(DataError) as err:
            require_mpp(r)
        line = str(err.value)
        assert line.startswith(f"slide {path} has no usable mpp (microns per pixel): {problem}")
        assert line.endswith("; pass --mpp") and "\n" not in line
    with open_slide(path, mpp=0.3) as r:  # --mpp wins over metadata that cannot be used
        assert require_mpp(r) == 0.3


def test_ome_xml_picks_the_image_of_the_slide_size() -> None:
    ns = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
    label = '<Image ID="Image:0"><Pixels SizeX="40" SizeY="30" PhysicalSizeX="20" PhysicalSizeXUnit="µm"/></Image>'
    main = '<Image ID="Image:1"><Pixels SizeX="512" SizeY="384" PhysicalSizeX="0.5" PhysicalSizeY="0.5"/></Image>'
    xml = f'<?xml version="1.0"?><OME xmlns="{ns}">{label}{main}</OME>'
    assert ome_mpp(xml, (512, 384)) == pytest.approx(0.5)
    assert ome_mpp(xml, None) == pytest.approx(20.0)  # no size to match: the first image
    objectives = (
        '<Instrument><Objective ID="O:1" NominalMagnification="10"/>'
        '<Objective ID="O:2" NominalMagnification="40"/></Instrument>'
    )
    linked = main.replace("<Pixels", '<ObjectiveSettings ID="O:2"/><Pixels')
    assert ome_objective(f'<OME xmlns="{ns}">{objectives}{label}{linked}</OME>', (512, 384)) == 40.0
    assert ome_objective(f'<OME xmlns="{ns}">{objectives}{label}{main}</OME>', (512, 384)) is None  # which one?
    assert ome_objective(xml, (512, 384)) is None
    assert ome_mpp(f'<OME xmlns="{ns}"><Image><Pixels SizeX="4" SizeY="4"/></Image></OME>') is None
    assert ome_mpp('<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01"/>') is None
    with pytest.raises(UnusableMpp, match="does not parse"):
        ome_mpp(f'<OME xmlns="{ns}"><Image>')


# -- DICOM WSI -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("syntax", list(DICOM_TRANSFER_SYNTAXES))
def test_dicom_series(tmp_path, he, syntax: str) -> None:
    folder = tmp_path / "case_dicom"
    levels = write_dicom_wsi(folder, he, mpp=0.25, transfer_syntax=syntax)
    assert len(dicom_level_files(folder)) == 3
    with open_slide(folder) as r:
        assert r.backend == "dicom" and r.path == folder
        assert r.dimensions == (512, 384)
        assert r.level_count == 3
        assert r.level_dimensions == ((512, 384), (256, 192), (128, 96))
        assert r.level_downsamples == (1.0, 2.0, 4.0)
        assert r.mpp == pytest.approx(0.25)
        assert r.objective_power == 20.0
        check_reads(r, levels)
        np.testing.assert_array_equal(arr(r.thumbnail(128)), levels[2])
    check_close(r, folder)


def test_dicom_edges_and_level0_coordinates(tmp_path) -> None:
    """A slide that is no whole number of tiles (500x380, tiles of 64): edge tiles, reads past the edge, and
    level-0 coordinates off the level grid all land where OpenSlide's own DICOM reader puts them."""
    folder = tmp_path / "edges"
    levels = write_dicom_wsi(folder, cmu_crop(700, 1500, 500, 380), mpp=0.5, objective=None)
    with open_slide(folder) as r:
        assert r.level_dimensions == ((500, 380), (250, 190), (125, 95))
        assert r.objective_power is None
        np.testing.assert_array_equal(arr(r.read_region((440, 330), 0, (60, 50))), levels[0][330:380, 440:500])
        corner = arr(r.read_region((480, 360), 0, (40, 40)))  # half outside: white there
        np.testing.assert_array_equal(corner[:20, :20], levels[0][360:380, 480:500])
        assert (corner[20:] == 255).all() and (corner[:, 20:] == 255).all()
        ours = arr(r.read_region((202, 101), 2, (30, 20)))
        np.testing.assert_array_equal(ours, levels[2][25:45, 50:80])  # floor(202 / 4), floor(101 / 4)
        other = openslide.OpenSlide(str(dicom_level_files(folder)[0]))
        try:
            assert other.properties["openslide.vendor"] == "dicom"
            assert other.level_dimensions == r.level_dimensions
            assert float(other.properties["openslide.mpp-x"]) == pytest.approx(r.mpp)
            for loc, level, size in [((0, 0), 0, (500, 380)), ((64, 32), 1, (100, 80)), ((200, 100), 2, (30, 20))]:
                np.testing.assert_array_equal(
                    arr(r.read_region(loc, level, size)), np.asarray(other.read_region(loc, level, size).convert("RGB"))
                )
        finally:
            other.close()


def test_dicom_file_stands_for_its_series(tmp_path, he) -> None:
    folder = tmp_path / "series"
    write_dicom_wsi(folder, he, mpp=0.25, levels=2)
    one = dicom_level_files(folder)[-1]
    with open_slide(one) as r:
        assert (r.backend, r.path, r.level_count) == ("dicom", folder, 2)
    with open_slide(folder, backend="dicom") as r:
        assert r.level_count == 2
    with pytest.raises(DataError, match="is a folder, which only the dicom backend reads"):
        open_slide(folder, backend="openslide")


def test_dicom_series_beside_other_dicom_files(tmp_path, he) -> None:
    """A photo (Secondary Capture) and an export's DICOMDIR in the series folder are left out; a folder holding
    only a DICOMDIR is no slide."""
    folder = tmp_path / "export" / "series"
    levels = write_dicom_wsi(folder, he, mpp=0.25, levels=2)
    write_dicom_file(folder / "photo.dcm")
    write_dicom_file(folder / "DICOMDIR", MediaStorageDirectoryStorage)
    write_dicom_file(tmp_path / "export" / "DICOMDIR", MediaStorageDirectoryStorage)
    assert find_slides(tmp_path / "export") == [folder]
    with open_slide(folder) as r:
        assert (r.level_count, r.mpp) == (2, pytest.approx(0.25))
        check_reads(r, levels)


def test_dicom_tiles_and_loader_reopen(tmp_path, he) -> None:
    folder = tmp_path / "tiles"
    levels = write_dicom_wsi(folder, he, mpp=0.25)
    with open_slide(folder) as r:
        plan = plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=64, min_tissue=0.0), mask=np.ones((8, 8), bool))
        assert (plan.level, plan.read_size, plan.needs_resize) == (1, 64, False)
        x, y = plan.coords[-1] // 2
        np.testing.assert_array_equal(arr(read_tile(r, plan, len(plan) - 1)), levels[1][y : y + 64, x : x + 64])
    ds = SlideTileDataset(folder, plan, lambda img: torch.from_numpy(np.asarray(img).copy()), backend="dicom")
    try:
        tile, i = ds[len(plan) - 1]
        np.testing.assert_array_equal(tile.numpy(), levels[1][y : y + 64, x : x + 64])
    finally:
        ds.close()


# -- Hamamatsu NDPI, Leica SCN and MIRAX through OpenSlide ------------------------------------------------------
def test_ndpi(tmp_path, he) -> None:
    path = tmp_path / "cmu.ndpi"
    levels = write_ndpi(path, he, mpp=0.25, objective=20.0)
    with open_slide(path) as r:
        assert (r.backend, r.vendor) == ("openslide", "hamamatsu")
        assert r.dimensions == (512, 384)
        # the three written levels, then the coarser ones OpenSlide decodes from the JPEG's DCT scaling
        assert r.level_dimensions[:3] == ((512, 384), (256, 192), (128, 96))
        assert r.level_downsamples == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
        assert r.mpp == pytest.approx(0.25)
        assert r.objective_power == 20.0
        check_reads(r, levels, exact=False)
        for level in (0, 2):  # and the JPEG (quality 95) stays close to the H&E it was made from
            assert np.abs(levels[level].astype(float) - pyramid_levels(he, 3)[level]).mean() < 2.5
        thumb = arr(r.thumbnail(128))
        assert thumb.shape == (96, 128, 3) and np.abs(thumb.astype(int) - levels[2].astype(int)).max() <= 1
    check_close(r, tmp_path)


def test_scn(tmp_path, he) -> None:
    path = tmp_path / "cmu.scn"
    levels = write_scn(path, he, mpp=0.5, objective=20, offset=(64, 32))
    with open_slide(path) as r:
        assert (r.backend, r.vendor) == ("openslide", "leica")
        assert r.dimensions == (640, 448)  # the collection: the image plus blank slide around it
        assert r.level_dimensions == ((640, 448), (320, 224), (160, 112))
        assert r.level_downsamples == (1.0, 2.0, 4.0)
        assert r.mpp == pytest.approx(0.5)
        assert r.objective_power == 20.0
        check_reads(r, levels, offset=(64, 32))
        assert (arr(r.read_region((0, 0), 0, (64, 32))) == 255).all()
        thumb = arr(r.thumbnail(160))
        np.testing.assert_array_equal(thumb[8:104, 16:144], levels[2])
    check_close(r, tmp_path)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_mrxs(tmp_path, he, image_format: str) -> None:
    path = tmp_path / "cmu.mrxs"
    levels = write_mrxs(path, he, mpp=0.25, objective=20, image_format=image_format)
    with open_slide(path) as r:
        assert (r.backend, r.vendor) == ("openslide", "mirax")
        assert r.dimensions == (512, 384)
        assert r.level_dimensions == ((512, 384), (256, 192), (128, 96))
        assert r.level_downsamples == (1.0, 2.0, 4.0)
        assert r.mpp == pytest.approx(0.25)
        assert r.objective_power == 20.0
        check_reads(r, levels, exact=image_format == "PNG")
        thumb = arr(r.thumbnail(128))
        assert np.abs(thumb.astype(int) - levels[2].astype(int)).max() <= (0 if image_format == "PNG" else 1)
    check_close(r, tmp_path)


# -- discovery -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """A cohort folder: the vendored SVS, an OME-TIFF, an NDPI, an SCN, a MIRAX slide (with its data folder), a
    DICOM series with .dcm names and, deeper down, one whose files have no extension (as PACS exports write
    them)."""
    root = tmp_path_factory.mktemp("cohort")
    he = cmu_crop(*REGION)
    shutil.copy(sample_slide(), root / "cmu_svs.svs")
    (root / "ome").mkdir()
    write_ome_tiff(root / "ome" / "cmu_ome.ome.tif", he, 250, "nm")
    write_ndpi(root / "cmu_ndpi.ndpi", he, mpp=0.25)
    write_scn(root / "cmu_scn.scn", he, mpp=0.5)
    write_mrxs(root / "cmu_mrxs.mrxs", he, mpp=0.25)
    write_dicom_wsi(root / "case_dcm", he, mpp=0.25)
    plain = root / "pacs" / "case_plain"
    write_dicom_wsi(plain, he, mpp=0.25, levels=2)
    for i, f in enumerate(dicom_level_files(plain)):
        f.rename(plain / f"IM{i:04d}")
    return root


def test_folder_discovery_finds_dicom_series_as_one_slide(mixed) -> None:
    found = find_slides(mixed)
    assert [p.relative_to(mixed).as_posix() for p in found] == [  # os.walk's order: a folder's files, then below
        "cmu_mrxs.mrxs",
        "cmu_ndpi.ndpi",
        "cmu_scn.scn",
        "cmu_svs.svs",
        "case_dcm",
        "ome/cmu_ome.ome.tif",
        "pacs/case_plain",
    ]
    ids = ["cmu_mrxs", "cmu_ndpi", "cmu_scn", "cmu_svs", "case_dcm", "cmu_ome.ome", "case_plain"]
    assert [slide_id(p) for p in found] == ids
    assert find_slides(mixed / "pacs" / "case_plain") == [mixed / "pacs" / "case_plain"]  # the series itself
    with open_slide(mixed / "pacs" / "case_plain") as r:
        assert (r.backend, r.level_count, r.mpp) == ("dicom", 2, pytest.approx(0.25))


def test_what_a_dicom_file_is(tmp_path, mixed) -> None:
    marked = b"\0" * 128 + b"DICM" + b"\0" * 16
    for name, dicom in [("IM0001", True), ("1.2.840.113619.2.5", True), ("x.dcm", True), ("x.tif", False)]:
        (tmp_path / name).write_bytes(marked)
        assert is_dicom_file(tmp_path / name) is dicom, name  # a slide extension is its own format
    (tmp_path / "notes.txt").write_bytes(b"\0" * 200)
    assert not is_dicom_file(tmp_path / "notes.txt")
    plain = mixed / "pacs" / "case_plain"
    with open_slide(plain / "IM0000") as r:  # an instance without extension opens its series
        assert (r.backend, r.path, r.level_count) == ("dicom", plain, 2)


def test_slide_list_names_dicom_folders_or_files(mixed, tmp_path) -> None:
    one = dicom_level_files(mixed / "case_dcm")[1]
    listing = tmp_path / "slides.csv"
    listing.write_text(f"slide_path,mpp\n{one},0.3\n{mixed / 'pacs' / 'case_plain'},0.26\n")
    assert listed_slides(listing) == [(mixed / "case_dcm", 0.3), (mixed / "pacs" / "case_plain", 0.26)]
    assert listed_slides(one) == [(mixed / "case_dcm", None)]
    # the folder and one of its files name the same slide: which row's mpp would count? The list must say once
    listing.write_text(f"slide_path,mpp\n{mixed / 'case_dcm'},\n{one},0.3\n")
    with pytest.raises(DataError, match="names slide .*case_dcm on lines 2 and 3; keep one row per slide"):
        listed_slides(listing)


def test_dicom_folder_ids_must_be_unique(tmp_path, he) -> None:
    write_dicom_wsi(tmp_path / "a" / "case1", he, mpp=0.25, levels=1)
    shutil.copy(sample_slide(), tmp_path / "case1.svs")
    with pytest.raises(DataError, match="share the id 'case1' \\(file stem or DICOM folder name\\)"):
        find_slides(tmp_path)


def test_dot_folder_has_the_folder_name(tmp_path, he, monkeypatch) -> None:
    write_dicom_wsi(tmp_path / "case9", he, mpp=0.25, levels=1)
    monkeypatch.chdir(tmp_path / "case9")
    assert [slide_id(p) for p in find_slides(".")] == ["case9"]


# -- the command line over the mixed folder --------------------------------------------------------------------
def test_cli_tile_extract_heatmap_over_every_format(mixed, tmp_path, monkeypatch, capsys) -> None:
    before = {p: p.read_bytes() for p in mixed.rglob("*") if p.is_file()}
    out = tmp_path / "tiles"
    code, _, err = run_main(
        monkeypatch, capsys, "slides", "tile", "--slides", mixed, "--out", out, "--target-mpp", "1.0",
        "--tile-size", "64", "--thumb-size", "256",
    )  # fmt: skip
    assert code == 0, err
    with open(out / "tiles_summary.csv", newline="") as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f)}
    want_mpp = {"case_dcm": 0.25, "case_plain": 0.25, "cmu_mrxs": 0.25, "cmu_ndpi": 0.25, "cmu_ome.ome": 0.25}
    want_mpp.update(cmu_scn=0.5, cmu_svs=0.499)
    assert set(rows) == set(want_mpp)
    for sid, mpp in want_mpp.items():
        assert float(rows[sid]["slide_mpp"]) == pytest.approx(mpp), sid
        assert int(rows[sid]["tiles"]) > 0, sid
        for suffix in ("_qc.png", "_tiles.csv", "_tissue.geojson"):
            assert (out / f"{sid}{suffix}").is_file()
    # 1 mpp from a 0.25 mpp slide reads its 4x level; the 2-level DICOM series has no 4x level, so its 2x one
    assert (int(rows["case_dcm"]["level"]), int(rows["case_plain"]["level"])) == (2, 1)

    g = torch.Generator().manual_seed(0)
    text = (torch.randn(24, generator=g), torch.randn(7, 24, generator=g))
    model = create_model(TINY_NAME, "pathotune", 3, image_size=32, backbone_kwargs=dict(TINY2), text_features=text)
    bundle = save_bundle(model, tmp_path / "bundle")
    feats = tmp_path / "feats"
    code, _, err = run_main(
        monkeypatch, capsys, "slides", "extract", "--slides", mixed, "--bundle", bundle, "--out", feats,
        "--target-mpp", "2.0", "--num-workers", "0", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    for sid in want_mpp:
        f = read_slide_features(feats / f"{sid}.h5")
        assert f.features.shape[0] == len(f.coords) > 0 and np.isfinite(f.features).all()
    heat = tmp_path / "heat"
    code, _, err = run_main(
        monkeypatch, capsys, "slides", "heatmap", "--bundle", bundle, "--features", feats, "--slides", mixed,
        "--out", heat, "--max-size", "128",
    )  # fmt: skip
    assert code == 0, err
    for sid in want_mpp:  # each slide found again by its id, its thumbnail painted
        with Image.open(heat / f"{sid}_class_0.png") as img:
            assert img.mode == "RGB" and max(img.size) >= 128
    assert {p: p.read_bytes() for p in mixed.rglob("*") if p.is_file()} == before  # slides are only read
