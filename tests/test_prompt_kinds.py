"""A prompt kind describes itself: one class, defined here and nowhere in the package, is switched, built, trained,
served and bundled without any change to the model, the switches or the bundle format."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import IMG, TINY2, TINY_NAME, pooled

from pathotune import ConfigError, create_model, load_bundle, save_bundle
from pathotune.multitask import forward_mixed
from pathotune.prompts import BuildContext, Option, PromptGroup, at_least, check_entry, unregister_kind
from pathotune.switches import Switches, switch_names

KWARGS = {"backbone_kwargs": dict(TINY2), "image_size": IMG}
NO_BUILT_IN = {"tvp_tokens": 0}  # vpt-shallow trains prompts; with its TVP off, only the test kind is left


@pytest.fixture
def toy_kind():
    """``xvp``: k learnable tokens entering before one block, registered for one test only."""

    class ExtraPrompts(PromptGroup):
        kind = "xvp"
        order = 40  # after TVP: [prefix][TTP][IVP][TVP][XVP][patches]
        no_decay = ("tokens",)
        off = {"xvp_tokens": 0}
        options = (
            Option("xvp_tokens", "int", 0, at_least(0), "toy tokens (0: off)"),
            Option("xvp_layer", "int", 0, at_least(0)),
        )

        def __init__(self, num_tokens: int, dim: int, layer: int) -> None:
            super().__init__([layer], num_tokens)
            self.tokens = torch.nn.Parameter(torch.randn(num_tokens, dim) * 0.02)

        @classmethod
        def build(cls, switches: Any, ctx: BuildContext) -> ExtraPrompts | None:
            if not switches.xvp_tokens:
                return None
            check_entry("xvp_layer", switches.xvp_layer, ctx.backbone.depth)
            return cls(switches.xvp_tokens, ctx.backbone.embed_dim, switches.xvp_layer)

        def forward(self, layer: int, batch: int, features: torch.Tensor) -> torch.Tensor:
            return self.tokens.unsqueeze(0).expand(batch, -1, -1)

    yield ExtraPrompts
    unregister_kind("xvp")
    assert "xvp_tokens" not in switch_names()


def open_gates(model, value: float = 0.5) -> None:
    with torch.no_grad():
        for g in model.gates.values():
            g.fill_(value)


def test_a_kind_defined_in_a_test_builds_runs_and_trains_alone(toy_kind, images):
    torch.manual_seed(0)
    model = create_model(TINY_NAME, "vpt-shallow", 3, xvp_tokens=3, xvp_layer=1, **NO_BUILT_IN, **KWARGS)
    assert model.groups == ["xvp"] and isinstance(model.xvp, toy_kind) and model.xvp.layers == [1]
    assert model.layout[0][-1] == 3  # its token count takes its place in the layout
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"xvp.tokens", "gates.xvp", "head.weight", "head.bias"}
    with torch.no_grad():
        assert torch.equal(pooled(model.eval(), images), model.backbone(images))  # gates shut: frozen model
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tokens = model.xvp.tokens.detach().clone()
    open_gates(model)
    model.train()
    opt = torch.optim.SGD(model.param_groups(lr=0.1, head_lr=0.1, weight_decay=0.0))
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert not torch.equal(model.xvp.tokens, tokens)
    assert all(torch.equal(v, frozen[k]) for k, v in model.backbone.state_dict().items())


def test_its_switches_round_trip_and_are_checked(toy_kind):
    s = Switches(xvp_tokens=2)
    d = s.to_dict()
    assert d["xvp_tokens"] == 2 and d["xvp_layer"] == 0 and Switches.from_dict(d) == s
    assert s.update(xvp_layer=1).xvp_layer == 1 and "xvp_tokens" in switch_names()
    with pytest.raises(ConfigError, match="switch xvp_tokens must be >= 0, got -1"):
        Switches(xvp_tokens=-1)
    with pytest.raises(ConfigError, match="switch xvp_tokens must be an integer"):
        Switches(xvp_tokens="2")
    with pytest.raises(ConfigError, match="xvp_layer=5 must be < the backbone depth 2"):
        create_model(TINY_NAME, "vpt-shallow", 3, xvp_tokens=2, xvp_layer=5, **NO_BUILT_IN, **KWARGS)


def test_it_bundles_and_serves_beside_the_built_in_kinds(toy_kind, images, tmp_path):
    torch.manual_seed(0)
    model = create_model(TINY_NAME, "vpt-shallow", 3, tvp_tokens=2, xvp_tokens=3, **KWARGS).eval()
    assert model.groups == ["tvp", "xvp"]
    open_gates(model)
    save_bundle(model, tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    assert back.switches == model.switches
    with torch.no_grad():
        torch.testing.assert_close(back(images), model(images))
        other = load_bundle(tmp_path / "b", backbone_module=back.backbone)
        mixed = forward_mixed([back, other], images, torch.tensor([0, 1, 1, 0]))
        torch.testing.assert_close(torch.stack(mixed), model(images))
    back.drop_groups(["xvp"])
    assert back.groups == ["tvp"] and back.xvp is None and back.switches.xvp_tokens == 0


def test_a_kind_or_a_switch_is_registered_once(toy_kind):
    with pytest.raises(ConfigError, match="prompt kind 'xvp' is already registered"):
        type("Again", (PromptGroup,), {"kind": "xvp", "order": 50, "off": {}})
    with pytest.raises(ConfigError, match=r"prompt kind 'yvp' must set off and build\(\) and forward\(\)$"):
        type("Incomplete", (PromptGroup,), {"kind": "yvp", "order": 50})

    class Clash(PromptGroup):
        kind = "clash"
        order = 60
        off: dict = {}
        options = (Option("xvp_layer", "int", 0),)

        @classmethod
        def build(cls, switches, ctx):
            return None

        def forward(self, layer, batch, features):
            return features

    try:
        with pytest.raises(ConfigError, match=r"switch\(es\) \['xvp_layer'\] are declared twice"):
            Switches()
    finally:
        unregister_kind("clash")
