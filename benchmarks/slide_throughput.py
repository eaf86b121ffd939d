"""Slide feature extraction vs the same model's forward on tiles already in memory, in one run.

    python benchmarks/slide_throughput.py                      # bundled DINOv2-S, CMU slide, 224 px at 0.5 mpp
    python benchmarks/slide_throughput.py --num-workers 2 --repeats 5       # decoding workers beside the model

``extract_slides`` reads, decodes and normalises every tile, runs the model and writes the HDF5; the
reference is ``forward`` on a ready (N, 3, S, S) tensor stack of the very same tiles, batch for batch. Their
ratio says how much of the model's speed the data path costs. Two extraction rates are given: the tile loop
(reading through writing, what ``extract_log.csv`` records) and end to end (also planning: thumbnail and
tissue mask, which a large slide amortises over many more tiles than this small one). Both paths are warmed
up once (imports, worker start-up code, page cache), then runs alternate between the two measurements so
drifting load on a shared machine hits both alike. Reported: medians, bests (the least disturbed runs) and
the median of each extraction's ratio to the raw run just before it. The process keeps freed memory for reuse,
as `pathotune slides extract` does (`--allocator system`: glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pathotune.core.allocator import allocator_note, retain_freed_memory
from pathotune.slides import TilingConfig, open_slide, plan_tiles, read_tile, sample_slide
from pathotune.slides.extract import TileTransform, default_num_workers, extract_slides, load_extractor


def raw_rate(ex, x: torch.Tensor, batch_size: int) -> float:
    """Tiles per second of the model alone on an in-memory stack, batch by batch."""
    with torch.inference_mode():
        t = time.perf_counter()
        for i in range(0, len(x), batch_size):
            ex.forward(x[i : i + batch_size])
        return len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default=str(sample_slide()))
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--weights", default="bundled")
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--min-tissue", type=float, default=0.5, help="0 keeps every tile: more tiles, same slide")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=None, help="default: the library's (see default_num_workers)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--allocator", choices=("retain", "system"), default="retain", help="as the CLI runs, or not")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.allocator == "retain":
        retain_freed_memory()
    if args.num_workers is None:
        args.num_workers = default_num_workers("cpu")

    ex = load_extractor(args.backbone, args.weights)
    tiling = TilingConfig(target_mpp=args.target_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue)
    tf = TileTransform(ex.mean, ex.std, ex.image_size)
    with open_slide(args.slide) as reader:
        plan = plan_tiles(reader, tiling)
        stack = torch.stack([tf(read_tile(reader, plan, i)) for i in range(len(plan))])
    n = len(plan)
    print(
        f"{n} tiles of {args.tile_size} px at {args.target_mpp:g} mpp from {Path(args.slide).name}; "
        f"{args.backbone} at {ex.image_size} px, batch {args.batch_size}, {args.num_workers} workers, "
        f"{torch.get_num_threads()} torch threads, allocator: {allocator_note()}"
    )
    raw, loop, e2e = [], [], []
    with tempfile.TemporaryDirectory() as tmp:

        def extract() -> tuple[float, float]:
            t = time.perf_counter()
            (res,) = extract_slides(
                ex,
                [args.slide],
                tmp,
                tiling=tiling,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                overwrite=True,
                progress=False,
            )
            return res.tiles_per_s, n / (time.perf_counter() - t)

        raw_rate(ex, stack[: args.batch_size], args.batch_size)  # warm-up
        extract()
        for _ in range(args.repeats):
            raw.append(raw_rate(ex, stack, args.batch_size))
            rates = extract()
            loop.append(rates[0])
            e2e.append(rates[1])
    result: dict = {"tiles": n}
    for stat, fn in (("median", statistics.median), ("best", max)):
        result[stat] = {
            "raw_forward_tiles_per_s": fn(raw),
            "extract_loop_tiles_per_s": fn(loop),
            "extract_end_to_end_tiles_per_s": fn(e2e),
            "ratio_loop": fn(loop) / fn(raw),
            "ratio_end_to_end": fn(e2e) / fn(raw),
        }
    # Each extraction against the raw run just before it: load that drifts between pairs cancels out.
    result["paired_median"] = {
        "ratio_loop": statistics.median(lo / ra for lo, ra in zip(loop, raw, strict=True)),
        "ratio_end_to_end": statistics.median(e / ra for e, ra in zip(e2e, raw, strict=True)),
    }
    result.update(
        {
            "runs": {"raw": raw, "loop": loop, "end_to_end": e2e},
            "config": vars(args),
            "machine": {
                "cpus": torch.get_num_threads(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "allocator": allocator_note(),
            },
        }
    )
    for stat in ("median", "best"):
        r = result[stat]
        print(f"[{stat}] raw forward on in-memory tiles : {r['raw_forward_tiles_per_s']:8.2f} tiles/s")
        print(
            f"[{stat}] extract_slides, tile loop      : {r['extract_loop_tiles_per_s']:8.2f} tiles/s  "
            f"ratio {r['ratio_loop']:.3f}"
        )
        print(
            f"[{stat}] extract_slides, end to end     : {r['extract_end_to_end_tiles_per_s']:8.2f} tiles/s  "
            f"ratio {r['ratio_end_to_end']:.3f}"
        )
    p = result["paired_median"]
    print(f"[paired] median ratio: tile loop {p['ratio_loop']:.3f}, end to end {p['ratio_end_to_end']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
