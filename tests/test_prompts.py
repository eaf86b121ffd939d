"""Where prompts enter, how image tokens read them, what they replace, and what pooling reads."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY2, TINY_NAME, pooled

from pathotune import ConfigError, create_model
from pathotune.prompts import sequence_order

NAME = TINY_NAME
METHODS_WITH_PROMPTS = ["vpt-shallow", "vpt-deep", "text", "instance", "tvp+ttp", "tvp+ivp", "ttp+ivp", "pathotune"]


def open_gates(model, value: float = 0.7) -> None:
    with torch.no_grad():
        for g in model.gates.values():
            g.fill_(value)


def concatenated_forward(model, images):
    """VPT as published: prompts concatenated into the sequence, [prefix][TTP][IVP][TVP][patches], timm blocks.

    The reference for ``prompt_attn="joint"``: deep TVP replaces its slice at each of its layers, TTP and IVP
    enter once and travel on.
    """
    bb = model.backbone
    p = bb.num_prefix_tokens
    inst = model._instance_tokens(images)
    h = bb.embed(images)
    lengths: dict[str, int] = {}
    for i, blk in enumerate(bb.blocks):
        for group in model.schedule.get(i, ()):
            tokens = model.group_tokens(group, i, _image_tokens(h, p, lengths), inst)
            order = sequence_order()
            offset = p + sum(lengths.get(g, 0) for g in order[: order.index(group)])
            old = lengths.get(group, 0)
            lengths[group] = tokens.shape[1]
            h = torch.cat([h[:, :offset], tokens, h[:, offset + old :]], dim=1)
        h = blk(h)
    return bb.pool(_image_tokens(h, p, lengths))


def _image_tokens(h, p, lengths):
    n = sum(lengths.values())
    return torch.cat([h[:, :p], h[:, p + n :]], dim=1)


@pytest.mark.parametrize("method", METHODS_WITH_PROMPTS)
def test_gated_prompts_start_exactly_at_the_frozen_model(method, tiny_kwargs, images, text_features):
    """Zero-initialised gates: step 0 of every prompt method gives the frozen backbone's features, bit for bit."""
    torch.manual_seed(0)
    model = create_model(NAME, method, 3, text_features=text_features, **tiny_kwargs).eval()
    assert model.groups and set(model.gates) == set(model.groups)
    with torch.no_grad():
        assert torch.equal(pooled(model, images), model.backbone(images))
        open_gates(model)
        assert not torch.allclose(pooled(model, images), model.backbone(images))


def test_gated_start_is_exact_on_register_and_avg_pooled_backbones(images, text_features):
    # Image sizes are multiples of each patch size (14 and 16): anything else is refused.
    for name, size, extra in [("vit_small_patch14_reg4_dinov2", 28, {}), (NAME, 32, {"global_pool": "avg"})]:
        kwargs = {**TINY2, **extra}
        model = create_model(
            name, "pathotune", 3, image_size=size, backbone_kwargs=kwargs, text_features=text_features
        ).eval()
        x = images[:, :, :size, :size]
        with torch.no_grad():
            assert torch.equal(pooled(model, x), model.backbone(x))


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "pathotune"])
def test_joint_attention_equals_prompts_concatenated_into_the_sequence(method, tiny_kwargs, images, text_features):
    torch.manual_seed(0)
    model = create_model(NAME, method, 3, prompt_attn="joint", text_features=text_features, **tiny_kwargs).eval()
    assert not model.gates
    with torch.no_grad():
        torch.testing.assert_close(pooled(model, images), concatenated_forward(model, images))


def test_a_group_with_closed_gates_is_switched_off_exactly(tiny_kwargs, images, text_features):
    """Groups are independent: closing IVP's gates gives the model without IVP (to float rounding)."""
    torch.manual_seed(0)
    full = create_model(NAME, "pathotune", 3, text_features=text_features, **tiny_kwargs).eval()
    without = create_model(NAME, "tvp+ttp", 3, text_features=text_features, **tiny_kwargs).eval()
    open_gates(full)
    with torch.no_grad():
        full.gates["ivp"].zero_()
    without.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("ivp.", "gates.ivp"))})
    with torch.no_grad():
        torch.testing.assert_close(pooled(full, images), pooled(without, images), atol=1e-6, rtol=0)


def test_gated_block_matches_the_zero_init_attention_formula(tiny_kwargs):
    """Image tokens: softmax over themselves plus tanh(g) x a separate softmax over each group's keys."""
    from pathotune.prompts.attention import prompted_block

    torch.manual_seed(0)
    model = create_model(NAME, "linear", 3, **tiny_kwargs).eval()
    blk = model.backbone.blocks[0]
    h, p1, p2 = torch.randn(2, 5, 32), torch.randn(2, 3, 32), torch.randn(2, 2, 32)
    g1, g2 = torch.tensor([0.3, -0.5]), torch.tensor([0.8, 0.1])
    with torch.no_grad():
        out, _ = prompted_block(blk, h, [p1, p2], [g1, g2], [False, False])
        a = blk.attn
        heads, hd = a.num_heads, a.head_dim

        def qkv(t):
            return a.qkv(blk.norm1(t)).reshape(2, t.shape[1], 3, heads, hd).permute(2, 0, 3, 1, 4)

        q, k, v = qkv(h)
        o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        for pr, g in ((p1, g1), (p2, g2)):
            _, pk, pv = qkv(pr)
            o = o + g.view(1, -1, 1, 1) * (torch.softmax(q @ pk.transpose(-1, -2) / math.sqrt(hd), -1) @ pv)
        x = h + a.proj(o.transpose(1, 2).reshape(2, 5, 32))
        x = x + blk.mlp(blk.norm2(x))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_batch_shared_groups_run_once_with_the_same_result(tiny_kwargs, gated):
    """A group given as one set of tokens expanded over the batch (TVP, TTP where it enters) goes through the
    frozen layers once; image and carried tokens match those of the same tokens copied per sample."""
    from pathotune.prompts.attention import prompted_block

    torch.manual_seed(0)
    blk = create_model(NAME, "linear", 3, **tiny_kwargs).eval().backbone.blocks[0]
    h, own, shared = torch.randn(3, 5, 32), torch.randn(3, 2, 32), torch.randn(1, 4, 32)
    gates = [torch.tensor([0.3, -0.5]), torch.randn(3, 2)] if gated else None
    with torch.no_grad():
        ref = prompted_block(blk, h, [own, shared.repeat(3, 1, 1)], gates, [True, True])
        out = prompted_block(blk, h, [own, shared.expand(3, -1, -1)], gates, [True, True])
        all_shared = prompted_block(blk, h, [shared.expand(3, -1, -1)], gates and gates[:1], [True])
        all_ref = prompted_block(blk, h, [shared.repeat(3, 1, 1)], gates and gates[:1], [True])
    torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=0)
    for a, b in zip(out[1] + all_shared[1], ref[1] + all_ref[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(all_shared[0], all_ref[0], atol=1e-6, rtol=0)


def test_deep_tvp_reads_fresh_tokens_at_each_layer(tiny_kwargs, images):
    """Deep TVP: each layer's tokens matter; shallow TVP: only layer 0's exist and they travel on."""
    torch.manual_seed(0)
    deep = create_model(NAME, "vpt-deep", 3, tvp_tokens=3, **tiny_kwargs).eval()
    assert deep.tvp.tokens.shape == (3, 3, 32) and deep.tvp.layers == [0, 1, 2]
    assert deep.keep == {0: set(), 1: set(), 2: set()}  # replaced at the next block: keys and values only
    open_gates(deep)
    with torch.no_grad():
        before = pooled(deep, images)
        deep.tvp.tokens[2].add_(torch.randn_like(deep.tvp.tokens[2]))  # a constant shift would vanish in LN
        assert not torch.allclose(pooled(deep, images), before)
    shallow = create_model(NAME, "vpt-shallow", 3, tvp_tokens=3, **tiny_kwargs)
    assert shallow.tvp.tokens.shape == (1, 3, 32) and shallow.keep == {0: {"tvp"}, 1: {"tvp"}, 2: set()}


def test_deep_tvp_depth_and_entry_layer(tiny_kwargs, images):
    model = create_model(NAME, "vpt-deep", 3, tvp_tokens=2, tvp_layer=1, tvp_depth=1, **tiny_kwargs).eval()
    assert model.tvp.layers == [1]
    assert model.gates["tvp"].shape == (2, 2)  # blocks 1 and 2, two heads each
    entered: list[int] = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, a: entered.append(0))
    with torch.no_grad():
        model(images)
    assert entered == [0]  # block 0 has no prompts: it runs as the plain timm block


def test_ivp_is_per_image_and_ttp_per_task(tiny_kwargs, images, text_features):
    torch.manual_seed(0)
    model = create_model(NAME, "ttp+ivp", 3, text_features=text_features, **tiny_kwargs).eval()
    with torch.no_grad():
        for p in model.ivp.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        h = model.backbone.embed(images)
        inst = model._instance_tokens(images)
        ttp = model.group_tokens("ttp", 0, h, inst)
        ivp = model.group_tokens("ivp", 0, h, inst)
    assert ttp.shape == (4, 4, 32) and ivp.shape == (4, 4, 32)
    assert torch.equal(ttp[0], ttp[1])  # constant per task
    assert not torch.allclose(ivp[0], ivp[1])  # differs per image


def test_vrm_starts_as_plain_learnable_tokens(tiny_kwargs, images):
    """The VRM's output layer is zero-initialised: IVP starts as its base tokens, whatever the image."""
    model = create_model(NAME, "instance", 3, **tiny_kwargs).eval()
    with torch.no_grad():
        tokens = model.group_tokens("ivp", 0, model.backbone.embed(images), model._instance_tokens(images))
    torch.testing.assert_close(tokens, model.ivp.base.expand(4, -1, -1))
    assert model.switches.ivp_hidden == 64 and model.switches.ivp_dropout == 0.1


def test_pooling_ignores_prompts_unless_switched(images):
    kwargs = {
        "backbone_kwargs": {**TINY2, "global_pool": "avg"},
        "image_size": 32,
    }
    torch.manual_seed(0)
    model = create_model(NAME, "vpt-shallow", 3, tvp_tokens=4, **kwargs).eval()
    open_gates(model)
    normed: list[torch.Tensor] = []
    model.backbone.vit.norm.register_forward_hook(lambda m, a, o: normed.append(o.detach().clone()))
    with torch.no_grad():
        feats = pooled(model, images)
    p = model.backbone.num_prefix_tokens
    assert normed[0].shape[1] == p + 4  # 2x2 patches, no prompts
    torch.testing.assert_close(feats, model.backbone.vit.fc_norm(normed[0][:, p:].mean(1)))
    switched = create_model(NAME, "vpt-shallow", 3, tvp_tokens=4, pool_prompts=True, **kwargs).eval()
    switched.load_state_dict(model.state_dict())
    switched.backbone.vit.norm.register_forward_hook(lambda m, a, o: normed.append(o.detach().clone()))
    with torch.no_grad():
        assert not torch.allclose(pooled(switched, images), feats)
    assert normed[-1].shape[1] == p + 4 + 4


def test_early_ivp_costs_no_second_pass(tiny_kwargs, images, text_features):
    model = create_model(
        NAME, "pathotune", 3, ivp_source="early", ivp_layer=1, text_features=text_features, **tiny_kwargs
    ).eval()
    calls = []
    model.backbone.vit.patch_embed.register_forward_hook(lambda m, a, o: calls.append(1))
    read: list[torch.Tensor] = []
    model.ivp.vrm.register_forward_pre_hook(lambda m, a: read.append(a[0].detach().clone()))
    with torch.no_grad():
        model(images)
    assert len(calls) == 1  # one patch embedding: no second encoder pass
    assert model.first_layer == {"ttp": 0, "ivp": 1, "tvp": 0}
    # The VRM reads the image tokens after block 0 (gates at 0: exactly the frozen block's output).
    with torch.no_grad():
        expected = model.backbone.blocks[0](model.backbone.embed(images))
    torch.testing.assert_close(read[0], expected)


def test_vpt_initialisation_range(tiny_kwargs):
    model = create_model(NAME, "vpt-deep", 3, tvp_tokens=50, **tiny_kwargs)
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 32))
    t = model.tvp.tokens
    assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound


def test_separate_instance_encoder_cnn_pools_the_whole_feature_map(tiny_kwargs, images):
    model = create_model(
        NAME, "instance", 3, ivp_source="encoder", ivp_encoder="resnet18", ivp_vrm="mlp", **tiny_kwargs
    ).eval()
    with torch.no_grad():
        out = model(images)
    assert out.shape == (4, 3)
    assert model.ivp.encoder.dim == 512
    assert model.provenance.instance_fingerprint
    # A CNN has no prefix token: the MLP VRM must read the mean of the map, not its top-left cell.
    assert model.ivp.prefix_tokens == 0
    seen: list[torch.Tensor] = []
    model.ivp.vrm.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(images)
        fmap = model.ivp.encoder(images)
    torch.testing.assert_close(seen[0], fmap.mean(1))


def test_bad_switches_are_refused(tiny_kwargs):
    with pytest.raises(ConfigError, match="unknown switch"):
        create_model(NAME, "vpt-deep", 3, tvp_tokenz=3, **tiny_kwargs)
    with pytest.raises(ConfigError, match="ivp_vrm"):
        create_model(NAME, "instance", 3, ivp_vrm="conv", **tiny_kwargs)
    with pytest.raises(ConfigError, match="prompt_attn"):
        create_model(NAME, "instance", 3, prompt_attn="sideways", **tiny_kwargs)
    with pytest.raises(ConfigError, match="ivp_dropout must be in"):
        create_model(NAME, "instance", 3, ivp_dropout=1.5, **tiny_kwargs)
    with pytest.raises(ConfigError, match="tvp_layer=7 must be < the backbone depth 3"):
        create_model(NAME, "vpt-deep", 3, tvp_layer=7, **tiny_kwargs)
    with pytest.raises(ConfigError, match="unknown method"):
        create_model(NAME, "prompt-magic", 3, **tiny_kwargs)
    with pytest.raises(ConfigError, match="needs ivp_encoder"):
        create_model(NAME, "pathotune-fm", 3, **tiny_kwargs)


def test_instance_cache_skips_the_second_pass_for_seen_images(tiny_kwargs, images):
    torch.manual_seed(0)
    plain = create_model(NAME, "instance", 3, ivp_source="backbone", **tiny_kwargs).eval()
    cached = create_model(NAME, "instance", 3, ivp_source="backbone", ivp_cache=16, **tiny_kwargs).eval()
    open_gates(plain)
    cached.load_state_dict(plain.state_dict())
    passes = []
    cached.backbone.vit.patch_embed.register_forward_hook(lambda m, a, o: passes.append(o.shape[0]))
    with torch.no_grad():
        first = cached(images)
        second = cached(images[[2, 0]])
        torch.testing.assert_close(first, plain(images))
        torch.testing.assert_close(second, plain(images[[2, 0]]))
    # first call: instance pass (4) + prompted pass (4); second: prompted pass only (2)
    assert passes == [4, 4, 2]
    assert (cached.ivp.cache.hits, cached.ivp.cache.misses) == (2, 4)
    with pytest.raises(ConfigError, match="ivp_cache needs a frozen backbone"):
        create_model(NAME, "full", 3, ivp_cache=8, ivp_tokens=2, **tiny_kwargs)
