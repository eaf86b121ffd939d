"""Prompt bundles: only the trained tensors (safetensors) plus a JSON manifest and a model card. Nothing is
unpickled. A bundle is also what ``save_pretrained``/``from_pretrained``/``push_to_hub`` share (one format):
a local folder, or a Hugging Face repo named ``hf-hub:owner/repo[@revision]``.

About 440 lines on purpose: the format (write, read, every check, the format-1 reader) and its sharing (model card,
Hub) are one contract, kept in one file; Hub transport itself is in ``hub.py``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbones import get_backbone_spec
from .card import Licence, model_card, run_card_extra
from .errors import BundleError, ConfigError, PathoTuneError, describe_os_error, write_error
from .hub import HUB_PREFIX, HubRef, download_folder, is_hub_ref, parse_hub_ref, upload_folder
from .model import BUNDLE_IO, PathoTuneModel, Provenance, create_model
from .prompts import saved_text_features
from .task import Task
from .version import __version__

FORMAT_VERSION = 2  # 2: the manifest's own checksum and the input normalisation; 1: tensors only
TENSORS = "prompts.safetensors"
MANIFEST = "manifest.json"
CARD = "README.md"  # the model card; documentation only, so no checksum covers it
RUN_FILES = ("config.yaml", "metrics.json")  # what a run folder adds beside its bundle when pushed


def bundle_state(model: PathoTuneModel) -> dict[str, torch.Tensor]:
    """The trained tensors, plus the buffers each prompt group needs (the cached task-text encoding, so that
    inference needs no text encoder)."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for kind, group in model.prompt_groups.items():
        state.update({f"{kind}.{name}": t for name, t in group.bundle_buffers().items()})
    return {k: v.contiguous().cpu() for k, v in state.items()}


def save_bundle(model: PathoTuneModel, path: str | Path, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``path/`` with prompts.safetensors, manifest.json and a model card README.md, atomically (a crash
    leaves no half bundle). ``extra`` holds the evidence the card shows (see :func:`pathotune.card.model_card`);
    None keeps what the model was loaded with.

    An existing ``path`` is refused unless ``overwrite``; even then only a bundle folder (or an empty one) is
    replaced, and only once the new bundle is complete. The manifest carries a checksum over everything that
    decides what a prediction means (classes, task, switches, provenance, normalisation, tensor checksum).
    """

    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise BundleError(f"{path} already exists; pass overwrite=True to replace it (nothing was written)")
        if not path.is_dir() or (any(path.iterdir()) and not (path / MANIFEST).is_file()):
            raise BundleError(f"{path} exists and is not a bundle folder; will not replace it, pick another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise write_error(path, e) from e
    try:
        state = bundle_state(model)
        try:
            save_file(state, str(tmp / TENSORS))
        except (OSError, SafetensorError) as e:
            raise write_error(path / TENSORS, _os_error(e)) from e
        spec = model.backbone.spec
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
            "normalization": {"mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std]},
            "tensors": {k: list(v.shape) for k, v in state.items()},
            "sha256": _sha256(tmp / TENSORS),
            "extra": (model.bundle_extra if extra is None else extra) or {},
        }
        manifest = json.loads(json.dumps(manifest))  # the checksum covers what a reader will see
        manifest["manifest_sha256"] = manifest_checksum(manifest)
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            (tmp / CARD).write_text(bundle_card(manifest))
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / "bundle")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except OSError as e:
            raise write_error(path / MANIFEST, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own checksum (so formatting may change, content not)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _os_error(e: BaseException) -> BaseException:
    """safetensors reports I/O failures as SafetensorError("... (os error 28)"); recover the errno."""

    found = re.search(r"os error (\d+)", str(e))
    if isinstance(e, OSError) or not found:
        return e
    code = int(found.group(1))
    return OSError(code, os.strerror(code)) if code in errno.errorcode else e


REQUIRED_KEYS = ("method", "num_classes", "class_names", "task", "switches", "provenance", "tensors", "sha256")
PROVENANCE_KEYS = ("backbone", "weights", "fingerprint", "image_size")


def resolve_bundle(path: str | Path) -> Path:
    """A bundle folder, a run folder that holds one in ``bundle/``, or ``hf-hub:owner/repo[@revision]`` (fetched
    into HF's cache; ``HF_HUB_OFFLINE`` uses the cached copy)."""
    if is_hub_ref(path):
        return _hub_bundle(parse_hub_ref(str(path), BundleError), "pass a local bundle folder")
    p = Path(path)
    return p / "bundle" if (p / "bundle" / MANIFEST).is_file() else p


def _hub_bundle(ref: HubRef, instead: str) -> Path:
    if ref.filename:
        raise BundleError(f"'{ref}' names a file; a bundle is a whole repo: hf-hub:{ref.repo_id}[@revision]")
    return download_folder(ref, (MANIFEST, TENSORS), "bundle", instead, BundleError)


def resolve_pretrained(source: str | Path) -> Path:
    """Where ``from_pretrained`` reads: a local bundle or run folder if one exists, else a Hub repo (``owner/repo``
    as peft takes it, or ``hf-hub:owner/repo[@revision]``)."""
    text = str(source)
    if is_hub_ref(text) or Path(text).exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return resolve_bundle(source)
    ref = parse_hub_ref(HUB_PREFIX + text, BundleError)
    return _hub_bundle(ref, f"pass a local bundle folder (there is no folder {text} here)")


def bundle_card(manifest: dict, repo_id: str | None = None) -> str:
    """The model card of a bundle, from its manifest (the evidence is in its ``extra``) and its backbone's registry
    entry (the Hub id of the base model, the weights' licence)."""
    prov = manifest["provenance"]
    try:
        spec = get_backbone_spec(prov["backbone"])
    except ConfigError:  # a backbone this version does not know: the card still describes the bundle
        spec = None
    weights = str(prov.get("weights") or "")
    base = parse_hub_ref(weights, BundleError).repo_id if is_hub_ref(weights) else None
    return model_card(
        manifest,
        base_model=base or (spec.hub_repo if spec is not None and spec.hub_repo else None),
        weights_hint="" if spec is None or is_hub_ref(weights) else spec.weights_hint,
        repo_id=repo_id,
        licence=Licence(spec.license, spec.license_name, spec.license_link) if spec is not None else Licence(),
    )


def save_pretrained(
    model: PathoTuneModel,
    path: str | Path,
    metrics: dict | None = None,
    command: str | None = None,
    overwrite: bool = False,
) -> Path:
    """peft's ``save_pretrained`` for a PathoTune model: the bundle (the trained tensors only, never the frozen
    backbone) and its model card, with ``metrics`` and the training ``command`` kept in the manifest's extra.

    A model loaded from a bundle keeps that bundle's evidence (metrics, intervals, evaluation, recipe) on a re-save;
    new ``metrics`` replace it all, since the old intervals and split described the old numbers."""
    extra = dict(model.bundle_extra or {})
    if metrics is not None:
        for key in ("metrics", "intervals", "evaluation"):
            extra.pop(key, None)
        extra["metrics"] = metrics
    if command is not None:
        extra["command"] = command
    return save_bundle(model, path, extra=extra, overwrite=overwrite)


def from_pretrained(source: str | Path, weights: str | Path | None = None, **kwargs) -> PathoTuneModel:
    """peft's ``from_pretrained``: a local bundle or run folder, or a Hub repo (see ``resolve_pretrained``);
    ``weights`` and ``kwargs`` as ``load_bundle`` takes them."""
    return load_bundle(resolve_pretrained(source), weights=weights, **kwargs)


def push_bundle(
    source: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload pathotune bundle",
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a saved bundle (or a run folder's) to ``repo_id`` as one commit (on branch ``revision``, or as a pull
    request with ``create_pr``); returns the commit (or pull request) URL.

    The backbone is never loaded. From a run folder the run's ``config.yaml`` and ``metrics.json`` go along, the
    card shows the metrics with their confidence intervals and ``pathotune train --config config.yaml``.
    """
    path = resolve_bundle(source)
    manifest = read_manifest(path)
    if not (path / TENSORS).is_file():
        raise BundleError(f"bundle {path} has no {TENSORS}; it is incomplete, re-export it")
    if _sha256(path / TENSORS) != manifest["sha256"]:
        raise BundleError(f"bundle file {path / TENSORS} is corrupt (checksum mismatch); re-export the bundle")
    run = path.parent if path.name == "bundle" and (path.parent / "metrics.json").is_file() else None
    run_files = [run / f for f in RUN_FILES if run is not None and (run / f).is_file()]
    card_manifest = {**manifest, "extra": _run_card_extra(manifest, run_files)}
    with tempfile.TemporaryDirectory(prefix=".pathotune-push.") as tmp:
        stage = Path(tmp)
        for f in (path / MANIFEST, path / TENSORS, *run_files):
            shutil.copyfile(f, stage / f.name)
        (stage / CARD).write_text(bundle_card(card_manifest, repo_id=repo_id))
        return upload_folder(
            stage,
            repo_id,
            BundleError,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def _run_card_extra(manifest: dict, run_files: list[Path]) -> dict:
    """The bundle's evidence, completed from its run folder (metrics with intervals, the evaluation split and n, the
    recipe) and pointing at the run's config.yaml, which goes along."""
    extra = dict(manifest.get("extra") or {})
    for f in run_files:
        try:
            if f.name == "metrics.json":
                run_metrics = json.loads(f.read_text())
                if isinstance(run_metrics, dict):
                    kept = extra.get("metrics") if isinstance(extra.get("metrics"), dict) else {}
                    names = list(kept) or [k for k, v in run_metrics.items() if isinstance(v, float)]
                    extra.update(run_card_extra(run_metrics, names))
            elif f.name == "config.yaml" and "command" not in extra and isinstance(yaml.safe_load(f.read_text()), dict):
                extra["command"] = "pathotune train --config config.yaml  # config.yaml is in this repo"
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise BundleError(f"run file {f} is unreadable ({describe_os_error(e)}); fix or remove it") from e
    return extra


def push_to_hub(
    model: PathoTuneModel,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload pathotune bundle",
    metrics: dict | None = None,
    command: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """peft's ``push_to_hub``: ``save_pretrained`` into a temporary folder, then ``push_bundle`` (``revision``: a
    branch to commit to; ``create_pr``: open a pull request instead of committing)."""
    with tempfile.TemporaryDirectory(prefix=".pathotune-save.") as tmp:
        saved = save_pretrained(model, Path(tmp) / "bundle", metrics=metrics, command=command)
        return push_bundle(
            saved,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def read_manifest(path: str | Path) -> dict:
    """The bundle's manifest, checked: known format, every key a bundle needs, and (format 2) its checksum."""
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
    except OSError as e:
        raise BundleError(f"bundle manifest {mf} is unreadable ({describe_os_error(e)}); check the file") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle manifest {mf} is not a JSON object; it was not written by pathotune")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"bundle manifest {mf} has no format_version; it was not written by pathotune")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"bundle {path} has format {version}, newer than this pathotune ({__version__}) reads "
            f"(format {FORMAT_VERSION}); upgrade pathotune"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if version >= 2 and "manifest_sha256" not in manifest:
        missing.append("manifest_sha256")
    if missing:
        raise BundleError(f"bundle manifest {mf} lacks key '{missing[0]}'; it is incomplete or edited, re-export it")
    if version >= 2 and manifest["manifest_sha256"] != manifest_checksum(manifest):
        raise BundleError(
            f"bundle manifest {mf} was changed after it was written (checksum mismatch); its classes, task or "
            "switches can no longer be trusted: re-export the bundle"
        )
    prov, tensors = manifest["provenance"], manifest["tensors"]
    if not isinstance(prov, dict) or not isinstance(tensors, dict) or not isinstance(manifest["switches"], dict):
        raise BundleError(f"bundle manifest {mf} has a malformed provenance, switches or tensors entry; re-export it")
    if not all(isinstance(v, list) and all(isinstance(d, int) for d in v) for v in tensors.values()):
        raise BundleError(f"bundle manifest {mf} has malformed tensor shapes; re-export it")
    if "img_size" in prov and "image_size" not in prov:  # bundles written before the input size was image_size
        manifest["provenance"] = prov = {("image_size" if k == "img_size" else k): v for k, v in prov.items()}
    lost = [k for k in PROVENANCE_KEYS if k not in prov]
    if lost:
        raise BundleError(f"bundle manifest {mf} lacks key 'provenance.{lost[0]}'; it is incomplete, re-export it")
    unknown = sorted(set(prov) - {f.name for f in fields(Provenance)})
    if unknown:
        raise BundleError(f"bundle manifest {mf} has unknown key 'provenance.{unknown[0]}'; re-export it")
    names, n = manifest["class_names"], manifest["num_classes"]
    if not isinstance(names, list) or not isinstance(n, int) or len(names) != n or n < 2:
        raise BundleError(f"bundle manifest {mf} has {names!r} as class_names for num_classes={n!r}; re-export it")
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
    if manifest["format_version"] < 2:
        switches.setdefault("prompt_attn", "joint")  # format 1 predates gated prompt attention
    if instance_weights is not None:
        switches["ivp_encoder_weights"] = str(instance_weights)
    if manifest["format_version"] < 2:
        state = _format1_state(state)
    text_features = saved_text_features(state)
    try:
        model = create_model(
            prov.backbone,
            manifest["method"],
            manifest["num_classes"],
            task=Task.from_dict(manifest["task"]),
            weights=weights if weights is not None else prov.weights,
            image_size=prov.image_size,
            text_features=text_features,
            backbone_kwargs=prov.backbone_kwargs,
            backbone_module=backbone_module,
            **switches,
        )
    except PathoTuneError as e:
        raise type(e)(f"cannot rebuild bundle {path}: {e}") from e
    norm = manifest.get("normalization")
    spec = model.backbone.spec
    if norm is not None and not _same_floats(norm, {"mean": spec.mean, "std": spec.std}):
        raise BundleError(
            f"bundle {path} was trained with input normalisation mean {norm.get('mean')} std {norm.get('std')}, but "
            f"backbone '{prov.backbone}' now normalises with mean {list(spec.mean)} std {list(spec.std)}; "
            "use the pathotune version it was trained with"
        )
    got = model.provenance
    # A randomly initialised backbone is defined by its recipe (id, overrides, size, seed), all taken from the
    # manifest; its bits depend on the CPU's vector maths (AVX2 and AVX-512 round erfinv differently), so its
    # content hash is compared only where real weights were given.
    random_both = prov.weights is None and got.weights is None
    if got.fingerprint != prov.fingerprint and not random_both:
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
    if manifest["format_version"] < 2 and "ivp.base" in expected:
        state["ivp.base"] = torch.zeros_like(expected["ivp.base"])  # format 1: IVP tokens were the VRM's output alone
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
    model.bundle_extra = dict(manifest.get("extra") or {})  # its evidence, kept by a re-save
    return model.eval()


def _same_floats(a: dict, b: dict) -> bool:
    try:
        return all(
            len(a[k]) == len(b[k]) and all(abs(float(x) - float(y)) <= 1e-6 for x, y in zip(a[k], b[k], strict=True))
            for k in ("mean", "std")
        )
    except (KeyError, TypeError, ValueError):
        return False


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _format1_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format-1 tensor names in today's layout: the VRM's output layer moved one place (a dropout precedes it)."""
    renames = (("ivp.vrm.out.3.", "ivp.vrm.out.4."), ("ivp.vrm.mlp.3.", "ivp.vrm.mlp.4."))
    out = {}
    for k, v in state.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old) :]
        out[k] = v
    return out


# PathoTuneModel.save_pretrained / from_pretrained / push_to_hub call these; model.py sits below this layer.
BUNDLE_IO.update(save=save_pretrained, load=from_pretrained, push=push_to_hub)
