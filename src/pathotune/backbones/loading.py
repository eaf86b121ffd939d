"""Read local or Hub checkpoints (never unpickling code), fit them to a timm ViT, and fingerprint weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from ..errors import WeightsError
from ..hub import HUB_PREFIX, download_file, is_hub_ref, parse_hub_ref
from .registry import BackboneSpec

# Files looked for, in order, when ``weights`` is a folder (HF, timm and open_clip layouts).
FOLDER_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "model.pth",
    "checkpoint.pth",
)
# Wrappers that training scripts put around the state dict.
NESTED_KEYS = ("state_dict", "model", "module", "teacher", "model_state_dict")


def hub_file(ref: str, spec: BackboneSpec | None = None) -> Path:
    """The local copy of ``hf-hub:owner/repo[@revision][:file]`` in HF's cache, downloaded if needed (the user's
    token, ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` apply). Without ``:file``: the spec's file when the repo is its
    own, else the usual names, safetensors first. Bare ``hf-hub``: the spec's own repo."""
    if ref == HUB_PREFIX.rstrip(":"):
        if spec is None or not spec.hub_repo:
            name = f"'{spec.name}'" if spec is not None else "this backbone"
            raise WeightsError(f"{name} has no registered Hugging Face repo; pass weights hf-hub:owner/repo[:file]")
        ref = f"{HUB_PREFIX}{spec.hub_repo}" + (f":{spec.hub_file}" if spec.hub_file else "")
    parsed = parse_hub_ref(ref, WeightsError)
    own = spec is not None and spec.hub_file and spec.hub_repo == parsed.repo_id
    defaults = (spec.hub_file,) if own else FOLDER_FILES
    return download_file(parsed, defaults, "weights", "pass --weights with a local file", WeightsError)


def resolve_file(path: str | Path, spec: BackboneSpec | None = None) -> Path:
    """A weight file from a file or folder path, or a Hub reference (``hf-hub:...``, fetched into HF's cache),
    with an error that says what file is expected."""
    if is_hub_ref(path) or str(path) == HUB_PREFIX.rstrip(":"):
        return hub_file(str(path), spec)
    p = Path(path).expanduser()
    expected = f" ({spec.name} expects {spec.weights_hint})" if spec is not None else ""
    if p.is_dir():
        for name in FOLDER_FILES:
            if (p / name).is_file():
                return p / name
        found = sorted(x.name for x in p.iterdir() if x.suffix in {".safetensors", ".bin", ".pth", ".pt"})
        if len(found) == 1:
            return p / found[0]
        raise WeightsError(
            f"no weight file in folder {p}{expected}; looked for {', '.join(FOLDER_FILES)}"
            + (f", found several: {found}" if found else "")
        )
    if not p.is_file():
        raise WeightsError(f"weights file {p} not found{expected}; pass --weights with a local path")
    return p


def read_state_dict(path: str | Path, spec: BackboneSpec | None = None) -> dict[str, torch.Tensor]:
    """Tensors from safetensors, or from a .pth/.bin/.pt read with ``weights_only=True``."""
    f = resolve_file(path, spec)
    try:
        if f.suffix == ".safetensors":
            sd = load_file(str(f), device="cpu")
        else:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickled code, truncated download...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"cannot read weights file {f}: {first[:200]}; re-download it or convert it to safetensors"
        ) from e
    for _ in range(3):
        if isinstance(sd, dict) and len(sd) <= 4:
            inner = next((sd[k] for k in NESTED_KEYS if isinstance(sd.get(k), dict)), None)
            if inner is not None:
                sd = inner
                continue
        break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights file {f} does not hold a flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def resample_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize a learned position embedding to the model's grid, bicubic, as its vendor would at that size.

    Vendors that build the model with ``dynamic_img_size`` (UNI, UNI2-h, Virchow2, CONCH) let timm resample at
    run time, with antialias; the others resample without it, as DINOv2 and HF do.
    """

    pe = sd.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is None or target is None or pe.shape == target.shape:
        return sd
    n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed(
        pe.float(),
        new_size=list(model.patch_embed.grid_size),
        num_prefix_tokens=n_prefix,
        interpolation="bicubic",
        antialias=bool(getattr(model, "dynamic_img_size", False)),
        verbose=False,
    ).to(pe.dtype)
    return sd


def load_into_vit(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly, except the classifier head, which we never use."""

    sd = resample_pos_embed(sd, model)
    sd = checkpoint_filter_fn(sd, model)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.") or k in model.state_dict()}
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad_shape = sorted(k for k in set(sd) & set(want) if sd[k].shape != want[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"shape of {k} is {tuple(sd[k].shape)}, model wants {tuple(want[k].shape)}")
        raise WeightsError(
            f"weights {source} do not fit this architecture: {'; '.join(parts)}; "
            "check that the file matches the backbone id"
        )
    model.load_state_dict(sd, strict=True)


def fingerprint(module: nn.Module) -> str:
    """A content hash of a module's weights: bundles refuse to load onto any other weights."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
