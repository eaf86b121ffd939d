"""The slide viewer under a long pan: its memory stays flat, and the first tile of a fresh view comes fast.

    python benchmarks/viewer_pan.py --slide big.tif                       # any slide the project reads
    python benchmarks/viewer_pan.py --build-mosaic /tmp/mosaic.tif --side 24576   # first make one, then pan it

Starts `pathotune slides view SLIDE --port 0` on 127.0.0.1 in a subprocess (the real server: uvicorn, the
Deep Zoom pyramid over the slide reader, the LRU tile cache) and talks HTTP to it:

1. cold views: ``--views`` random viewports (``--view-tiles`` columns x rows of tiles, as a 1280 x 800 screen
   shows) at the full-resolution Deep Zoom level, none of whose tiles was asked for before; each view's tiles
   are requested at once over 6 connections, as a browser does. Reported: time to the first tile of a view
   (median, 90th percentile, max) and to the whole view. The very first view also opens the slide.
2. the pan: every tile of ``--level`` (default: the full-resolution level), row by row (``--passes`` times),
   over 4 connections, bounded by ``--max-tiles`` and ``--max-seconds``. The server's resident memory (RSS) is
   sampled every ``--sample-every`` tiles; reported at 10%, 50% and 100% of the pan, and every sample.

``--build-mosaic`` writes a pyramidal JPEG TIFF of ``--side`` x ``--side`` px by mirrored tiling of the
vendored CMU H&E slide (real tissue, every tile distinct in position), level by level from an iterator, so it
needs little memory; use it where no large slide is at hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xml.etree import ElementTree

import httpx
import numpy as np
import tifffile
from PIL import Image

from pathotune.slides import open_slide, sample_slide

try:
    import psutil
except ImportError:  # optional: /proc has the same number on Linux
    psutil = None


def rss_mb(pid: int) -> float:
    if psutil is not None:
        return psutil.Process(pid).memory_info().rss / 2**20
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RSS for the server: install psutil")


# -- a large slide from the small vendored one ----------------------------------------------------------------
def build_mosaic(path: Path, side: int, tile: int = 256, quality: int = 85) -> None:
    with open_slide(sample_slide()) as reader:
        source = np.asarray(reader.read_region((0, 0), 0, reader.dimensions))
    levels = []
    size = side
    while size >= tile:
        levels.append(size)
        size //= 2
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, size in enumerate(levels):
            scale = 2**k
            src = (
                source
                if k == 0
                else np.asarray(
                    Image.fromarray(source).resize(
                        (max(1, source.shape[1] // scale), max(1, source.shape[0] // scale)), Image.Resampling.BOX
                    )
                )
            )
            h, w = src.shape[:2]
            mirrored = np.concatenate(
                [np.concatenate([src, src[:, ::-1]], 1), np.concatenate([src[::-1], src[::-1, ::-1]], 1)], 0
            )

            def tiles(mirrored=mirrored, size=size, h=h, w=w):
                for y in range(0, size, tile):
                    for x in range(0, size, tile):
                        ys = (np.arange(y, y + tile) % (2 * h))[:, None]
                        xs = (np.arange(x, x + tile) % (2 * w))[None, :]
                        yield mirrored[ys, xs]

            mpp = 0.5 * scale
            tw.write(
                tiles(),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                subfiletype=1 if k else 0,
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            print(f"level {k}: {size} x {size} px", flush=True)


# -- the server -----------------------------------------------------------------------------------------------
def start_server(slide: Path, cache_tiles: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "pathotune.cli.main", "slides", "view", str(slide), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--cache-tiles", str(cache_tiles)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"http://127\.0\.0\.1:\d+/", line)
        if m:
            return proc, m[0]
    raise RuntimeError(f"the viewer did not start (exit {proc.wait()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path)
    ap.add_argument("--build-mosaic", type=Path, help="write a mosaic slide here first (and pan it)")
    ap.add_argument("--side", type=int, default=24576, help="the mosaic's side in px")
    ap.add_argument("--level", type=int, default=None, help="Deep Zoom level to pan; default the full-size one")
    ap.add_argument("--views", type=int, default=20)
    ap.add_argument("--view-tiles", default="6x4", help="columns x rows of tiles in a view (1280 x 800 px: 6x4)")
    ap.add_argument("--passes", type=int, default=1, help="pan the level this many times (each pass cache-cold)")
    ap.add_argument("--max-tiles", type=int, default=100_000)
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    ap.add_argument("--sample-every", type=int, default=200)
    ap.add_argument("--cache-tiles", type=int, default=1024, help="the server's LRU cache, as `--cache-tiles`")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.build_mosaic is not None:
        if not args.build_mosaic.exists():
            build_mosaic(args.build_mosaic, args.side)
        args.slide = args.slide or args.build_mosaic
    if args.slide is None:
        ap.error("pass --slide (or --build-mosaic)")

    proc, url = start_server(args.slide, args.cache_tiles)
    pid = proc.pid
    sid = args.slide.stem
    try:
        client = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=8))
        rss_start = rss_mb(pid)
        dzi = ElementTree.fromstring(client.get(f"/slides/{sid}.dzi").text)
        size = dzi.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
        width, height = int(size.get("Width")), int(size.get("Height"))
        tile_side = int(dzi.get("TileSize"))
        top = math.ceil(math.log2(max(width, height)))
        level = top if args.level is None else args.level
        scale = 2 ** (top - level)
        cols, rows = math.ceil(math.ceil(width / scale) / tile_side), math.ceil(math.ceil(height / scale) / tile_side)

        def get(col: int, row: int, lvl: int = level) -> float:
            r = client.get(f"/slides/{sid}_files/{lvl}/{col}_{row}.jpeg")
            r.raise_for_status()
            return time.perf_counter()

        # 1. cold views at full resolution
        vc, vr = (int(v) for v in args.view_tiles.split("x"))
        tcols, trows = math.ceil(width / tile_side), math.ceil(height / tile_side)
        rng = random.Random(0)
        firsts, wholes, seen = [], [], set()
        with ThreadPoolExecutor(6) as pool:
            for _ in range(args.views):
                for _attempt in range(100):
                    c0, r0 = rng.randrange(max(1, tcols - vc)), rng.randrange(max(1, trows - vr))
                    view = [(c, r) for r in range(r0, min(trows, r0 + vr)) for c in range(c0, min(tcols, c0 + vc))]
                    if not seen & set(view):
                        break
                seen |= set(view)
                t0 = time.perf_counter()
                done = list(pool.map(lambda cr: get(*cr, lvl=top), view))
                firsts.append((min(done) - t0) * 1000)
                wholes.append((max(done) - t0) * 1000)

        # 2. the pan
        order = [(c, r) for r in range(rows) for c in (range(cols) if r % 2 == 0 else range(cols - 1, -1, -1))]
        order = (order * args.passes)[: args.max_tiles]
        samples: list[tuple[int, float]] = [(0, rss_mb(pid))]
        t0 = time.perf_counter()
        served = 0
        with ThreadPoolExecutor(4) as pool:
            for start in range(0, len(order), args.sample_every):
                list(pool.map(lambda cr: get(*cr), order[start : start + args.sample_every]))
                served = min(len(order), start + args.sample_every)
                samples.append((served, rss_mb(pid)))
                if time.perf_counter() - t0 > args.max_seconds:
                    break
        pan_s = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    def at(fraction: float) -> float:
        """The largest RSS sampled up to this fraction of the pan (at least the first sample after it began)."""
        upto = max(fraction * served, samples[min(1, len(samples) - 1)][0])
        return max(mb for n, mb in samples if n <= upto)

    result = {
        "slide": str(args.slide),
        "size": [width, height],
        "deep_zoom_top_level": top,
        "pan_level": level,
        "pan_level_tiles": cols * rows,
        "pan_passes": args.passes,
        "pan_tiles_served": served,
        "pan_seconds": round(pan_s, 1),
        "pan_tiles_per_s": round(served / pan_s, 1),
        "rss_mb_after_start": round(rss_start, 1),
        "rss_mb_max_at_10pct": round(at(0.1), 1),
        "rss_mb_max_at_50pct": round(at(0.5), 1),
        "rss_mb_max_at_100pct": round(at(1.0), 1),
        "cold_views": len(firsts),
        "first_tile_ms_median": round(statistics.median(firsts), 1),
        "first_tile_ms_p90": round(sorted(firsts)[int(0.9 * (len(firsts) - 1))], 1),
        "first_tile_ms_max": round(max(firsts), 1),
        "first_tile_ms_first_view": round(firsts[0], 1),
        "whole_view_ms_median": round(statistics.median(wholes), 1),
        "rss_mb_samples": [[n, round(mb, 1)] for n, mb in samples],
        "view_tiles": args.view_tiles,
        "cache_tiles": args.cache_tiles,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
