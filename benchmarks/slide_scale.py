"""Feature extraction at scale on one gigapixel slide: memory, throughput along the slide, and resuming after kill -9.

    python benchmarks/big_slide.py --out runs/big/big.tif --tiles 50000
    python benchmarks/slide_scale.py --slide runs/big/big.tif --out runs/big/scale

Runs the real command (``pathotune slides extract``) in a subprocess and samples, once a second, the resident memory
of its process tree (psutil) and the tiles it has finished (the rows of the chunks it keeps while a slide runs,
``.<slide_id>.partial/``). Reports:

1. peak RSS up to 5,000 tiles against peak RSS over the whole slide (the issue's bound: at most 10% growth);
2. throughput in windows of 5,000 tiles, each against the median window (bound: within 5%);
3. a second extraction killed with SIGKILL once half the tiles are done, then rerun: the chunks it had finished,
   the chunks the rerun computed (from its own "resuming" line), whether any finished chunk file was rewritten
   (their modification times, polled while the rerun runs), the rerun's wall time, and whether the final features
   equal the uninterrupted run's bit for bit.

The model is small on purpose (``--backbone vit_tiny_patch16_224 --weights random --image-size 112``): the
measurement is about the pipeline around the model, which is the same for any backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

PATHOTUNE = str(Path(sys.executable).with_name("pathotune"))


def command(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        PATHOTUNE, "slides", "extract", "--slides", str(args.slide), "--out", str(out),
        "--backbone", args.backbone, "--weights", "random", "--image-size", str(args.image_size),
        "--target-mpp", "0.5", "--tile-size", "224", "--batch-size", str(args.batch_size),
        "--chunk-tiles", str(args.chunk_tiles), "--quiet", "--accelerator", "cpu",
    ]  # fmt: skip


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += p.memory_info().rss
    return total


def chunk_files(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for d in out.glob(".*.partial") for p in d.glob("chunk_*.npy")}


def run(cmd: list[str], out: Path, chunk: int, kill_at: int | None = None, watch: dict | None = None) -> dict:
    """Run ``cmd`` sampling (seconds, tiles done, tree RSS); SIGKILL it once ``kill_at`` tiles are done."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc = psutil.Process(popen.pid)
    samples, rewritten = [], set()
    while popen.poll() is None:
        files = chunk_files(out)
        done = len(files) * chunk
        samples.append((time.perf_counter() - t0, done, tree_rss(proc)))
        if watch:
            rewritten |= {n for n, m in files.items() if n in watch and m != watch[n]}
        if kill_at is not None and done >= kill_at:
            popen.send_signal(signal.SIGKILL)
            popen.wait()
            break
        time.sleep(1.0)
    stdout, stderr = popen.communicate()
    return {
        "seconds": time.perf_counter() - t0,
        "code": popen.returncode,
        "samples": samples,
        "stdout": stdout,
        "stderr": stderr,
        "rewritten": sorted(rewritten),
    }


def windows(samples: list[tuple[float, int, int]], size: int) -> list[float]:
    """Tiles per second in consecutive windows of ``size`` tiles (from the samples' first crossing of each bound)."""
    out, start = [], None
    for t, done, _ in samples:
        if done == 0:
            continue
        if start is None:
            start = (t, done)
            continue
        if done - start[1] >= size:
            out.append((done - start[1]) / (t - start[0]))
            start = (t, done)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/big/scale"))
    ap.add_argument("--backbone", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-tiles", type=int, default=1024)
    ap.add_argument("--window", type=int, default=5000)
    args = ap.parse_args()
    chunk = max(args.batch_size, args.chunk_tiles - args.chunk_tiles % args.batch_size)
    whole, cut = args.out / "whole", args.out / "cut"
    for d in (whole, cut):
        if d.exists():
            raise SystemExit(f"{d} exists; pass another --out")

    full = run(command(args, whole), whole, chunk)
    if full["code"] != 0:
        raise SystemExit(full["stderr"])
    sid = args.slide.stem
    with h5py.File(whole / f"{sid}.h5") as f:
        n = int(f["features"].shape[0])
        reference = f["features"][()]
    samples = full["samples"]
    early = max((rss for _, done, rss in samples if done <= args.window), default=0)
    peak = max(rss for _, _, rss in samples)
    rates = windows(samples, args.window)
    median = statistics.median(rates) if rates else float("nan")

    half = run(command(args, cut), cut, chunk, kill_at=n // 2)
    kept = chunk_files(cut)
    resumed = run(command(args, cut), cut, chunk, watch=kept)
    with h5py.File(cut / f"{sid}.h5") as f:
        equal = bool(np.array_equal(f["features"][()], reference))
    line = next((x for x in resumed["stderr"].splitlines() if "resuming" in x), "")
    result = {
        "tiles": n,
        "chunk_tiles": chunk,
        "whole_seconds": round(full["seconds"], 1),
        "tiles_per_s": round(n / full["seconds"], 1),
        "peak_rss_mb_first_window": round(early / 2**20),
        "peak_rss_mb_whole": round(peak / 2**20),
        "rss_growth_pct": round(100 * (peak - early) / early, 1) if early else None,
        "window_tiles_per_s": [round(r, 1) for r in rates],
        "window_spread_pct": [round(100 * (r - median) / median, 1) for r in rates],
        "killed_after_chunks": len(kept),
        "resume_line": line,
        "chunks_rewritten": half["rewritten"] + resumed["rewritten"],
        "rerun_seconds": round(resumed["seconds"], 1),
        "rerun_exit": resumed["code"],
        "resumed_equals_whole": equal,
    }
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
