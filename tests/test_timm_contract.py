"""timm's contract: ``forward_features`` gives tokens, ``forward_head(tokens, pre_logits=...)`` pools (and classifies).

The old contract (``forward_features`` pooled, ``forward_head`` the head alone) stays one release behind a
FutureWarning; every result here is compared bit for bit with the old computation.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY2, TINY_NAME, pooled

from pathotune import create_model
from pathotune.engine.cached import HeadOnly
from pathotune.multitask import forward_mixed
from pathotune.slides.extractor import as_extractor

PATCHES = 4  # 32 px in 16 px patches


def tiny(method: str = "pathotune", name: str = TINY_NAME, size: int = 32, open_gates: bool = True, **kw):
    torch.manual_seed(0)
    model = create_model(name, method, 3, image_size=size, backbone_kwargs={**TINY2, **kw.pop("extra", {})}, **kw)
    with torch.no_grad():
        for g in model.gates.values():
            g.fill_(0.7 if open_gates else 0.0)
    return model.eval()


def old_pooled(model, x: torch.Tensor) -> torch.Tensor:
    """The old ``forward_features``: the backbone's ``pool`` (final norm, then pooling) on the pre-norm tokens."""
    seen: list[torch.Tensor] = []
    hook = model.backbone.vit.norm.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        model.forward_features(x)
    finally:
        hook.remove()
    return model.backbone.pool(seen[-1])


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "method,switches,n_prompts",
    [("linear", {}, 0), ("pathotune", {}, 0), ("vpt-shallow", {"tvp_tokens": 5, "pool_prompts": True}, 5)],
)
def test_forward_features_are_normed_tokens_prefix_prompts_patches(method, switches, n_prompts, text_features, x):
    """(B, prefix + carried prompts + patches, D), in that order; image tokens are the frozen model's when shut."""
    model = tiny(method, open_gates=False, text_features=text_features, **switches)
    with torch.no_grad():
        tokens = model.forward_features(x)
        frozen = model.backbone.vit.forward_features(x)
    p = model.backbone.num_prefix_tokens
    assert tokens.shape == (3, p + n_prompts + PATCHES, 32)
    assert torch.equal(tokens[:, :p], frozen[:, :p]) and torch.equal(tokens[:, p + n_prompts :], frozen[:, p:])


@pytest.mark.parametrize("pool", ["default", "avg", "token+avg"])
@pytest.mark.parametrize("pool_prompts", [False, True])
def test_head_pools_as_before_and_forward_is_unchanged(pool, pool_prompts, text_features, x):
    model = tiny(pool=pool, pool_prompts=pool_prompts, text_features=text_features, extra={"global_pool": "avg"})
    with torch.no_grad():
        before = old_pooled(model, x)
        tokens = model.forward_features(x)
        feats = model.forward_head(tokens, pre_logits=True)
        assert feats.shape == (3, model.backbone.feature_dim)
        assert torch.equal(feats, before)
        assert torch.equal(as_extractor(model).forward(x), before)  # what slide extraction writes
        logits = model(x)
        assert torch.equal(logits, model.forward_head(tokens))
        assert torch.equal(logits, model.logits_from_pooled(before))  # the old forward_head(forward_features(x))


def test_pooled_features_to_forward_head_warn_and_give_the_old_logits(x) -> None:
    model = tiny("vpt-shallow")
    with torch.no_grad():
        feats = pooled(model, x)
        with pytest.warns(FutureWarning, match=r"logits_from_pooled.*pre_logits=True"):
            logits = model.forward_head(feats)
        assert torch.equal(logits, model(x))
        with pytest.warns(FutureWarning):
            assert torch.equal(model.forward_head(feats, pre_logits=True), feats)


@pytest.mark.parametrize(
    "name,size,extra",
    [(TINY_NAME, 32, {}), (TINY_NAME, 32, {"global_pool": "avg"}), ("vit_small_patch14_reg4_dinov2", 28, {})],
    ids=["token", "avg", "registers"],
)
@pytest.mark.parametrize("method", ["linear", "pathotune"])
def test_prompts_off_equals_the_frozen_timm_model(name, size, extra, method, text_features) -> None:
    model = tiny(method, name=name, size=size, open_gates=False, text_features=text_features, extra=extra)
    vit = model.backbone.vit
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), vit.forward_features(x))
        assert torch.equal(pooled(model, x), vit.forward_head(vit.forward_features(x), pre_logits=True))


def test_internal_pooled_callers_do_not_warn(text_features, x) -> None:
    """Cached-feature heads and mixed-task batches run the head on pooled features without the deprecated path."""
    a = tiny("pathotune", text_features=text_features)
    b = create_model(TINY_NAME, "vpt-shallow", 4, image_size=32, backbone_module=a.backbone, backbone_kwargs=TINY2)
    b.eval()
    with torch.no_grad():
        feats = pooled(a, x)
        assert torch.equal(HeadOnly(a)(feats), a(x))
        views = HeadOnly(a)(torch.stack([feats, feats], 1))
        torch.testing.assert_close(views, a(x).log_softmax(-1))
        mixed = forward_mixed([a, b], x, torch.tensor([0, 1, 0]))
    assert torch.equal(torch.stack([mixed[0], mixed[2]]), a(x[[0, 2]]))
    assert torch.equal(mixed[1], b(x[1:2])[0])
