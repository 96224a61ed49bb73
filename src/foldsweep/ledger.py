"""Every look at sealed rows, counted by the rows themselves, across sweeps.

A sweep's own `ledger.json` can be sidestepped: `run --fresh` or a new `name` seals the same rows
(same data, same seed) under a name with an empty ledger, and a deleted ledger file reads as no
looks. So each look also leaves one file here, under `mlruns/looks/` beside every sweep: the sealed
rows' hashes (sorted uint64) and the look's record, written atomically before the score is shown.
A later look at any sweep whose sealed rows share a hash with an earlier look's is a further look,
whatever the sweep is called. One file per look keeps damage local and appends free of races; a file
that cannot be read is never taken for "no look": every look then needs `again` until it is restored.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LookLedger", "PriorLook"]

_SUFFIX = ".npz"


@dataclass(frozen=True)
class PriorLook:
    """An earlier look at some of the rows about to be looked at: its record and how many rows it shares."""

    entry: dict[str, Any]  # the look as recorded (sweep, time, score, look_number, ...)
    shared_rows: int  # sealed rows of this look that the earlier one scored too (0 when damaged: unknown)
    damaged: str = ""  # why its file cannot be read; such a look may have scored any rows


class LookLedger:
    """The folder of looks (`mlruns/looks/`): one `.npz` per look, never rewritten, never removed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def lock_path(self) -> Path:
        """One lock for every sweep's looks: two looks at the same rows from two sweeps exclude each other."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / "looks.lock"

    def prior_looks(self, sealed_hashes: np.ndarray) -> list[PriorLook]:
        """The recorded looks that scored any of `sealed_hashes` (uint64, (n,)), oldest first.

        A look whose file cannot be read is returned as damaged: which rows it scored is unknown, and an
        unknown look must not read as none.
        """
        wanted = np.unique(np.asarray(sealed_hashes, dtype=np.uint64))
        found = []
        for path in self._files():
            try:
                hashes, entry = _read_look(path)
            except Exception as err:  # noqa: BLE001 -- zipfile, numpy and json raise many kinds on damaged bytes
                found.append(PriorLook(entry={"time": _file_time(path)}, shared_rows=0,
                                       damaged=f"{path}: {_short(err)}"))
                continue
            shared = int(np.count_nonzero(np.isin(hashes, wanted, assume_unique=True)))
            if shared:
                found.append(PriorLook(entry=entry, shared_rows=shared))
        return sorted(found, key=lambda look: str(look.entry.get("time", "")))

    def record(self, entry: dict[str, Any], sealed_hashes: np.ndarray) -> Path:
        """Write one look (its record and the rows it scored) atomically; returns the file written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"look-{time.time_ns()}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
        hashes = np.unique(np.asarray(sealed_hashes, dtype=np.uint64))
        text = np.frombuffer(json.dumps(entry, default=str).encode(), dtype=np.uint8)
        tmp = path.with_suffix(".tmp")
        try:
            with tmp.open("wb") as handle:
                np.savez(handle, allow_pickle=False, hashes=hashes, entry=text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(path)
        return path

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob(f"look-*{_SUFFIX}")) if self.folder.is_dir() else []


def _read_look(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as arrays:
        hashes, text = arrays["hashes"], arrays["entry"]
    entry = json.loads(text.tobytes().decode())
    if hashes.dtype != np.uint64 or hashes.ndim != 1 or not isinstance(entry, dict):
        raise ValueError("unexpected contents")
    return hashes, entry


def _file_time(path: Path) -> str:
    """When a damaged look was written, from its name (`look-<ns>-...`), for ordering and the message."""
    try:
        stamp = int(path.name.split("-")[1]) / 1e9
    except (IndexError, ValueError):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(stamp))  # as a look's own time


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:120] or type(err).__name__
