"""A trained MIL run on disk (one folder per fold: ``model.safetensors`` + ``model.json``) and its predictions.

``model.json`` holds the format (``pathotune-mil``, version 1), the aggregator and its options, the input size,
the classes, the feature-file attributes the model was trained on (so slides of another extractor are refused),
the fold's slides and its test metrics.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ..engine.runtime import Runtime, infer_batches
from ..errors import DataError, WeightsError, one_line
from ..features import check_feature_compatibility, list_feature_files
from ..report.io import atomic_path, atomic_write_json
from .aggregators import MILAggregator, create_aggregator
from .bags import read_slide_features

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "MODEL_FILE",
    "load_mil_model",
    "predict_slides",
    "save_mil_model",
    "write_csv",
    "write_slide_predictions",
]

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT = "pathotune-mil"
FORMAT_VERSION = 1


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], lineterminator: str = "\n") -> Path:
    """A CSV written all-or-nothing."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator=lineterminator)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)


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


class _SlideBags(Dataset):
    """``(features, coords, index)`` of each file, for prediction; coords (0, 2) for a ``.pt`` file, which has
    none (a batch cannot hold None)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, np.ndarray, int]:
        feats, coords, _ = read_slide_features(self.files[i])
        return feats, np.zeros((0, 2), dtype=np.int64) if coords is None else coords, i


def predict_slides(
    model_dir: str | os.PathLike[str],
    features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Class probabilities and tile scores for each slide feature file (a folder of h5 files or a list).

    Given a run folder, every fold's model scores each slide and the probabilities and tile scores are
    averaged (an ensemble over folds; averaged tile scores still sum to one). Given one fold folder, that
    model alone. Slides must come from the extractor the models were trained on. ``coords`` is None for a
    ``.pt`` file (no tile coordinates); ``n_tiles`` is the bag's size.
    """
    dirs = _fold_dirs(Path(model_dir))
    loaded = [load_mil_model(d, device) for d in dirs]
    classes = loaded[0][1]["classes"]
    ref = loaded[0][1]["feature_attrs"]
    for _, meta in loaded[1:]:
        if meta["classes"] != classes or meta["in_dim"] != loaded[0][1]["in_dim"]:
            raise WeightsError(f"fold models in {model_dir} disagree on classes or input size; retrain the run")
    files = list_feature_files(features)
    check_feature_compatibility(files, trained_on=ref, model=str(dirs[0]))

    def ensemble(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [model(x) for model, _ in loaded]
        probs = torch.stack([logits.float().softmax(-1)[0] for logits, _ in outs]).mean(0)
        return probs, torch.stack([scores.float()[0] for _, scores in outs]).mean(0)

    results = []
    loader = DataLoader(_SlideBags(files), batch_size=1)
    for (probs, scores), (coords, idx) in infer_batches(Runtime.of(device=device), loader, ensemble):
        p, tile_scores, xy = probs.numpy(), scores.numpy(), coords[0].numpy()
        results.append(
            {
                "slide_id": files[int(idx[0])].stem,
                "probs": p,
                "pred": classes[int(p.argmax())],
                "classes": list(classes),
                "tile_scores": tile_scores,
                "n_tiles": len(tile_scores),
                "coords": xy if len(xy) == len(tile_scores) else None,
            }
        )
    return results


def write_slide_predictions(predictions: list[dict[str, Any]], out: str | os.PathLike[str]) -> Path:
    """``slide_id, pred, n_tiles, prob_<class>...`` for :func:`predict_slides` results (``slides predict``)."""
    if not predictions:
        raise DataError("no slide predictions to write")
    classes = list(predictions[0]["classes"])
    rows = [[p["slide_id"], p["pred"], p["n_tiles"], *[f"{float(v):.6f}" for v in p["probs"]]] for p in predictions]
    return write_csv(Path(out), ["slide_id", "pred", "n_tiles", *[f"prob_{c}" for c in classes]], rows, "\r\n")
