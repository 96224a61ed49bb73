"""Optuna storages: open, check before any training, and keep dead workers from holding trials.

Local sweeps use Optuna's journal file (many processes append safely; `optuna studies --storage FILE
--storage-class JournalFileBackend` opens it to read). Many machines share a PostgreSQL URL. Optuna's
heartbeat exists for RDB storages only, so journal trials get a lease of our own: a worker stamps its
running trials every few seconds, and a trial whose stamp is too old is failed and re-enqueued. A
trial whose worker ran on this host under a process id that no longer exists is dead without waiting
for its lease to run out, which is what makes a rerun after `kill -9` pick up at once.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from foldsweep.compat import BaseJournalFileLock, stale_trial_ids, storage_of, study_id, trial_id
from foldsweep.crash import crash_point
from foldsweep.errors import DiskFull, StorageError, StoreError, os_hint
from foldsweep.journal import LEASE, damaged_records, refusal
from foldsweep.record import home

__all__ = ["GRACE_ENV", "GRACE_S", "HEARTBEAT_S", "LEASE", "LOST", "MAX_RETRIES", "SCHEMA_ATTEMPTS", "SLOT",
           "TAIL_SCAN", "FlockLock", "Heartbeat", "RepairingJournal", "backend", "default_storage",
           "fail_stale_trials", "grace_period", "heartbeat_interval", "holder", "is_journal", "notice", "preflight",
           "redact", "retry", "write_error"]

HEARTBEAT_S = 5
GRACE_S = 30
GRACE_ENV = "FOLDSWEEP_HEARTBEAT_GRACE_S"
MAX_RETRIES = 3
SCHEMA_ATTEMPTS = 5
TAIL_SCAN = 1 << 16  # bytes read back to find the last complete record of a torn journal
SLOT = "slot"  # which of a study's n_trials places a trial fills; a retry keeps the slot of what it repeats
LOST = "lost"  # a trial failed by the machinery (dead worker, surplus, Ctrl-C), not by its configuration


class _CurrentStderr(logging.Handler):
    """Writes to whatever `sys.stderr` is when a notice comes (the CLI's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


_log = logging.getLogger("foldsweep")
if not _log.handlers:
    _log.addHandler(_CurrentStderr(logging.WARNING))


def default_storage(name: str) -> str:
    return str(home() / "optuna" / f"{name}.journal")


def is_journal(url: str) -> bool:
    return "://" not in url


def backend(url: str) -> str:
    return "journal file" if is_journal(url) else url.split("://")[0].split("+")[0]


def grace_period() -> float:
    """Seconds without a stamp after which a running trial counts as dead (`FOLDSWEEP_HEARTBEAT_GRACE_S`).

    Every process of a sweep must use the same value: a worker stamps every third of it.
    """
    raw = os.environ.get(GRACE_ENV, "")
    try:
        grace = float(raw) if raw else float(GRACE_S)
    except ValueError:
        raise StorageError(f"{GRACE_ENV}={raw!r} is not a number of seconds") from None
    if grace < 1:
        raise StorageError(f"{GRACE_ENV} must be at least 1 second, got {raw}")
    return grace


def heartbeat_interval() -> float:
    return min(float(HEARTBEAT_S), grace_period() / 3)


def preflight(url: str, n_workers: int) -> optuna.storages.BaseStorage:
    """Open the storage, refusing set-ups that would fail mid-sweep (before any training starts)."""
    if url.startswith("sqlite") and n_workers > 1:
        raise StorageError(f"storage `{url}`: SQLite locks under {n_workers} concurrent workers; use the default "
                           "journal file (leave `storage:` unset) on one machine, or PostgreSQL for several")
    grace = grace_period()
    if is_journal(url):
        path = Path(url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = RepairingJournal(str(path))
        except OSError as err:
            raise write_error(err, f"journal {path}") from None
        return JournalStorage(backend)
    # ask/tell with a heartbeat is what we do on purpose: the coordinator runs the stale-trial checks itself
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    driver_url = _with_driver(url)
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # Optuna marks its heartbeat experimental; we rely on it knowingly
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(driver_url, engine_kwargs=_connect_timeout(url),
                                  heartbeat_interval=max(1, int(heartbeat_interval())),
                                  grace_period=max(1, int(grace)))
        except Exception as err:  # the driver's error types differ per database
            text = str(err).strip()
            if _creating_schema_elsewhere(text) and attempt < SCHEMA_ATTEMPTS - 1:
                time.sleep(0.5 * (attempt + 1))
                continue
            first = text.splitlines()[0] if text else type(err).__name__
            raise StorageError(f"storage `{redact(url)}` cannot be reached: {first}") from None
    raise AssertionError("unreachable")


def _creating_schema_elsewhere(error: str) -> bool:
    """Workers that start together on an empty database all create Optuna's tables; all but one collide."""
    return any(s in error.lower() for s in ("already exists", "duplicate key", "uniqueviolation"))


def _with_driver(url: str) -> str:
    """A plain `postgresql://` URL works with whichever driver is installed (SQLAlchemy 2.1 assumes psycopg 3)."""
    if not url.startswith("postgresql://"):
        return url
    for module, scheme in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return scheme + url[len("postgresql"):]
    raise StorageError("storage `postgresql://...` needs a PostgreSQL driver: pip install 'foldsweep[postgres]'")


def _connect_timeout(url: str) -> dict[str, object]:
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 5}}
    if url.startswith("mysql"):
        return {"connect_args": {"connect_timeout": 5}}
    return {}


def redact(url: str) -> str:
    """The URL with its password masked, for messages, MLflow tags and printed summaries."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else url


class FlockLock(BaseJournalFileLock):
    """The journal's write lock as a kernel `flock`: released by the kernel when its holder dies.

    Optuna's file locks are lock files: one left by a `kill -9` blocks every writer for 30 s, and
    Ctrl-C while waiting for one deletes the lock another process holds. This lock has neither
    problem; it needs a local file system (several machines share PostgreSQL instead).
    """

    def __init__(self, journal: str) -> None:
        self.path = journal + ".flock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = _open_lock_file(self.path)
        if fd is None:  # a read-only mlruns/ with no lock file: no one can write there, so no one to wait for
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock


def _open_lock_file(path: str) -> int | None:
    """The lock file, opened for writing; on a read-only folder opened for reading (`flock` needs no write
    access), or None when it cannot be made there. Reading a sweep (`status`, `report`, `export`) needs no write."""
    try:
        return os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def write_error(err: OSError, what: str) -> StorageError:
    """One line for a failed write: a full disk says so (a rerun after freeing space resumes)."""
    if err.errno == errno.ENOSPC:
        return DiskFull(f"disk full while writing {what}: nothing finished is lost; free space and rerun "
                        "the same command to resume")
    hint = os_hint(err.errno)
    return StorageError(f"cannot write {what}: {err.strerror or err}" + (f"; {hint}" if hint else ""))


class RepairingJournal(JournalFileBackend):
    """Optuna's journal file that survives torn writes.

    A process that dies (or hits a full disk) in the middle of an append leaves half a record at the
    end. Optuna's reader skips it, but the next append lands on the same line and turns two records
    into one unreadable one, after which nothing opens the study again. So, under the write lock:
    before each append a torn tail is cut off, and an append that fails is cut back to where it began.
    On open, a torn tail is cut too; damage inside the journal is repaired only where no later record
    depends on it, else refused in one line with the file untouched (`journal` says which). What is
    set aside is kept beside the journal (`NAME.journal.torn-<time>`), and one line says what was done.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, lock_obj=FlockLock(path))
        self._path = path
        self.journal_path = path  # what `errors.explain` names when Optuna's reader fails inside it
        self._lock.acquire()
        try:
            _repair(path)
        finally:
            self._lock.release()

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
        self._lock.acquire()
        try:
            with open(self._path, "r+b", buffering=0) as f:
                end = _cut_torn_tail(self._path, f)
                try:
                    f.seek(end)
                    _write_all(f, data)
                except BaseException as err:  # a full disk, or Ctrl-C between two parts of the record
                    f.truncate(end)  # a half-written record must not be left for the next append to join
                    if isinstance(err, OSError):
                        raise write_error(err, f"the Optuna journal {self._path}") from None
                    raise
        finally:
            self._lock.release()


def _write_all(f: BinaryIO, data: bytes) -> None:
    """Write and fsync; `FOLDSWEEP_CRASH_AT=journal:N` stops the process halfway through the Nth record."""
    half = len(data) // 2
    f.write(data[:half])
    crash_point("journal")
    written = half
    while written < len(data):
        written += f.write(data[written:]) or 0
    os.fsync(f.fileno())


def _cut_torn_tail(path: str, f: BinaryIO) -> int:
    """The offset to append at; bytes after the last newline (a writer died mid-record) are set aside."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return 0
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return end
    start = max(0, end - TAIL_SCAN)
    f.seek(start)
    block = f.read()
    if b"\n" not in block and start:
        f.seek(0)
        start, block = 0, f.read()
    keep = start + block.rfind(b"\n") + 1
    _set_aside(path, block[keep - start:], f"an unfinished record of {end - keep} bytes at its end (a write was "
               "cut short)")
    f.truncate(keep)
    return keep


def _repair(path: str) -> None:
    """Cut a torn tail, replace damaged heartbeat stamps, or refuse, leaving the file as it was (see `journal`).

    What is replaced is set aside, and the journal as it was is kept beside it (`.before-repair-<time>`).
    """
    *body, tail = Path(path).read_bytes().split(b"\n")
    damage = damaged_records(body)
    if not damage:
        if tail:
            with open(path, "r+b") as f:
                _cut_torn_tail(path, f)
        return
    if any(d.replacement is None for d in damage):
        raise StoreError(refusal(path, damage))
    for d in damage:
        body[d.line - 1] = d.replacement or b""
    backup = f"{path}.before-repair-{_stamp()}"
    lines = ", ".join(str(d.line) for d in damage)
    _set_aside(path, b"".join(d.bad + b"\n" for d in damage) + tail,
               f"{len(damage)} damaged heartbeat stamp(s) of trials stamped again or finished later (line {lines}; "
               f"each replaced by a record of the same length that changes nothing; the journal as it was is kept "
               f"as {Path(backup).name})")
    tmp = f"{path}.repairing"
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in body))
        f.flush()
        os.fsync(f.fileno())
    os.link(path, backup)
    os.replace(tmp, path)


def _set_aside(path: str, data: bytes, what: str) -> None:
    aside = f"{path}.torn-{_stamp()}"
    try:
        with open(aside, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise write_error(err, f"{aside} (the journal has {what}; it is left as it was)") from None
    notice(f"repaired the Optuna journal {path}: set aside {what}, kept in {Path(aside).name}")


def notice(message: str) -> None:
    """One line on stderr about something repaired or made again, so the user knows and can look."""
    _log.warning(message)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class Heartbeat:
    """A background stamp on each trial this worker is running, so others can tell it is alive."""

    def __init__(self, storage: optuna.storages.BaseStorage, interval_s: float | None = None) -> None:
        self.storage = storage
        self.interval_s = interval_s or heartbeat_interval()
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="foldsweep-heartbeat")
        self._thread.start()

    def hold(self, trial_ids: list[int]) -> None:
        """Stamp exactly these trials from now on (already stamped when asked); `[]` once they are told."""
        with self._lock:
            self.trial_ids = set(trial_ids)

    def add(self, trial_id: int) -> None:
        """Stamp a trial right after it is asked: Optuna never fails an RDB trial that has no heartbeat yet."""
        with self._lock:
            self.trial_ids.add(trial_id)
        self._stamp([trial_id])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                ids = list(self.trial_ids)
            self._stamp(ids)

    def _stamp(self, ids: list[int]) -> None:
        for held in ids:
            try:
                if isinstance(self.storage, RDBStorage):
                    self.storage.record_heartbeat(held)
                else:
                    self.storage.set_trial_system_attr(held, LEASE, time.time())
            except Exception:  # the trial finished between the copy and the stamp: nothing to keep alive
                continue


def holder() -> dict[str, Any]:
    """Who runs a trial, stored on it when asked, so a rerun on this host can tell a dead process at once."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def fail_stale_trials(study: optuna.Study, grace_s: float | None = None) -> list[int]:
    """Fail trials whose worker is gone and queue each for a retry; returns the failed trial numbers.

    Gone means: its lease (Optuna's heartbeat on an RDB, timed by the database server's clock; our
    stamp on the journal) is older than the grace period, or it was run on this host by a process
    that no longer exists. The retry is queued here rather than by Optuna's callback so that both
    storages mark the failed trial `lost` (not the configuration's fault) before failing it.
    """
    storage = storage_of(study)
    grace = grace_s if grace_s is not None else grace_period()
    expired: set[int] = set()
    if isinstance(storage, RDBStorage):
        expired = set(stale_trial_ids(storage, study_id(study)))
        grace = storage.grace_period or grace
    failed: list[int] = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _why_dead(trial, now, None if isinstance(storage, RDBStorage) else grace)
        if not reason and trial_id(trial) in expired:
            reason = _no_heartbeat(trial, grace)
        if reason and _fail_and_retry(study, trial, reason):
            failed.append(trial.number)
    return failed


def _why_dead(trial: optuna.trial.FrozenTrial, now: float, grace_s: float | None) -> str:
    who = trial.user_attrs.get("worker") or {}
    if who.get("host") == socket.gethostname() and who.get("pid") and not _alive(int(who["pid"])):
        return f"worker {who.get('name', '?')} (pid {who['pid']}) died while running it"
    if grace_s is None:
        return ""
    stamp = trial.system_attrs.get(LEASE)
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    return _no_heartbeat(trial, grace_s) if now - (stamp or started) > grace_s else ""


def _no_heartbeat(trial: optuna.trial.FrozenTrial, grace_s: float) -> str:
    name = (trial.user_attrs.get("worker") or {}).get("name", "?")
    return f"worker {name} stopped answering (no heartbeat for {grace_s:.0f}s)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fail_and_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> bool:
    """False when another process finished or failed the trial first."""
    storage, number = storage_of(study), trial_id(trial)
    try:
        storage.set_trial_user_attr(number, "reason", reason)
        storage.set_trial_user_attr(number, LOST, True)
        if not storage.set_trial_state_values(number, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    retry(study, trial)
    return True


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.trial.Trial) -> None:
    """Queue a lost trial's configuration again, in its slot, unless it was lost MAX_RETRIES times already.

    Parameters are written one by one while a trial is asked, and its `worker` stamp says `asked` once
    they all are. One lost before that never trained: its slot is queued without parameters, and the
    sampler, reseeded from the slot, draws them again as they would have been.
    """
    retries = int(trial.user_attrs.get("retries", 0)) + 1
    if retries <= MAX_RETRIES:
        params = trial.params if (trial.user_attrs.get("worker") or {}).get("asked") else {}
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number, "retries": retries,
                                                SLOT: int(trial.user_attrs.get(SLOT, trial.number))})
