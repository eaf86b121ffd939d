"""Write a gigapixel pyramidal TIFF from real H&E, for scale measurements (extraction, the viewer).

The content is the vendored CMU-1-Small-Region slide (CC0, H&E skin): four tissue-rich 1024 px crops of its
level 0 make a 2048 px block; the slide is a grid of such blocks, each turned or mirrored (one of 8 ways, seeded by
its position) so that no two neighbours match. Level k is the block downsampled by 2^k (area mean), written from
the same blocks, so every level shows the same slide. Tiles are 256 px JPEG (quality 85), as scanners write them.

    python benchmarks/big_slide.py --out runs/big/big.tif --tiles 50000

``--tiles`` is the number of 224 px tiles at 0.5 mpp the slide must hold; the grid is made square and large
enough (50,000 tissue tiles: 25 x 25 blocks, 51,200 px a side, 2.6 gigapixels, 1.2 GiB). The file is written
under a temporary name and renamed; an existing file is kept (``--force`` rewrites it).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from pathotune.report.io import atomic_path
from pathotune.slides import sample_slide

BLOCK = 2048
TILE = 256
MPP = 0.5
# The most tissue-rich 1024 px windows of the CMU slide's level 0 (HSV saturation > 0.12 over 85% of them).
CROPS = ((704, 1920), (768, 1792), (640, 1856), (704, 1728))
TISSUE_SHARE = 1.0  # of a block's 224 px tiles kept at the default settings (2907 of 2916 on a 6 x 6 block slide)


def blocks(levels: int) -> list[list[np.ndarray]]:
    """For each of the 8 dihedral orientations, the block at every level (level 0 first)."""
    rgb = tifffile.imread(sample_slide(), key=0)
    base = np.zeros((BLOCK, BLOCK, 3), dtype=np.uint8)
    half = BLOCK // 2
    for k, (x, y) in enumerate(CROPS):
        r, c = divmod(k, 2)
        base[r * half : (r + 1) * half, c * half : (c + 1) * half] = rgb[y : y + half, x : x + half]
    out = []
    for turn in range(8):
        b = np.rot90(base, turn % 4)
        b = np.ascontiguousarray(b[:, ::-1] if turn >= 4 else b)
        pyramid = [b]
        for _ in range(1, levels):
            p = pyramid[-1].astype(np.float32)
            h, w = p.shape[0] // 2, p.shape[1] // 2
            pyramid.append(np.round(p.reshape(h, 2, w, 2, 3).mean(axis=(1, 3))).astype(np.uint8))
        out.append(pyramid)
    return out


def level_tiles(grid: int, level: int, variants: list[list[np.ndarray]], seed: int) -> Iterator[np.ndarray]:
    """The level's tiles in row-major order (what tifffile writes from an iterator)."""
    rng = np.random.default_rng(seed)
    turns = rng.integers(0, 8, size=(grid, grid))
    side = BLOCK >> level
    size = grid * side
    for ty in range(math.ceil(size / TILE)):
        for tx in range(math.ceil(size / TILE)):
            tile = np.full((TILE, TILE, 3), 242, dtype=np.uint8)
            y0, x0 = ty * TILE, tx * TILE
            for y in range(y0, min(y0 + TILE, size), min(side, TILE)):
                for x in range(x0, min(x0 + TILE, size), min(side, TILE)):
                    by, bx = y // side, x // side
                    block = variants[turns[by, bx]][level]
                    oy, ox = y - by * side, x - bx * side
                    h = min(TILE - (y - y0), side - oy)
                    w = min(TILE - (x - x0), side - ox)
                    tile[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = block[oy : oy + h, ox : ox + w]
            yield tile


def write_big_slide(path: Path, tiles: int, levels: int = 4, seed: int = 0) -> Path:
    per_block = (BLOCK // 224) ** 2 * TISSUE_SHARE
    grid = math.ceil(math.sqrt(tiles / per_block))
    variants = blocks(levels)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level in range(levels):
            size = grid * (BLOCK >> level)
            per_cm = 1e4 / (MPP * 2**level)
            tw.write(
                level_tiles(grid, level, variants, seed),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 85},
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                metadata=None,
            )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/big/big.tif"))
    ap.add_argument("--tiles", type=int, default=50_000, help="224 px tiles at 0.5 mpp the slide must hold")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if args.out.is_file() and not args.force:
        print(f"{args.out} exists ({args.out.stat().st_size / 2**30:.2f} GiB); --force rewrites it")
        return
    t0 = time.perf_counter()
    write_big_slide(args.out, args.tiles, args.levels)
    with tifffile.TiffFile(args.out) as tf:
        shape = tf.pages[0].shape
    size = args.out.stat().st_size / 2**30
    print(f"{args.out}: {shape[1]}x{shape[0]} px, {size:.2f} GiB, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
