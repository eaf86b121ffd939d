"""Controls for the question "does the text matter?": what TTP reads instead of the real text encoding.

- ``empty``: the encoding of the empty string (one per text);
- ``random``: Gaussian vectors rescaled to the norm of each real vector (pooled, and every non-padding token),
  drawn with the run's seed, so only the direction of the real encoding is lost;
- ``unrelated``: the encodings of sentences about something else, the ones of ``UNRELATED_SENTENCES`` least
  similar (cosine) to the real texts.

A control that is nearly the real text cannot tell anything (shuffled class names in a MiniLM sentence have
cosine 0.999 to the original), so every encoding comes with its cosine to the real one, reported beside the
result.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .encoders import encode_texts

CONTROLS = ("none", "empty", "random", "unrelated")
UNRELATED_SENTENCES = (
    "The train to the coast leaves the station at seven every morning.",
    "Add two cups of flour and a pinch of salt, then knead the dough.",
    "The football match was postponed because of heavy rain.",
    "She tuned the old guitar before the evening concert began.",
    "Shares closed slightly higher after a quiet week of trading.",
    "A lighthouse stands on the rocky northern tip of the island.",
    "The committee will vote on the new parking rules next month.",
    "He painted the garden fence a bright shade of yellow.",
)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _random_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian vectors along the last dimension with the norms of ``x``'s (zero rows stay zero)."""
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    norms = x.double().norm(dim=-1, keepdim=True)
    return (noise / noise.norm(dim=-1, keepdim=True) * norms).to(x.dtype)


def text_encoding(
    texts: list[str], encoder: str = "minilm", weights: str | Path | None = None, control: str = "none", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(pooled (T, D), tokens (T, L, D), info) for ``texts`` under ``control``; ``info`` records the control, the
    texts actually encoded, and the cosine of each pooled encoding to the real one (and their mean)."""
    if control not in CONTROLS:
        raise ValueError(f"text control {control!r} is not one of {CONTROLS}")
    real_pooled, real_tokens = encode_texts(texts, encoder, weights)
    used: list[str] | None = list(texts)
    if control == "none":
        pooled, tokens = real_pooled, real_tokens
    elif control == "empty":
        used = [""] * len(texts)
        pooled, tokens = encode_texts(used, encoder, weights)
    elif control == "random":
        generator = torch.Generator().manual_seed(seed)
        pooled, tokens = _random_like(real_pooled, generator), _random_like(real_tokens, generator)
        used = None
    else:
        if len(texts) > len(UNRELATED_SENTENCES):
            raise ValueError(f"{len(texts)} texts but only {len(UNRELATED_SENTENCES)} unrelated sentences")
        cand_pooled, _ = encode_texts(list(UNRELATED_SENTENCES), encoder, weights)
        sims = torch.stack([torch.stack([torch.tensor(cosine(c, r)) for r in real_pooled]).mean() for c in cand_pooled])
        used = [UNRELATED_SENTENCES[i] for i in sims.argsort()[: len(texts)].tolist()]
        pooled, tokens = encode_texts(used, encoder, weights)
    per_text = [cosine(p, r) for p, r in zip(pooled, real_pooled, strict=True)]
    info = {"control": control, "texts": used, "cosine": sum(per_text) / len(per_text), "cosine_per_text": per_text}
    return pooled, tokens, info
