"""The sweep's record on disk: small JSON, the plan as hash-checked arrays, meta read once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_spec

import foldsweep.record as record_module
from foldsweep.data import Dataset, hash_rows
from foldsweep.errors import FoldsweepError, SealError
from foldsweep.record import PLAN_FILE, SweepRecord, create_or_resume, plan_hash
from foldsweep.spec import SweepSpec, parse_spec

ROWS = 200_000


def synthetic(n: int = ROWS, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4), dtype=np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    return Dataset(name="synthetic", X=X, y=y, feature_names=["a", "b", "c", "d"], task="classification",
                   metric="accuracy", classes=["neg", "pos"], row_hashes=hash_rows(X, y), target="y")


def spec() -> SweepSpec:
    return parse_spec(tiny_spec(split={"test_size": 0.2, "seed": 0, "outer": {"k": 3}, "inner": {"k": 2}}),
                      source="test")


@pytest.fixture
def created(workdir: Path) -> tuple[SweepRecord, Dataset]:
    data = synthetic()
    record, _, resumed = create_or_resume(spec(), data, "journal")
    assert not resumed
    return record, data


def test_record_json_stays_small_and_the_plan_comes_back_whole(created: tuple[SweepRecord, Dataset]) -> None:
    """record.json held every sealed row's index and hash as JSON (MBs here, about a GB at 10^7 rows)."""
    record, data = created
    plan = record.plan
    assert (record.folder / "record.json").stat().st_size < 4_000
    assert not (record.folder / "plan.json").exists() and (record.folder / PLAN_FILE).is_file()
    again, back, resumed = create_or_resume(spec(), data, "journal")
    assert resumed and back.layout == plan.layout == [3, 2, 2, 2, 2]
    for a, b in zip([back.dev, back.test, *(r for f in back.folds for r in (f.train, f.valid))],
                    [plan.dev, plan.test, *(r for f in plan.folds for r in (f.train, f.valid))], strict=True):
        assert np.array_equal(a, b) and a.dtype == np.int64
    assert np.array_equal(again.test_hashes, data.row_hashes[plan.test])
    assert again.meta["plan_hash"] == plan_hash(back, ROWS)
    assert set(plan.test).isdisjoint(plan.dev) and len(plan.test) + len(plan.dev) == ROWS


def test_meta_is_read_once_until_the_file_changes(created: tuple[SweepRecord, Dataset],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    record, _ = created
    reads = []
    real = json.loads
    monkeypatch.setattr(record_module.json, "loads", lambda text: reads.append(1) or real(text))
    fresh = SweepRecord(record.name, record.folder)
    for _ in range(5):
        assert fresh.meta["name"] == "tiny"
    assert len(reads) == 1
    SweepRecord(record.name, record.folder).update(summary={"done": True})  # another reader writes
    assert fresh.meta["summary"] == {"done": True} and len(reads) >= 2


def test_a_damaged_plan_is_refused_in_one_line(created: tuple[SweepRecord, Dataset]) -> None:
    record, _ = created
    path = record.folder / PLAN_FILE
    with np.load(path) as arrays:
        masks, hashes = arrays["masks"].copy(), arrays["test_hashes"].copy()
    moved = masks.copy()
    moved[2, 0] ^= 1  # one row moved between sets of the first fold
    edited = hashes.copy()
    edited[0] ^= np.uint64(1)  # one sealed row's hash
    damaged = r"^the fold plan of sweep `tiny` \(.*plan.npz\) was changed or damaged"
    for stored in ({"masks": moved, "test_hashes": hashes}, {"masks": masks, "test_hashes": edited}):
        with path.open("wb") as handle:
            np.savez(handle, **stored)
        with pytest.raises(SealError, match=damaged) as info:
            SweepRecord(record.name, record.folder).plan  # noqa: B018 -- reading is what is tested
        assert "\n" not in str(info.value) and "--fresh" in str(info.value)
    path.write_bytes(b"not a zip")
    with pytest.raises(SealError, match=r"cannot be read \(.*\); .*rerun with --fresh"):
        SweepRecord(record.name, record.folder).plan  # noqa: B018


def test_a_record_from_before_plan_npz_is_refused_in_one_line(workdir: Path) -> None:
    folder = workdir / "mlruns" / "sweeps" / "old"
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps({"dev": [0, 1], "test": [2]}))
    (folder / "record.json").write_text(json.dumps({"name": "old", "spec_hash": "x", "fingerprint": "y",
                                                    "plan_hash": "z", "n_rows": 3, "test_rows": [2],
                                                    "test_hashes": ["00"], "storage": "journal"}))
    with pytest.raises(FoldsweepError, match=r"^sweep `old` was recorded by an earlier foldsweep .*--fresh") as info:
        SweepRecord.open("old").meta  # noqa: B018
    assert "\n" not in str(info.value)


# -- damaged files at every position: one line naming the file, or the record exactly as it was ------------
@pytest.fixture
def small(workdir: Path) -> SweepRecord:
    record, _, _ = create_or_resume(spec(), synthetic(n=300), "journal")
    return record


def test_a_plan_with_any_byte_flipped_is_refused_in_one_line_or_reads_the_same(small: SweepRecord) -> None:
    """A flipped byte anywhere in plan.npz (zip headers, CRCs, the arrays) never gives a traceback or another plan."""
    path = small.folder / PLAN_FILE
    intact = path.read_bytes()
    plan, hashes = small.plan, small.test_hashes
    outcomes = set()
    for position in range(len(intact)):
        damaged = bytearray(intact)
        damaged[position] ^= 0x5A
        path.write_bytes(bytes(damaged))
        fresh = SweepRecord(small.name, small.folder)
        try:
            same = (np.array_equal(fresh.plan.to_masks(300), plan.to_masks(300))
                    and np.array_equal(fresh.test_hashes, hashes))
        except SealError as err:
            assert "\n" not in str(err) and str(path) in str(err), position
            outcomes.add("refused")
            continue
        assert same, f"byte {position} changed the plan silently"
        outcomes.add("same")
    assert "refused" in outcomes
    path.write_bytes(intact)


def test_a_record_json_cut_anywhere_is_one_line_naming_it(small: SweepRecord) -> None:
    path = small.folder / "record.json"
    intact = path.read_text()
    for end in range(len(intact)):
        path.write_text(intact[:end])
        with pytest.raises(FoldsweepError, match=r"^the record of sweep `tiny` \(.*record.json\) is damaged") as info:
            SweepRecord(small.name, small.folder).meta  # noqa: B018
        assert "\n" not in str(info.value)
    path.write_text(json.dumps({"name": "tiny"}))
    lacks = r"is damaged \(it lacks spec_hash, fingerprint, plan_hash, n_rows, storage, plan\)"
    with pytest.raises(FoldsweepError, match=lacks):
        SweepRecord(small.name, small.folder).meta  # noqa: B018
    path.write_text("[1, 2]")
    with pytest.raises(FoldsweepError, match=r"is damaged \(it is not a JSON object\)"):
        SweepRecord(small.name, small.folder).meta  # noqa: B018
    path.write_text(intact)


def test_a_ledger_cut_anywhere_is_one_line_never_no_looks(small: SweepRecord) -> None:
    with small.looking(False) as number:
        small.append_look({"look_number": number, "time": "2026-12-08T00:00:00+00:00", "score": 0.5})
    path = small.folder / "ledger.json"
    intact = path.read_text()
    for end in range(len(intact)):
        path.write_text(intact[:end])
        with pytest.raises(SealError, match=r"ledger of sweep `tiny` \(.*ledger.json\) is damaged") as info:
            SweepRecord(small.name, small.folder).check_can_look(True)
        assert "\n" not in str(info.value)
