"""A trained MIL run on disk (one folder per fold: ``model.safetensors`` + ``model.json``) and its predictions.

``model.json`` holds the format (``pathotune-mil``, version 1), the aggregator and its options, the input size,
the classes, the feature-file attributes the model was trained on (so slides of another extractor are refused),
the fold's slides and its test metrics.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..cohort import Cohort
from ..core.runtime import Runtime
from ..errors import DataError, WeightsError, note_interrupt, one_line
from ..features import check_feature_compatibility, check_unique_slides, list_feature_files
from ..records import claim_file, mark_file
from ..report.io import atomic_path, atomic_write_csv, atomic_write_json
from .aggregators import MILAggregator, create_aggregator
from .bags import read_slide_features

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "MODEL_FILE",
    "FoldEnsemble",
    "load_mil_model",
    "predict_cohort",
    "predict_slides",
    "save_mil_model",
    "write_slide_predictions",
]

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT = "pathotune-mil"
FORMAT_VERSION = 1


def save_mil_model(fold_dir: Path, model: MILAggregator, meta: dict[str, Any]) -> None:
    """The fold's weights and ``model.json``, each written all-or-nothing."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(fold_dir / MODEL_FILE) as tmp:
        save_file(state, str(tmp))
    atomic_write_json(fold_dir / META_FILE, meta)


def _fold_dirs(model_dir: Path) -> list[Path]:
    """``model_dir`` itself when it holds a model, else its ``fold_*`` folders in fold order."""
    if (model_dir / META_FILE).is_file():
        return [model_dir]
    found = [d for d in model_dir.glob("fold_*") if (d / META_FILE).is_file()]

    def order(d: Path) -> tuple[int, str]:
        suffix = d.name[len("fold_") :]
        return (int(suffix), d.name) if suffix.lstrip("-").isdigit() else (0, d.name)

    if not found:
        raise WeightsError(f"no {META_FILE} in {model_dir} or its fold_* folders; point at a train_mil output folder")
    return sorted(found, key=order)


def load_mil_model(fold_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[MILAggregator, dict]:
    """The aggregator saved in ``fold_dir`` (eval mode) and its metadata from model.json."""
    d = Path(fold_dir)
    meta_path, weights_path = d / META_FILE, d / MODEL_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise WeightsError(f"{d} lacks {META_FILE} or {MODEL_FILE}; point at a fold folder written by train_mil")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{meta_path} is not readable JSON ({e}); retrain this fold") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{meta_path} is not a pathotune MIL model (format {meta.get('format')!r})")
    n_classes = len(meta["classes"])
    model = create_aggregator(meta["aggregator"], int(meta["in_dim"]), n_classes, **meta["aggregator_kwargs"])
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        detail = one_line(e, 200)
        raise WeightsError(f"{weights_path} does not fit {meta['aggregator']} ({detail}); retrain this fold") from None
    return model.to(device).eval(), meta


class FoldEnsemble:
    """A MIL run's fold models, loaded once: each slide's class probabilities and tile scores are their average
    (averaged tile scores still sum to one). Given one fold folder, that model alone."""

    def __init__(self, model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        self.dirs = _fold_dirs(Path(model_dir))
        self.loaded = [load_mil_model(d, device) for d in self.dirs]
        self.device = torch.device(device)
        meta = self.loaded[0][1]
        self.classes: list[str] = list(meta["classes"])
        self.trained_on: dict[str, Any] = meta["feature_attrs"]
        for _, other in self.loaded[1:]:
            if other["classes"] != meta["classes"] or other["in_dim"] != meta["in_dim"]:
                raise WeightsError(f"fold models in {model_dir} disagree on classes or input size; retrain the run")

    def check(self, files: Sequence[str | os.PathLike[str]]) -> None:
        """Files must come from the extractor the models were trained on."""
        check_feature_compatibility(files, trained_on=self.trained_on, model=str(self.dirs[0]))

    def predict(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """One slide's prediction: slide_id, probs, pred, classes, tile_scores, n_tiles and coords (None for a
        ``.pt`` file, which has none)."""
        feats, coords, _ = read_slide_features(path)
        x = feats.unsqueeze(0).to(self.device)
        rt = Runtime.of(device=self.device)
        with torch.inference_mode(), rt.autocast():
            outs = [model(x) for model, _ in self.loaded]
            probs = torch.stack([logits.float().softmax(-1)[0] for logits, _ in outs]).mean(0).cpu().numpy()
            scores = torch.stack([s.float()[0] for _, s in outs]).mean(0).cpu().numpy()
        return {
            "slide_id": Path(path).stem,
            "probs": probs,
            "pred": self.classes[int(probs.argmax())],
            "classes": list(self.classes),
            "tile_scores": scores,
            "n_tiles": len(scores),
            "coords": coords if coords is not None and len(coords) == len(scores) else None,
        }


def predict_slides(
    model_dir: str | os.PathLike[str],
    features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Class probabilities and tile scores for each slide feature file (a folder of h5 files or a list), averaged
    over a run's fold models (:class:`FoldEnsemble`). Slides must come from the extractor the models were trained
    on. ``coords`` is None for a ``.pt`` file (no tile coordinates); ``n_tiles`` is the bag's size."""
    ensemble = FoldEnsemble(model_dir, device)
    files = list_feature_files(features)
    check_unique_slides(files)
    ensemble.check(files)
    return [ensemble.predict(f) for f in files]


def predict_cohort(
    model_dir: str | os.PathLike[str],
    features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    skip_errors: bool = False,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """``slides predict``: every slide's prediction into the CSV ``out``, one slide at a time.

    ``out`` is a record (:func:`pathotune.records.claim_file`): a rerun with the same model and features keeps
    the rows it has and predicts only the slides it lacks; another request is refused unless ``overwrite``. A
    slide that fails is listed in ``<out stem>_errors.csv`` beside it with ``skip_errors``, else it ends the call.
    Returns one row per feature file with its ``status`` (``predicted``, ``done`` or ``failed``).
    """
    out = Path(out)
    ensemble = FoldEnsemble(model_dir, device)
    files = list_feature_files(features)
    check_unique_slides(files)
    request = {"model": [_fingerprint(d / MODEL_FILE) for d in ensemble.dirs], "features": [str(f) for f in files]}
    kept = _read_predictions(out) if claim_file(out, "predictions", {"model": request["model"]}, overwrite) else {}
    cohort = Cohort(out.parent, skip_errors, errors_name=f"{out.stem}_errors.csv")
    rows, preds = [], []
    note_interrupt(f"{out} was not written; rerun the same command")
    for f in files:
        sid = f.stem
        if sid in kept:
            rows.append({"slide_id": sid, "status": "done"})
            preds.append(kept[sid])
            continue

        def one(f: Path = f) -> dict[str, Any]:
            ensemble.check([f])
            return ensemble.predict(f)

        pred = cohort.run(sid, f, "predict", one)
        if pred is None:
            rows.append({"slide_id": sid, "status": "failed", "reason": cohort.failures[sid].reason})
            if cohort.stop:
                break
            continue
        rows.append({"slide_id": sid, "status": "predicted", "pred": pred["pred"], "n_tiles": pred["n_tiles"]})
        preds.append(_prediction_row(pred))
    if skip_errors:
        cohort.write()
    cohort.raise_first()
    if preds:
        header = ["slide_id", "pred", "n_tiles", *[f"prob_{c}" for c in ensemble.classes]]
        atomic_write_csv(out, preds, header)
        mark_file(out, "predictions", {"model": request["model"]})
    return rows


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prediction_row(p: dict[str, Any]) -> list[Any]:
    return [p["slide_id"], p["pred"], p["n_tiles"], *[f"{float(v):.6f}" for v in p["probs"]]]


def _read_predictions(path: Path) -> dict[str, list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row[0]: row for row in csv.reader(f) if row and row[0] != "slide_id"}


def write_slide_predictions(predictions: list[dict[str, Any]], out: str | os.PathLike[str]) -> Path:
    """``slide_id, pred, n_tiles, prob_<class>...`` for :func:`predict_slides` results (``slides predict``)."""
    if not predictions:
        raise DataError("no slide predictions to write")
    classes = list(predictions[0]["classes"])
    rows = [_prediction_row(p) for p in predictions]
    return atomic_write_csv(Path(out), rows, ["slide_id", "pred", "n_tiles", *[f"prob_{c}" for c in classes]])
