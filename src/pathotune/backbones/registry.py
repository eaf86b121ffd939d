"""Backbone registry: string id -> BackboneSpec. Any timm ViT name works too, without registration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import timm

from ..errors import ConfigError

StateDict = dict  # str -> torch.Tensor
KeyMap = Callable[[StateDict], StateDict]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one frozen vision FM and read its published checkpoint.

    ``key_map`` turns the published checkpoint's keys into timm ``VisionTransformer`` keys; timm's own
    checkpoint filter and position-embedding resampling run after it.
    """

    name: str
    timm_name: str
    family: str  # "natural", "pathology" or "timm"
    img_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: dict = field(default_factory=dict)
    key_map: KeyMap | None = None
    weights_hint: str = "a timm/safetensors state dict for this architecture"
    pool: str = "default"  # "default" (the model's own global_pool), "token", "avg" or "token+avg"
    bundled: bool = False
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ConfigError(f"backbone id '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones(family: str | None = None) -> list[str]:
    """Registered backbone ids (any timm ViT name is accepted by ``create_model`` as well)."""
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec for a registered id, or a generic spec for a timm ViT model name (``timm/`` prefix optional)."""
    if name in _REGISTRY:
        return _REGISTRY[name]

    timm_name = name.removeprefix("timm/")
    if timm.is_model(timm_name):
        cfg = timm.models.get_pretrained_cfg(timm_name)
        mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
        std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
        size = int(cfg.input_size[-1]) if cfg is not None else 224
        return BackboneSpec(name=name, timm_name=timm_name, family="timm", img_size=size, mean=mean, std=std)
    raise ConfigError(
        f"unknown backbone '{name}'; use one of {list_backbones()} or a timm ViT model name (see `pathotune backbones`)"
    )


def resolve_weights(backbone: str, weights: str | None) -> str | None:
    """Which weights ``backbone`` gets: ``weights`` when given ('random': none), else the bundled ones where the
    package ships them; a named natural or pathology FM needs a local file, so it fails asking for one."""
    spec = get_backbone_spec(backbone)
    if weights == "random":
        return None
    if weights is not None:
        return weights
    if spec.bundled:
        return "bundled"
    if spec.family in ("natural", "pathology"):
        raise ConfigError(
            f"backbone '{backbone}' needs --weights: {spec.weights_hint} (or --weights random for a smoke test)"
        )
    return None
