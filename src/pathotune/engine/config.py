"""Typed run configuration. YAML keys mirror the CLI flags; unknown or ill-typed keys fail on one line.

Each field's ``description`` is its help, written once: ``pathotune train`` builds its flags from these fields
(cli/config_flags.py), so this module stays light (no torch) for the CLI to import before it parses.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..core.config import build_config, parse_loggers

# What Lightning Fabric accepts, checked here so that a typo fails on one line before Fabric starts.
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

# Every command that runs a model (train, eval, predict, slides extract) shares this default and this help.
DEFAULT_PRECISION = "32-true"
PRECISION_HELP = (
    "Numeric precision: 32-true (the default: float32, the same numbers on CPU and GPU), bf16-mixed, 16-mixed... "
    "(Lightning's names), or auto: bf16 autocast on a CUDA GPU (16-mixed where bf16 is missing), 32-true elsewhere."
)


def check_precision(value: object) -> str:
    """A precision Fabric accepts, or ``auto`` (:func:`core.runtime.auto_precision` resolves it)."""
    if str(value) not in (*PRECISIONS, "auto"):
        raise ValueError(f"must be one of {list(PRECISIONS)} or auto")
    return str(value)


class TaskConfig(BaseModel):
    """The task description that textual prompts encode; classes come from the data."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("tissue classification", description="The task's name in the rendered task text.")
    organ: str = Field("tissue", description="The organ named in the rendered task text.")
    stain: str = Field("H&E", description="The stain named in the rendered task text.")
    description: str = Field("", description="A sentence about the task added to the rendered task text.")
    text: str | None = Field(
        None,
        description='Free text describing the task for TTP; replaces the rendered template entirely ("" encodes '
        "empty text).",
    )
    shuffle_classes: bool = Field(
        False, description="Control: class names in the task text permuted (seeded), so they mislabel."
    )
    control: Literal["none", "empty", "random", "unrelated"] = Field(
        "none",
        description="TTP control, read instead of the task's own text encoding (text/controls.py): empty (the "
        "empty string), random (a seeded random vector of the real encoding's norm), unrelated (an unrelated "
        "sentence).",
    )
    class_descriptions: dict[str, str] = Field(
        default_factory=dict, description="Class name -> short text (switch ttp_text=classes); YAML only."
    )


ProbeC = Literal["val", "cv", "uni"]
PROBE_C_RULES = typing.get_args(ProbeC)


class ProbeConfig(BaseModel):
    """How the linear probe is fitted (engine/probe.py)."""

    model_config = ConfigDict(extra="forbid")
    features: Literal["standardized", "raw"] = Field(
        "standardized", description="Probe features: standardized (per feature, on train) or raw."
    )
    c: ProbeC | float = Field(
        "val",
        description="Probe C: val (from a log grid on validation), cv (by cross-validation inside train + val, "
        "then fitted on both), uni (UNI's fixed rule C = feature dim x classes / 100, fitted on train + val), "
        "or a number.",
    )
    views: int = Field(
        0,
        description="Probe on the features of this many augmented views of every training tile (the training "
        "augmentation; 0: the tiles alone).",
    )
    folds: int = Field(5, description="Cross-validation folds for probe C cv (fewer when a class has fewer labels).")

    @field_validator("c", mode="before")
    @classmethod
    def _c_text(cls, v: object) -> object:
        """A keyword or a number, as text too (the flag gives text): one message for anything else."""
        if isinstance(v, str) and v not in PROBE_C_RULES:
            try:
                return float(v)
            except ValueError:
                raise ValueError("must be val, cv, uni or a number > 0") from None
        return v

    @field_validator("c")
    @classmethod
    def _c(cls, v: str | float) -> str | float:
        if not isinstance(v, str) and not (v > 0 and math.isfinite(v)):
            raise ValueError("must be val, cv, uni or a number > 0")
        return v

    @field_validator("views")
    @classmethod
    def _views(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be >= 2")
        return v


class TrainConfig(BaseModel):
    """One patch-level training run (``pathotune train``): YAML keys, flags and the run's config.yaml alike."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Folder, CSV manifest, or layout:<name>:<path>.")
    backbone: str = Field("dinov2_vits14", description="Backbone id (see `pathotune backbones`).")
    weights: str | None = Field(
        None,
        description="Local weights file/folder (the default), 'bundled', 'random', or hf-hub:owner/repo[@rev][:file] "
        "via the Hugging Face cache ('hf-hub': the backbone's own repo; HF_TOKEN, HF_HUB_OFFLINE apply); unset: "
        "the backbone's default.",
    )
    method: str = Field("pathotune", description="Method (see `pathotune methods`).")
    switches: dict = Field(default_factory=dict, description="Prompt switches, name -> value (flag: --switch).")
    backbone_kwargs: dict = Field(
        default_factory=dict,
        description="Architecture overrides passed to timm (tiny test models, drop-path rates...); YAML only.",
    )
    task: TaskConfig = Field(default_factory=TaskConfig, description="The task text that textual prompts encode.")
    image_size: int | None = Field(None, description="Input size in pixels (default: the backbone's).")
    val_fraction: float = Field(
        0.2, description="Share carved out for validation where the data defines no val split (or with --split-seed)."
    )
    test_fraction: float = Field(
        0.0, description="Share carved out for testing where the data defines no test split (or with --split-seed)."
    )
    skip_bad: bool = Field(False, description="Go on without unreadable files.")
    augment: Literal["pathology", "none"] = Field("pathology", description="Training augmentation.")
    steps: int | None = Field(
        None, description="Budget in optimizer steps (unset: --epochs, else the method's default)."
    )
    epochs: int | None = Field(None, description="Budget in epochs, converted to steps and raised to --min-steps.")
    min_steps: int | None = Field(None, description="The least number of steps a run trains (unset: the method's).")
    eval_every: int | None = Field(
        None, description="Steps between validation passes (unset: 20 passes over the budget)."
    )
    warmup_fraction: float | None = Field(
        None, description="Share of the budget spent warming the learning rate up (unset: the method's)."
    )
    batch_size: int = Field(
        32, description="Images per batch, over all devices (an optimizer step takes --grad-accum batches)."
    )
    lr: float | None = Field(None, description="Learning rate of prompts/adapters/backbone (unset: the method's).")
    head_lr: float | None = Field(None, description="Learning rate of the classification head (unset: the method's).")
    weight_decay: float | None = Field(None, description="AdamW weight decay (unset: the method's).")
    grad_accum: int = Field(1, description="Batches accumulated into each optimizer step.")
    monitor: Literal["balanced_accuracy", "accuracy", "macro_f1", "auroc", "loss"] = Field(
        "balanced_accuracy", description="The validation score that selects steps and stops early."
    )
    patience: int = Field(
        5, description="Evaluations without a better smoothed validation score, after --min-steps, before stopping."
    )
    head_init: Literal["probe", "random"] | None = Field(
        None, description="Head start: probe (LP-FT) or random (unset: the method's, probe for every trained method)."
    )
    probe_refit: bool = Field(False, description="linear: refit on train + val with the C chosen on val.")
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="How the linear probe is fitted.")
    select_groups: bool = Field(True, description="Keep only the prompt groups that help on validation.")
    selection: Literal["significant", "best", "cv"] = Field(
        "significant",
        description="How validation chooses the step and the prompt groups (engine/selection.py): significant "
        "leaves step 0 (the probe) or keeps a group only when a paired bootstrap over validation groups says the "
        "gain beats its noise; best takes the best score; cv chooses the step by cross-validation over train + val "
        "(small data).",
    )
    selection_alpha: float = Field(0.05, description="One-sided level of the significant selection rule.")
    selection_folds: int = Field(5, description="Folds of selection cv.")
    tta: bool = Field(False, description="Also score with test-time augmentation (the 8 rot90 x flip views averaged).")
    split_seed: int | None = Field(
        None, description="Draw a group k-fold split with this seed (unset: the data's own split)."
    )
    cache_features: bool = Field(True, description="Head-only methods train on features computed once.")
    seed: int = Field(0, description="Random seed of the run.")
    num_workers: int = Field(0, description="Image-decoding loader processes.")
    accelerator: str = Field("auto", description=f"Accelerator: {', '.join(ACCELERATORS)}.")
    devices: int | str = Field(1, description="Devices per node: a count, -1 (all), 'auto' or indices such as '0,1'.")
    num_nodes: int = Field(1, description="Machines (SLURM: one task per device).")
    strategy: str = Field("auto", description="Fabric strategy: auto, ddp...")
    precision: str = Field(DEFAULT_PRECISION, description=PRECISION_HELP)
    logger: list[str] = Field(
        default_factory=lambda: ["csv"],
        description="Experiment loggers: csv (default), tensorboard, mlflow, wandb, none; repeat or a,b.",
    )
    bootstrap: int = Field(1000, description="Bootstrap resamples for the test metrics' confidence intervals.")
    out: str = Field("runs/latest", description="Run directory.")
    resume: bool = Field(False, description="Continue the unfinished run in --out from its checkpoint (same settings).")
    overwrite: bool = Field(False, description="Replace the run in --out, once the new one has finished.")

    @field_validator("switches")
    @classmethod
    def _known_switches(cls, v: dict) -> dict:
        # switches names its options from the prompt kinds, which load torch: imported here, on validation, so that
        # the CLI can build train's flags from this module before it parses (tests/test_layers.py, LAZY)
        from ..switches import check_keys

        check_keys(v)
        return v

    @field_validator("batch_size", "grad_accum", "patience", "num_nodes", "steps", "epochs", "eval_every")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("lr", "head_lr", "weight_decay")
    @classmethod
    def _positive_rate(cls, v: float | None) -> float | None:
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise ValueError("must be a finite number >= 0")
        return v

    @field_validator("selection_alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0.0 < v < 0.5:
            raise ValueError("must be in (0, 0.5)")
        return v

    @field_validator("selection_folds")
    @classmethod
    def _selection_folds(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be >= 2")
        return v

    @field_validator("num_workers", "seed", "bootstrap", "min_steps", "split_seed")
    @classmethod
    def _not_negative(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("image_size")
    @classmethod
    def _pixels(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be a positive number of pixels")
        return v

    @field_validator("warmup_fraction")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, v: object) -> str:
        return check_precision(v)

    @field_validator("logger", mode="before")
    @classmethod
    def _loggers(cls, v: object) -> list[str]:
        if v is not None and not isinstance(v, (str, list, tuple)):
            raise ValueError("must be a logger name, a comma list or a list of names (csv, tensorboard, mlflow, wandb)")
        return parse_loggers(v)  # type: ignore[arg-type]

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, v: str) -> str:
        if v not in ACCELERATORS:
            raise ValueError(f"must be one of {list(ACCELERATORS)}")
        return v

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: object) -> int | str:
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1):
            return v
        parts = [p.strip() for p in v.split(",")] if isinstance(v, str) else []
        if v == "auto" or (parts and all(p.isdigit() for p in parts)):
            return v
        raise ValueError("must be a number of devices >= 1, -1 (all), 'auto', or device indices such as '0,1'")

    @model_validator(mode="after")
    def _resume_or_overwrite(self) -> TrainConfig:
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
        return self


def load_config(
    path: str | Path | None = None, *, flag_names: Mapping[str, str] | None = None, **overrides
) -> TrainConfig:
    """The training config: YAML (optional) plus flags; ``flag_names`` (dotted key -> ``--flag``, from
    cli/config_flags.py) lets a bad value name the flag that gave it."""
    return build_config(TrainConfig, path, flag_names=flag_names, **overrides)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
