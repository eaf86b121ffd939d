"""Prompt bundles: only the trained tensors (safetensors) plus a JSON manifest. Nothing is unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__
from .errors import BundleError, PathoTuneError
from .model import PathoTuneModel, Provenance, create_model
from .task import Task

FORMAT_VERSION = 1
TENSORS = "prompts.safetensors"
MANIFEST = "manifest.json"


def bundle_state(model: PathoTuneModel) -> dict[str, torch.Tensor]:
    """The trained tensors, plus the cached task-text encoding so that inference needs no text encoder."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if model.ttp is not None:
        state["ttp.text_pooled"] = model.ttp.text_pooled
        state["ttp.text_tokens"] = model.ttp.text_tokens
    return {k: v.contiguous().cpu() for k, v in state.items()}


def save_bundle(model: PathoTuneModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``path/`` with prompts.safetensors and manifest.json, atomically (a crash leaves no half bundle)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = bundle_state(model)
        save_file(state, str(tmp / TENSORS))
        manifest = {
            "format_version": FORMAT_VERSION,
            "pathotune_version": __version__,
            "method": model.method,
            "num_classes": model.num_classes,
            "class_names": model.class_names,
            "task": model.task.to_dict(),
            "task_text": model.task.render(),
            "switches": model.switches.to_dict(),
            "provenance": asdict(model.provenance),
            "tensors": {k: list(v.shape) for k, v in state.items()},
            "sha256": _sha256(tmp / TENSORS),
            "extra": extra or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle {path} not found; pass the folder written by `pathotune train` or save_bundle")
    if not mf.is_file():
        raise BundleError(f"bundle {path} has no {MANIFEST}; it is incomplete, re-export it with save_bundle")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle manifest {mf} is corrupt ({e.msg if hasattr(e, 'msg') else e}); re-export it") from e
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"bundle manifest {mf} has no format_version; it was not written by pathotune")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"bundle {path} has format {version}, newer than this pathotune ({__version__}) reads "
            f"(format {FORMAT_VERSION}); upgrade pathotune"
        )
    return manifest


def load_bundle(
    path: str | Path,
    weights: str | Path | None = None,
    instance_weights: str | Path | None = None,
    backbone: str | None = None,
    backbone_module=None,
) -> PathoTuneModel:
    """Rebuild the model and load the bundle's tensors, refusing other backbones or weights.

    ``weights`` defaults to what the bundle was trained with (a file path or ``"bundled"``).
    ``backbone_module`` shares an already loaded frozen backbone (its fingerprint is still checked).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    prov = Provenance(**manifest["provenance"])
    if backbone is not None and backbone != prov.backbone:
        raise BundleError(
            f"bundle {path} was trained on backbone '{prov.backbone}', not '{backbone}'; use it with '{prov.backbone}'"
        )
    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise BundleError(f"bundle {path} has no {TENSORS}; it is incomplete, re-export it")
    if _sha256(tensor_file) != manifest.get("sha256"):
        raise BundleError(f"bundle file {tensor_file} is corrupt (checksum mismatch); re-export the bundle")
    try:
        state = load_file(str(tensor_file))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"bundle file {tensor_file} is unreadable ({e}); re-export the bundle") from e

    switches = dict(manifest["switches"])
    if instance_weights is not None:
        switches["ivp_encoder_weights"] = str(instance_weights)
    text_features = None
    if "ttp.text_pooled" in state:
        text_features = (state["ttp.text_pooled"], state["ttp.text_tokens"])
    try:
        model = create_model(
            prov.backbone,
            manifest["method"],
            manifest["num_classes"],
            task=Task.from_dict(manifest["task"]),
            weights=weights if weights is not None else prov.weights,
            img_size=prov.img_size,
            text_features=text_features,
            backbone_kwargs=prov.backbone_kwargs,
            backbone_module=backbone_module,
            **switches,
        )
    except PathoTuneError as e:
        raise type(e)(f"cannot rebuild bundle {path}: {e}") from e
    got = model.provenance
    if got.fingerprint != prov.fingerprint:
        raise BundleError(
            f"bundle {path} was trained on '{prov.backbone}' weights with fingerprint {prov.fingerprint[:12]}, "
            f"but the weights given ({got.weights}) have fingerprint {got.fingerprint[:12]}; "
            "pass the weights it was trained with"
        )
    if prov.instance_fingerprint and got.instance_fingerprint != prov.instance_fingerprint:
        raise BundleError(
            f"bundle {path} was trained with instance encoder '{prov.instance_encoder}' of fingerprint "
            f"{prov.instance_fingerprint[:12]}, not {str(got.instance_fingerprint)[:12]}; pass its weights"
        )
    expected = bundle_state(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise BundleError(f"bundle {path} lacks tensor '{missing[0]}' that method '{model.method}' needs")
    for k, v in state.items():
        if k not in expected:
            raise BundleError(f"bundle {path} has tensor '{k}' that this model does not have")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise BundleError(
                f"bundle {path} tensor '{k}' has shape {tuple(v.shape)}, model wants {tuple(expected[k].shape)}"
            )
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for k, v in state.items():
            (params.get(k) if k in params else buffers[k]).copy_(v)
    return model.eval()


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
