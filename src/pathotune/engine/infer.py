"""Judging and applying a trained bundle: evaluation on labelled data, prediction on image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..bundle import load_bundle
from ..errors import DataError
from ..model import PathoTuneModel
from .metrics import bootstrap_ci, classification_metrics

EVAL_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auroc")


def resolve_bundle(path: str | Path) -> Path:
    """A bundle folder, or a run folder that holds one in ``bundle/``."""
    p = Path(path)
    return p / "bundle" if (p / "bundle" / "manifest.json").is_file() else p


def eval_transform(model: PathoTuneModel):
    from ..data import build_transforms

    spec = model.backbone.spec
    return build_transforms(spec.mean, spec.std, model.backbone.img_size, train=False, augment="none")


@torch.inference_mode()
def run_probs(model: PathoTuneModel, dataset, batch_size: int = 32, workers: int = 0, progress: bool = True):
    from tqdm.auto import tqdm

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    from ..data.validate import quiet_native_stderr

    with (
        quiet_native_stderr() as stream,  # a bad TIFF's libtiff chatter would print before the error line
        tqdm(loader, desc="predict", disable=not progress, leave=False, file=stream) as bar,
    ):
        probs = [model(x).float().softmax(-1) for x, _, _ in bar]
    return torch.cat(probs).numpy() if probs else np.zeros((0, model.num_classes))


def evaluate(
    bundle: str | Path,
    data: str | Path,
    split: str = "auto",
    weights: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    bootstrap: int = 1000,
    progress: bool = True,
) -> dict:
    """Metrics of a bundle on labelled data; class names are matched by name, not by position."""
    from ..data import PatchDataset, check_source, load_source

    model = load_bundle(resolve_bundle(bundle), weights=weights)
    source = load_source(data, val_fraction=0.0, test_fraction=0.0)
    source, _ = check_source(source, progress=progress)
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
    probs = run_probs(model, PatchDataset(samples, eval_transform(model)), batch_size, workers, progress)
    metrics = classification_metrics(labels, probs, names)
    if bootstrap:
        metrics["ci"] = bootstrap_ci(labels, probs, EVAL_KEYS, n=bootstrap)
    metrics.update({"split": split, "n": len(samples), "bundle": str(bundle), "data": str(data), "evaluation": True})
    return metrics


EVAL_IDENTITY = ("bundle", "data", "split")


def eval_output_dir(out: str | Path, metrics: dict) -> Path:
    """Where ``eval --out`` writes, so that it never replaces a training run's outputs.

    ``out`` itself when it is new, empty, or holds an earlier evaluation of the same bundle, data and split;
    otherwise (a run folder, a bundle, anything else) ``out/eval/<data>-<split>/``, which is refused when it
    holds an evaluation of something else.
    """
    import re

    from ..errors import OutputError
    from .runfolder import check_out_usable

    out = Path(out)
    check_out_usable(out)
    if _holds_same_eval(out, metrics) or not out.exists() or not any(out.iterdir()):
        return out
    stem = Path(str(metrics["data"]).rstrip("/").split(":")[-1]).name or "data"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{metrics['split']}")
    target = out / "eval" / name
    if target.exists() and any(target.iterdir()) and not _holds_same_eval(target, metrics):
        raise OutputError(
            f"{target} already holds other results; pass another --out for this evaluation (nothing was written)"
        )
    return target


def _holds_same_eval(folder: Path, metrics: dict) -> bool:
    import json

    try:
        old = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(old, dict)
        and old.get("evaluation") is True
        and all(old.get(k) == metrics.get(k) for k in EVAL_IDENTITY)
    )


def check_output_file(path: str | Path) -> None:
    """Fail before any work when ``path`` cannot be an output file (a folder, under a file, read-only)."""
    from ..errors import OutputError
    from .runfolder import check_out_usable, is_run_output, run_state

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"--out {path} is a folder; pass a file name such as {path / 'predictions.csv'}")
    check_out_usable(path.parent, shown=path)
    if is_run_output(path.name) and run_state(path.parent) in ("finished", "unfinished"):
        raise OutputError(
            f"--out {path} is one of the training outputs of the run in {path.parent}; pass another file name"
        )


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Image files from files and folders (searched recursively), in a stable order."""
    from ..data import IMAGE_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist; pass image files or folders")
    if not files:
        raise DataError(f"no images found in {[str(i) for i in inputs]}")
    return files


@torch.inference_mode()
def predict_files(
    bundles: list[str | Path],
    inputs: list[str | Path],
    weights: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> tuple[list[Path], dict[str, tuple[list[str], np.ndarray]]]:
    """Per-class probabilities of every image for every bundle; all bundles share one backbone forward."""
    from tqdm.auto import tqdm

    from ..data import PatchDataset, Sample
    from ..multitask import MultiTaskModel

    files = list_images(inputs)
    multi = MultiTaskModel.from_bundles([resolve_bundle(b) for b in bundles], weights=weights)
    n_tasks = len(multi.tasks)
    dataset = PatchDataset([Sample(f, 0, "test") for f in files], eval_transform(multi.tasks[0]))
    loader = DataLoader(dataset, batch_size=max(1, batch_size // n_tasks), num_workers=workers)
    probs: list[list[torch.Tensor]] = [[] for _ in range(n_tasks)]
    from ..data.validate import quiet_native_stderr

    with (
        quiet_native_stderr() as stream,  # a bad TIFF's libtiff chatter would print before the error line
        tqdm(loader, desc="predict", disable=not progress, leave=False, file=stream) as bar,
    ):
        for x, _, _ in bar:
            # Every image once per task, in one batch: each sample carries its own task's prompts and head.
            xs = x.repeat(n_tasks, 1, 1, 1)
            task_ids = torch.arange(n_tasks).repeat_interleave(x.shape[0])
            logits = multi(xs, task_ids)
            for t in range(n_tasks):
                probs[t] += [logits[t * x.shape[0] + i].float().softmax(-1) for i in range(x.shape[0])]
    out = {
        name: (task.class_names, torch.stack(p).numpy())
        for name, task, p in zip(multi.names, multi.tasks, probs, strict=True)
    }
    return files, out
