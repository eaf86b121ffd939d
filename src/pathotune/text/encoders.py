"""Frozen text encoders, loaded from local files only, and a per-process cache of task-text encodings."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..backbones.loading import read_state_dict
from ..errors import WeightsError
from .registry import TextEncoderSpec, get_text_encoder_spec


class HFTextEncoder(nn.Module):
    """A BERT-family encoder: token states and their attention-masked mean (as sentence-transformers pools)."""

    def __init__(self, path: Path, normalize: bool, max_length: int = 128) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

        hf_logging.disable_progress_bar()

        if not Path(path).is_dir():
            raise WeightsError(f"text encoder folder {path} not found; pass a local Hugging Face model folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot load text encoder from {path}: {str(e).splitlines()[0][:200]}") from e
        self.model.requires_grad_(False)
        self.normalize = normalize
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (B, D), tokens (B, L, D)) with padding tokens zeroed."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled, states * mask


class OpenClipTextEncoder(nn.Module):
    """A CLIP text tower via open_clip; weights come from a local file read without unpickling code."""

    def __init__(self, arch: str, weights: Path, normalize: bool) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError as e:
            raise WeightsError("CLIP text encoders need open_clip: `pip install 'pathotune[clip]'`") from e

        model = open_clip.create_model(arch, pretrained=None)
        sd = read_state_dict(weights)
        missing, _ = model.load_state_dict(sd, strict=False)
        text_missing = [k for k in missing if not k.startswith("visual.")]
        if text_missing:
            raise WeightsError(f"weights {weights} lack text-tower keys such as {text_missing[:3]} for {arch}")
        model.visual = None  # the vision tower is never used here
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.normalize = normalize

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.encode_text(self.tokenizer(texts), normalize=self.normalize)
        return pooled, pooled.unsqueeze(1)


def load_text_encoder(name: str, weights: str | Path | None = None) -> nn.Module:
    spec: TextEncoderSpec = get_text_encoder_spec(name)
    if weights is None:
        if spec.bundled_path is not None:
            weights = spec.bundled_path()
        elif spec.kind == "hf" and Path(spec.name).expanduser().is_dir():
            weights = Path(spec.name).expanduser()
        else:
            raise WeightsError(f"text encoder '{name}' has no bundled weights; pass text_weights= {spec.weights_hint}")
    if spec.kind == "open_clip":
        return OpenClipTextEncoder(spec.arch, Path(weights), spec.normalize)
    return HFTextEncoder(Path(weights), spec.normalize)


_CACHE: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def encode_task_text(text: str, encoder: str = "minilm", weights: str | Path | None = None):
    """Encode one task text once per process; returns (pooled (D,), tokens (L, D))."""
    key = (encoder, str(weights), text)
    if key not in _CACHE:
        enc = load_text_encoder(encoder, weights)
        pooled, tokens = enc.encode([text])
        _CACHE[key] = (pooled[0].clone(), tokens[0].clone())
    return _CACHE[key]


def encode_texts(texts: list[str], encoder: str = "minilm", weights: str | Path | None = None):
    """Several texts, each encoded once per process: (pooled (T, D), tokens (T, L, D)), tokens zero-padded."""
    encoded = [encode_task_text(t, encoder, weights) for t in texts]
    length = max(tok.shape[0] for _, tok in encoded)
    tokens = torch.zeros(len(encoded), length, encoded[0][1].shape[-1])
    for i, (_, tok) in enumerate(encoded):
        tokens[i, : tok.shape[0]] = tok
    return torch.stack([p for p, _ in encoded]), tokens
