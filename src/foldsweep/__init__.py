"""foldsweep: honest hyperparameter sweeps for PyTorch MLPs (nested k-fold CV, sealed test set).

From Python: `foldsweep.run(spec, data=frame, target="label")` runs a sweep and returns a `SweepResult`;
`foldsweep.open(name)` reopens one. The command line (`foldsweep run ...`) is a shell over the same calls.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from foldsweep.api import fit, load_model, open, run, status
from foldsweep.errors import FoldsweepError
from foldsweep.result import FittedModel, NestedEstimate, SweepResult
from foldsweep.spec import SweepSpec, load_spec

try:
    __version__ = version("foldsweep")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["FittedModel", "FoldsweepError", "NestedEstimate", "SweepResult", "SweepSpec", "__version__", "fit",
           "load_model", "load_spec", "open", "run", "status"]
