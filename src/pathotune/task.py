"""A task description, rendered to the text that the textual prompts (TTP) encode."""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field

from .errors import ConfigError

DEFAULT_TEMPLATE = "A {task} task on {stain} stained {organ} histopathology images. Classes: {classes}. {description}"
CLASS_TEMPLATE = "A {stain} stained {organ} histopathology image of {name}."


@dataclass(frozen=True)
class Task:
    """What the prompts should specialise in. Only ``classes`` matters to the head; the rest feeds TTP."""

    name: str = "classification"
    organ: str = "tissue"
    stain: str = "H&E"
    classes: tuple[str, ...] = field(default_factory=tuple)
    description: str = ""
    template: str = DEFAULT_TEMPLATE
    text_classes: tuple[str, ...] = ()  # names the text uses instead of ``classes`` (the shuffled control)
    class_descriptions: dict[str, str] = field(default_factory=dict, hash=False)  # class -> short per-class text

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "text_classes", tuple(str(c) for c in self.text_classes))
        allowed = {"task", "organ", "stain", "classes", "description"}
        used = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        unknown = used - allowed
        if unknown:
            raise ConfigError(
                f"task template uses unknown field(s) {sorted(unknown)}; allowed fields are {sorted(allowed)}"
            )

    def render(self) -> str:
        """The exact text sent to the text encoder (saved in bundles for provenance)."""
        names = self.text_classes or self.classes
        text = self.template.format(
            task=self.name,
            organ=self.organ,
            stain=self.stain,
            classes=", ".join(names) if names else "unspecified",
            description=self.description,
        )
        return " ".join(text.split())

    def class_texts(self) -> list[str]:
        """One text per class, in class order (TTP with ``ttp_text='classes'``): its description, else its name
        (the names of ``text_classes`` when set), in ``CLASS_TEMPLATE``."""
        names = self.text_classes or self.classes
        return [
            CLASS_TEMPLATE.format(stain=self.stain, organ=self.organ, name=self.class_descriptions.get(c) or name)
            for c, name in zip(self.classes, names, strict=True)
        ]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["text_classes"] = list(self.text_classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown task key(s) {sorted(unknown)}; allowed keys are {sorted(known)}")
        return cls(
            **{
                **d,
                "classes": tuple(d.get("classes", ())),
                "text_classes": tuple(d.get("text_classes", ())),
                "class_descriptions": dict(d.get("class_descriptions") or {}),
            }
        )
