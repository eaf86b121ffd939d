"""Frozen vision foundation models: registry, token-level ViT wrapper, weight loading."""

from . import natural, pathology  # noqa: F401  (each vendor module registers its entries on import)
from .registry import BackboneSpec, get_backbone_spec, list_backbones, register_backbone, resolve_weights
from .vit import TokenViT, create_backbone

__all__ = [
    "BackboneSpec",
    "TokenViT",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "register_backbone",
    "resolve_weights",
]
