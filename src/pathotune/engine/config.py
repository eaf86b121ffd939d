"""Typed run configuration. YAML keys mirror the CLI flags; unknown or ill-typed keys fail on one line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..core.config import build_config
from ..core.runtime import parse_loggers
from ..switches import check_keys

# What Lightning Fabric accepts, checked here so that a typo fails on one line before Fabric starts.
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


class TaskConfig(BaseModel):
    """The task description that textual prompts encode; classes come from the data."""

    model_config = ConfigDict(extra="forbid")
    name: str = "tissue classification"
    organ: str = "tissue"
    stain: str = "H&E"
    description: str = ""
    text: str | None = None  # free text that replaces the rendered template entirely ("" encodes empty text)
    shuffle_classes: bool = False  # control: class names in the text permuted (seeded), so they mislabel
    # What TTP reads instead of the task's own text encoding (text/controls.py): "empty" (the empty string),
    # "random" (a seeded random vector of the real encoding's norm), "unrelated" (an unrelated sentence)
    control: Literal["none", "empty", "random", "unrelated"] = "none"
    class_descriptions: dict[str, str] = Field(default_factory=dict)  # class -> short text (ttp_text=classes)


class ProbeConfig(BaseModel):
    """How the linear probe is fitted (engine/probe.py)."""

    model_config = ConfigDict(extra="forbid")
    features: Literal["standardized", "raw"] = "standardized"
    # "val": from a log grid on validation; "cv": by cross-validation inside train + val, then fitted on both;
    # "uni": UNI's fixed rule C = feature dim x classes / 100, fitted on train + val; or a number
    c: Literal["val", "cv", "uni"] | float = "val"
    views: int = 0  # features of this many augmented views of every training tile (the training augmentation)
    folds: int = 5  # cross-validation folds for c: cv (fewer when a class has fewer labels)

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
    model_config = ConfigDict(extra="forbid")

    data: str
    backbone: str = "dinov2_vits14"
    weights: str | None = None  # a local file/folder, "bundled", or None for the backbone's default
    method: str = "pathotune"
    switches: dict = Field(default_factory=dict)
    backbone_kwargs: dict = Field(default_factory=dict)
    task: TaskConfig = Field(default_factory=TaskConfig)
    image_size: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    skip_bad: bool = False
    augment: Literal["pathology", "none"] = "pathology"
    steps: int | None = None  # the budget in optimizer steps; None: --epochs, else the method's default
    epochs: int | None = None  # converted to steps and raised to min_steps
    min_steps: int | None = None  # None: the method's floor
    eval_every: int | None = None  # steps between validation passes; None: 20 over the budget
    warmup_fraction: float | None = None
    batch_size: int = 32
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float | None = None
    grad_accum: int = 1
    monitor: Literal["balanced_accuracy", "accuracy", "macro_f1", "auroc", "loss"] = "balanced_accuracy"
    patience: int = 5  # evaluations without a better smoothed validation score, after min_steps
    head_init: Literal["probe", "random"] | None = None  # None: the method's (probe for every trained method)
    probe_refit: bool = False  # linear: refit on train + val with the C chosen on val
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    select_groups: bool = True  # keep only the prompt groups that help on validation
    # How validation chooses the step and the prompt groups (engine/selection.py): "significant" leaves step 0
    # (the probe) or keeps a group only when a paired bootstrap over validation groups says the gain beats its
    # noise; "best" takes the best score; "cv" chooses the step by cross-validation over train + val
    selection: Literal["significant", "best", "cv"] = "significant"
    selection_alpha: float = 0.05  # one-sided level of the significance rule
    selection_folds: int = 5  # folds of selection: cv
    tta: bool = False  # also score with test-time augmentation (the 8 rot90 x flip views averaged)
    split_seed: int | None = None  # None: the data's own split; a number: a group k-fold split drawn with it
    cache_features: bool = True  # head-only methods train on features computed once
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    logger: list[str] = Field(default_factory=lambda: ["csv"])  # experiment loggers: csv, tensorboard, mlflow, wandb
    bootstrap: int = 1000
    out: str = "runs/latest"
    resume: bool = False  # continue the run in ``out`` from its checkpoint (same settings)
    overwrite: bool = False  # replace a run already in ``out``, once the new one has finished

    @field_validator("switches")
    @classmethod
    def _known_switches(cls, v: dict) -> dict:
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
        if str(v) not in PRECISIONS:
            raise ValueError(f"must be one of {list(PRECISIONS)}")
        return str(v)

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


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """The training config: YAML (optional) plus flags."""
    return build_config(TrainConfig, path, **overrides)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
