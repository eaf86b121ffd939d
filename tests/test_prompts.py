"""Where prompts enter, what they replace, and what pooling reads."""

from __future__ import annotations

import math

import pytest
import torch

from pathotune import ConfigError, create_model

NAME = "vit_small_patch16_224"
N_PATCH = 4  # 32 px / 16 px patches -> 2x2


def capture_block_inputs(model) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    for blk in model.backbone.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def test_shallow_tvp_enters_once_without_position_embedding(tiny_kwargs, images):
    model = create_model(NAME, "vpt-shallow", 3, tvp_tokens=5, **tiny_kwargs).eval()
    seen = capture_block_inputs(model)
    with torch.no_grad():
        model(images)
    p = model.backbone.num_prefix_tokens
    assert [s.shape[1] for s in seen] == [p + 5 + N_PATCH] * 3
    # Block 0 sees the raw prompt parameters (no position embedding added) ...
    torch.testing.assert_close(seen[0][:, p : p + 5], model.tvp.tokens[0].expand(4, -1, -1))
    # ... and later blocks see the previous block's outputs there, not fresh prompts.
    assert not torch.allclose(seen[1][:, p : p + 5], model.tvp.tokens[0].expand(4, -1, -1))
    # Patch tokens and prefix are exactly the unprompted embedding.
    with torch.no_grad():
        emb = model.backbone.embed(images)
    torch.testing.assert_close(seen[0][:, :p], emb[:, :p])
    torch.testing.assert_close(seen[0][:, p + 5 :], emb[:, p:])


def test_deep_tvp_replaces_previous_layer_prompt_outputs(tiny_kwargs, images):
    model = create_model(NAME, "vpt-deep", 3, tvp_tokens=3, **tiny_kwargs).eval()
    seen: list[torch.Tensor] = capture_block_inputs(model)
    outs: list[torch.Tensor] = []
    for blk in model.backbone.blocks:
        blk.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    with torch.no_grad():
        model(images)
    p = model.backbone.num_prefix_tokens
    assert model.tvp.tokens.shape == (3, 3, 32)
    for layer in range(3):
        assert seen[layer].shape[1] == p + 3 + N_PATCH  # replaced, never accumulated
        torch.testing.assert_close(seen[layer][:, p : p + 3], model.tvp.tokens[layer].expand(4, -1, -1))
    for layer in (1, 2):
        # Layer l's prompt slots do not carry layer l-1's prompt outputs ...
        assert not torch.allclose(seen[layer][:, p : p + 3], outs[layer - 1][:, p : p + 3])
        # ... while prefix and patch tokens flow on unchanged.
        torch.testing.assert_close(seen[layer][:, :p], outs[layer - 1][:, :p])
        torch.testing.assert_close(seen[layer][:, p + 3 :], outs[layer - 1][:, p + 3 :])


def test_deep_tvp_depth_and_entry_layer(tiny_kwargs, images):
    model = create_model(NAME, "vpt-deep", 3, tvp_tokens=2, tvp_layer=1, tvp_depth=1, **tiny_kwargs).eval()
    seen = capture_block_inputs(model)
    with torch.no_grad():
        model(images)
    p = model.backbone.num_prefix_tokens
    assert model.tvp_layers == [1]
    assert [s.shape[1] for s in seen] == [p + N_PATCH, p + 2 + N_PATCH, p + 2 + N_PATCH]


def test_token_order_prefix_ttp_ivp_tvp_patches(tiny_kwargs, images, text_features):
    model = create_model(
        NAME,
        "pathotune",
        3,
        tvp_tokens=2,
        ttp_tokens=3,
        ivp_tokens=4,
        text_features=text_features,
        **tiny_kwargs,
    ).eval()
    seen = capture_block_inputs(model)
    with torch.no_grad():
        model(images)
        inst = model.backbone.forward_tokens(images)
        ttp = model.ttp(4)
        ivp = model.ivp(inst, model.backbone.num_prefix_tokens)
        emb = model.backbone.embed(images)
    p = model.backbone.num_prefix_tokens
    x = seen[3]  # the instance pass (plain backbone) ran first
    assert [s.shape[1] for s in seen[:3]] == [p + N_PATCH] * 3
    assert x.shape[1] == p + 3 + 4 + 2 + N_PATCH
    torch.testing.assert_close(x[:, :p], emb[:, :p])
    torch.testing.assert_close(x[:, p : p + 3], ttp)
    torch.testing.assert_close(x[:, p + 3 : p + 7], ivp)
    torch.testing.assert_close(x[:, p + 7 : p + 9], model.tvp.tokens[0].expand(4, -1, -1))
    torch.testing.assert_close(x[:, p + 9 :], emb[:, p:])


def test_ivp_is_per_image_and_ttp_per_task(tiny_kwargs, images, text_features):
    model = create_model(NAME, "ttp+ivp", 3, text_features=text_features, **tiny_kwargs).eval()
    seen = capture_block_inputs(model)
    with torch.no_grad():
        model(images)
    p = model.backbone.num_prefix_tokens
    ttp, ivp = seen[-3][:, p : p + 4], seen[-3][:, p + 4 : p + 8]
    assert torch.equal(ttp[0], ttp[1])  # constant per task
    assert not torch.allclose(ivp[0], ivp[1])  # differs per image


def test_pooling_ignores_prompts(images):
    kwargs = {
        "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_pool": "avg"},
        "img_size": 32,
    }
    torch.manual_seed(0)
    model = create_model(NAME, "vpt-shallow", 3, tvp_tokens=4, **kwargs).eval()
    normed: list[torch.Tensor] = []
    model.backbone.vit.norm.register_forward_hook(lambda m, a, o: normed.append(o.detach().clone()))
    with torch.no_grad():
        feats = model.forward_features(images)
    p = model.backbone.num_prefix_tokens
    assert normed[0].shape[1] == p + N_PATCH
    torch.testing.assert_close(feats, model.backbone.vit.fc_norm(normed[0][:, p:].mean(1)))
    switched = create_model(NAME, "vpt-shallow", 3, tvp_tokens=4, pool_prompts=True, **kwargs).eval()
    switched.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(switched.forward_features(images), feats)


def test_early_ivp_costs_no_second_pass(tiny_kwargs, images, text_features):
    model = create_model(
        NAME,
        "pathotune",
        3,
        ivp_source="early",
        ivp_layer=1,
        ttp_layer=1,
        tvp_layer=1,
        text_features=text_features,
        **tiny_kwargs,
    ).eval()
    calls = []
    model.backbone.vit.patch_embed.register_forward_hook(lambda m, a, o: calls.append(1))
    seen = capture_block_inputs(model)
    outs: list[torch.Tensor] = []
    model.backbone.blocks[0].register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    with torch.no_grad():
        model(images)
    assert len(calls) == 1  # one patch embedding: no second encoder pass
    p = model.backbone.num_prefix_tokens
    assert seen[0].shape[1] == p + N_PATCH  # block 0 runs unprompted
    with torch.no_grad():
        expected_ivp = model.ivp(outs[0], p)
    torch.testing.assert_close(seen[1][:, p + 4 : p + 8], expected_ivp)


def test_vpt_initialisation_range(tiny_kwargs):
    model = create_model(NAME, "vpt-deep", 3, tvp_tokens=50, **tiny_kwargs)
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 32))
    t = model.tvp.tokens
    assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound


def test_separate_instance_encoder_cnn(tiny_kwargs, images):
    model = create_model(
        NAME, "instance", 3, ivp_source="encoder", ivp_encoder="resnet18", ivp_vrm="mlp", **tiny_kwargs
    ).eval()
    with torch.no_grad():
        out = model(images)
    assert out.shape == (4, 3)
    assert model.instance_encoder.dim == 512
    assert model.provenance.instance_fingerprint


def test_bad_switches_are_refused(tiny_kwargs):
    with pytest.raises(ConfigError, match="unknown switch"):
        create_model(NAME, "vpt-deep", 3, tvp_tokenz=3, **tiny_kwargs)
    with pytest.raises(ConfigError, match="ivp_vrm"):
        create_model(NAME, "instance", 3, ivp_vrm="conv", **tiny_kwargs)
    with pytest.raises(ConfigError, match="tvp_layer=7 must be < the backbone depth 3"):
        create_model(NAME, "vpt-deep", 3, tvp_layer=7, **tiny_kwargs)
    with pytest.raises(ConfigError, match="unknown method"):
        create_model(NAME, "prompt-magic", 3, **tiny_kwargs)


def test_instance_cache_skips_the_second_pass_for_seen_images(tiny_kwargs, images):
    torch.manual_seed(0)
    plain = create_model(NAME, "instance", 3, **tiny_kwargs).eval()
    cached = create_model(NAME, "instance", 3, ivp_cache=16, **tiny_kwargs).eval()
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
    assert (cached.instance_cache.hits, cached.instance_cache.misses) == (2, 4)
    with pytest.raises(ConfigError, match="ivp_cache needs a frozen backbone"):
        create_model(NAME, "full", 3, ivp_cache=8, ivp_tokens=2, **tiny_kwargs)
