"""PathoTuneModel: a frozen ViT with prompt groups (TTP, IVP, TVP...) inserted between its blocks, and a head.

About 450 lines on purpose: composing the prompt groups, the block walk and the parameter bookkeeping share the
model's state; the prompt kinds (``prompts/``: each builds itself from the switches, the model names none), the
prompted attention and the backbones live elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

import timm
import torch
from peft import LoraConfig, inject_adapter_in_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbones import TokenViT, bundled_cnn_file, create_backbone, get_backbone_spec
from .backbones.loading import fingerprint, read_state_dict
from .backbones.vit import take_old_image_size
from .errors import ConfigError
from .methods import get_method
from .prompts import BuildContext, InstanceEncoder, PromptGroup, prompt_kinds, sequence_order
from .prompts.attention import check_block, prompted_block
from .report import trainable_percent
from .switches import Switches
from .task import Task
from .text import encode_texts

# How a model is saved, loaded and shared as a bundle: ``pathotune.bundle`` (a higher layer, imported by the
# package's __init__) fills it with "save", "load" and "push", so the methods below need no upward import.
BUNDLE_IO: dict[str, Callable] = {}


def _bundle_io(name: str) -> Callable:
    """The bundle format's ``save``/``load``/``push``: ``pathotune.bundle`` sits above this module (it builds models
    through ``create_model``) and registers them in :data:`BUNDLE_IO` when it is imported, which happens here on
    first use, whatever the caller imported before."""
    if name not in BUNDLE_IO:
        import_module("pathotune.bundle")
    return BUNDLE_IO[name]


class PromptSource(Protocol):
    """Where a forward takes prompt tokens and gates from: a model itself, or MultiTaskModel's per-sample mix."""

    def group_tokens(self, group: str, layer: int, h: torch.Tensor, inst: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def group_gate(self, group: str, layer: int) -> torch.Tensor: ...


@dataclass
class Provenance:
    """Where the frozen parts came from; bundles record it and refuse to load onto anything else."""

    backbone: str
    weights: str | None
    fingerprint: str
    image_size: int
    backbone_kwargs: dict = field(default_factory=dict)
    instance_encoder: str | None = None
    instance_weights: str | None = None
    instance_fingerprint: str | None = None


class PathoTuneModel(nn.Module):
    """Image -> tokens -> prompted frozen blocks -> pooled feature -> head."""

    bundle_extra: dict | None = None  # a loaded bundle's evidence (metrics, intervals, recipe), kept on re-save

    def __init__(
        self,
        backbone: TokenViT,
        num_classes: int,
        switches: Switches,
        method: str,
        task: Task,
        provenance: Provenance,
        context: BuildContext | None = None,
    ) -> None:
        """``context``: what the prompt kinds build from besides the switches (``create_model`` supplies the text
        encoder and the second-encoder factory; without them, kinds that need one refuse)."""
        super().__init__()
        s = switches
        self.switches, self.method, self.task, self.provenance = s, method, task, provenance
        self.num_classes = num_classes
        self.backbone = backbone
        depth = backbone.depth
        ctx = context or BuildContext(backbone, num_classes, task, provenance)
        kinds = prompt_kinds()
        for kind in kinds:  # every kind prepares before any builds: one fixed order of random draws
            ctx.prepared[kind.kind] = kind.prepare(s, ctx)
        for kind in kinds:  # each kind's group is the attribute of its name (tensors are "tvp.tokens"...)
            self.register_module(kind.kind, kind.build(s, ctx))

        self._plan_layers()
        if self.groups:
            check_block(backbone.blocks[0])
        heads = int(backbone.blocks[0].attn.num_heads)
        # Zero-initialised per-layer, per-head gates: at step 0 every prompt group is exactly a no-op.
        self.gates = nn.ParameterDict(
            {g: nn.Parameter(torch.zeros(depth - self.first_layer[g], heads)) for g in self.groups}
            if s.prompt_attn == "gated"
            else {}
        )

        self.head_drop = nn.Dropout(s.head_dropout)
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self._set_trainable()

    def _plan_layers(self) -> None:
        """Where each group (re)enters, and after which blocks a group's output tokens are still read."""
        depth = self.backbone.depth
        self.schedule: dict[int, list[str]] = {}
        for kind, group in self.prompt_groups.items():
            for layer in group.layers:
                self.schedule.setdefault(layer, []).append(kind)
        self.first_layer = {kind: group.layers[0] for kind, group in self.prompt_groups.items()}
        self.keep: dict[int, set[str]] = {}
        for i in range(depth):
            present = {g for g in self.groups if self.first_layer[g] <= i}
            after = present - set(self.schedule.get(i + 1, ())) if i + 1 < depth else set()
            self.keep[i] = present if i + 1 == depth and self.switches.pool_prompts else after

    def drop_groups(self, names: list[str]) -> None:
        """Remove prompt groups for good (validation found they do not help): no tensors, no inference cost."""
        off: dict = {}
        for g in names:
            group = self.prompt_groups[g]
            group.release(self.provenance)
            off.update(type(group).off)
            setattr(self, g, None)
            if g in self.gates:
                del self.gates[g]
        self.switches = self.switches.update(**off)
        self._plan_layers()

    def param_groups(self, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        """The optimiser's groups: the head at ``head_lr``, the rest at ``lr``; no decay on biases, norms, gates
        and whatever each prompt group declares (its tokens are not weights)."""
        no_decay = {f"gates.{g}" for g in self.gates}
        for kind, group in self.prompt_groups.items():
            no_decay |= {f"{kind}.{name}" for name in group.no_decay}
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                decay = p.ndim > 1 and name not in no_decay
                groups.setdefault((name.startswith("head."), decay), []).append(p)
        return [
            {"params": ps, "lr": head_lr if is_head else lr, "weight_decay": weight_decay if decay else 0.0}
            for (is_head, decay), ps in groups.items()
        ]

    # training set-up
    def _set_trainable(self) -> None:
        self.requires_grad_(False)
        self.head.requires_grad_(True)
        if self.switches.train in ("prompts", "all", "lora"):
            for m in (*self.prompt_groups.values(), self.gates):
                m.requires_grad_(True)
        if self.switches.train == "all":
            self.backbone.requires_grad_(True)
        if self.switches.train == "lora":
            self._inject_lora()

    def _inject_lora(self) -> None:

        s = self.switches
        config = LoraConfig(
            r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=s.lora_targets
        )
        inject_adapter_in_model(config, self.backbone.vit)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_("lora_" in name)

    def train(self, mode: bool = True) -> PathoTuneModel:
        super().train(mode)
        if self.switches.train not in ("all", "lora"):
            self.backbone.eval()  # frozen: keep dropout/drop-path off even while prompts train
        return self

    def trainable_parameters(self) -> dict:
        """Counts as peft reports them, plus a breakdown by top-level module."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        by_module: dict[str, int] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = name.split(".")[0]
                by_module[key] = by_module.get(key, 0) + p.numel()
        return {
            "trainable": trainable,
            "total": total,
            "percent": trainable_percent(trainable, total),
            "by_module": by_module,
        }

    def print_trainable_parameters(self) -> None:
        """peft's line, with peft's four decimals (reports round the same value to two)."""
        t = self.trainable_parameters()
        print(f"trainable params: {t['trainable']:,} || all params: {t['total']:,} || trainable%: {t['percent']:.4f}")

    # forward
    def _instance_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What each per-image group reads from the whole image before the blocks run, by group (a second frozen
        pass); groups that read the image tokens entering their block are absent."""
        read = {g: group.read_image(x, self.backbone) for g, group in self.prompt_groups.items()}
        return {g: t for g, t in read.items() if t is not None}

    @property
    def prompt_groups(self) -> dict[str, PromptGroup]:
        """This model's prompt groups by kind, in sequence order."""
        return {g: getattr(self, g) for g in sequence_order() if getattr(self, g, None) is not None}

    @property
    def groups(self) -> list[str]:
        """The kinds of prompt this model has, in sequence order (empty: the plain frozen model and its head)."""
        return list(self.prompt_groups)

    def group_tokens(self, group: str, layer: int, h: torch.Tensor, inst: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens of ``group`` entering before block ``layer``: it reads its entry of ``inst`` (what it read from
        the image), else the image tokens ``h``."""
        return getattr(self, group)(layer, h.shape[0], inst.get(group, h)).to(h.dtype)

    def group_gate(self, group: str, layer: int) -> torch.Tensor:
        """The (H,) gate of ``group`` in block ``layer``, through tanh."""
        return torch.tanh(self.gates[group][layer - self.first_layer[group]])

    @property
    def layout(self) -> tuple:
        """Everything that fixes the token sequence; models with equal layouts can share one batched forward."""
        s, groups = self.switches, self.prompt_groups
        counts = tuple(groups[g].num_tokens if g in groups else 0 for g in sequence_order())
        sched = tuple(sorted((k, tuple(v)) for k, v in self.schedule.items()))
        keys = tuple((g, group.layout_key()) for g, group in groups.items())
        return (counts, sched, keys, s.pool_prompts, s.prompt_attn, self.provenance.instance_fingerprint)

    def forward_features(self, x: torch.Tensor, prompts: PromptSource | None = None) -> torch.Tensor:
        """Output tokens (B, N, D) after the final norm, as timm's ``VisionTransformer.forward_features``.

        Order: the backbone's prefix tokens (class, registers), then, only with ``pool_prompts``, the prompt
        outputs carried to the last block (in the kinds' order), then the patch tokens. With every prompt off (or
        gated to 0) these are the frozen backbone's tokens. Pool them with ``forward_head(tokens, pre_logits=True)``.

        ``prompts`` replaces this model as the source of prompt tokens and gates; MultiTaskModel uses it to give
        each sample its own task's prompts.
        """
        bb = self.backbone
        src = prompts or self
        inst = self._instance_tokens(x)
        h = bb.embed(x)
        carried: dict[str, torch.Tensor] = {}
        use_ckpt = self.switches.grad_checkpointing and self.training and torch.is_grad_enabled()
        gated = self.switches.prompt_attn == "gated"
        for i, blk in enumerate(bb.blocks):
            for group in self.schedule.get(i, ()):
                carried[group] = src.group_tokens(group, i, h, inst)
            if not carried:
                h = checkpoint(blk, h, use_reentrant=False) if use_ckpt else blk(h)
                continue
            names = [g for g in self.groups if g in carried]
            gates = [src.group_gate(g, i) for g in names] if gated else None
            keep = [g in self.keep[i] for g in names]
            args = (blk, h, [carried[g] for g in names], gates, keep)
            h, outs = checkpoint(prompted_block, *args, use_reentrant=False) if use_ckpt else prompted_block(*args)
            carried = {g: o for g, o in zip(names, outs, strict=True) if o is not None}
        if carried:  # only when pool_prompts: avg pooling may read the prompt outputs
            p = bb.num_prefix_tokens
            h = torch.cat([h[:, :p], *carried.values(), h[:, p:]], dim=1)
        return bb.final_norm(h)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) from ``forward_features`` -> the backbone's pooling (cls, avg, fc_norm, attentional, as
        configured) -> (B, feature_dim) with ``pre_logits``, else head dropout and head -> (B, num_classes).

        Deprecated, kept for one release: a 2-D ``x`` is taken as already pooled features (the old contract) and
        gets the head only, with a FutureWarning; call :meth:`logits_from_pooled` for that.
        """
        if x.ndim == 2:
            warnings.warn(
                "PathoTuneModel.forward_head now takes tokens (B, N, D) from forward_features, as timm does; for "
                "pooled features (B, D) call model.logits_from_pooled(features) (pooled features are "
                "model.forward_head(model.forward_features(x), pre_logits=True)). 2-D input stops working in "
                "the next release.",
                FutureWarning,
                stacklevel=2,
            )
            return x if pre_logits else self.logits_from_pooled(x)
        pooled = self.backbone.pool_tokens(x)
        return pooled if pre_logits else self.logits_from_pooled(pooled)

    def logits_from_pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Head dropout and head on pooled features (..., feature_dim): cached or stored features need no
        backbone (the linear probe, slide heatmaps from feature files, per-task heads of a mixed batch)."""
        return self.head(self.head_drop(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"PathoTuneModel takes a normalised (B, 3, H, W) tensor, not a {type(x).__name__}; for images use "
                "model.predict(images), or pathotune.transforms(model) to make the tensor"
            )
        return self.forward_head(self.forward_features(x))

    @property
    def class_names(self) -> list[str]:
        return list(self.task.classes) if self.task.classes else [f"class_{i}" for i in range(self.num_classes)]

    @property
    def pretrained_cfg(self) -> dict:
        """timm's description of the input this model takes (``timm.data.resolve_data_config`` reads it): the
        backbone's size and normalisation, bilinear resampling, the whole tile centred."""
        size = int(self.backbone.image_size)
        spec = self.backbone.spec
        return {
            "input_size": (3, size, size),
            "interpolation": "bilinear",
            "mean": tuple(float(v) for v in spec.mean),
            "std": tuple(float(v) for v in spec.std),
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": self.num_classes,
            "architecture": spec.timm_name,
        }

    def predict(self, images: Any, batch_size: int = 32, device: str | torch.device | None = None) -> Any:
        """Labels and class probabilities for PIL images, HxWx3 uint8 arrays, image paths or a folder
        (:func:`pathotune.inference.predict`: the evaluation pipeline of ``pathotune predict``)."""
        return import_module("pathotune.inference").predict(self, images, batch_size=batch_size, device=device)

    def save_pretrained(
        self, path: str | Path, metrics: dict | None = None, command: str | None = None, overwrite: bool = False
    ) -> Path:
        """Save as peft does: a bundle (manifest.json: the config; prompts.safetensors: the trained prompts, head
        and needed buffers, never the frozen backbone) and a model card README.md showing ``metrics`` and the
        training ``command``. Refuses an existing ``path`` unless ``overwrite``."""
        return _bundle_io("save")(self, path, metrics=metrics, command=command, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, source: str | Path, weights: str | Path | None = None, **kwargs) -> PathoTuneModel:
        """Load a bundle: a local bundle or run folder, else a Hub repo (``owner/repo`` or
        ``hf-hub:owner/repo[@revision]``). ``weights``: the backbone's, if not where the bundle says; ``kwargs``
        as ``load_bundle`` takes them (``backbone_module``, ``instance_weights``...)."""
        return _bundle_io("load")(source, weights=weights, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload pathotune bundle",
        metrics: dict | None = None,
        command: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """``save_pretrained`` into a temporary folder and upload it to ``repo_id`` (created if needed) as one
        commit, with the user's token (on branch ``revision``, or as a pull request with ``create_pr``); returns
        the commit or pull request URL."""
        return _bundle_io("push")(
            self,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            metrics=metrics,
            command=command,
            revision=revision,
            create_pr=create_pr,
        )


def build_instance_encoder(name: str, weights: str | Path | None, backbone: TokenViT) -> tuple[InstanceEncoder, str]:
    """A frozen encoder for IVP: any registered ViT, or any timm model (CNNs give their feature map)."""
    spec = get_backbone_spec(name)

    with torch.device("meta"):  # only the class is needed: a ViT-g probe must not cost gigabytes
        probe = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.model_kwargs)
    if isinstance(probe, VisionTransformer):
        enc = create_backbone(name, weights=weights)
        n_prefix, dim = enc.num_prefix_tokens, enc.embed_dim
        fp = fingerprint(enc.vit)
    else:
        enc = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.model_kwargs)
        if spec.family == "cnn" and weights in (None, "bundled"):
            weights = bundled_cnn_file(name)
        if weights is not None:
            sd = read_state_dict(weights, spec)
            sd = spec.key_map(sd) if spec.key_map else sd
            sd = {k: v for k, v in sd.items() if not k.startswith(("classifier.", "fc.", "head."))}
            enc.load_state_dict(sd, strict=True)
        n_prefix, dim = 0, int(enc.num_features)
        fp = fingerprint(enc)
    wrapped = InstanceEncoder(
        enc, n_prefix, dim, backbone.spec.mean, backbone.spec.std, spec.mean, spec.std, spec.image_size
    )
    return wrapped, fp


def create_model(
    backbone: str,
    method: str = "pathotune",
    num_classes: int = 2,
    task: Task | None = None,
    weights: str | Path | None = None,
    image_size: int | None = None,
    text_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    backbone_kwargs: dict | None = None,
    backbone_module: TokenViT | None = None,
    **switches,
) -> PathoTuneModel:
    """Build a prompt-tuned model: a frozen backbone by id, a method preset, and switch overrides.

    ``weights``: None (random init, for tests), ``"bundled"`` (weights shipped in a package), or a local file.
    ``text_features``: a precomputed (pooled, tokens) task-text encoding, which skips the text encoder.
    ``backbone_kwargs``: architecture overrides passed to timm (tiny test models, drop-path rates...).
    ``backbone_module``: an already built frozen backbone to share (serving many tasks on one backbone).
    """
    image_size = take_old_image_size(image_size, switches, "create_model")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2 (a classifier needs two classes), got {num_classes!r}")
    s = get_method(method).resolve(**switches)
    task = task or Task()
    if task.classes and len(task.classes) != num_classes:
        raise ConfigError(f"task has {len(task.classes)} classes {list(task.classes)} but num_classes={num_classes}")
    backbone_kwargs = dict(backbone_kwargs or {})
    if backbone_module is not None:
        if s.train in ("all", "lora"):
            raise ConfigError(f"method '{method}' changes the backbone, so it cannot share one")
        bb = backbone_module
    else:
        bb = create_backbone(backbone, weights=weights, image_size=image_size, pool=s.pool, **backbone_kwargs)
    if getattr(bb, "fingerprint", None) is None:
        bb.fingerprint = fingerprint(bb.vit)
    prov = Provenance(
        backbone=backbone,
        weights=None if weights is None else str(weights),
        fingerprint=bb.fingerprint,
        image_size=bb.image_size,
        backbone_kwargs=backbone_kwargs,
    )
    context = BuildContext(
        bb, num_classes, task, prov, text_features,
        encode_texts=encode_texts,
        build_encoder=lambda name, enc_weights: build_instance_encoder(name, enc_weights, bb),
    )  # fmt: skip
    return PathoTuneModel(bb, num_classes, s, method, task, prov, context)
