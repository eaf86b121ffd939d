"""Each method trains exactly what it declares; everything frozen stays bit-identical."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_NAME

from pathotune import create_model, list_methods

NAME = TINY_NAME

# The top-level modules whose parameters each method trains (besides anything not listed: frozen).
EXPECTED = {
    "linear": {"head"},
    "linear-adamw": {"head"},
    "full": {"head", "backbone"},
    "vpt-shallow": {"head", "tvp", "gates"},
    "vpt-deep": {"head", "tvp", "gates"},
    "text": {"head", "ttp", "gates"},
    "text-classes": {"head", "ttp", "gates"},
    "instance": {"head", "ivp", "gates"},
    "pathotune": {"head", "tvp", "ttp", "ivp", "gates"},
    "pathotune-fm": {"head", "tvp", "ttp", "ivp", "gates"},
    "tvp+ttp": {"head", "tvp", "ttp", "gates"},
    "tvp+ivp": {"head", "tvp", "ivp", "gates"},
    "ttp+ivp": {"head", "ttp", "ivp", "gates"},
    "lora": {"head", "backbone"},
}


def test_every_method_is_covered():
    assert set(list_methods()) == set(EXPECTED)


@pytest.mark.parametrize("method", list_methods())
def test_trainable_set_and_frozen_weights(method, tiny_kwargs, images, text_features):
    torch.manual_seed(0)
    encoder = {"ivp_source": "encoder", "ivp_encoder": "vit_tiny_patch16_224"}
    extra = encoder if method in ("instance", "pathotune-fm") else {}
    if method == "text-classes":  # one text encoding per class
        text_features = tuple(t.unsqueeze(0).expand(3, *t.shape) * torch.tensor([1.0, -1.0, 0.5]).view(3, *[1] * t.ndim)
                              for t in text_features)  # fmt: skip
    model = create_model(NAME, method, 3, text_features=text_features, **extra, **tiny_kwargs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == EXPECTED[method]
    if method == "lora":
        assert trainable == {n for n in trainable if "lora_" in n or n.startswith("head.")}
        from peft.tuners.lora import LoraLayer

        lora_layers = [m for m in model.backbone.modules() if isinstance(m, LoraLayer)]
        assert len(lora_layers) == 2 * 3  # qkv and proj in each of the 3 blocks
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}

    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    # Three steps: zero-initialised parts (prompt gates, the VRM's output layer, LoRA's B) open the way one step
    # at a time, so everything behind them has moved by step 3.
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    after = model.state_dict()
    for name, old in before.items():
        changed = not torch.equal(old, after[name])
        is_trainable = name in trainable
        assert changed == is_trainable, f"{method}: {name} changed={changed} trainable={is_trainable}"
    summary = model.trainable_parameters()
    assert summary["trainable"] == sum(model.get_parameter(n).numel() for n in trainable)
    assert summary["total"] == sum(p.numel() for p in model.parameters())


def test_frozen_backbone_stays_in_eval_mode(tiny_kwargs, text_features):
    model = create_model(NAME, "pathotune", 3, text_features=text_features, **tiny_kwargs).train()
    assert model.training and model.tvp.training
    assert not model.backbone.training
    full = create_model(NAME, "full", 3, **tiny_kwargs).train()
    assert full.backbone.training


def test_print_trainable_parameters(tiny_kwargs, capsys):
    model = create_model(NAME, "linear", 3, **tiny_kwargs)
    model.print_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 99 || all params: {total:,} || trainable%: {100 * 99 / total:.4f}"
    )
