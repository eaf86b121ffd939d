"""From images to predictions in Python, under timm's names: ``data_config(model)``, ``transforms(model)`` and
``model.predict(images)``.

A model's input is what its backbone was trained on: ``data_config`` gives the input size, resampling, crop and
normalisation as timm's ``resolve_data_config`` does (and ``model.pretrained_cfg`` holds the same, so timm's own
function returns them too); ``transforms`` is the one evaluation pipeline ``pathotune predict``, ``eval`` and the
server use. ``predict`` takes what a notebook has at hand: PIL images, arrays, paths or a folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import build_transforms, list_images, load_rgb, to_rgb
from .errors import DataError
from .model import PathoTuneModel

__all__ = ["Predictions", "data_config", "predict", "transforms"]

ImageLike = Image.Image | np.ndarray | str | os.PathLike[str]


def data_config(model: PathoTuneModel) -> dict[str, Any]:
    """timm's data config of the model: input size, interpolation, mean, std, crop (the whole tile, centred)."""
    return dict(model.pretrained_cfg)


def transforms(model: PathoTuneModel, train: bool = False, augment: str = "pathology") -> Any:
    """The model's image pipeline: PIL image -> normalised (3, S, S) tensor. ``train`` adds the training
    augmentation (flips, rot90, colour and HED stain jitter); without it, the evaluation pipeline."""
    cfg = data_config(model)
    size = int(cfg["input_size"][-1])
    return build_transforms(cfg["mean"], cfg["std"], size, train=train, augment=augment if train else "none")


@dataclass
class Predictions:
    """What ``predict`` gives back, one row per image: ``labels`` (class names), ``probs`` (N, C) and ``names``
    (the file paths, or ``image_<i>`` for images given in memory); ``classes`` orders the columns of ``probs``."""

    labels: list[str]
    probs: np.ndarray
    names: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per image: name, label and one ``prob_<class>`` per class."""
        return [
            {"name": n, "label": lab, **{f"prob_{c}": float(p) for c, p in zip(self.classes, row, strict=True)}}
            for n, lab, row in zip(self.names, self.labels, self.probs, strict=True)
        ]


def _as_items(images: ImageLike | Iterable[ImageLike]) -> list[tuple[str, ImageLike]]:
    """(name, image) pairs: a folder becomes its images (sorted), a single image a list of one."""
    if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
        images = [images]
    out: list[tuple[str, ImageLike]] = []
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                found = list_images(path)
                if not found:
                    raise DataError(f"no images in folder {path}; pass image files, a folder of them, or PIL images")
                out += [(str(p), p) for p in found]
            else:
                out.append((str(path), path))
        elif isinstance(item, (Image.Image, np.ndarray)):
            out.append((f"image_{i}", item))
        else:
            raise DataError(
                f"image {i} is a {type(item).__name__}; pass PIL images, HxWx3 uint8 arrays, file paths or a folder"
            )
    return out


def _pil(name: str, item: ImageLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        arr = item
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise DataError(f"{name}: an array image must be HxW or HxWx3 (RGB) or HxWx4, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 1:
                raise DataError(f"{name}: a float array image must hold values in [0, 1]; pass uint8 RGB instead")
            arr = (arr * 255).round().astype(np.uint8)
        return to_rgb(Image.fromarray(arr))
    return load_rgb(item)


@torch.inference_mode()
def predict(
    model: PathoTuneModel,
    images: ImageLike | Iterable[ImageLike],
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> Predictions:
    """Class probabilities and labels for ``images`` (PIL images, HxWx3 uint8 arrays, paths or a folder), through
    the model's evaluation pipeline (:func:`transforms`), in batches of ``batch_size`` on ``device`` (default:
    where the model is). Equal to ``pathotune predict`` on the same files."""
    items = _as_items(images)
    pipeline = transforms(model)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(dev)
    parts = []
    for start in range(0, len(items), batch_size):
        chunk: Sequence[tuple[str, ImageLike]] = items[start : start + batch_size]
        x = torch.stack([pipeline(_pil(n, item)) for n, item in chunk]).to(dev)
        parts.append(model(x).float().softmax(-1).cpu())
    probs = torch.cat(parts).numpy() if parts else np.zeros((0, model.num_classes), dtype=np.float32)
    classes = model.class_names
    return Predictions([classes[int(i)] for i in probs.argmax(1)], probs, [n for n, _ in items], classes)
