"""Judging and applying a trained bundle: evaluation on labelled data, prediction on image files.

Both run through the one inference loop (:func:`core.runtime.infer_dataset`) on a :class:`Runtime`: a
single CPU process by default, or the one a Fabric from :func:`core.runtime.make_fabric` gives (``--accelerator``,
``--devices``, ``--precision``), with the data sharded over its processes and the outputs gathered back in order.
``pathotune eval`` and ``pathotune predict`` are :func:`evaluate` + :func:`write_evaluation` and
:func:`predict_to_csv`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..bundle import load_bundle, resolve_bundle
from ..core.metrics import METRIC_NAMES, classification_metrics, group_bootstrap_ci
from ..core.runtime import Runtime, infer_dataset
from ..data import PatchDataset, Sample, check_source, list_images, load_source, quiet_native_stderr
from ..errors import DataError, OutputError
from ..inference import transforms
from ..model import PathoTuneModel
from ..multitask import MultiTaskModel
from ..report import atomic_path, atomic_write_json, write_run_report
from .runfolder import check_out_usable, is_run_output, run_state
from .tta import averaged

__all__ = [
    "check_output_file",
    "eval_output_dir",
    "evaluate",
    "image_files",
    "predict_files",
    "predict_to_csv",
    "resolve_bundle",
    "run_probs",
    "settings",
    "write_evaluation",
]

# What makes two evaluations the same one (an `eval --out` folder may be reused for it).
EVAL_IDENTITY = ("bundle", "data", "split")


def run_probs(
    model: PathoTuneModel,
    dataset: Dataset,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    runtime: Runtime | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Class probabilities of every sample of ``dataset`` (its ``(image, label, index)`` items), in order, on
    ``runtime`` (default: this process, on the CPU); with ``tta`` averaged over the 8 rot90 x flip views."""
    rt = runtime or Runtime.of()
    model.eval().to(rt.device)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return model(x).float().softmax(-1)

    if tta:
        probabilities = averaged(probabilities)

    with quiet_native_stderr() as stream:  # a bad TIFF's libtiff chatter would print before the error line
        probs = infer_dataset(
            rt, dataset, probabilities, batch_size, workers, progress=progress, desc="predict", file=stream
        )
    return probs.numpy() if len(probs) else np.zeros((0, model.num_classes))


def settings(runtime: Runtime, batch_size: int, workers: int) -> dict:
    """How an evaluation or prediction ran, recorded beside its results."""
    return {
        "accelerator": runtime.device.type,
        "devices": runtime.world_size,
        "precision": runtime.precision,
        "batch_size": batch_size,
        "num_workers": workers,
    }


def evaluate(
    bundle: str | Path,
    data: str | Path,
    split: str = "auto",
    weights: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    bootstrap: int = 1000,
    progress: bool = True,
    runtime: Runtime | None = None,
    skip_bad: bool = False,
    tta: bool = False,
) -> dict:
    """Metrics of a bundle on labelled data; class names are matched by name, not by position.

    ``split`` ``auto`` is test, else val, else all samples. The result is :func:`classification_metrics` (with
    bootstrap CIs under ``ci`` unless ``bootstrap`` is 0: over the data's groups when it names them, with
    ``ci_note`` saying when there are too few) plus split, n, bundle, data, ``evaluation: True``, ``tta``,
    ``skipped_files`` and how it ran (:func:`settings`). ``runtime`` defaults to this process on the CPU.
    """
    rt = runtime or Runtime.of()
    model = load_bundle(resolve_bundle(bundle), weights=weights)
    source = load_source(data, val_fraction=0.0, test_fraction=0.0)
    source, skipped = check_source(source, skip_bad=skip_bad, progress=progress and rt.main)
    if split == "auto":
        split = next((s for s in ("test", "val") if source.split(s)), "all")
    samples = source.all_samples() if split == "all" else source.split(split)
    if not samples:
        raise DataError(f"data {data} has no '{split}' samples; use --split test|val|train|all")
    names = model.class_names
    unknown = sorted(set(source.classes) - set(names))
    if unknown:
        raise DataError(f"data {data} has classes {unknown} that bundle {bundle} does not know (it has {names})")
    remap = {i: names.index(c) for i, c in enumerate(source.classes)}
    labels = np.array([remap[s.label] for s in samples])
    probs = run_probs(model, PatchDataset(samples, transforms(model)), batch_size, workers, progress, rt, tta)
    metrics = classification_metrics(labels, probs, names)
    if bootstrap:
        groups = [s.unit for s in samples] if source.has_groups() else None
        res = group_bootstrap_ci(labels, probs, groups, METRIC_NAMES, n=bootstrap)
        metrics.update({"ci": res["ci"], "ci_unit": res["unit"], "ci_units": res["units"], "ci_note": res["note"]})
    metrics.update({"split": split, "n": len(samples), "bundle": str(bundle), "data": str(data), "evaluation": True})
    metrics["tta"] = tta
    metrics.update({"skipped_files": skipped, **settings(rt, batch_size, workers)})
    return metrics


def eval_output_dir(out: str | Path, metrics: dict) -> Path:
    """Where ``eval --out`` writes, so that it never replaces a training run's outputs.

    ``out`` itself when it is new, empty, or holds an earlier evaluation of the same bundle, data, split and
    views; otherwise (a run folder, a bundle, anything else) ``out/eval/<data>-<split>[-tta]/``, refused when it
    holds an evaluation of something else.
    """
    out = Path(out)
    check_out_usable(out)
    if _holds_same_eval(out, metrics) or not out.exists() or not any(out.iterdir()):
        return out
    stem = Path(str(metrics["data"]).rstrip("/").split(":")[-1]).name or "data"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{metrics['split']}" + ("-tta" if metrics.get("tta") else ""))
    target = out / "eval" / name
    if target.exists() and any(target.iterdir()) and not _holds_same_eval(target, metrics):
        raise OutputError(
            f"{target} already holds other results; pass another --out for this evaluation (nothing was written)"
        )
    return target


def _holds_same_eval(folder: Path, metrics: dict) -> bool:
    try:
        old = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(old, dict)
        and old.get("evaluation") is True
        and all(old.get(k) == metrics.get(k) for k in EVAL_IDENTITY)
        and bool(old.get("tta")) == bool(metrics.get("tta"))  # single views and averaged views are two results
    )


def write_evaluation(out: str | Path, metrics: dict) -> Path:
    """``report.md`` and ``metrics.json`` of an :func:`evaluate` result in :func:`eval_output_dir`; returns it."""
    target = eval_output_dir(out, metrics)
    names = list(metrics["per_class"])
    bundle, data = metrics["bundle"], metrics["data"]
    write_run_report(target, metrics, [], names, {"bundle": bundle, "data": data}, title=f"eval of {bundle}")
    atomic_write_json(target / "metrics.json", metrics)
    return target


def check_output_file(path: str | Path) -> None:
    """Fail before any work when ``path`` cannot be an output file (a folder, under a file, read-only)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"--out {path} is a folder; pass a file name such as {path / 'predictions.csv'}")
    check_out_usable(path.parent, shown=path)
    if is_run_output(path.name) and run_state(path.parent) in ("finished", "unfinished"):
        raise OutputError(
            f"--out {path} is one of the training outputs of the run in {path.parent}; pass another file name"
        )


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Image files from files and folders (folders searched as :func:`pathotune.data.list_images` does), in order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist; pass image files or folders")
    if not files:
        raise DataError(f"no images found in {[str(i) for i in inputs]}")
    return files


def predict_files(
    bundles: list[str | Path],
    inputs: list[str | Path],
    weights: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    runtime: Runtime | None = None,
    tta: bool = False,
) -> tuple[list[Path], dict[str, tuple[list[str], np.ndarray]]]:
    """Per-class probabilities of every image for every bundle; all bundles share one backbone forward.

    ``batch_size`` counts images times tasks (each image runs once per bundle); ``runtime`` defaults to this
    process on the CPU; ``tta`` averages the 8 rot90 x flip views of every image.
    """
    rt = runtime or Runtime.of()
    files = image_files(inputs)
    multi = MultiTaskModel.from_bundles([resolve_bundle(b) for b in bundles], weights=weights)
    multi.eval().to(rt.device)
    n_tasks = len(multi.tasks)
    sizes = [len(task.class_names) for task in multi.tasks]
    dataset = PatchDataset([Sample(f, 0, "test") for f in files], transforms(multi.tasks[0]))

    def every_task(x: torch.Tensor) -> torch.Tensor:
        # Every image once per task, in one batch: each sample carries its own task's prompts and head.
        n = x.shape[0]
        tasks = torch.arange(n_tasks, device=x.device).repeat_interleave(n)
        logits = multi(x.repeat(n_tasks, 1, 1, 1), tasks)
        return torch.cat([torch.stack(logits[t * n : (t + 1) * n]).float().softmax(-1) for t in range(n_tasks)], 1)

    per_batch = max(1, batch_size // n_tasks)
    fn = averaged(every_task) if tta else every_task
    with quiet_native_stderr() as stream:  # a bad TIFF's libtiff chatter would print before the error line
        probs = infer_dataset(
            rt, dataset, fn, per_batch, workers, progress=progress, desc="predict", file=stream
        ).numpy()
    ends = np.cumsum(sizes)
    out = {
        name: (task.class_names, probs[:, end - size : end])
        for name, task, size, end in zip(multi.names, multi.tasks, sizes, ends, strict=True)
    }
    return files, out


def predict_to_csv(
    bundles: list[str | Path],
    inputs: list[str | Path],
    out: str | Path,
    weights: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    runtime: Runtime | None = None,
    tta: bool = False,
) -> tuple[list[Path], dict[str, tuple[list[str], np.ndarray]]]:
    """:func:`predict_files` written as CSV to ``out`` (checked before any work; written by rank 0), and returned.

    Columns: ``path``, then per bundle ``pred`` and ``prob_<class>``; with several bundles each column is
    prefixed by the bundle's name and a colon.
    """
    check_output_file(out)
    rt = runtime or Runtime.of()
    files, results = predict_files(bundles, inputs, weights, batch_size, workers, progress, rt, tta)
    if not rt.main:
        return files, results
    single = len(results) == 1
    header = ["path"]
    for name, (classes, _) in results.items():
        prefix = "" if single else f"{name}:"
        header += [f"{prefix}pred", *[f"{prefix}prob_{c}" for c in classes]]
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, path in enumerate(files):
            row = [str(path)]
            for classes, probs in results.values():
                row += [classes[int(probs[i].argmax())], *[f"{p:.6f}" for p in probs[i]]]
            w.writerow(row)
    return files, results
