"""PathoTune: multi-modal prompt tuning of frozen vision foundation models for pathology."""

from .backbones import list_backbones
from .bundle import load_bundle, save_bundle
from .errors import BundleError, ConfigError, DataError, PathoTuneError, WeightsError
from .methods import list_methods
from .model import PathoTuneModel, create_model
from .switches import Switches
from .task import Task
from .version import __version__

__all__ = [
    "BundleError",
    "ConfigError",
    "DataError",
    "PathoTuneError",
    "PathoTuneModel",
    "Switches",
    "Task",
    "WeightsError",
    "__version__",
    "create_model",
    "list_backbones",
    "list_methods",
    "load_bundle",
    "save_bundle",
]
