"""Storages: the journal's lock, dead-worker detection on the journal and an RDB, and the preflight."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from conftest import fill_disk, mounted_tmpfs
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import TrialState

from foldsweep.cli import cli
from foldsweep.errors import DiskFull, StorageError
from foldsweep.storage import GRACE_ENV, LEASE, LOST, FlockLock, fail_stale_trials, grace_period, preflight, retry


def _study(url: str, name: str = "s") -> optuna.Study:
    return optuna.create_study(storage=preflight(url, 1), study_name=name, load_if_exists=True)


def _running(study: optuna.Study, **worker: object) -> optuna.trial.Trial:
    trial = study.ask()
    trial.suggest_float("lr", 0.001, 0.1)
    if worker:
        trial.set_user_attr("worker", {**worker, "asked": True})  # every parameter written
    return trial


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_journal_lock_held_by_a_killed_process_does_not_block_the_next_writer(tmp_path: Path) -> None:
    journal = str(tmp_path / "j.journal")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from foldsweep.storage import FlockLock\n"
        f"FlockLock({journal!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    started = time.time()
    lock = FlockLock(journal)
    lock.acquire()
    lock.release()
    assert time.time() - started < 2  # Optuna's lock files would block for their 30 s grace period


def test_a_trial_of_a_dead_process_on_this_host_is_failed_at_once_and_retried(tmp_path: Path) -> None:
    study = _study(str(tmp_path / "j.journal"))
    dead = _running(study, name="worker-3", host=socket.gethostname(), pid=_dead_pid())
    alive = _running(study, name="worker-0", host=socket.gethostname(), pid=os.getpid())

    assert fail_stale_trials(study) == [dead.number]

    trials = {t.number: t for t in study.get_trials()}
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[dead.number].user_attrs[LOST] is True
    assert "worker-3" in trials[dead.number].user_attrs["reason"] and "died" in trials[dead.number].user_attrs["reason"]
    assert trials[alive.number].state == TrialState.RUNNING
    retry = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].system_attrs["fixed_params"] == trials[dead.number].params  # enqueued
    assert retry[0].user_attrs == {"retry_of": dead.number, "retries": 1, "slot": dead.number}  # its own slot


def test_a_journal_trial_is_failed_when_its_lease_is_older_than_the_grace(tmp_path: Path) -> None:
    study = _study(str(tmp_path / "j.journal"))
    away = _running(study, name="remote", host="another-host", pid=1)
    fresh = _running(study, name="remote", host="another-host", pid=1)
    study._storage.set_trial_system_attr(away._trial_id, LEASE, time.time() - 100)
    study._storage.set_trial_system_attr(fresh._trial_id, LEASE, time.time())

    assert fail_stale_trials(study, grace_s=30) == [away.number]
    reason = study.get_trials()[away.number].user_attrs["reason"]
    assert reason == "worker remote stopped answering (no heartbeat for 30s)"


def test_retries_stop_after_three(tmp_path: Path) -> None:
    study = _study(str(tmp_path / "j.journal"))
    trial = _running(study, name="w", host=socket.gethostname(), pid=_dead_pid())
    study._storage.set_trial_user_attr(trial._trial_id, "retries", 3)
    assert fail_stale_trials(study) == [trial.number]
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_optunas_heartbeat_fails_an_rdb_trial_whose_worker_stopped_beating(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GRACE_ENV, "1")
    study = _study(f"sqlite:///{tmp_path / 'o.db'}")
    trial = _running(study, name="remote", host="another-host", pid=1)
    study._storage.record_heartbeat(trial._trial_id)
    assert fail_stale_trials(study) == []
    time.sleep(2.5)
    assert fail_stale_trials(study) == [trial.number]
    assert study.get_trials()[trial.number].user_attrs[LOST] is True
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [study.get_trials()[trial.number].params]


def test_the_grace_period_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GRACE_ENV, "4")
    assert grace_period() == 4
    monkeypatch.setenv(GRACE_ENV, "soon")
    with pytest.raises(StorageError, match=f"{GRACE_ENV}='soon' is not a number of seconds"):
        grace_period()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sqlite_with_two_workers_is_refused_before_training(write_spec, workdir: Path) -> None:
    spec = write_spec(resources={"devices": "cpu", "workers": 2})
    result = CliRunner().invoke(cli, ["run", str(spec), "--storage", f"sqlite:///{workdir / 'o.db'}"])
    assert result.exit_code == 2
    assert "SQLite locks under 2 concurrent workers" in result.stderr
    assert "journal file" in result.stderr and "PostgreSQL" in result.stderr
    assert not (workdir / "mlruns" / "sweeps").exists()  # refused before the sweep was even recorded


def test_an_unreachable_postgresql_fails_fast_with_a_clear_message(write_spec) -> None:
    spec = write_spec()
    url = f"postgresql://sweeper:secret@127.0.0.1:{_free_port()}/sweeps"
    started = time.time()
    result = CliRunner().invoke(cli, ["run", str(spec), "--storage", url])
    assert result.exit_code == 2
    assert time.time() - started < 10
    assert f"storage `postgresql://sweeper:***@127.0.0.1:{url.rsplit(':', 1)[1]}` cannot be reached" in result.stderr
    assert "secret" not in result.stderr


def test_status_reports_the_backend(write_spec) -> None:
    spec = write_spec()
    assert CliRunner().invoke(cli, ["run", str(spec), "--json"]).exit_code == 0
    result = CliRunner().invoke(cli, ["status", "tiny", "--json"])
    entry = json.loads(result.stdout)[0]
    assert entry["backend"] == "journal file"
    assert entry["storage"].endswith("tiny.journal")
    assert entry["workers"] == []  # nothing is running any more
    assert "journal file" in CliRunner().invoke(cli, ["status", "tiny"]).stdout


# -- torn writes and a full disk ---------------------------------------------------------------------------
def _finished_study(journal: Path, n: int = 3) -> list[float]:
    study = _study(str(journal))
    for i in range(n):
        trial = _running(study)
        study.tell(trial, float(i))
    return [t.value for t in study.get_trials()]


def _values(journal: Path) -> list[float | None]:
    return [t.value for t in _study(str(journal)).get_trials()]


def test_a_torn_last_journal_record_is_set_aside_and_the_study_goes_on(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "j.journal"
    values = _finished_study(journal)
    intact = journal.read_bytes()
    with open(journal, "ab") as f:
        f.write(b'{"op_code":8,"worker_id":"')  # what a full disk left in the issue

    study = _study(str(journal))  # repaired on open, before anything (opening appends a record) is appended
    assert journal.read_bytes().startswith(intact + b'{"op_code":0,')
    aside = list(tmp_path.glob("j.journal.torn-*"))
    assert [p.read_bytes() for p in aside] == [b'{"op_code":8,"worker_id":"']
    assert [r.message for r in caplog.records] == [
        f"repaired the Optuna journal {journal}: set aside an unfinished record of 26 bytes at its end (a write "
        f"was cut short), kept in {aside[0].name}"]
    study.tell(_running(study), 9.0)
    assert _values(journal) == [*values, 9.0]  # the next record did not land on the torn line


def test_a_torn_record_glued_to_the_next_one_is_repaired_keeping_the_next(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    values = _finished_study(journal)
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-40])  # `truncate -s -40`, then the old code appended the next record to it
    lost = whole[whole.rstrip(b"\n").rfind(b"\n") + 1 : -40]
    plain = optuna.storages.journal.JournalFileBackend(str(journal))
    for key in ("glued", "next"):
        plain.append_logs([{"op_code": JournalOperation.SET_STUDY_USER_ATTR, "worker_id": "w", "study_id": 0,
                            "user_attr": {key: 1}}])
    with pytest.raises(json.JSONDecodeError):  # what every later command met before the repair
        optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(plain))

    study = _study(str(journal))
    assert _values(journal)[:-1] == values[:-1] and len(study.get_trials()) == len(values)
    assert study.user_attrs == {"glued": 1, "next": 1}  # the record glued to the torn one was kept
    assert list(tmp_path.glob("j.journal.torn-*"))[0].read_bytes() == lost + b"\n"
    assert list(tmp_path.glob("j.journal.before-repair-*"))[0].read_bytes().startswith(whole[:-40])
    study.tell(_running(study), 7.0)
    assert _values(journal)[-1] == 7.0


def test_a_garbage_line_inside_the_journal_is_set_aside(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    values = _finished_study(journal)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3]) + b"\x00garbage\x1b[31m\n" + b"".join(lines[3:]))
    assert _values(journal) == values
    assert list(tmp_path.glob("j.journal.torn-*"))[0].read_bytes() == b"\x00garbage\x1b[31m\n"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MB file system: writes past it fail with ENOSPC."""
    yield from mounted_tmpfs(tmp_path / "disk", "1m")


def test_a_full_disk_fails_the_append_in_one_line_and_leaves_no_torn_record(small_disk: Path) -> None:
    journal = small_disk / "j.journal"
    values = _finished_study(journal)
    intact = journal.read_bytes()
    fill_disk(small_disk)
    study = _study(str(journal))
    with pytest.raises(DiskFull, match=r"^disk full while writing the Optuna journal .*j\.journal: nothing "
                                       "finished is lost; free space and rerun the same command to resume$"):
        for _ in range(100):  # the last free block may still take a record or two
            study.tell(_running(study), 1.0)
    assert journal.read_bytes().endswith(b"\n") and journal.read_bytes().startswith(intact)
    (small_disk / "filler").unlink()
    study = _study(str(journal))
    study.tell(_running(study), 2.0)
    assert _values(journal)[: len(values)] == values and _values(journal)[-1] == 2.0


def test_a_trial_lost_while_its_parameters_were_written_is_queued_in_its_slot_without_them(tmp_path: Path) -> None:
    study = _study(str(tmp_path / "j.journal"))
    half = study.ask()  # killed while asked: one parameter written, no worker stamp yet
    half.suggest_float("lr", 0.001, 0.1)
    study._storage.set_trial_user_attr(half._trial_id, "slot", 4)
    retry(study, study.get_trials()[half.number])
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.system_attrs.get("fixed_params"), t.user_attrs["slot"]) for t in queued] == [({}, 4)]
