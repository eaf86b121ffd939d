"""Opening a slide and reading 224 px tiles at level 0, per format, on the same H&E in every format.

    python benchmarks/slide_formats.py                 # the CMU slide's 2048x2816 level 0, 3 levels, 5 repeats

The vendored CMU slide's level 0 (cropped to whole 256 px camera images for MIRAX) is written in each format
by the writers the tests use (tests/vendor_slides.py): tiled TIFF and OME-TIFF (deflate), DICOM WSI (JPEG 2000
lossless and uncompressed), NDPI (JPEG strips), SCN (deflate), MIRAX (JPEG images); the SVS is the vendored
file itself (JPEG). For each, ``open_slide`` (median of the repeats, after one warm-up) and the rate of reading
every 224 px tile of level 0 in row order through ``read_region`` (tiles/s, median); the JPEG 2000 series is also
read through OpenSlide's own DICOM reader, to tell the codec's cost from wsidicom's. Files sit in a temporary
folder, so the page cache holds them: this measures decoding and the readers, not the disk.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openslide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from slide_fixtures import cmu_rgb, write_pyramid_tiff  # noqa: E402
from vendor_slides import (  # noqa: E402
    dicom_level_files,
    write_dicom_wsi,
    write_mrxs,
    write_ndpi,
    write_ome_tiff,
    write_scn,
)

from pathotune.slides import open_slide, sample_slide  # noqa: E402

TILE = 224


def write_all(root: Path, width: int, height: int) -> dict[str, Path]:
    rgb = cmu_rgb()[:height, :width]
    out = {"svs (vendored)": sample_slide()}
    write_pyramid_tiff(root / "p.tif", rgb, mpp=0.5, levels=3, tile=256)
    out["tiled tiff"] = root / "p.tif"
    write_ome_tiff(root / "o.ome.tif", rgb, 0.5, levels=3, tile=256)
    out["ome-tiff"] = root / "o.ome.tif"
    for syntax in ("jpeg2000-lossless", "uncompressed"):
        write_dicom_wsi(root / syntax, rgb, mpp=0.5, levels=3, tile=256, transfer_syntax=syntax)
        out[f"dicom {syntax}"] = root / syntax
    write_ndpi(root / "n.ndpi", rgb, mpp=0.5, levels=3, restart_blocks=32)
    out["ndpi"] = root / "n.ndpi"
    write_scn(root / "s.scn", rgb, mpp=0.5, levels=3, tile=256)
    out["scn"] = root / "s.scn"
    write_mrxs(root / "m.mrxs", rgb, mpp=0.5, levels=3, image=256, image_format="JPEG")
    out["mrxs"] = root / "m.mrxs"
    return out


def measure(opener: Callable[[], Any], repeats: int) -> tuple[float, float, int]:
    """(open seconds, tiles per second, tiles): medians over ``repeats`` after one warm-up pass."""
    opens, rates = [], []
    for k in range(repeats + 1):
        t = time.perf_counter()
        reader = opener()
        opened = time.perf_counter() - t
        w, h = reader.dimensions
        corners = [(x, y) for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)]
        t = time.perf_counter()
        for corner in corners:
            reader.read_region(corner, 0, (TILE, TILE))
        rate = len(corners) / (time.perf_counter() - t)
        reader.close()
        if k:  # the first pass warms imports and the page cache
            opens.append(opened)
            rates.append(rate)
    return statistics.median(opens), statistics.median(rates), len(corners)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--height", type=int, default=2816)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        slides = write_all(Path(tmp), args.width, args.height)
        print("| format | backend | open (ms, median) | 224 px tiles/s at level 0 (median) | tiles |")
        print("|---|---|---:|---:|---:|")
        rows = []
        for name, path in slides.items():
            with open_slide(path) as reader:
                rows.append((name, reader.backend, lambda p=path: open_slide(p)))
        # the same JPEG 2000 series through OpenSlide's own DICOM reader: what the codec costs, not wsidicom
        first = dicom_level_files(slides["dicom jpeg2000-lossless"])[0]
        rows.append(("dicom jpeg2000-lossless", "OpenSlide's DICOM reader", lambda: openslide.OpenSlide(str(first))))
        for name, backend, opener in rows:
            opened, rate, n = measure(opener, args.repeats)
            print(f"| {name} | {backend} | {opened * 1000:.1f} | {rate:.0f} | {n} |")


if __name__ == "__main__":
    main()
