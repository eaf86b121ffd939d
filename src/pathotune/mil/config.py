"""One MIL experiment's settings, validated in one place."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.config import build_config
from ..core.runtime import parse_loggers
from ..errors import ConfigError
from .aggregators import aggregator_options, list_aggregators

__all__ = ["MILConfig", "load_mil_config"]


class MILConfig(BaseModel):
    """One MIL experiment; ``hidden``/``dropout`` override the aggregator's defaults when set."""

    model_config = ConfigDict(extra="forbid")

    features: str
    labels: str
    aggregator: str = "abmil"
    aggregator_kwargs: dict = Field(default_factory=dict)
    hidden: int | None = None
    dropout: float | None = None
    folds: int = 5  # used only when the CSV has neither a split nor a fold column
    val_fraction: float = 0.2
    epochs: int = 20
    warmup_epochs: int = 1
    lr: float = 2e-4
    weight_decay: float = 1e-4
    patience: int = 5
    monitor: Literal["balanced_accuracy", "accuracy", "macro_f1", "auroc", "loss"] = "balanced_accuracy"
    max_tiles: int | None = None  # random tiles per bag and training step; None uses every tile
    cache_mb: float = 4096.0  # bag features kept in memory across epochs and folds; 0 rereads every time
    seed: int = 0
    bootstrap: int = 1000  # resamples for CIs on the pooled out-of-fold predictions; 0 skips them
    accelerator: str = "cpu"
    logger: list[str] = Field(default_factory=lambda: ["csv"])  # Fabric loggers under OUT/logs (see core.runtime)
    out: str = "runs/mil"
    overwrite: bool = False  # replace the MIL run in ``out`` once the new one has finished

    @field_validator("logger", mode="before")
    @classmethod
    def _loggers(cls, v: Any) -> list[str]:
        return parse_loggers(v)

    @field_validator("aggregator")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in list_aggregators():
            raise ValueError(f"unknown aggregator; choose from {list_aggregators()}")
        return v

    @field_validator("folds")
    @classmethod
    def _two_folds(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be >= 2")
        return v

    @field_validator("epochs", "patience", "hidden", "max_tiles")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("warmup_epochs", "bootstrap", "cache_mb")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("must be between 0 and 1")
        return v

    def model_kwargs(self) -> dict[str, Any]:
        """Aggregator keyword arguments: ``aggregator_kwargs`` with ``hidden``/``dropout`` applied on top."""
        kw = dict(self.aggregator_kwargs)
        accepted = aggregator_options(self.aggregator)
        for key in ("hidden", "dropout"):
            value = getattr(self, key)
            if value is None:
                continue
            if key not in accepted:
                raise ConfigError(f"aggregator '{self.aggregator}' has no '{key}' option; unset {key}")
            kw[key] = value
        return kw


def load_mil_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> MILConfig:
    """A config from YAML (optional) with non-None overrides on top; bad keys fail on one line."""
    return build_config(MILConfig, path, **overrides)
