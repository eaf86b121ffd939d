"""Whole-slide layer: readers agree with each other and with the pixels written, plans land where they say."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from slide_fixtures import (
    cmu_crop,
    cmu_rgb,
    tissue_and_glass,
    truncate,
    write_pyramid_tiff,
)

from pathotune.errors import ConfigError, DataError
from pathotune.slides import (
    TilingConfig,
    TissueConfig,
    iter_tiles,
    open_slide,
    plan_tiles,
    qc_thumbnail,
    read_tile,
    require_mpp,
    sample_slide,
    tissue_mask,
)
from pathotune.slides.qc import MASK_COLOUR, TILE_COLOUR

CMU = sample_slide()


def arr(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A 1024x768 real-H&E crop written as a 0.25 mpp, 3-level (ds 1, 2, 4) tiled TIFF."""
    rgb = cmu_crop(700, 1500, 1024, 768)
    path = tmp_path_factory.mktemp("pyr") / "cmu_pyramid.tif"
    levels = write_pyramid_tiff(path, rgb, mpp=0.25, levels=3, tile=64)
    return path, levels


@pytest.fixture(scope="module")
def half_glass(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Left half tissue, right half glass, 0.5 mpp, 3 levels."""
    rgb = tissue_and_glass(512, 1024)
    path = tmp_path_factory.mktemp("half") / "half_glass.tif"
    write_pyramid_tiff(path, rgb, mpp=0.5, levels=3, tile=64)
    return path, rgb


# -- the vendored Aperio slide ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "auto"])
def test_cmu_metadata(backend: str) -> None:
    with open_slide(CMU, backend=backend) as r:
        assert r.backend == ("openslide" if backend == "auto" else backend)
        assert r.dimensions == (2220, 2967)  # width x height: the section is portrait
        assert r.level_count == 1
        assert r.level_dimensions == ((2220, 2967),)
        assert r.level_downsamples == (1.0,)
        assert r.mpp == pytest.approx(0.499)
        assert r.objective_power == 20.0
        assert require_mpp(r) == pytest.approx(0.499)


def test_cmu_backends_read_identical_pixels() -> None:
    with open_slide(CMU, backend="openslide") as a, open_slide(CMU, backend="tiffslide") as b:
        for loc, size in [((0, 0), (240, 240)), ((301, 1703), (257, 193)), ((2100, 2900), (120, 67))]:
            ra, rb = arr(a.read_region(loc, 0, size)), arr(b.read_region(loc, 0, size))
            assert ra.shape == (size[1], size[0], 3)
            np.testing.assert_array_equal(ra, rb)
            x, y = loc
            np.testing.assert_array_equal(ra, cmu_rgb()[y : y + size[1], x : x + size[0]])
        np.testing.assert_array_equal(arr(a.thumbnail(300)), arr(b.thumbnail(300)))


def test_mpp_argument_overrides_metadata() -> None:
    with open_slide(CMU, mpp=0.25) as r:
        assert r.mpp == 0.25
    with pytest.raises(ConfigError, match="mpp must be a positive"):
        open_slide(CMU, mpp=-1)


def test_thumbnail_size_and_content() -> None:
    with open_slide(CMU) as r:
        thumb = r.thumbnail(512)
        assert thumb.size == (383, 512)
        # Box-averaged thumbnail agrees with a direct box resize of level 0.
        ref = np.asarray(Image.fromarray(cmu_rgb()).resize((383, 512), Image.Resampling.BOX), dtype=float)
        assert np.abs(arr(thumb).astype(float) - ref).mean() < 3.0
        assert r.thumbnail(5000).size == (2220, 2967)  # never upscaled


# -- pyramidal TIFF written from real pixels -------------------------------------------------------------------
@pytest.mark.parametrize("bigtiff", [False, True])
def test_pyramid_both_backends_match_written_pixels(tmp_path, bigtiff: bool) -> None:
    rgb = cmu_crop(700, 1500, 512, 384)
    path = tmp_path / "p.tif"
    levels = write_pyramid_tiff(path, rgb, mpp=0.25, levels=3, tile=64, bigtiff=bigtiff)
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tiffslide") as b:
        for r in (a, b):
            assert r.dimensions == (512, 384)
            assert r.level_count == 3
            assert r.level_dimensions == ((512, 384), (256, 192), (128, 96))
            assert r.level_downsamples == (1.0, 2.0, 4.0)
            assert r.mpp == pytest.approx(0.25)
            assert r.objective_power is None
        for level, ds in enumerate((1, 2, 4)):
            lx, ly, w, h = 13, 7, 50, 41  # level pixels; level-0 location is an exact multiple of ds
            ra = arr(a.read_region((lx * ds, ly * ds), level, (w, h)))
            rb = arr(b.read_region((lx * ds, ly * ds), level, (w, h)))
            np.testing.assert_array_equal(ra, rb)
            np.testing.assert_array_equal(ra, levels[level][ly : ly + h, lx : lx + w])


def test_auto_prefers_openslide(pyramid) -> None:
    path, _ = pyramid
    with open_slide(path) as r:
        assert r.backend == "openslide"


def test_auto_takes_tiffslide_for_subifd_pyramid(tmp_path) -> None:
    path = tmp_path / "sub.tif"
    levels = write_pyramid_tiff(path, cmu_crop(700, 1500, 512, 384), mpp=0.25, levels=3, subifds=True)
    with open_slide(path, backend="openslide") as r:
        assert r.level_count == 1  # OpenSlide does not follow SubIFDs
    with open_slide(path) as r:
        assert r.backend == "tiffslide" and r.level_downsamples == (1.0, 2.0, 4.0)
        np.testing.assert_array_equal(arr(r.read_region((64, 32), 2, (40, 30))), levels[2][8:38, 16:56])


def test_read_outside_slide_is_white(pyramid) -> None:
    path, levels = pyramid
    with open_slide(path) as r:
        region = arr(r.read_region((-10, -20), 0, (30, 40)))
        assert (region[:20] == 255).all() and (region[:, :10] == 255).all()
        np.testing.assert_array_equal(region[20:, 10:], levels[0][:20, :20])
        w, h = r.dimensions
        corner = arr(r.read_region((w - 5, h - 5), 0, (10, 10)))
        assert (corner[5:] == 255).all() and (corner[:, 5:] == 255).all()
        assert (arr(r.read_region((w + 100, 0), 0, (8, 8))) == 255).all()


def test_best_level_for_downsample(pyramid) -> None:
    path, _ = pyramid
    with open_slide(path) as r:
        assert [r.best_level_for_downsample(d) for d in (0.5, 1, 1.9, 2, 3.2, 3.99, 4, 100)] == [0, 0, 0, 1, 1, 2, 2, 2]


# -- tiling ----------------------------------------------------------------------------------------------------
ALL = np.ones((8, 8), dtype=bool)  # "everything is tissue", so geometry tests keep every tile


@pytest.mark.parametrize(
    ("target", "level", "read_size"),
    [(0.25, 0, 64), (0.5, 1, 64), (0.8, 1, 102), (1.0, 2, 64), (None, 0, 64)],
)
def test_level_choice(pyramid, target, level: int, read_size: int) -> None:
    path, _ = pyramid
    with open_slide(path) as r:
        plan = plan_tiles(r, TilingConfig(target_mpp=target, tile_size=64, min_tissue=0.0), mask=ALL)
    assert (plan.level, plan.read_size) == (level, read_size)
    assert plan.downsample == (1.0, 2.0, 4.0)[level]
    assert plan.needs_resize == (read_size != 64)
    assert plan.slide_mpp == pytest.approx(0.25)
    assert plan.coords.dtype == np.int64 and plan.coords.shape == (len(plan), 2)
    assert len(plan) == plan.n_candidates > 0
    side = plan.tile_size_level0
    assert (plan.coords >= 0).all()
    assert (plan.coords[:, 0] + side <= 1024 + plan.downsample).all()
    assert (plan.coords[:, 1] + side <= 768 + plan.downsample).all()


def test_upsampling_target_is_refused(pyramid) -> None:
    path, _ = pyramid
    with open_slide(path) as r, pytest.raises(DataError, match=r"target mpp 0\.1 is finer .*0\.25 mpp"):
        plan_tiles(r, TilingConfig(target_mpp=0.1, tile_size=64), mask=ALL)


def test_tiles_match_direct_reads(pyramid) -> None:
    path, levels = pyramid
    rgb = levels[0]
    with open_slide(path) as r:
        # Level 0, no resize: a tile is exactly the numpy crop of the written array.
        plan = plan_tiles(r, TilingConfig(target_mpp=None, tile_size=64, overlap=16, min_tissue=0.0), mask=ALL)
        assert plan.stride == 48
        assert set(np.diff(np.unique(plan.coords[:, 0])).tolist()) == {48}
        for i in (0, 7, len(plan) - 1):
            x, y = plan.coords[i]
            np.testing.assert_array_equal(arr(read_tile(r, plan, i)), rgb[y : y + 64, x : x + 64])
        # Level 1 at 0.5 mpp: the tile is the level-1 array at coords / 2.
        plan = plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=64, min_tissue=0.0), mask=ALL)
        assert set(np.diff(np.unique(plan.coords[:, 0])).tolist()) == {128}
        for i in (0, 5, len(plan) - 1):
            x, y = plan.coords[i] // 2
            np.testing.assert_array_equal(arr(read_tile(r, plan, i)), levels[1][y : y + 64, x : x + 64])
        # 0.8 mpp: read 102 px at level 1 and shrink; same as reading the region directly at those coords.
        plan = plan_tiles(r, TilingConfig(target_mpp=0.8, tile_size=64, min_tissue=0.0), mask=ALL)
        for i in (0, 3, len(plan) - 1):
            tile = read_tile(r, plan, i)
            assert tile.size == (64, 64)
            direct = r.read_region(tuple(plan.coords[i]), 1, (102, 102)).resize((64, 64), Image.Resampling.LANCZOS)
            np.testing.assert_array_equal(arr(tile), arr(direct))
        assert sum(1 for _ in iter_tiles(r, plan)) == len(plan)


def test_cmu_tiles_at_half_micron_are_level0_crops() -> None:
    with open_slide(CMU) as r:
        plan = plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=224))
        assert (plan.level, plan.read_size, plan.needs_resize) == (0, 224, False)
        assert plan.scale == pytest.approx(0.5 / 0.499)
        assert 0 < len(plan) < plan.n_candidates  # glass around the section is dropped
        assert (plan.tissue >= 0.5).all()
        for i in (0, len(plan) // 2, len(plan) - 1):
            x, y = plan.coords[i]
            np.testing.assert_array_equal(arr(read_tile(r, plan, i)), cmu_rgb()[y : y + 224, x : x + 224])


def test_tissue_filter_drops_glass_half(half_glass) -> None:
    path, _ = half_glass
    with open_slide(path) as r:
        plan = plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=64, min_tissue=0.5))
        assert plan.n_candidates == 16 * 8
        assert len(plan) == 8 * 8  # every tile of the tissue half, none of the glass half
        assert (plan.coords[:, 0] + 64 <= 512).all()
        assert plan.tissue.mean() > 0.85  # real dermis has pale gaps between fibres
        everything = plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=64, min_tissue=0.0), mask=plan.mask)
        glass = everything.coords[:, 0] >= 512
        assert glass.sum() == 64 and (everything.tissue[glass] < 0.05).all()
        # At 1 mpp the tiles come from level 1 and the same split holds.
        coarse = plan_tiles(r, TilingConfig(target_mpp=1.0, tile_size=64, min_tissue=0.5), mask=plan.mask)
        assert coarse.level == 1 and len(coarse) == 4 * 4
        assert (coarse.coords[:, 0] + 128 <= 512).all()


def test_slide_smaller_than_a_tile(pyramid) -> None:
    path, _ = pyramid
    with open_slide(path) as r, pytest.raises(DataError, match="smaller than one"):
        plan_tiles(r, TilingConfig(target_mpp=0.25, tile_size=2048), mask=ALL)


def test_tiling_config_validation() -> None:
    with pytest.raises(ConfigError, match="overlap"):
        TilingConfig(tile_size=64, overlap=64)
    with pytest.raises(ConfigError, match="min_tissue"):
        TilingConfig(min_tissue=1.5)
    with pytest.raises(ConfigError, match="target_mpp"):
        TilingConfig(target_mpp=0)


# -- tissue mask -----------------------------------------------------------------------------------------------
def test_tissue_mask_on_real_slide() -> None:
    with open_slide(CMU) as r:
        thumb = r.thumbnail(512)
    mask = tissue_mask(thumb)
    assert mask.dtype == bool and mask.shape == (512, 383)
    assert 0.25 < mask.mean() < 0.6
    assert not mask[:60, :60].any() and not mask[:60, -60:].any()  # glass corners
    # Dense dermis around level-0 (1150, 2300) sits at thumbnail (~198, ~397).
    assert mask[380:420, 180:220].all()
    np.testing.assert_array_equal(mask, tissue_mask(np.asarray(thumb)))


def test_tissue_mask_blank_glass_and_config() -> None:
    glass = tissue_and_glass(128, 256)[:, 128:]
    assert not tissue_mask(glass).any()  # Otsu would split the noise; the floor stops it
    half = tissue_and_glass(128, 256)
    fixed = tissue_mask(half, method="fixed", threshold=0.1)
    assert fixed[:, :100].mean() > 0.9 and not fixed[:, 140:].any()
    dark = tissue_mask(half, channel="darkness")
    assert dark[:, :100].mean() > 0.5 and not dark[:, 140:].any()
    with pytest.raises(ConfigError, match="needs a threshold"):
        TissueConfig(method="fixed")
    with pytest.raises(ConfigError, match="channel"):
        tissue_mask(half, channel="hue")


def test_hole_filling_respects_size() -> None:
    ring = np.full((200, 200, 3), 245, dtype=np.uint8)
    ring[20:180, 20:180] = (180, 80, 160)  # stained square
    ring[60:140, 60:140] = 245  # large glass hole (16% of the image)
    ring[30:34, 30:34] = 245  # tiny pale hole
    mask = tissue_mask(ring, close_radius=0, open_radius=0)
    assert mask[31, 31] and not mask[100, 100]
    assert tissue_mask(ring, close_radius=0, open_radius=0, max_hole_frac=None)[100, 100]
    assert not tissue_mask(ring, close_radius=0, open_radius=0, fill_holes=False)[31, 31]


# -- errors ----------------------------------------------------------------------------------------------------
def test_missing_mpp(tmp_path) -> None:
    path = tmp_path / "no_mpp.tif"
    write_pyramid_tiff(path, cmu_crop(700, 1500, 256, 256), mpp=None, levels=2, tile=64)
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as r:
            assert r.mpp is None
            msg = f"slide {path} has no mpp (microns per pixel) in its metadata; pass --mpp"
            with pytest.raises(DataError) as err:
                require_mpp(r)
            assert str(err.value) == msg
            with pytest.raises(DataError, match="pass --mpp"):
                plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=64), mask=ALL)
            assert len(plan_tiles(r, TilingConfig(target_mpp=None, tile_size=64, min_tissue=0), mask=ALL)) == 16
    with open_slide(path, mpp=0.25) as r:
        plan = plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=64, min_tissue=0), mask=ALL)
        assert (plan.level, plan.read_size) == (1, 64)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"slide .*nope\.svs not found"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(DataError, match="is a folder without DICOM files; pass a slide file"):
        open_slide(tmp_path)  # a folder is a DICOM WSI series


def test_corrupt_file(tmp_path) -> None:
    path = tmp_path / "bad.svs"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as err:
        open_slide(path)
    assert str(err.value) == (f"cannot open slide {path}: not a slide format that OpenSlide, tiffslide or Pillow reads")
    with pytest.raises(DataError, match="with the openslide backend"):
        open_slide(path, backend="openslide")
    with pytest.raises(ConfigError, match="unknown slide backend"):
        open_slide(path, backend="bioformats")


def test_truncated_tiff(tmp_path) -> None:
    path = tmp_path / "cut.tif"
    write_pyramid_tiff(path, cmu_crop(700, 1500, 512, 512), mpp=0.25, levels=3, tile=64)
    truncate(path, 0.5)
    # OpenSlide rejects it (its later directories are gone); tiffslide opens the first level, whose tiles
    # now run past the end of the file, so the failure surfaces on the first read.
    with open_slide(path) as r, pytest.raises(DataError, match=r"cut\.tif.*truncated or corrupt"):
        r.read_region((0, 0), 0, r.dimensions)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own complaint on the way to our error
def test_truncated_svs(tmp_path) -> None:
    path = tmp_path / "cut.svs"
    path.write_bytes(CMU.read_bytes())
    truncate(path, 0.5)  # Aperio keeps its directories at the end: nothing can even open it
    with pytest.raises(DataError, match=r"cut\.svs.*truncated or corrupt"):
        open_slide(path)


def test_truncated_png(tmp_path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(tissue_and_glass(128, 256)).save(path)
    truncate(path, 0.6)
    with pytest.raises(DataError, match=r"cut\.png.*truncated or corrupt"):
        open_slide(path)


# -- plain images ----------------------------------------------------------------------------------------------
def test_png_is_a_single_level_slide(tmp_path) -> None:
    rgb = tissue_and_glass(256, 512)
    path = tmp_path / "patch.png"
    Image.fromarray(rgb).save(path)
    with open_slide(path) as r:
        assert r.backend == "image"
        assert (r.dimensions, r.level_count, r.level_downsamples) == ((512, 256), 1, (1.0,))
        assert r.mpp is None and r.objective_power is None
        np.testing.assert_array_equal(arr(r.read_region((40, 30), 0, (100, 50))), rgb[30:80, 40:140])
        with pytest.raises(DataError, match="pass --mpp"):
            plan_tiles(r, TilingConfig(tile_size=64))
    with open_slide(path, mpp=0.5) as r:
        plan = plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=64))
        assert len(plan) == 4 * 4 and (plan.coords[:, 0] + 64 <= 256).all()
        x, y = plan.coords[-1]
        np.testing.assert_array_equal(arr(read_tile(r, plan, len(plan) - 1)), rgb[y : y + 64, x : x + 64])


def test_rgba_is_composited_on_white(tmp_path) -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = (120, 40, 90)
    rgba[:, :32, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with open_slide(path) as r:
        px = arr(r.read_region((0, 0), 0, (64, 64)))
    assert (px[:, :32] == (120, 40, 90)).all()
    assert (px[:, 32:] == 255).all()


def test_closed_reader_refuses_reads(pyramid) -> None:
    path, _ = pyramid
    r = open_slide(path)
    r.close()
    r.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        r.read_region((0, 0), 0, (4, 4))


# -- QC picture ------------------------------------------------------------------------------------------------
def test_qc_thumbnail(tmp_path, half_glass) -> None:
    path, _ = half_glass
    out = tmp_path / "qc" / "half_glass.png"
    with open_slide(path) as r:
        plan = plan_tiles(r, TilingConfig(target_mpp=0.5, tile_size=64))
        written = qc_thumbnail(r, plan, out, max_size=256)
    assert written == out and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["half_glass.png"]  # no temp file left behind
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (256, 128)
        px = np.asarray(img.convert("RGB"))
    is_tile = (px == TILE_COLOUR).all(axis=-1)
    is_mask = (px == MASK_COLOUR).all(axis=-1)
    assert is_tile[:, :128].any() and not is_tile[:, 132:].any()  # grid only over the tissue half
    assert is_mask.any()
