"""Backbone registry: string id -> BackboneSpec. Any timm ViT name works too, without registration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import timm

from ..errors import ConfigError
from ..hub import HUB_PREFIX, is_hub_ref, parse_hub_ref

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
    family: str  # "natural", "pathology", "timm", or "cnn" (an IVP instance encoder only, never prompted)
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: dict = field(default_factory=dict)
    key_map: KeyMap | None = None
    weights_hint: str = "a timm/safetensors state dict for this architecture"
    hub_repo: str = ""  # the Hugging Face repo publishing the weights: `--weights hf-hub` fetches from it
    hub_file: str = ""  # the weight file in ``hub_repo`` (empty: the usual names, safetensors first)
    pool: str = "default"  # "default" (the model's own global_pool), "token", "avg" or "token+avg"
    bundled: bool = False
    description: str = ""
    # The weights' licence as the Hub names it ("apache-2.0", "cc-by-nc-nd-4.0", or "other" with a name and link):
    # a bundle trained on these weights is a derivative, so its model card carries the same terms.
    license: str = ""
    license_name: str = ""
    license_link: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ConfigError(f"backbone id '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones(family: str | None = None) -> list[str]:
    """Registered backbone ids (any timm ViT name is accepted by ``create_model`` as well); the CNN instance
    encoders (family ``cnn``) only when asked for by family."""
    return sorted(n for n, s in _REGISTRY.items() if (s.family != "cnn" if family is None else s.family == family))


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
        return BackboneSpec(name=name, timm_name=timm_name, family="timm", image_size=size, mean=mean, std=std)
    raise ConfigError(
        f"unknown backbone '{name}'; use one of {list_backbones()} or a timm ViT model name (see `pathotune backbones`)"
    )


def resolve_weights(backbone: str, weights: str | None) -> str | None:
    """Which weights ``backbone`` gets: ``weights`` when given ('random': none; 'hf-hub': the spec's own Hugging
    Face repo and file; 'hf-hub:owner/repo[@revision][:file]' checked here, fetched when the backbone is built),
    else the bundled ones where the package ships them; a named natural or pathology FM needs weights, so it
    fails asking for a local file or a Hub reference. Local files stay the default: nothing is downloaded unasked.
    """
    spec = get_backbone_spec(backbone)
    if weights == "random":
        return None
    if weights == HUB_PREFIX.rstrip(":"):
        if not spec.hub_repo:
            raise ConfigError(
                f"backbone '{backbone}' has no registered Hugging Face repo; pass --weights hf-hub:owner/repo[:file]"
            )
        return f"{HUB_PREFIX}{spec.hub_repo}" + (f":{spec.hub_file}" if spec.hub_file else "")
    if weights is not None:
        if is_hub_ref(weights):
            parse_hub_ref(weights, ConfigError)  # a malformed reference fails before any data is read
        return weights
    if spec.bundled:
        return "bundled"
    if spec.family in ("natural", "pathology"):
        repo = spec.hub_repo or "owner/repo[:file]"
        hub = f", or --weights hf-hub:{repo} to download it"
        raise ConfigError(
            f"backbone '{backbone}' needs --weights: {spec.weights_hint}{hub} (or --weights random for a smoke test)"
        )
    return None
