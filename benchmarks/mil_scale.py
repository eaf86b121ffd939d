"""Slide-level MIL at cohort scale: training memory bounded by the bag cache, time linear in the number of bags.

    python benchmarks/mil_scale.py --out runs/mil_scale

Writes a cohort of 2,000 feature files (``--tiles`` tiles of ``--dim`` features each, two classes that differ in a
few tiles per bag, in PathoTune's h5 layout), then trains ``pathotune slides train`` (ABMIL, 2 folds, 2 epochs) on
the first 500, 1,000 and 2,000 of them, each with a small and a large bag cache (``--cache-mb``). Each training
runs in its own process; its peak resident memory (psutil, sampled every 0.2 s) and wall time are reported, with
the time per bag, which is flat when time is linear in the number of bags.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

PATHOTUNE = str(Path(sys.executable).with_name("pathotune"))


def write_cohort(folder: Path, n: int, tiles: int, dim: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,label"]
    for i in range(n):
        path = folder / f"s{i:05d}.h5"
        label = i % 2
        rows.append(f"s{i:05d},{'tumor' if label else 'normal'}")
        if path.exists():
            continue
        x = rng.normal(size=(tiles, dim)).astype(np.float32)
        if label:
            x[rng.choice(tiles, 8, replace=False)] += 1.5
        with h5py.File(path, "w") as f:
            f["coords"] = np.stack([np.arange(tiles) * 224, np.zeros(tiles)], axis=1).astype(np.int64)
            f["features"] = x
            f.attrs.update({"backbone": "toy", "bundle_fingerprint": "", "feature_dim": dim, "tile_size": 224})
    labels = folder.parent / f"labels_{n}.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels


def train(features: Path, labels: Path, out: Path, cache_mb: float) -> dict:
    cmd = [PATHOTUNE, "slides", "train", "--features", str(features), "--labels", str(labels), "--folds", "2"]
    cmd += ["--epochs", "2", "--cache-mb", str(cache_mb), "--out", str(out), "--quiet", "--logger", "none"]
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc, peak = psutil.Process(popen.pid), 0
    while popen.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.2)
    _, err = popen.communicate()
    if popen.returncode != 0:
        raise SystemExit(err)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": round(peak / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/mil_scale"))
    ap.add_argument("--tiles", type=int, default=500)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--caches", type=float, nargs="+", default=[64, 4096])
    args = ap.parse_args()
    feats = args.out / "features"
    rows = []
    for n in args.sizes:
        labels = write_cohort(feats, n, args.tiles, args.dim)
        subset = args.out / f"subset_{n}"
        subset.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            link = subset / f"s{i:05d}.h5"
            if not link.exists():
                link.symlink_to((feats / f"s{i:05d}.h5").resolve())
        for cache in args.caches:
            r = train(subset, labels, args.out / f"run_{n}_{int(cache)}", cache)
            rows.append({"bags": n, "cache_mb": cache, **r, "ms_per_bag_epoch": round(1e3 * r["seconds"] / (n * 2), 2)})
            print(json.dumps(rows[-1]))
    bag_mb = args.tiles * args.dim * 4 / 2**20
    (args.out / "mil_scale.json").write_text(json.dumps({"bag_mb": bag_mb, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
