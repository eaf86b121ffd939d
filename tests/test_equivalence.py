"""With every prompt off, features are exactly the frozen timm model's."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import TINY2, pooled

from pathotune import create_model

CASES = [
    ("cls-pooled", "vit_small_patch16_224", {}),
    ("avg-pooled", "vit_small_patch16_224", {"global_pool": "avg", "class_token": False}),
    ("avg-pooled-with-cls", "vit_small_patch16_224", {"global_pool": "avg"}),
    ("registers", "vit_small_patch14_reg4_dinov2", {}),
]


@pytest.mark.parametrize("case,name,extra", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("method", ["linear", "vpt-shallow"])
def test_prompts_off_equals_plain_timm(case, name, extra, method, images):
    kwargs = {**TINY2, **extra}
    torch.manual_seed(0)
    # vpt-shallow with zero tokens: the prompted code path with nothing to insert.
    switches = {"tvp_tokens": 0} if method == "vpt-shallow" else {}
    size = 28 if "patch14" in name else 32  # a multiple of the patch size (anything else is refused)
    model = create_model(name, method, 3, image_size=size, backbone_kwargs=kwargs, **switches).eval()
    ref = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **kwargs).eval()
    ref.load_state_dict(model.backbone.vit.state_dict())
    x = images[:, :, :size, :size]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled(model, x), ref(x), atol=1e-6, rtol=0)
    if case == "registers":
        assert model.backbone.num_prefix_tokens == 5


def test_prompted_features_differ_from_plain_once_gates_open(tiny_kwargs, images, text_features):
    torch.manual_seed(0)
    model = create_model("vit_small_patch16_224", "pathotune", 3, text_features=text_features, **tiny_kwargs)
    with torch.no_grad():
        plain = model.backbone(images)
        assert torch.equal(pooled(model, images), plain)  # zero-initialised gates: step 0 is frozen
        for g in model.gates.values():
            g.fill_(0.5)
        assert not torch.allclose(plain, pooled(model, images))
