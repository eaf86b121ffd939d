"""PathoTune: multi-modal prompt tuning of frozen vision foundation models for pathology.

The public names are loaded on first use (PEP 562), so ``import pathotune`` and the ``pathotune --help`` and
``--version`` that start with it do not pay for torch, timm and peft until a model is needed.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import BundleError, ConfigError, DataError, PathoTuneError, WeightsError
from .version import __version__

if TYPE_CHECKING:
    from .backbones import list_backbones
    from .bundle import load_bundle, save_bundle
    from .inference import Predictions, data_config, predict, transforms
    from .methods import list_methods
    from .model import PathoTuneModel, create_model
    from .switches import Switches
    from .task import Task

_LAZY = {
    "list_backbones": "backbones",
    "load_bundle": "bundle",
    "save_bundle": "bundle",
    "list_methods": "methods",
    "PathoTuneModel": "model",
    "create_model": "model",
    "Switches": "switches",
    "Task": "task",
    "Predictions": "inference",
    "data_config": "inference",
    "predict": "inference",
    "transforms": "inference",
}

__all__ = [
    "BundleError",
    "ConfigError",
    "DataError",
    "PathoTuneError",
    "PathoTuneModel",
    "Predictions",
    "Switches",
    "Task",
    "WeightsError",
    "__version__",
    "create_model",
    "data_config",
    "list_backbones",
    "list_methods",
    "load_bundle",
    "predict",
    "save_bundle",
    "transforms",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
