"""One exception tree: the CLI turns any of these into one line on stderr and exit code 2."""

from __future__ import annotations

import errno
import json

__all__ = ["DataError", "DeviceError", "DiskFull", "FoldsweepError", "MachineError", "ModelFolderError", "SealError",
           "SpecError", "SplitError", "StorageError", "StoreError", "SweepFailed", "explain", "os_hint"]


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


class MachineError(FoldsweepError):
    """The machine refused: a read-only or full disk, a missing permission, a store that cannot be opened."""


class StoreError(FoldsweepError):
    """A store on disk (the Optuna journal, the MLflow database) is damaged or cannot be opened."""


_OS_HINTS = {
    errno.EROFS: "foldsweep keeps its state under mlruns/ (or $FOLDSWEEP_HOME): run where that is writable",
    errno.EACCES: "foldsweep keeps its state under mlruns/ (or $FOLDSWEEP_HOME): run where that is writable",
    errno.ENOSPC: "the disk is full: free space and rerun the same command (finished trials are kept)",
    errno.EDQUOT: "the disk quota is used up: free space and rerun the same command (finished trials are kept)",
}


def os_hint(code: int | None) -> str:
    """What to do about an operating-system refusal (read-only, permission, full disk), or ''."""
    return _OS_HINTS.get(code, "") if code is not None else ""


def explain(error: BaseException) -> FoldsweepError | None:
    """A failure raised by another library that is about the machine or a store, as one line; else None.

    The CLI prints what this returns (exit 2) and lets anything else through as the bug it is. The
    cause chain is searched, since MLflow and SQLAlchemy wrap what the operating system said.
    """
    for cause in _chain(error):
        if isinstance(cause, FoldsweepError):
            return cause
        if isinstance(cause, json.JSONDecodeError) and (journal := _journal_path(cause)) is not None:
            return StoreError(f"the Optuna journal `{journal}` is damaged: a line is not JSON ({cause.msg}); "
                              "move that line aside (keep a copy) and rerun")
        if isinstance(cause, OSError) and cause.errno is not None and cause.strerror:
            hint = os_hint(cause.errno)
            return MachineError(cause.strerror + (f": `{cause.filename}`" if cause.filename else "")
                                + (f"; {hint}" if hint else ""))
        if type(cause).__name__ == "OperationalError" and "unable to open database file" in str(cause):
            return StoreError("the MLflow database cannot be opened (unable to open database file): its folder "
                              "must exist and be writable (tracking.uri, or run where mlruns/ is writable)")
    return None


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not s for s in seen) and len(seen) < 20:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _journal_path(error: BaseException) -> str | None:
    """The journal file being read when `error` was raised, from the frame of foldsweep's journal backend."""
    tb = error.__traceback__
    path = None
    while tb is not None:
        frame = tb.tb_frame
        if "optuna" in frame.f_code.co_filename and "journal" in frame.f_code.co_filename:
            owner = frame.f_locals.get("self")
            path = getattr(owner, "journal_path", path)  # `storage.RepairingJournal`, the only backend used
        tb = tb.tb_next
    return str(path) if path is not None else None


class DiskFull(StorageError):
    """A write failed for lack of space; what was written before is intact and a rerun resumes."""
