"""One exception tree: the CLI turns any of these into one line on stderr and exit code 2."""

from __future__ import annotations


class FoldsweepError(Exception):
    """Root of every error foldsweep raises on purpose (bad input, refused actions)."""


class SpecError(FoldsweepError):
    """A sweep file or a `--set` override is malformed."""


class DataError(FoldsweepError):
    """The data set cannot be loaded or does not fit the spec."""


class SplitError(FoldsweepError):
    """The fold plan cannot be built or does not match the stored one."""


class StorageError(FoldsweepError):
    """The Optuna storage cannot be reached or is unsuitable for the requested workers."""


class DeviceError(FoldsweepError):
    """A requested device does not exist on this machine."""


class SealError(FoldsweepError):
    """The sealed test set was asked for in a way the ledger does not allow."""


class ModelFolderError(FoldsweepError):
    """A model folder is incomplete, was changed after `foldsweep fit` wrote it, or does not parse."""


class SweepFailed(FoldsweepError):
    """Every trial of a study failed: the sweep cannot produce an estimate."""
