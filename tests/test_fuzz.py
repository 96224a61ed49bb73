"""Fuzzing the two inputs a user writes (the sweep file and the data file) and the Optuna journal.

Valid inputs are mutated (bytes deleted, duplicated, swapped or inserted; values replaced by huge
numbers, wrong types, odd text; other encodings) and `foldsweep validate` (and, for some, a tiny `run`)
must answer with exit 0, or exit 2 and one line: never a traceback, never a hang. The default run
tries a fixed, derandomised sample (~20 s); `-m slow` tries many more. Every record of a journal is
damaged in turn (a byte, a cut, a lost newline): opening it must give the intact study state or refuse
in one line with the file untouched, never a silently different state.
"""

from __future__ import annotations

import copy
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

from foldsweep.cli import cli
from foldsweep.errors import StoreError
from foldsweep.storage import LEASE, preflight

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=400)
SECONDS_PER_CALL = 30.0  # a hang is what this catches; a validate takes well under a second


def clean_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"f1": rng.normal(size=120).round(3), "f2": rng.integers(0, 5, 120),
                         "site": [f"s{i % 20}" for i in range(120)], "y": ["a", "b"] * 60})


def clean_spec() -> dict[str, Any]:
    """A deep copy: the mutations below write into nested blocks, which tiny_spec shares with TINY."""
    spec = copy.deepcopy(tiny_spec(train={"epochs": 2, "batch_size": 4}, split={"test_size": 0.25, "outer": {"k": 2},
                                                                   "inner": {"k": 2}}))
    spec["data"] = {"path": "data.csv", "target": "y", "group": "site"}
    spec["search"] = {"lr": spec["search"]["lr"], "batch_size": {"type": "categorical", "choices": [4, 8]}}
    return spec


SPEC_TEXT = yaml.safe_dump(clean_spec(), sort_keys=False).encode()
CSV_TEXT = clean_table().to_csv(index=False).encode()

odd_values = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30), st.sampled_from([0, -1, 1, 2**63, 10**18, 1e9, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=20),
    st.sampled_from(["", "nan", "inf", "-inf", "1e999", "auto", "cpu", "cuda:0", "stratified", "\x00", "~"]),
    st.lists(st.integers(min_value=-3, max_value=1000), max_size=4), st.dictionaries(st.text(max_size=5),
                                                                                    st.integers(), max_size=3),
)


@st.composite
def byte_mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """A few edits of the bytes: delete, duplicate, swap, insert, truncate, or re-encode the whole."""
    data = bytearray(original)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if not data:
            break
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "truncate", "byte"]))
        i = draw(st.integers(min_value=0, max_value=len(data) - 1))
        j = min(len(data), i + draw(st.integers(min_value=1, max_value=64)))
        if kind == "delete":
            del data[i:j]
        elif kind == "duplicate":
            data[i:i] = data[i:j] * draw(st.integers(min_value=1, max_value=50))
        elif kind == "swap":
            k = draw(st.integers(min_value=0, max_value=len(data) - 1))
            data[i], data[k] = data[k], data[i]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[i:]
        else:
            data[i] = draw(st.integers(min_value=0, max_value=255))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        encoding = draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig"]))
        data = bytearray(bytes(data).decode("utf-8", errors="replace").encode(encoding, errors="replace"))
    return bytes(data)


@st.composite
def spec_value_mutations(draw: st.DrawFn) -> bytes:
    """The clean spec with one to three values (or whole blocks) replaced by odd ones."""
    spec = clean_spec()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        node: Any = spec
        while isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], dict) or draw(st.booleans()):
                node[key] = draw(odd_values)
                break
            node = node[key]
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True).encode()


@st.composite
def csv_value_mutations(draw: st.DrawFn) -> bytes:
    """The clean table with cells, a header name or a column replaced by odd values."""
    frame = clean_table().astype(object)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        row = draw(st.integers(min_value=0, max_value=len(frame) - 1))
        column = draw(st.sampled_from(list(frame.columns)))
        value = draw(odd_values)
        cell = "" if value is None else value if isinstance(value, (int, float, str)) else str(value)
        target = draw(st.sampled_from(["cell", "header", "column"]))
        if target == "cell":
            frame.at[row, column] = cell
        elif target == "header":
            frame = frame.rename(columns={column: str(value)})
        else:
            frame[column] = pd.Series([cell] * len(frame), index=frame.index, dtype=object)
    return frame.to_csv(index=False).encode("utf-8", errors="replace")


def answer(folder: Path, spec: bytes, table: bytes, *args: str) -> None:
    """Exit 0, or exit 2 with one line; never an exception, never a hang."""
    (folder / "sweep.yaml").write_bytes(spec)
    (folder / "data.csv").write_bytes(table)
    started = time.perf_counter()
    result = CliRunner().invoke(cli, [args[0], str(folder / "sweep.yaml"), *args[1:]])
    assert time.perf_counter() - started < SECONDS_PER_CALL
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 2:
        message = result.stderr.strip()
        assert message.startswith("error: ") and "\n" not in message, message
        assert "Traceback" not in message


def test_the_clean_inputs_validate(tmp_path: Path) -> None:
    """The mutations start from inputs that pass: a refusal below is the mutation's doing."""
    (tmp_path / "sweep.yaml").write_bytes(SPEC_TEXT)
    (tmp_path / "data.csv").write_bytes(CSV_TEXT)
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "sweep.yaml")])
    assert result.exit_code == 0, result.stderr


@FAST
@given(spec=st.one_of(byte_mutations(SPEC_TEXT), spec_value_mutations()))
def test_mutated_spec_files(workdir: Path, spec: bytes) -> None:
    answer(workdir, spec, CSV_TEXT, "validate")


@FAST
@given(table=st.one_of(byte_mutations(CSV_TEXT), csv_value_mutations()))
def test_mutated_data_files(workdir: Path, table: bytes) -> None:
    answer(workdir, SPEC_TEXT, table, "validate")


TINY_RUN = ("--set", "optuna.n_trials=1", "--set", "train.epochs=2", "--set", "tracking.enabled=false",
            "--set", "resources.workers=1", "--set", "resources.devices=cpu")


@settings(FAST, max_examples=3)
@given(spec=spec_value_mutations(), table=csv_value_mutations())
def test_a_tiny_run_on_mutated_inputs(workdir: Path, spec: bytes, table: bytes) -> None:
    answer(workdir, spec, table, "run", *TINY_RUN)


@pytest.mark.slow
@SLOW
@given(spec=st.one_of(byte_mutations(SPEC_TEXT), spec_value_mutations()),
       table=st.one_of(byte_mutations(CSV_TEXT), csv_value_mutations()))
def test_many_mutated_inputs(workdir: Path, spec: bytes, table: bytes) -> None:
    answer(workdir, spec, table, "validate")


@pytest.mark.slow
@settings(FAST, max_examples=30)
@given(spec=spec_value_mutations(), table=csv_value_mutations())
def test_many_tiny_runs_on_mutated_inputs(workdir: Path, spec: bytes, table: bytes) -> None:
    answer(workdir, spec, table, "run", *TINY_RUN)


# -- the Optuna journal: each record damaged in turn -------------------------------------------------------
@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail a probe that does not answer in time (a hang), in this process: SIGALRM interrupts the main thread."""
    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def small_journal(path: Path) -> bytes:
    """Two studies written as a sweep writes them: study attributes, slots and workers, parameters, two heartbeat
    stamps and a report per trial, every end state, a trial still running and a queued retry."""
    storage = preflight(str(path), 1)
    for key in ("outer-0", "final"):
        study = optuna.create_study(storage=storage, study_name=f"s/{key}", sampler=optuna.samplers.RandomSampler(0))
        study.set_user_attr("spec_hash", "abc")
        for slot, end in enumerate((TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)):
            trial = study.ask()
            trial.set_user_attr("slot", slot)
            trial.suggest_float("lr", 1e-3, 1e-1, log=True)
            trial.suggest_categorical("batch_size", [16, 32])
            trial.set_user_attr("worker", {"host": "h", "pid": 1, "asked": True})
            storage.set_trial_system_attr(trial._trial_id, LEASE, 1000.0 + slot)
            trial.report(0.5, 0)
            storage.set_trial_system_attr(trial._trial_id, LEASE, 2000.0 + slot)
            if end == TrialState.COMPLETE:
                study.tell(trial, 0.75)
            elif end != TrialState.RUNNING:
                study.tell(trial, state=end)
        study.enqueue_trial({"lr": 0.01, "batch_size": 16}, user_attrs={"slot": 2, "retry_of": 2})
    return path.read_bytes()


def journal_state(path: Path) -> list[Any]:
    """Everything a sweep reads back from its studies; a finished trial's lease is never read, so it is left out."""
    storage = preflight(str(path), 1)
    state: list[Any] = []
    for study in storage.get_all_studies():
        trials = [(t.number, t.state, t.params, t.values, t.user_attrs, t.intermediate_values, t.datetime_start,
                   t.datetime_complete, {k: v for k, v in t.system_attrs.items()
                                         if k != LEASE or not t.state.is_finished()})
                  for t in storage.get_all_trials(study._study_id, deepcopy=False)]
        state.append((study.study_name, study.user_attrs, study.system_attrs, trials))
    return state


def damaged_journals(intact: bytes) -> Iterator[tuple[str, bytes]]:
    """For each record: a byte made unreadable in its middle, the record cut in half, and cut in half with its
    newline lost (so that it runs into the next record; for the last, a torn tail)."""
    lines = intact.splitlines(keepends=True)
    for i, line in enumerate(lines):
        before, after, half = b"".join(lines[:i]), b"".join(lines[i + 1:]), len(line) // 2
        yield f"line {i + 1}: byte", before + line[:half] + b"\xff" + line[half + 1:] + after
        yield f"line {i + 1}: cut", before + line[:half] + b"\n" + after
        yield f"line {i + 1}: run on", before + line[:half] + after


def probe_journal(folder: Path, damaged: bytes, expected: list[Any]) -> str:
    """Open a damaged journal: the state it gives must be the expected one, or it is refused in one line with the
    file and its folder untouched. Returns which of the two (and whether the file was rewritten)."""
    folder.mkdir()
    path = folder / "j.journal"
    path.write_bytes(damaged)
    with within(10):
        try:
            state = journal_state(path)
        except StoreError as err:
            message = str(err)
            assert "\n" not in message and f"the Optuna journal `{path}` is damaged at line " in message, message
            assert path.read_bytes() == damaged
            assert {p.name for p in folder.iterdir()} <= {"j.journal", "j.journal.flock"}  # the lock, nothing else
            return "refused"
    assert state == expected
    return "repaired" if path.read_bytes() != damaged else "read as it is"


def test_a_journal_damaged_at_any_record_gives_the_intact_state_or_one_line(tmp_path: Path) -> None:
    intact = small_journal(tmp_path / "intact.journal")
    lines = intact.splitlines(keepends=True)
    whole = journal_state(tmp_path / "intact.journal")
    (tmp_path / "torn.journal").write_bytes(b"".join(lines[:-1]))
    without_tail = journal_state(tmp_path / "torn.journal")  # a torn tail: Optuna never applied it
    outcomes: Counter[str] = Counter()
    for n, (name, damaged) in enumerate(damaged_journals(intact)):
        expected = whole if damaged.endswith(b"\n") else without_tail
        try:
            outcomes[probe_journal(tmp_path / str(n), damaged, expected)] += 1
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None
    assert outcomes["refused"] and outcomes["repaired"], outcomes  # both ways were taken
    assert sum(outcomes.values()) == 3 * len(lines)


@pytest.mark.slow
def test_status_on_a_real_journal_damaged_at_any_record(workdir: Path) -> None:
    """The same at the command line, on the journal of a real sweep: `status` answers as on the intact journal, or
    exit 2 and one line with the journal untouched."""
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(tiny_spec(tracking={"enabled": False}), sort_keys=False))
    assert CliRunner().invoke(cli, ["run", str(workdir / "sweep.yaml"), "--json"]).exit_code == 0
    journal = workdir / "mlruns" / "optuna" / "tiny.journal"
    intact = journal.read_bytes()

    def status() -> Any:
        return json.loads(CliRunner().invoke(cli, ["status", "tiny", "--json"]).stdout)

    whole = status()
    journal.write_bytes(b"".join(intact.splitlines(keepends=True)[:-1]))
    without_tail = status()
    for name, damaged in damaged_journals(intact):
        for stale in journal.parent.glob("tiny.journal.*"):
            stale.unlink()
        journal.write_bytes(damaged)
        expected = whole if damaged.endswith(b"\n") else without_tail
        with within(SECONDS_PER_CALL):
            result = CliRunner().invoke(cli, ["status", "tiny", "--json"])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(name) from result.exception
        if result.exit_code == 2:
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (name, result.stderr)
            assert journal.read_bytes() == damaged, name
        else:
            assert result.exit_code == 0 and json.loads(result.stdout) == expected, (name, result.output)
