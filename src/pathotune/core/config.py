"""Typed settings from YAML plus flags, for any run: unknown or ill-typed keys fail on one line.

Each command keeps its own pydantic model (the patch run's ``TrainConfig`` in ``engine``, MIL's in ``mil``) and
builds it here, so a bad key reads the same whichever command met it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
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


def _one_line(e: ValidationError, source: str, model: type[BaseModel], flags: Mapping[str, str] | None = None) -> str:
    """The first error on one line, blamed on the flag that gave the value (``flags``: key -> flag) or on ``source``."""
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
    loc = [str(p) for p in _field_path(model, err["loc"])]
    key = ".".join(loc)
    # the flag that set the field, or the one above it (``--logger`` for ``logger.1``)
    flag = next((f for i in range(len(loc), 0, -1) if (f := (flags or {}).get(".".join(loc[:i])))), None)
    if flag is not None:  # worded as click words a value it rejects itself
        return f"Invalid value for '{flag}' (key '{key}'): {msg} (got {err.get('input')!r})"
    return f"{source}: key '{key}': {msg} (got {err.get('input')!r})"


def _field_path(model: type[BaseModel], loc: tuple) -> tuple:
    """``loc`` without the member that pydantic names below a union-typed field (``probe.c.float`` -> ``probe.c``)."""
    current: type[BaseModel] | None = model
    for i, part in enumerate(loc):
        field = current.model_fields.get(str(part)) if current is not None else None
        if field is None:
            return loc
        sub = field.annotation
        if typing.get_origin(sub) in (typing.Union, types.UnionType):
            return loc[: i + 1]
        current = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
    return loc


def _given(overrides: Mapping, key: str) -> bool:
    node: object = overrides
    for part in key.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return False
        node = node[part]
    return True


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


def build_config(
    model: type[M], path: str | Path | None = None, *, flag_names: Mapping[str, str] | None = None, **overrides
) -> M:
    """A typed config from YAML (optional) with flag overrides on top; None-valued overrides are ignored.

    Nested mappings merge key by key. Any bad key fails on one line naming the file (or "flags") and the key;
    ``flag_names`` (dotted key -> ``--flag``) names the flag instead where one gave the bad value.
    """
    data = read_yaml_mapping(path) if path is not None else {}
    source = str(path) if path is not None else "flags"
    for k, v in overrides.items():
        if v is None:
            continue
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    given = {k: f for k, f in (flag_names or {}).items() if _given(overrides, k)}
    try:
        return model(**data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, source, model, given)) from None
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
