"""The sweep's record on disk: resolved spec, fold plan, sealed-test seal, test-look ledger, summary.

It lives under `mlruns/sweeps/<name>/` beside the Optuna and MLflow stores, is written before the
work it describes starts, and is only ever appended to, so a crash or a rerun never loses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from filelock import FileLock

from foldsweep.data import Dataset
from foldsweep.errors import FoldsweepError, SealError, SplitError
from foldsweep.spec import SweepSpec, parse_spec, read_yaml
from foldsweep.splits import FoldPlan, check_batch_size, make_plan

ROOT_ENV = "FOLDSWEEP_HOME"
_log = logging.getLogger("foldsweep")


def home() -> Path:
    """Where sweeps keep their state: `mlruns/` in the working directory unless FOLDSWEEP_HOME says otherwise."""
    return Path(os.environ.get(ROOT_ENV, "mlruns"))


@dataclass(frozen=True)
class SweepRecord:
    name: str
    folder: Path

    @classmethod
    def open(cls, name: str) -> SweepRecord:
        folder = home() / "sweeps" / name
        if not (folder / "record.json").is_file():
            known = sorted(p.name for p in (home() / "sweeps").glob("*") if (p / "record.json").is_file()) \
                if (home() / "sweeps").is_dir() else []
            raise FoldsweepError(f"no sweep named `{name}` under {home()}/sweeps"
                                 + (f"; known: {', '.join(known)}" if known else "; run `foldsweep run SPEC` first"))
        return cls(name, folder)

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "record.json").read_text())

    def update(self, **values: Any) -> None:
        meta = self.meta | values
        _write_json(self.folder / "record.json", meta)

    @property
    def spec(self) -> SweepSpec:
        path = self.folder / "spec.yaml"
        return parse_spec(read_yaml(path, what="sweep record"), source=str(path))

    @property
    def plan(self) -> FoldPlan:
        return FoldPlan.from_json(json.loads((self.folder / "plan.json").read_text()))

    # -- the sealed test look ------------------------------------------------------------------------
    @property
    def ledger(self) -> list[dict[str, Any]]:
        path = self.folder / "ledger.json"
        return json.loads(path.read_text()) if path.is_file() else []

    @contextmanager
    def looking(self, again: bool) -> Iterator[int]:
        """Hold the ledger's lock from the one-look check to the append; yields the number this look gets.

        Without it two `foldsweep test` started together both passed the check and both looked. The lock
        is a kernel flock (filelock), so a process that dies holding it releases it.
        """
        with FileLock(self.folder / "ledger.lock"):
            self.check_can_look(again)
            yield len(self.ledger) + 1

    def check_can_look(self, again: bool) -> None:
        looks = len(self.ledger)
        if looks and not again:
            raise SealError(f"the sealed test set of `{self.name}` was already looked at {looks} time(s); "
                            "a further look biases it: pass --again to look anyway (it will be counted)")

    def append_look(self, look: dict[str, Any]) -> int:
        entries = self.ledger + [look]
        _write_json(self.folder / "ledger.json", entries)
        return len(entries)

    def verify_data(self, data: Dataset) -> None:
        """Refuse if the rows differ from the sweep's: a changed test row would make the look meaningless."""
        meta = self.meta
        if data.fingerprint == meta["fingerprint"]:
            return
        if len(data.row_hashes) != meta["n_rows"]:
            raise SealError(f"data of `{self.name}` changed: {len(data.row_hashes)} rows now, "
                            f"{meta['n_rows']} when the sweep was sealed")
        test = meta["test_rows"]
        changed = int(np.count_nonzero(np.asarray(data.row_hex(test)) != np.asarray(meta["test_hashes"])))
        what = "rows were edited or reordered" if changed else "columns were renamed, reordered or re-encoded"
        raise SealError(f"data of `{self.name}` changed since the sweep was sealed ({changed} sealed test rows "
                        f"differ, or {what}); the fingerprint no longer matches")


def create_or_resume(spec: SweepSpec, data: Dataset, storage: str) -> tuple[SweepRecord, FoldPlan, bool]:
    """The plan is built once and stored; a rerun must see the same data and settings to continue."""
    folder = home() / "sweeps" / spec.name
    if (folder / "record.json").is_file():
        record = SweepRecord(spec.name, folder)
        meta = record.meta
        if meta["spec_hash"] != spec.spec_hash():
            _accept_changes(record, spec)
        if meta["fingerprint"] != data.fingerprint:
            raise SplitError(f"data of sweep `{spec.name}` changed since it started (fingerprint "
                             f"{meta['fingerprint']}, now {data.fingerprint}); rerun with --fresh")
        return record, record.plan, True
    plan = make_plan(data, spec.split)
    check_batch_size(spec, plan)  # before anything is written: a corrected spec must start cleanly
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    plan_json = plan.to_json()
    _write_json(folder / "plan.json", plan_json)
    meta = {
        "name": spec.name, "created": time.time(), "spec_hash": spec.spec_hash(), "fingerprint": data.fingerprint,
        "plan_hash": hashlib.sha256(json.dumps(plan_json, sort_keys=True).encode()).hexdigest()[:16],
        "n_rows": len(data.row_hashes), "storage": storage, "test_rows": plan.test.tolist(),
        "test_hashes": data.row_hex(plan.test),
    }
    _write_json(folder / "record.json", meta)
    return SweepRecord(spec.name, folder), plan, False


def _accept_changes(record: SweepRecord, spec: SweepSpec) -> None:
    """A rerun may ask for more trials (`optuna.n_trials` up) and run them differently (`resources`).

    Neither changes a finished trial: the studies go on, the outer refits and `final` are brought up to
    date, and the change is recorded. Anything else (search space, training, folds, seeds, even the
    rounds of `trials_per_batch`, which decide what history each new trial is asked with) would make
    the finished trials answers to another question, so it is refused. Fewer trials is refused too:
    finished trials are never dropped, and a study with more than n_trials would no longer be the sweep
    the spec describes.
    """
    old = record.spec
    if _settings_hash(old) != _settings_hash(spec):
        raise FoldsweepError(f"sweep `{spec.name}` exists with other settings (spec hash {record.meta['spec_hash']}, "
                             f"now {spec.spec_hash()}); only optuna.n_trials (more trials) and resources may change "
                             "on a rerun: rerun with --fresh to start a new sweep beside it")
    before, after = old.optuna.n_trials, spec.optuna.n_trials
    if after < before:
        raise FoldsweepError(f"sweep `{spec.name}` runs with optuna.n_trials={before}; a rerun can add trials but "
                             f"not drop finished ones (got {after}): keep {before} or more, or rerun with --fresh")
    change = {"time": time.time(), "spec_hash": [record.meta["spec_hash"], spec.spec_hash()]}
    if after != before:
        change["n_trials"] = [before, after]
        _log.warning(f"sweep `{spec.name}`: optuna.n_trials {before} -> {after}; each study gets "
                     f"{after - before} more trial(s), then the outer refits and final are brought up to date")
    (record.folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    record.update(spec_hash=spec.spec_hash(), changes=record.meta.get("changes", []) + [change])


def _settings_hash(spec: SweepSpec) -> str:
    """The spec without what a rerun may change (see `_accept_changes`)."""
    settings = spec.model_dump(mode="json")
    settings.pop("resources")
    settings["optuna"].pop("n_trials")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def fresh_name(name: str) -> str:
    """`name-2`, `name-3`, ...: the first name no sweep uses yet (nothing is ever deleted)."""
    n = 2
    while (home() / "sweeps" / f"{name}-{n}").exists():
        n += 1
    return f"{name}-{n}"


def _write_json(path: Path, value: Any) -> None:
    """Write to a temporary file and rename, so a crash never leaves half a record."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(value, indent=1, default=str))
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: the record as it was stays whole
        raise
    tmp.replace(path)
