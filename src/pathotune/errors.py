"""One error family. Every message names the file or key at fault and says what to do."""

from __future__ import annotations


class PathoTuneError(Exception):
    """Base class for errors a user can cause; the CLI prints them on one line and exits 2."""


class ConfigError(PathoTuneError):
    """An unknown, ill-typed or conflicting configuration key or switch."""


class WeightsError(PathoTuneError):
    """A weight file that is missing, unreadable, or does not fit the architecture."""


class BundleError(PathoTuneError):
    """A prompt bundle that is missing, corrupt, or made for another backbone or format."""


class DataError(PathoTuneError):
    """Unreadable images, empty classes, bad manifests, slides without the metadata needed."""
