"""PathoTune: multi-modal prompt tuning of frozen vision foundation models for pathology."""

__version__ = "0.1.0"

from .backbones import list_backbones  # noqa: E402
from .bundle import load_bundle, save_bundle  # noqa: E402
from .errors import BundleError, ConfigError, DataError, PathoTuneError, WeightsError  # noqa: E402
from .methods import list_methods  # noqa: E402
from .model import PathoTuneModel, create_model  # noqa: E402
from .switches import Switches  # noqa: E402
from .task import Task  # noqa: E402

__all__ = [
    "BundleError",
    "ConfigError",
    "DataError",
    "PathoTuneError",
    "PathoTuneModel",
    "Switches",
    "Task",
    "WeightsError",
    "create_model",
    "list_backbones",
    "list_methods",
    "load_bundle",
    "save_bundle",
]
