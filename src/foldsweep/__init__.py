"""foldsweep: honest hyperparameter sweeps for PyTorch MLPs (nested k-fold CV, sealed test set)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from foldsweep.errors import FoldsweepError
from foldsweep.spec import SweepSpec, load_spec

try:
    __version__ = version("foldsweep")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["FoldsweepError", "SweepSpec", "load_spec", "__version__"]
