"""Every prompt switch in one typed place, so ablations are configuration rather than code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .errors import ConfigError
from .prompts import VRM_KINDS
from .prompts.attention import PROMPT_ATTENTION
from .prompts.textual import TTP_MODES, TTP_TEXTS

IVP_SOURCES = ("backbone", "early", "encoder")
TRAIN_MODES = ("head", "prompts", "all", "lora")


@dataclass(frozen=True)
class Switches:
    """What a method builds and trains. Counts of 0 switch a prompt kind off."""

    # Task-specific visual prompts (VPT).
    tvp_tokens: int = 0
    tvp_deep: bool = False
    tvp_depth: int | None = None  # deep only: how many layers get fresh prompts (None: all from tvp_layer on)
    tvp_layer: int = 0  # the block before which TVP enters
    tvp_dropout: float = 0.0
    # Task-specific textual prompts.
    ttp_tokens: int = 0
    ttp_mode: str = "pooled"  # "pooled" or "attn"
    ttp_hidden: int = 128
    ttp_layer: int = 0
    ttp_text: str = "task"  # "task": the task description; "classes": one text per class (name or description)
    ttp_deep: bool = False  # re-enter before each of ttp_depth layers from ttp_layer (a shift per layer)
    ttp_depth: int | None = None  # deep only: how many layers (None: all from ttp_layer on)
    text_encoder: str = "minilm"
    text_weights: str | None = None
    # Instance-specific visual prompts.
    ivp_tokens: int = 0
    ivp_vrm: str = "attn"  # "attn" or "mlp"
    ivp_hidden: int = 64  # small on purpose: the VRM must not memorise a few dozen images
    ivp_dropout: float = 0.1
    ivp_layer: int | None = None  # None: depth // 3 for the "early" source, else 0
    # "early" (image tokens after the first ivp_layer blocks: no second pass), "backbone" (a second frozen pass
    # of the whole backbone), "encoder" (a separate frozen ivp_encoder, e.g. a pathology FM or a CNN)
    ivp_source: str = "early"
    ivp_encoder: str | None = None  # backbone id or timm name when ivp_source == "encoder"
    ivp_encoder_weights: str | None = None
    ivp_cache: int = 0  # cache instance tokens of up to this many distinct images (un-augmented inputs)
    # How image tokens read prompts: "gated" (zero-init per-group gates: step 0 is the frozen model) or
    # "joint" (one softmax over image and prompt tokens, as VPT concatenates them).
    prompt_attn: str = "gated"
    # What trains.
    train: str = "prompts"  # "head", "prompts", "all" or "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = r".*\.attn\.(qkv|proj)"
    # Head and pooling.
    pool: str = "default"
    pool_prompts: bool = False  # let avg pooling read prompt outputs too
    head_dropout: float = 0.0
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:

        check_types(self)
        for name in ("tvp_tokens", "ttp_tokens", "ivp_tokens", "tvp_layer", "ttp_layer", "ivp_layer"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"switch {name} must be >= 0, got {getattr(self, name)}")
        choices = {
            "ttp_mode": TTP_MODES,
            "ttp_text": TTP_TEXTS,
            "ivp_vrm": VRM_KINDS,
            "ivp_source": IVP_SOURCES,
            "train": TRAIN_MODES,
            "prompt_attn": PROMPT_ATTENTION,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"switch {name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.ivp_tokens and self.ivp_source == "encoder" and not self.ivp_encoder:
            raise ConfigError("switch ivp_source='encoder' needs ivp_encoder (a backbone id or timm name)")
        if self.ivp_tokens and self.ivp_source == "early" and self.ivp_layer == 0:
            raise ConfigError("switch ivp_source='early' needs ivp_layer >= 1: the blocks run before IVP enters")
        if self.ivp_cache and self.train in ("all", "lora"):
            raise ConfigError("switch ivp_cache needs a frozen backbone; it cannot be used with train='all' or 'lora'")
        if self.ivp_cache < 0:
            raise ConfigError(f"switch ivp_cache must be >= 0 (a number of images), got {self.ivp_cache}")
        for name in ("tvp_dropout", "ivp_dropout", "lora_dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"switch {name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("tvp_depth", "ttp_depth"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"switch {name} must be >= 1 or None, got {getattr(self, name)}")

    @property
    def num_prompts(self) -> int:
        return self.tvp_tokens + self.ttp_tokens + self.ivp_tokens

    def ivp_entry(self, depth: int) -> int:
        """The block before which IVP enters; by default a third of the way in when IVP reads early tokens."""
        if self.ivp_layer is not None:
            return self.ivp_layer
        return max(1, depth // 3) if self.ivp_source == "early" else 0

    def to_dict(self) -> dict:
        return asdict(self)

    def update(self, **changes) -> Switches:
        check_keys(changes)
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> Switches:
        check_keys(d)
        return cls(**d)


def switch_names() -> list[str]:
    return [f.name for f in fields(Switches)]


def check_keys(d: dict) -> None:
    unknown = sorted(set(d) - set(switch_names()))
    if unknown:
        raise ConfigError(f"unknown switch(es) {unknown}; allowed switches are {switch_names()}")


_TYPE_NAMES = {"int": "an integer", "bool": "true or false", "float": "a number", "str": "a string"}


def check_types(s: Switches) -> None:
    """Every switch has the type its field declares (``tvp_tokens: many`` fails here, naming the switch)."""
    for f in fields(s):
        value = getattr(s, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        base = kinds[0]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
        }.get(base, True)
        if not ok:
            wanted = _TYPE_NAMES.get(base, base) + (" or null" if "None" in kinds else "")
            raise ConfigError(f"switch {f.name} must be {wanted}, got {value!r} ({type(value).__name__})")
