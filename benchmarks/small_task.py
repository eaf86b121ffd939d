"""Default settings on a small task, over repeated group-aware splits: does selection respect validation noise?

    pip download histolytics==0.3.0 --no-deps -d runs/data
    python benchmarks/small_task.py --data layout:histolytics-hgsc:runs/data/histolytics-0.3.0-py3-none-any.whl

Each repetition r draws split seed r of the dataset (HGSC: a group k-fold over its 250 px blocks, so test blocks
never touch training blocks), then ``--per-class`` training and validation tiles per class from that split's own
train and val parts (seeded by r); the test part is kept whole. Every method then trains with nothing but the
data, the image size and the method: its default recipe, budget and selection rule (batch 32). The probe is the
``linear`` method. ``pathotune (best)`` is PathoTune with the previous rule (keep the best validation score),
trained identically, for contrast; ``pathotune (cv)`` chooses its step by 3-fold cross-validation over train + val
and then trains on both (the option for data this small).

Printed per repetition: each method's test balanced accuracy and the step it kept; then, per method, the mean
test score, the mean difference to the probe with a 95% t-interval over repetitions, and in how many
repetitions it falls below, ties or rises above the probe. The project's claim for the default rule: mean test
score at least the probe's, and no more repetitions below the probe than above it.

Cost on 2 CPU cores at 56 px, measured on one repetition: the probe a few seconds, PathoTune, VPT-deep and
PathoTune (best) 1.6-1.8 min each (early stopping), PathoTune (cv) 6.8 min (3 folds and the final fit); about 12
min per repetition, 2-2.5 h for the default 10. Finished runs are kept; rerun to resume.
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
from pathotune.engine.fewshot import t_interval
from pathotune.engine.run import train_run

METHODS = {  # display name -> TrainConfig keys beyond the defaults
    "linear": {"method": "linear"},
    "pathotune": {"method": "pathotune"},
    "vpt-deep": {"method": "vpt-deep"},
    "pathotune (best)": {"method": "pathotune", "selection": "best"},
    # cross-validated selection over train + val: 3 folds and the final fit, 4 trainings without early stopping
    "pathotune (cv)": {"method": "pathotune", "selection": "cv", "selection_folds": 3},
}


def write_subset(data: str, per_class: int, rep: int, out: Path) -> Path:
    """A manifest: ``per_class`` train and val tiles per class from split ``rep``'s own parts, and its whole test."""
    source = load_source(data, val_fraction=0.2, test_fraction=0.2, split_seed=rep)
    rng = np.random.default_rng([rep, per_class])
    rows = []
    for split in ("train", "val"):
        samples = source.split(split)
        for c, name in enumerate(source.classes):
            of_class = [s for s in samples if s.label == c]
            for i in sorted(rng.permutation(len(of_class))[:per_class]):
                s = of_class[i]
                rows.append((str(Path(s.path_or_key).resolve()), name, split, s.group or ""))
    rows += [(str(Path(s.path_or_key).resolve()), source.classes[s.label], "test", s.group or "")
             for s in source.split("test")]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "group"])
        w.writerows(rows)
    return manifest


def summary(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: mean test score, the paired difference to the probe over repetitions, below / tie / above."""
    out = []
    probe = {r["rep"]: r["test"] for r in rows if r["method"] == "linear"}
    for m in methods:
        mine = {r["rep"]: r["test"] for r in rows if r["method"] == m}
        both = sorted(set(mine) & set(probe))
        diffs = [mine[r] - probe[r] for r in both]
        ci = t_interval(diffs)
        out.append(
            {
                "method": m,
                "reps": len(mine),
                "mean test": float(np.mean(list(mine.values()))) if mine else None,
                "minus probe": ci["mean"],
                "95% t-interval": None if ci["low"] is None else (ci["low"], ci["high"]),
                "below / tie / above": f"{sum(d < 0 for d in diffs)} / {sum(d == 0 for d in diffs)} / "
                f"{sum(d > 0 for d in diffs)}",
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default="runs/small_task")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    methods = ["linear", *[m for m in args.methods if m != "linear"]]
    rows = []
    for rep in range(args.reps):
        manifest = write_subset(args.data, args.per_class, rep, out / f"rep_{rep}")
        for name in methods:
            keys = METHODS[name]
            run_dir = out / f"rep_{rep}" / name.replace(" ", "_").replace("(", "").replace(")", "")
            cfg = TrainConfig(data=str(manifest), backbone="dinov2_vits14", image_size=args.image_size, seed=0,
                              out=str(run_dir), resume=True, **keys)  # fmt: skip
            t0 = time.perf_counter()
            m = train_run(cfg, progress=False)
            wall = time.perf_counter() - t0
            sel = m.get("selection") or {}
            row = {
                "rep": rep,
                "method": name,
                "test": m["balanced_accuracy"],
                "val": m.get("val_score"),
                "step": m["selected_step"],
                "best_step": sel.get("best_step", m["selected_step"]),
                "kept": (m.get("prompt_groups") or {}).get("kept"),
                "n": (m["n_train"], m["n_val"], m["n_test"]),
                "wall_s": wall,
            }
            rows.append(row)
            val = "-" if row["val"] is None else f"{row['val']:.3f}"
            print(
                f"rep {rep} {name:18s} test {row['test']:.3f}  val {val}  step {row['step']} (best {row['best_step']})"
                f"  groups {row['kept']}  {wall / 60:.1f} min",
                flush=True,
            )
    table = summary(rows, methods)
    for r in table:
        print(r)
    print(
        f"{args.per_class} train + {args.per_class} val tiles per class, {args.image_size} px, "
        f"{args.reps} split seeds, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "summary": table}, indent=2))


if __name__ == "__main__":
    main()
