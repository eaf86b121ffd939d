"""Methods are presets over one model: which prompt modules exist and which parameters train."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .switches import Switches


@dataclass(frozen=True)
class Recipe:
    """A training recipe that suits the method (learning rates for the head and for everything else)."""

    lr: float = 1e-3
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 30
    warmup_epochs: int = 1


@dataclass(frozen=True)
class Method:
    name: str
    switches: dict = field(default_factory=dict)
    recipe: Recipe = field(default_factory=Recipe)
    description: str = ""

    def resolve(self, **overrides) -> Switches:
        return Switches().update(**{**self.switches, **overrides})


_TVP = {"tvp_tokens": 10}
_TVP_DEEP = {"tvp_tokens": 10, "tvp_deep": True}
_TTP = {"ttp_tokens": 4}
_IVP = {"ivp_tokens": 4}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            {"train": "head"},
            Recipe(lr=1e-3, head_lr=1e-3, weight_decay=1e-4, epochs=50),
            "Linear probe: only the head trains on frozen features.",
        ),
        Method(
            "full",
            {"train": "all"},
            Recipe(lr=1e-5, head_lr=1e-3, weight_decay=0.05, epochs=20),
            "Full fine-tuning of the backbone and head.",
        ),
        Method(
            "vpt-shallow",
            _TVP,
            Recipe(lr=5e-3, head_lr=1e-3, weight_decay=1e-4),
            "VPT-shallow: task visual prompts at the input.",
        ),
        Method(
            "vpt-deep",
            _TVP_DEEP,
            Recipe(lr=5e-3, head_lr=1e-3, weight_decay=1e-4),
            "VPT-deep: fresh task visual prompts at every layer.",
        ),
        Method("text", _TTP, Recipe(lr=2e-3, head_lr=1e-3), "Task textual prompts only."),
        Method("instance", _IVP, Recipe(lr=2e-3, head_lr=1e-3), "Instance visual prompts only."),
        Method(
            "pathotune",
            {**_TVP_DEEP, **_TTP, **_IVP},
            Recipe(lr=3e-3, head_lr=1e-3),
            "PathoTune: deep TVP + TTP + IVP.",
        ),
        Method("tvp+ttp", {**_TVP_DEEP, **_TTP}, Recipe(lr=3e-3, head_lr=1e-3), "Ablation: TVP and TTP."),
        Method("tvp+ivp", {**_TVP_DEEP, **_IVP}, Recipe(lr=3e-3, head_lr=1e-3), "Ablation: TVP and IVP."),
        Method("ttp+ivp", {**_TTP, **_IVP}, Recipe(lr=2e-3, head_lr=1e-3), "Ablation: TTP and IVP."),
        Method(
            "lora",
            {"train": "lora"},
            Recipe(lr=1e-3, head_lr=1e-3, weight_decay=1e-4),
            "LoRA on the attention projections through HF peft.",
        ),
    )
}


def list_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; use one of {list_methods()}")
    return METHODS[name]
