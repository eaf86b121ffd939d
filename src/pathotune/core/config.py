"""Typed settings from YAML plus flags, for any run: unknown or ill-typed keys fail on one line.

Each command keeps its own pydantic model (the patch run's ``TrainConfig`` in ``engine``, MIL's in ``mil``) and
builds it here, so a bad key reads the same whichever command met it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

__all__ = ["LOGGERS", "build_config", "parse_loggers", "read_yaml_mapping"]

M = TypeVar("M", bound=BaseModel)

# Experiment loggers a run can stream its validation curves to (``--logger`` / ``logger:``; core/runtime.py
# builds them). Here, not there, so that a config module can check the names without importing torch.
LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")


def _one_line(e: ValidationError, source: str, model: type[BaseModel]) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(root)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_at(model, err["loc"][:-1])
        return f"{source}: unknown key '{key}'; allowed keys are {allowed}"
    if err["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:
        return f"{source}: {msg}"
    return f"{source}: key '{key}': {msg} (got {err.get('input')!r})"


def _allowed_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return sorted(model.model_fields)


def read_yaml_mapping(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def build_config(model: type[M], path: str | Path | None = None, **overrides) -> M:
    """A typed config from YAML (optional) with flag overrides on top; None-valued overrides are ignored.

    Nested mappings merge key by key. Any bad key fails on one line naming the file (or "flags") and the key.
    """
    data = read_yaml_mapping(path) if path is not None else {}
    source = str(path) if path is not None else "flags"
    for k, v in overrides.items():
        if v is None:
            continue
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    try:
        return model(**data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, source, model)) from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_loggers(value: str | Sequence[str] | None) -> list[str]:
    """Logger names from ``"csv,tensorboard"``, a list of names or comma lists, or None (none); ``none`` is none.

    Raises ValueError naming an unknown logger (the config turns it into one line naming the key).
    """
    items = [value] if isinstance(value, str) else list(value or [])
    names = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in (*LOGGERS, "none")]
    if unknown:
        raise ValueError(f"unknown logger '{unknown[0]}'; choose from {', '.join(LOGGERS)} or none")
    return list(dict.fromkeys(n for n in names if n != "none"))
