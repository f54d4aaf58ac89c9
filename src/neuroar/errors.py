"""User-facing errors: each message names the problem and how to fix it.

The CLI prints these as one paragraph and exits non-zero; anything else is a bug and shows a traceback.
"""


class NeuroARError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""


class ConfigError(NeuroARError):
    """A config file or override is invalid."""


class ManifestError(NeuroARError):
    """A manifest CSV or BIDS folder is invalid."""


class ImageError(NeuroARError):
    """An image file cannot be used (missing, unreadable, not 3D, not finite)."""
