"""Many tasks on one frozen backbone: each sample gets its own task's prompt tokens and head in one forward."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .bundle import load_bundle, read_manifest
from .errors import BundleError
from .model import PathoTuneModel


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
                or m.backbone.img_size != first.backbone.img_size
            ):
                raise BundleError(
                    f"tasks must share backbone weights and image size: '{m.provenance.backbone}' "
                    f"({m.provenance.fingerprint[:12]}, {m.backbone.img_size} px) vs '{first.provenance.backbone}' "
                    f"({first.provenance.fingerprint[:12]}, {first.backbone.img_size} px)"
                )
            if m.switches.train in ("all", "lora"):
                raise BundleError(f"method '{m.method}' changes the backbone; it cannot share one with other tasks")
        self.backbone = first.backbone
        for m in models:
            m.backbone = self.backbone  # one copy of the frozen weights
        self.tasks = nn.ModuleList(models)
        self.names = list(names) if names is not None else [f"task_{i}" for i in range(len(models))]
        layouts: dict[tuple, list[int]] = {}
        for i, m in enumerate(models):
            layouts.setdefault(m.layout, []).append(i)
        self.layout_groups = list(layouts.values())
        self.eval()

    @classmethod
    def from_bundles(cls, paths: Sequence[str | Path], weights: str | Path | None = None) -> MultiTaskModel:
        """Load bundles onto a single backbone instance (loaded once, fingerprint checked for each bundle)."""

        if not paths:
            raise BundleError("MultiTaskModel needs at least one bundle")
        provs = [read_manifest(p)["provenance"] for p in paths]
        for p, prov in zip(paths[1:], provs[1:], strict=True):
            a, b = provs[0], prov
            if (a["backbone"], a["fingerprint"], a["img_size"]) != (b["backbone"], b["fingerprint"], b["img_size"]):
                raise BundleError(
                    f"bundles {paths[0]} and {p} were trained on different backbones: '{a['backbone']}' "
                    f"(weights {str(a['fingerprint'])[:12]}, {a['img_size']} px) and '{b['backbone']}' "
                    f"(weights {str(b['fingerprint'])[:12]}, {b['img_size']} px); tasks served together must share "
                    "one backbone, so predict them in separate runs"
                )
        first = load_bundle(paths[0], weights=weights)
        models = [first] + [load_bundle(p, weights=weights, backbone_module=first.backbone) for p in paths[1:]]
        return cls(models, names=[Path(p).name if Path(p).name != "bundle" else Path(p).parent.name for p in paths])

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample logits (each over its own task's classes)."""
        task_ids = torch.as_tensor(task_ids, device=x.device)
        out: list[torch.Tensor | None] = [None] * x.shape[0]
        for members in self.layout_groups:
            mask = torch.isin(task_ids, torch.as_tensor(members, device=x.device))
            rows = mask.nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            lead = self.tasks[members[0]]
            feats = lead.forward_features(
                x[rows], prompts=MixedPrompts([self.tasks[i] for i in members], members, task_ids[rows])
            )
            for t in members:
                sel = (task_ids[rows] == t).nonzero(as_tuple=True)[0]
                if sel.numel():
                    for r, logit in zip(rows[sel].tolist(), self.tasks[t].forward_head(feats[sel]), strict=True):
                        out[r] = logit
        return out  # type: ignore[return-value]


class MixedPrompts:
    """A prompt source for one batch of mixed tasks: each sample gets its own task's tokens, VRM and gates."""

    def __init__(self, models: list[PathoTuneModel], members: list[int], task_ids: torch.Tensor) -> None:
        self.models = models
        self.local = torch.as_tensor([members.index(int(t)) for t in task_ids], device=task_ids.device)

    def group_tokens(self, group: str, layer: int, h: torch.Tensor, inst: torch.Tensor | None) -> torch.Tensor:
        if not self.models[0].prompt_groups[group].per_image:  # task-level tokens: one row per task, gathered
            return torch.cat([m.group_tokens(group, layer, h[:1], inst) for m in self.models])[self.local]
        out = None
        for j, m in enumerate(self.models):
            rows = (self.local == j).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            tok = m.group_tokens(group, layer, h[rows], None if inst is None else inst[rows])
            if out is None:
                out = h.new_zeros(h.shape[0], *tok.shape[1:])
            out[rows] = tok
        return out

    def group_gate(self, group: str, layer: int) -> torch.Tensor:
        return torch.stack([m.group_gate(group, layer) for m in self.models])[self.local]
