"""Frozen vision foundation models: registry, token-level ViT wrapper, weight loading."""

from . import cnn, natural, pathology  # noqa: F401  (each vendor module registers its entries on import)
from .cnn import bundled_cnn_file
from .registry import BackboneSpec, get_backbone_spec, list_backbones, register_backbone, resolve_weights
from .vit import TokenViT, create_backbone

__all__ = [
    "BackboneSpec",
    "TokenViT",
    "bundled_cnn_file",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "register_backbone",
    "resolve_weights",
]
