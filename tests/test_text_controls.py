"""Text controls that can tell (each reported with its cosine to the real encoding), and per-class deep TTP."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import TINY_CONFIG, TINY_NAME, pooled, write_dataset

from pathotune import create_model
from pathotune.task import Task
from pathotune.text import controls
from pathotune.text.controls import UNRELATED_SENTENCES, cosine, text_encoding

TASK = Task(name="nucleus classification", organ="ovary", classes=("connective", "inflammatory", "neoplastic"))


def _fake_encoder(monkeypatch) -> None:
    """Deterministic stand-in: a text's vector is seeded by its characters (pooled (T, 8), tokens (T, 3, 8))."""

    def encode(texts, encoder="minilm", weights=None):
        pooled, tokens = [], []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)) + len(t))
            pooled.append(torch.randn(8, generator=g))
            tokens.append(torch.randn(3, 8, generator=g))
        return torch.stack(pooled), torch.stack(tokens)

    monkeypatch.setattr(controls, "encode_texts", encode)


def test_each_control_and_its_cosine(monkeypatch) -> None:
    _fake_encoder(monkeypatch)
    texts = TASK.class_texts()
    real_p, real_t, info = text_encoding(texts)
    assert info["control"] == "none" and info["cosine"] == pytest.approx(1.0)
    p, t, info = text_encoding(texts, control="random", seed=3)
    torch.testing.assert_close(p.norm(dim=-1), real_p.norm(dim=-1))
    torch.testing.assert_close(t.norm(dim=-1), real_t.norm(dim=-1))
    assert torch.equal(p, text_encoding(texts, control="random", seed=3)[0])  # seeded
    assert not torch.equal(p, text_encoding(texts, control="random", seed=4)[0])
    assert info["texts"] is None and len(info["cosine_per_text"]) == 3
    _, _, info = text_encoding(texts, control="empty")
    assert info["texts"] == ["", "", ""]
    _, _, info = text_encoding(texts, control="unrelated")
    cand = controls.encode_texts(list(UNRELATED_SENTENCES))[0]
    sims = [sum(cosine(c, r) for r in real_p) / 3 for c in cand]
    least = sorted(range(len(sims)), key=sims.__getitem__)[:3]
    assert info["texts"] == [UNRELATED_SENTENCES[i] for i in least]


def test_minilm_controls_are_far_from_the_text_where_shuffled_names_are_not() -> None:
    """On the bundled MiniLM, shuffling class names barely moves the encoding (cosine near 1), so it cannot tell
    anything; the controls used instead move it far."""
    real = text_encoding([TASK.render()])[0]
    shuffled = replace(TASK, text_classes=TASK.classes[1:] + TASK.classes[:1])
    assert cosine(text_encoding([shuffled.render()])[0], real) > 0.98
    for control, at_most in (("empty", 0.3), ("random", 0.25), ("unrelated", 0.3)):
        info = text_encoding([TASK.render()], control=control, seed=0)[2]
        assert info["cosine"] < at_most, (control, info["cosine"])


def _class_features(n: int = 3, dim: int = 24, length: int = 5):
    g = torch.Generator().manual_seed(9)
    return torch.randn(n, dim, generator=g), torch.randn(n, length, dim, generator=g)


def test_per_class_deep_ttp_starts_as_the_frozen_model_and_round_trips(tmp_path) -> None:
    import pathotune

    kwargs = {"backbone_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2}, "image_size": 32}
    model = create_model(TINY_NAME, "text-classes", 3, task=TASK, text_features=_class_features(), **kwargs).eval()
    plain = create_model(TINY_NAME, "linear", 3, **kwargs).eval()
    assert model.ttp.layers == [0, 1, 2] and model.ttp.num_tokens == 6 and model.layout[0][0] == 6
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(pooled(model, x), pooled(plain, x))  # gates shut: the frozen model
        for p in model.gates.values():
            p.fill_(0.5)
        model.ttp.layer_shift.normal_()
        opened = model(x)
        assert not torch.allclose(pooled(model, x), pooled(plain, x))
    pathotune.save_bundle(model, tmp_path / "b")
    back = pathotune.load_bundle(tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(back(x), opened)
    with pytest.raises(pathotune.ConfigError, match="one text encoding per class"):
        create_model(TINY_NAME, "text-classes", 3, task=TASK, text_features=_class_features(2), **kwargs)


def test_a_controlled_run_records_its_control_and_cosine(tmp_path) -> None:
    from pathotune.engine.config import TrainConfig
    from pathotune.engine.run import train_run

    data = write_dataset(tmp_path / "d", {"train": 3, "val": 2, "test": 2})
    cfg = TrainConfig(**{**TINY_CONFIG, "data": str(data), "out": str(tmp_path / "run"), "method": "text-classes",
                         "steps": 2, "accelerator": "cpu", "augment": "none", "bootstrap": 0,
                         "task": {"control": "random", "class_descriptions": {"red": "a red swatch"}}})  # fmt: skip
    m = train_run(cfg, progress=False)
    assert (
        m["text"]["control"] == "random" and abs(m["text"]["cosine"]) < 0.3 and len(m["text"]["cosine_per_text"]) == 3
    )
    manifest = json.loads((tmp_path / "run" / "bundle" / "manifest.json").read_text())
    assert manifest["extra"]["text_control"]["control"] == "random"
    assert manifest["task"]["class_descriptions"] == {"red": "a red swatch"}
