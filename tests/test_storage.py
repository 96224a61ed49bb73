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
from foldsweep.errors import DiskFull, StorageError, StoreError
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
    assert [r.message for r in caplog.records if r.name == "foldsweep"] == [
        f"repaired the Optuna journal {journal}: set aside an unfinished record of 26 bytes at its end (a write "
        f"was cut short), kept in {aside[0].name}"]
    study.tell(_running(study), 9.0)
    assert _values(journal) == [*values, 9.0]  # the next record did not land on the torn line


def _lines(journal: Path) -> list[bytes]:
    return journal.read_bytes().splitlines(keepends=True)


def _index(lines: list[bytes], op: int, after: int = 0) -> int:
    """The first line after `after` that holds a record of this kind."""
    return next(i for i, line in enumerate(lines) if i > after and json.loads(line)["op_code"] == op)


def _garble(line: bytes) -> bytes:
    """One byte in the middle of the record made unreadable (not UTF-8), as a bad sector or a stray write."""
    middle = len(line) // 2
    return line[:middle] + b"\xff" + line[middle + 1:]


def _refused(journal: Path) -> str:
    """Open the damaged journal: it must be refused in one line, with the file and its folder as they were."""
    before, files = journal.read_bytes(), sorted(journal.parent.iterdir())
    with pytest.raises(StoreError) as refused:
        _study(str(journal))
    assert journal.read_bytes() == before and sorted(journal.parent.iterdir()) == files
    message = str(refused.value)
    assert "\n" not in message and f"the Optuna journal `{journal}` is damaged at line " in message
    assert message.endswith("so the file is left as it was: rerun with --fresh to start a new sweep beside it, "
                            "or put back a copy of the journal")
    return message


def test_a_garbled_create_trial_record_inside_the_journal_is_refused_not_dropped(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    _finished_study(journal)
    lines = _lines(journal)
    second = _index(lines, JournalOperation.CREATE_TRIAL, _index(lines, JournalOperation.CREATE_TRIAL))
    lines[second] = _garble(lines[second])  # dropped, trial 1's records would land on trial 2
    journal.write_bytes(b"".join(lines))
    offset = len(b"".join(lines[:second]))
    assert f"damaged at line {second + 1} (byte {offset}): an unreadable create-trial record;" in _refused(journal)


def test_a_garbled_attribute_that_foldsweep_reads_is_refused(tmp_path: Path) -> None:
    """A trial's slot, worker, scores: each is read later (slots, dead workers, the report), so none is dropped."""
    journal = tmp_path / "j.journal"
    study = _study(str(journal))
    trial = _running(study)
    trial.set_user_attr("slot", 0)
    study.tell(trial, 1.0)
    lines = _lines(journal)
    at = _index(lines, JournalOperation.SET_TRIAL_USER_ATTR)
    lines[at] = _garble(lines[at])
    journal.write_bytes(b"".join(lines))
    assert "an unreadable set-trial-user-attr record;" in _refused(journal)


def test_a_garbled_heartbeat_stamp_of_a_trial_that_finished_later_is_replaced_in_place(tmp_path: Path) -> None:
    """A finished trial's lease is never read again: the stamp is replaced by a no-op of the same length."""
    journal = tmp_path / "j.journal"
    study = _study(str(journal))
    trial = _running(study)
    study._storage.set_trial_system_attr(trial._trial_id, LEASE, time.time())
    study.tell(trial, 1.0)
    _running(study)  # still running: later records exist, none of them about the first trial's lease
    intact = [(t.number, t.state, t.params, t.value, t.user_attrs) for t in _study(str(journal)).get_trials()]
    lines = _lines(journal)
    at = _index(lines, JournalOperation.SET_TRIAL_SYSTEM_ATTR)
    damaged = _garble(lines[at])
    journal.write_bytes(b"".join([*lines[:at], damaged, *lines[at + 1:]]))

    repaired = _study(str(journal))
    assert [(t.number, t.state, t.params, t.value, t.user_attrs) for t in repaired.get_trials()] == intact
    after = _lines(journal)
    assert [len(line) for line in after[: len(lines)]] == [len(line) for line in lines]  # no record moved
    assert after[:at] == lines[:at] and after[at + 1: len(lines)] == lines[at + 1:]
    assert list(tmp_path.glob("j.journal.torn-*"))[0].read_bytes() == damaged
    assert list(tmp_path.glob("j.journal.before-repair-*"))[0].read_bytes().startswith(b"".join(lines[:at]) + damaged)


def test_the_last_heartbeat_stamp_of_a_running_trial_is_not_dropped(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    study = _study(str(journal))
    trial = _running(study)
    study._storage.set_trial_system_attr(trial._trial_id, LEASE, time.time())
    study._storage.set_trial_user_attr(trial._trial_id, "note", 1)  # the stamp is not the tail
    lines = _lines(journal)
    at = _index(lines, JournalOperation.SET_TRIAL_SYSTEM_ATTR)
    lines[at] = _garble(lines[at])
    journal.write_bytes(b"".join(lines))
    assert "an unreadable heartbeat stamp record;" in _refused(journal)


def test_a_torn_record_glued_to_the_next_one_is_refused_unless_it_was_a_stamp(tmp_path: Path) -> None:
    """Appends cut a torn tail first, so a record run into the next is damage from outside: it could have been
    complete, and only a superseded heartbeat stamp may go (the record it runs into is kept)."""
    journal = tmp_path / "j.journal"
    _finished_study(journal)
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-40])  # `truncate -s -40`, then a plain Optuna writer appended the next record
    plain = optuna.storages.journal.JournalFileBackend(str(journal))
    for key in ("glued", "next"):
        plain.append_logs([{"op_code": JournalOperation.SET_STUDY_USER_ATTR, "worker_id": "w", "study_id": 0,
                            "user_attr": {key: 1}}])
    with pytest.raises(json.JSONDecodeError):  # what every later command met before the repair
        optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(plain))
    assert "a set-trial-state-values record cut short and run into the next one;" in _refused(journal)

    stamped = tmp_path / "stamped.journal"
    study = _study(str(stamped))
    trial = _running(study)
    study._storage.set_trial_system_attr(trial._trial_id, LEASE, time.time())
    lines = _lines(stamped)
    stamp = lines.pop()
    stamped.write_bytes(b"".join(lines) + stamp[: stamp.index(b'"heartbeat":') + 15])  # torn in its value
    optuna.storages.journal.JournalFileBackend(str(stamped)).append_logs(
        [{"op_code": JournalOperation.SET_TRIAL_STATE_VALUES, "worker_id": "w", "trial_id": trial._trial_id,
          "state": TrialState.FAIL.value, "values": None, "datetime_complete": "2026-01-01T00:00:00+00:00"}])
    assert [t.state for t in _study(str(stamped)).get_trials()] == [TrialState.FAIL]


def test_a_garbage_line_inside_the_journal_is_refused(tmp_path: Path) -> None:
    """It may stand where a record was: dropping it could renumber everything after it."""
    journal = tmp_path / "j.journal"
    _finished_study(journal)
    lines = _lines(journal)
    journal.write_bytes(b"".join(lines[:3]) + b"\x00garbage\x1b[31m\n" + b"".join(lines[3:]))
    assert "damaged at line 4 " in _refused(journal) and "an unreadable line of unknown kind;" in _refused(journal)


def _foldsweep(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, killed if it hangs (what a damaged journal used to make `run` do)."""
    return subprocess.run([sys.executable, "-m", "foldsweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=90)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_a_rerun_on_a_journal_whose_first_record_is_garbled_refuses_in_one_line(write_spec, workdir: Path) -> None:
    """Outer-0's create-study record dropped made outer-1 read as outer-0 and the rerun wait forever."""
    spec = write_spec(tracking={"enabled": False})
    assert CliRunner().invoke(cli, ["run", str(spec), "--json"]).exit_code == 0
    journal = workdir / "mlruns" / "optuna" / "tiny.journal"
    lines = _lines(journal)
    journal.write_bytes(_garble(lines[0]) + b"".join(lines[1:]))
    damaged = journal.read_bytes()
    for command in (["run", str(spec)], ["status", "tiny"]):
        message = _one_line(_foldsweep(*command, cwd=workdir))
        assert "damaged at line 1 (byte 0): an unreadable create-study record;" in message
    assert journal.read_bytes() == damaged


def test_a_study_that_cannot_go_on_ends_the_run_instead_of_waiting_forever(write_spec, workdir: Path) -> None:
    """A queued trial in a study that already has its n_trials is never asked, and the study is never done."""
    spec = write_spec(tracking={"enabled": False})
    assert CliRunner().invoke(cli, ["run", str(spec), "--json"]).exit_code == 0
    journal = str(workdir / "mlruns" / "optuna" / "tiny.journal")
    outer = optuna.load_study(study_name="tiny/outer-0", storage=preflight(journal, 1))
    outer.enqueue_trial({}, user_attrs={"slot": 5})
    message = _one_line(_foldsweep("run", str(spec), cwd=workdir))
    assert message == ("error: study outer-0 of sweep `tiny` cannot go on: 2 of 2 trials finished, 1 queued, none "
                       "running and none can be asked, so its Optuna records do not add up (a damaged or edited "
                       "journal?): rerun with --fresh to start a new sweep beside it\n")


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
