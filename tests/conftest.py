from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from helpers import IMG, TINY  # noqa: E402  (after the offline environment is set)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster on one thread than on two contended ones (~50x for tiny training steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_kwargs() -> dict:
    return {"backbone_kwargs": dict(TINY), "image_size": IMG}


@pytest.fixture
def text_features() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stand-in for an encoded task text, so most tests need no text encoder."""
    g = torch.Generator().manual_seed(123)
    return torch.randn(24, generator=g), torch.randn(7, 24, generator=g)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))
