"""The sweep's record on disk: resolved spec, fold plan, sealed-test seal, test-look ledger, summary.

It lives under `mlruns/sweeps/<name>/` beside the Optuna and MLflow stores, is written before the
work it describes starts, and is only ever appended to, so a crash or a rerun never loses it.
`record.json` stays small (a few KB whatever the rows): the fold plan and the sealed test rows' hashes
are arrays in `plan.npz` (bit masks, 2 + 2 x folds bits a row), checked against record.json's hashes on reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from filelock import FileLock

from foldsweep.data import Dataset
from foldsweep.errors import FoldsweepError, SealError, SplitError, StoreError
from foldsweep.files import write_text_atomic
from foldsweep.ledger import LookLedger, PriorLook
from foldsweep.spec import SweepSpec, parse_spec, read_yaml
from foldsweep.splits import FoldPlan, check_batch_size, make_plan

__all__ = ["SweepRecord", "create_or_resume", "fresh_name", "home", "plan_hash"]

ROOT_ENV = "FOLDSWEEP_HOME"
PLAN_FILE = "plan.npz"
_META_KEYS = ("name", "spec_hash", "fingerprint", "plan_hash", "n_rows", "storage")
_PLAN_KEYS = ("layout", "notes", "sealed_hash")
_log = logging.getLogger("foldsweep")


def home() -> Path:
    """Where sweeps keep their state: `mlruns/` in the working directory unless FOLDSWEEP_HOME says otherwise."""
    return Path(os.environ.get(ROOT_ENV, "mlruns"))


@dataclass(frozen=True)
class SweepRecord:
    """One sweep's record folder; `meta` and `plan` are read once and kept (meta again when the file changes)."""

    name: str
    folder: Path
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

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
        """record.json as a (shallow) copy, read again only when the file was replaced since."""
        path = self.folder / "record.json"
        stat = path.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if self._cache.get("meta_key") != key:
            meta = _read_meta(self.name, path)
            self._cache.update(meta_key=key, meta=meta)
        return dict(self._cache["meta"])

    def update(self, **values: Any) -> None:
        meta = self.meta | values
        _write_json(self.folder / "record.json", meta)

    @property
    def spec(self) -> SweepSpec:
        path = self.folder / "spec.yaml"
        return parse_spec(read_yaml(path, what="sweep record"), source=str(path))

    @property
    def plan(self) -> FoldPlan:
        """The stored fold plan (plan.npz, checked against the record's plan_hash)."""
        if "plan" not in self._cache:
            self._read_plan()
        plan: FoldPlan = self._cache["plan"]
        return plan

    @property
    def test_hashes(self) -> np.ndarray:
        """The sealed test rows' hashes (uint64, in the order of `plan.test`) as they were when sealed."""
        if "test_hashes" not in self._cache:
            self._read_plan()
        hashes: np.ndarray = self._cache["test_hashes"]
        return hashes

    def _read_plan(self) -> None:
        meta = self.meta
        path = self.folder / PLAN_FILE
        try:
            with np.load(path, allow_pickle=False) as arrays:
                masks, test_hashes = arrays["masks"], arrays["test_hashes"]
        except Exception as err:  # noqa: BLE001 -- zipfile and numpy raise a dozen kinds on damaged bytes
            raise SealError(f"the fold plan of sweep `{self.name}` ({path}) cannot be read ({_short(err)}); its "
                            "sealed test rows are no longer known: rerun with --fresh to seal them again (looks "
                            "at them stay counted)") from None
        layout = meta["plan"]["layout"]
        if _digest(masks, layout) != meta["plan_hash"] or _sealed_digest(test_hashes) != meta["plan"]["sealed_hash"]:
            raise SealError(f"the fold plan of sweep `{self.name}` ({path}) was changed or damaged (its hash is "
                            f"no longer {meta['plan_hash']}); its sealed test rows are no longer known: rerun with "
                            "--fresh to seal them again (looks at them stay counted)")
        plan = FoldPlan.from_masks(masks, meta["n_rows"], layout, meta["plan"]["notes"])
        self._cache.update(plan=plan, test_hashes=test_hashes)

    # -- the sealed test look ------------------------------------------------------------------------
    @property
    def ledger(self) -> list[dict[str, Any]]:
        """Every recorded look at this sweep's sealed rows, by any sweep, oldest first.

        The sweep's own `ledger.json` and the looks folder (`mlruns/looks/`, see `foldsweep.ledger`) are
        both read: deleting either still leaves the looks counted, and a look by another sweep at the same
        rows (a `--fresh` rerun, a renamed copy) is one of them.
        """
        own = self._own_ledger()
        known = {entry.get("look_id") for entry in own if entry.get("look_id")}
        others = [prior.entry | {"shared_rows": prior.shared_rows} | ({"damaged": prior.damaged} if prior.damaged
                                                                      else {})
                  for prior in self._prior_looks() if prior.damaged or prior.entry.get("look_id") not in known]
        return sorted(own + others, key=lambda entry: str(entry.get("time", "")))

    @contextmanager
    def looking(self, again: bool) -> Iterator[int]:
        """Hold the looks' lock from the one-look check to the append; yields the number this look gets.

        Without it two `foldsweep test` started together both passed the check and both looked. The lock
        is a kernel flock (filelock), so a process that dies holding it releases it; it is shared by every
        sweep under this home, since two sweeps may have sealed the same rows.
        """
        with FileLock(_looks().lock_path):
            yield len(self.check_can_look(again)) + 1

    def check_can_look(self, again: bool) -> list[dict[str, Any]]:
        """Refuse a further look at sealed rows already scored, by this sweep or any other, unless `again`;
        returns the earlier looks (the ledger, read once)."""
        looks = self.ledger
        if looks and not again:
            last = looks[-1]
            by = (f"a look whose record is damaged ({last['damaged']})" if last.get("damaged")
                  else f"sweep `{last.get('sweep', self.name)}` at {last.get('time', '?')}")
            raise SealError(f"the sealed test set of `{self.name}` was already looked at {len(looks)} time(s), last "
                            f"by {by}; a further look biases it: pass --again to look anyway (it will be counted)")
        return looks

    def append_look(self, look: dict[str, Any]) -> int:
        """Record the look in the looks folder and in the sweep's ledger.json; returns its number."""
        entry = look | {"sweep": self.name, "look_id": os.urandom(8).hex(), "sealed_hash":
                        self.meta["plan"]["sealed_hash"], "data_fingerprint": self.meta["fingerprint"]}
        _looks().record(entry, self.test_hashes)
        entries = self._own_ledger() + [entry]
        _write_json(self.folder / "ledger.json", entries)
        return len(self.ledger)

    def _own_ledger(self) -> list[dict[str, Any]]:
        path = self.folder / "ledger.json"
        if not path.is_file():
            return []
        try:
            entries = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise SealError(f"the test-look ledger of sweep `{self.name}` ({path}) is damaged ({_short(err)}); it "
                            "is never read as no looks: restore it from a copy, or move it aside to count the "
                            f"looks kept in {_looks().folder} only") from None
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise SealError(f"the test-look ledger of sweep `{self.name}` ({path}) is damaged (not a list of "
                            "looks); it is never read as no looks: restore it from a copy, or move it aside to "
                            f"count the looks kept in {_looks().folder} only")
        return entries

    def _prior_looks(self) -> list[PriorLook]:
        return _looks().prior_looks(self.test_hashes)

    def verify_data(self, data: Dataset) -> None:
        """Refuse if the rows differ from the sweep's: a changed test row would make the look meaningless."""
        meta = self.meta
        if data.fingerprint == meta["fingerprint"]:
            return
        if len(data.row_hashes) != meta["n_rows"]:
            raise SealError(f"data of `{self.name}` changed: {len(data.row_hashes)} rows now, "
                            f"{meta['n_rows']} when the sweep was sealed")
        changed = int(np.count_nonzero(np.asarray(data.row_hashes)[self.plan.test] != self.test_hashes))
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
    n_rows = len(data.row_hashes)
    masks, test_hashes = plan.to_masks(n_rows), np.asarray(data.row_hashes)[plan.test]
    _write_arrays(folder / PLAN_FILE, {"masks": masks, "test_hashes": test_hashes})
    meta = {
        "name": spec.name, "created": time.time(), "spec_hash": spec.spec_hash(), "fingerprint": data.fingerprint,
        "plan_hash": _digest(masks, plan.layout), "n_rows": n_rows, "storage": storage,
        "plan": {"file": PLAN_FILE, "layout": plan.layout, "notes": plan.notes,
                 "sealed_hash": _sealed_digest(test_hashes)},
    }
    _write_json(folder / "record.json", meta)
    return SweepRecord(spec.name, folder), plan, False


def plan_hash(plan: FoldPlan, n_rows: int) -> str:
    """The hash a record stores for `plan` over `n_rows` rows: a worker elsewhere checks its own plan with it."""
    return _digest(plan.to_masks(n_rows), plan.layout)


def _digest(masks: np.ndarray, layout: list[int]) -> str:
    """sha256 over the layout and the plan's bit masks (90 MB at 10^7 rows, 5 x 5 folds: ~0.1 s)."""
    digest = hashlib.sha256(json.dumps({"plan": 2, "layout": layout}).encode())
    digest.update(np.ascontiguousarray(masks, dtype=np.uint8).data)
    return digest.hexdigest()[:16]


def _sealed_digest(test_hashes: np.ndarray) -> str:
    """sha256 over the sealed test rows' hashes as stored (little-endian uint64)."""
    return hashlib.sha256(np.ascontiguousarray(test_hashes, dtype="<u8").data).hexdigest()[:16]


def _looks() -> LookLedger:
    return LookLedger(home() / "looks")


def _read_meta(name: str, path: Path) -> dict[str, Any]:
    """record.json, or one line naming it when it is cut short, garbled or lacks what a record holds."""
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise StoreError(f"the record of sweep `{name}` ({path}) is damaged ({_short(err)}); restore it from a "
                         "copy, or rerun with --fresh to start a new sweep beside it") from None
    if not isinstance(meta, dict):
        raise StoreError(f"the record of sweep `{name}` ({path}) is damaged (it is not a JSON object); restore it "
                         "from a copy, or rerun with --fresh to start a new sweep beside it")
    _refuse_old_format(name, meta)
    plan = meta.get("plan")
    missing = [key for key in _META_KEYS + ("plan",) if key not in meta] + (
        [f"plan.{key}" for key in _PLAN_KEYS if key not in plan] if isinstance(plan, dict) else [])
    if missing:
        raise StoreError(f"the record of sweep `{name}` ({path}) is damaged (it lacks {', '.join(missing)}); "
                         "restore it from a copy, or rerun with --fresh to start a new sweep beside it")
    return meta


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:120] or type(err).__name__


def _refuse_old_format(name: str, meta: dict[str, Any]) -> None:
    """Records written before plan.npz kept every fold's index list in plan.json: refused, not converted."""
    if "plan" not in meta and "test_rows" in meta:
        raise FoldsweepError(f"sweep `{name}` was recorded by an earlier foldsweep (its fold plan is in plan.json); "
                             "this version cannot resume, report or test it: rerun with --fresh to start a new sweep "
                             "beside it, or finish it with the foldsweep version that started it")


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


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file, then rename: a crash never leaves half a plan."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with tmp.open("wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)  # a handle: savez would add .npz to a path
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _write_json(path: Path, value: Any) -> None:
    """Whole or not at all (see `write_text_atomic`): a crash or a full disk never leaves half a record."""
    write_text_atomic(path, json.dumps(value, indent=1, default=str))
