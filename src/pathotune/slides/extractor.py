"""The extractor factory: a plain frozen backbone, or a bundle's prompt-tuned model, ready to turn tiles into features.

As TRIDENT's encoder factory does, one call builds the model from a backbone id (and weights) or from a bundle
and says what identifies its output (backbone id, fingerprint of the weights, the bundle's checksum) and how a
tile must be normalised for it. Extraction records exactly that in every feature file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import TokenViT, create_backbone, resolve_weights
from ..backbones.loading import fingerprint
from ..bundle import load_bundle, read_manifest, resolve_bundle
from ..errors import ConfigError
from ..model import PathoTuneModel

__all__ = ["FeatureExtractor", "as_extractor", "load_extractor"]


@dataclass
class FeatureExtractor:
    """A frozen module mapping normalised images to pooled features, with what identifies its output."""

    module: nn.Module
    backbone: str
    backbone_fingerprint: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    feature_dim: int
    bundle_fingerprint: str = ""
    bundle_path: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, feature_dim): a model's tokens through its pooling, without the head."""
        m = self.module
        if isinstance(m, PathoTuneModel):
            return m.forward_head(m.forward_features(x), pre_logits=True)
        return m(x)


def as_extractor(model: Any) -> FeatureExtractor:
    """Wrap a PathoTuneModel (its pooled pre-logits features) or a TokenViT (its pooled output) for extraction."""
    if isinstance(model, FeatureExtractor):
        return model
    if isinstance(model, PathoTuneModel):
        bb = model.backbone
        return FeatureExtractor(
            model,
            model.provenance.backbone,
            model.provenance.fingerprint,
            tuple(bb.spec.mean),
            tuple(bb.spec.std),
            bb.image_size,
            bb.feature_dim,
        )
    if isinstance(model, TokenViT):
        return FeatureExtractor(
            model,
            model.spec.name,
            fingerprint(model.vit),
            tuple(model.spec.mean),
            tuple(model.spec.std),
            model.image_size,
            model.feature_dim,
        )
    raise ConfigError(f"cannot extract features with a {type(model).__name__}; pass a PathoTuneModel or TokenViT")


def load_extractor(
    backbone: str | None = None,
    weights: str | None = None,
    bundle: str | Path | None = None,
    image_size: int | None = None,
) -> FeatureExtractor:
    """A plain frozen backbone, or with ``bundle`` the prompt-tuned model it holds (TVP/TTP/IVP active).

    A bundle fixes its own backbone and input size; a different ``backbone`` or ``image_size`` is an error
    rather than silently ignored.
    """
    if bundle is not None:
        path = resolve_bundle(bundle)
        manifest = read_manifest(path)
        size = int(manifest["provenance"]["image_size"])
        if image_size is not None and image_size != size:
            raise ConfigError(f"bundle {path} was trained at {size} px; drop --image-size {image_size} or use {size}")
        ex = as_extractor(load_bundle(path, weights=weights, backbone=backbone))
        ex.bundle_fingerprint = str(manifest.get("sha256", ""))
        ex.bundle_path = str(path)
        return ex
    if backbone is None:
        raise ConfigError("pass --backbone (a backbone id) or --bundle (a prompt bundle) to extract features")
    return as_extractor(create_backbone(backbone, weights=resolve_weights(backbone, weights), image_size=image_size))
