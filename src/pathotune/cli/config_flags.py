"""Typer options built from a pydantic config's fields, so that an option is written once: on the model.

``@config_flags(TrainConfig)`` gives a command one ``--flag`` per exposed field, its help the field's
``description`` (Literal fields show their choices, fields with a default name it). Every generated option
defaults to None, meaning "not given": the YAML's value, else the model's default, stands. The command takes
them as ``**flags`` and turns them back into the model's nested form with :func:`overrides`, which it hands to the
config loader once, with :func:`flag_names` so that a value the model rejects is blamed on its flag.

Which fields are exposed (the rule, so that a new field gets its flag with no CLI edit):

- every field whose type, ``None`` aside, is ``str``, ``int``, ``float``, ``bool``, a ``Literal``, a union of
  these (taken as text for pydantic to read: ``probe.c`` is a keyword or a number, ``devices`` a count or
  ``auto``), or ``list[str]`` (a repeatable option: ``--logger``);
- the fields of a nested model (``task``, ``probe``) under the same rule, as flat flags named
  ``--<field>-<subfield>`` (``--probe-views``), or as :data:`FLAG_NAMES` renames them (``task.text`` ->
  ``--task-text``, ``task.organ`` -> ``--organ``, ``task.stain`` -> ``--stain``, ``task.control`` ->
  ``--text-control``);
- not mappings (``switches``: the hand-written ``--switch KEY=VALUE``; ``backbone_kwargs``,
  ``task.class_descriptions``: YAML only), nor the names in :data:`NOT_FLAGS`.

A ``bool`` field that defaults to False is a plain flag that sets it (``--tta``); one that defaults to True is a
plain flag that clears it (``select_groups`` -> ``--no-select-groups``). Options that are not config fields
(``--config``, ``--seeds``, ``--switch``, ``--json``, ``--quiet``) stay declared by hand on the command.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["FLAG_NAMES", "NOT_FLAGS", "ConfigFlag", "config_flags", "flag_names", "flags_of", "overrides"]

# Nested fields whose flag is not ``<field>_<subfield>`` (the names the CLI has always had).
FLAG_NAMES: dict[str, str] = {
    "task.text": "task_text",
    "task.organ": "organ",
    "task.stain": "stain",
    "task.control": "text_control",
}

# Fields the rule would expose that stay YAML-only (none today).
NOT_FLAGS: frozenset[str] = frozenset()

F = TypeVar("F", bound=Callable[..., Any])
SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class ConfigFlag:
    """One generated option: the field's dotted path in the model, its parameter name, its typer parameter."""

    path: str  # "probe.views"
    name: str  # "probe_views" (the option is --probe-views)
    parameter: inspect.Parameter
    field: FieldInfo
    negated: bool = False  # --no-<field>: given, the field is False

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _without_none(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _flag_type(annotation: Any) -> Any | None:
    """The option's value type for a field's annotation, or None when the rule leaves the field out."""
    parts = _without_none(annotation)
    if len(parts) == 1:
        (part,) = parts
        if part in SCALARS or typing.get_origin(part) is Literal:
            return part
        if typing.get_origin(part) is list and typing.get_args(part) == (str,):
            return list[str]
        return None
    if all(p in SCALARS or typing.get_origin(p) is Literal for p in parts):
        return str  # a keyword or a number, a count or 'auto': pydantic reads the text
    return None


def _choices(kind: Any) -> tuple[str, ...]:
    return tuple(str(c) for c in typing.get_args(kind)) if typing.get_origin(kind) is Literal else ()


def _shown_default(field: FieldInfo) -> str | None:
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if value is None or isinstance(value, bool) or value == "":
        return None
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _help(field: FieldInfo, kind: Any) -> str:
    text = (field.description or "").strip()
    if kind is bool and field.default is True:  # the flag is --no-<field>
        return f"Turns off (on by default): {text[:1].lower()}{text[1:]}" if text else ""
    if kind is str:  # a union read as text: name the keywords it takes
        keywords = [c for part in _without_none(field.annotation) for c in _choices(part)]
        if keywords and not all(k in text for k in keywords):
            text += f" One of {', '.join(keywords)} or a number."
    default = _shown_default(field)
    if default is not None and "default" not in text.lower():
        text += f" Default: {default}."
    return text.replace("[", "\\[")  # typer's rich help reads [...] as markup and would drop it


def _parameter(name: str, field: FieldInfo, kind: Any) -> inspect.Parameter:
    opt = typer.Option("--" + name.replace("_", "-"), help=_help(field, kind))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, opt])


def flags_of(model: type[BaseModel], prefix: str = "") -> list[ConfigFlag]:
    """The options for ``model``'s exposed fields (the module docstring's rule), in field order."""
    out: list[ConfigFlag] = []
    for key, field in model.model_fields.items():
        path = f"{prefix}{key}"
        if path in NOT_FLAGS:
            continue
        annotation = field.annotation
        if _is_model(annotation):
            out += flags_of(annotation, prefix=f"{path}.")
            continue
        kind = _flag_type(annotation)
        if kind is None:
            continue
        name = FLAG_NAMES.get(path, path.replace(".", "_"))
        negated = kind is bool and field.default is True
        if negated:
            name = f"no_{name}"
        out.append(ConfigFlag(path, name, _parameter(name, field, kind), field, negated))
    return out


def overrides(model: type[BaseModel], given: dict[str, Any]) -> dict[str, Any]:
    """The flags given (not None), keyed and nested as ``model``'s fields: ``{"probe": {"views": 2}}``."""
    out: dict[str, Any] = {}
    for flag in flags_of(model):
        value = given.get(flag.name)
        if value is None:
            continue
        *parents, leaf = flag.path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = (not value) if flag.negated else value
    return out


def flag_names(model: type[BaseModel]) -> dict[str, str]:
    """Dotted field path -> its option (``{"probe.views": "--probe-views"}``), for errors that name the flag."""
    return {flag.path: flag.option for flag in flags_of(model)}


def config_flags(model: type[BaseModel], after: str | None = None) -> Callable[[F], F]:
    """Give a command (``def cmd(*, <hand options>, **flags)``) an option per exposed field of ``model``.

    The generated options go after the hand-written option ``after`` (first when None); a name both declare
    is an error, found when the CLI is built.
    """

    def wrap(fn: F) -> F:
        own = [
            p
            for p in inspect.signature(fn, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        generated = [f.parameter for f in flags_of(model)]
        clash = sorted({p.name for p in own} & {p.name for p in generated})
        if clash:
            raise TypeError(f"{fn.__name__} declares {clash} by hand and {model.__name__} generates them too")
        at = 0 if after is None else [p.name for p in own].index(after) + 1
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        fn.__signature__ = inspect.Signature(params[:at] + generated + params[at:])  # type: ignore[attr-defined]
        return fn

    return wrap
