"""Many tasks on one frozen backbone: each sample gets its own task's prompt tokens and head in one forward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .backbones import get_backbone_spec
from .bundle import load_bundle, read_manifest
from .errors import BundleError, ConfigError
from .model import PathoTuneModel


def backbone_recipe(manifest: dict) -> tuple:
    """What a bundle needs of the frozen backbone it runs on: id, weights, image size and the pooling it was trained
    with (a shared backbone pools one way for every task, so the pooling must agree).

    The weights are their fingerprint; a randomly initialised backbone (tests) is its architecture overrides
    instead, as ``load_bundle`` matches it by recipe (its bits vary with the CPU's vector maths).
    """
    prov = manifest["provenance"]
    pool = manifest["switches"].get("pool", "default")
    if pool == "default":
        with contextlib.suppress(ConfigError):  # a backbone this version does not know: compare the setting as written
            pool = get_backbone_spec(prov["backbone"]).pool
    weights = prov["fingerprint"] if prov["weights"] is not None else f"random init {prov.get('backbone_kwargs') or {}}"
    return prov["backbone"], weights, prov["image_size"], pool


def describe_recipe(recipe: tuple) -> str:
    """A recipe in words, e.g. 'dinov2_vits14' (weights 3f2a9c01d4e7, 224 px, token pooling)."""
    backbone, weights, image_size, pool = recipe
    shown = weights if weights.startswith("random init") else f"weights {weights[:12]}"
    return f"'{backbone}' ({shown}, {image_size} px, {pool} pooling)"


class MultiTaskModel(nn.Module):
    """Serves several bundles trained on the same backbone weights.

    Samples whose tasks share a token layout (same prompt counts and insertion layers) run in one batched
    forward; each sample's TVP/TTP tokens are gathered from its task, and its IVP tokens come from its task's
    VRM. Samples of tasks with different layouts run in one forward per layout.
    """

    def __init__(self, models: Sequence[PathoTuneModel], names: Sequence[str] | None = None) -> None:
        super().__init__()
        if not models:
            raise BundleError("MultiTaskModel needs at least one task model")
        first = models[0]
        for m in models[1:]:
            if (
                m.provenance.fingerprint != first.provenance.fingerprint
                or m.backbone.image_size != first.backbone.image_size
                or m.backbone.pool_mode != first.backbone.pool_mode
            ):
                raise BundleError(
                    f"tasks must share backbone weights, image size and pooling: '{m.provenance.backbone}' "
                    f"({m.provenance.fingerprint[:12]}, {m.backbone.image_size} px, {m.backbone.pool_mode}) vs "
                    f"'{first.provenance.backbone}' ({first.provenance.fingerprint[:12]}, "
                    f"{first.backbone.image_size} px, {first.backbone.pool_mode})"
                )
            if m.switches.train in ("all", "lora"):
                raise BundleError(f"method '{m.method}' changes the backbone; it cannot share one with other tasks")
        self.backbone = first.backbone
        for m in models:
            m.backbone = self.backbone  # one copy of the frozen weights
        self.tasks = nn.ModuleList(models)
        self.names = list(names) if names is not None else [f"task_{i}" for i in range(len(models))]
        self.layout_groups = layout_groups(models, range(len(models)))
        self.eval()

    @classmethod
    def from_bundles(cls, paths: Sequence[str | Path], weights: str | Path | None = None) -> MultiTaskModel:
        """Load bundles onto a single backbone instance (loaded once, fingerprint checked for each bundle)."""

        if not paths:
            raise BundleError("MultiTaskModel needs at least one bundle")
        recipes = [backbone_recipe(read_manifest(p)) for p in paths]
        for p, recipe in zip(paths[1:], recipes[1:], strict=True):
            if recipe != recipes[0]:
                raise BundleError(
                    f"bundles {paths[0]} and {p} were trained on different backbones: {describe_recipe(recipes[0])} "
                    f"and {describe_recipe(recipe)}; tasks served together must share one backbone, so predict them "
                    "in separate runs"
                )
        first = load_bundle(paths[0], weights=weights)
        models = [first] + [load_bundle(p, weights=weights, backbone_module=first.backbone) for p in paths[1:]]
        return cls(models, names=[Path(p).name if Path(p).name != "bundle" else Path(p).parent.name for p in paths])

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample logits (each over its own task's classes)."""
        return forward_mixed(list(self.tasks), x, task_ids)


def layout_groups(models: Sequence[PathoTuneModel], indices: Iterable[int]) -> list[list[int]]:
    """``indices`` grouped by the token layout of their models (first appearance order): one forward per group."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault(models[i].layout, []).append(i)
    return list(groups.values())


def forward_mixed(models: Sequence[PathoTuneModel], x: torch.Tensor, task_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample logits: sample ``i`` through ``models[task_ids[i]]``, each over its own task's classes.

    The models must share one backbone instance (``MultiTaskModel`` or a serving cache sees to it). Only the tasks
    present in the batch run: one forward per token layout among them, so a caller may pass any subset of its
    loaded tasks without building anything per batch.
    """
    bb = models[0].backbone
    if any(m.backbone is not bb for m in models):
        raise BundleError("forward_mixed needs task models on one backbone instance; load them with backbone_module")
    task_ids = torch.as_tensor(task_ids, device=x.device)
    out: list[torch.Tensor | None] = [None] * x.shape[0]
    for members in layout_groups(models, sorted(set(task_ids.tolist()))):
        mask = torch.isin(task_ids, torch.as_tensor(members, device=x.device))
        rows = mask.nonzero(as_tuple=True)[0]
        lead = models[members[0]]
        tokens = lead.forward_features(
            x[rows], prompts=MixedPrompts([models[i] for i in members], members, task_ids[rows])
        )
        pooled = lead.forward_head(tokens, pre_logits=True)  # one backbone, so one pooling for every task
        for t in members:
            sel = (task_ids[rows] == t).nonzero(as_tuple=True)[0]
            for r, logit in zip(rows[sel].tolist(), models[t].logits_from_pooled(pooled[sel]), strict=True):
                out[r] = logit
    return out  # type: ignore[return-value]


class MixedPrompts:
    """A prompt source for one batch of mixed tasks: each sample gets its own task's tokens, VRM and gates."""

    def __init__(self, models: list[PathoTuneModel], members: list[int], task_ids: torch.Tensor) -> None:
        self.models = models
        self.local = torch.as_tensor([members.index(int(t)) for t in task_ids], device=task_ids.device)

    def group_tokens(self, group: str, layer: int, h: torch.Tensor, inst: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.models[0].prompt_groups[group].per_image:  # task-level tokens: one row per task, gathered
            return torch.cat([m.group_tokens(group, layer, h[:1], inst) for m in self.models])[self.local]
        out = None
        for j, m in enumerate(self.models):
            rows = (self.local == j).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            tok = m.group_tokens(group, layer, h[rows], {g: t[rows] for g, t in inst.items()})
            if out is None:
                out = h.new_zeros(h.shape[0], *tok.shape[1:])
            out[rows] = tok
        return out

    def group_gate(self, group: str, layer: int) -> torch.Tensor:
        return torch.stack([m.group_gate(group, layer) for m in self.models])[self.local]
