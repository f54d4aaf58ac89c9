"""neuroar: predict how a brain MRI will look years later (NeuroAR, arXiv 2507.22954)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuroar")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
