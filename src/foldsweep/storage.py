"""Optuna storages: open, check before any training, and keep dead workers from holding trials.

Local sweeps use Optuna's journal file (many processes append safely; `optuna studies --storage FILE
--storage-class JournalFileBackend` opens it). Many machines share a PostgreSQL URL. Optuna's
heartbeat exists for RDB storages only, so journal trials get a lease of our own: a worker stamps its
running trials every few seconds, and a trial whose stamp is too old is failed and re-enqueued.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from foldsweep.errors import StorageError
from foldsweep.record import home

HEARTBEAT_S = 5
GRACE_S = 30
LEASE = "heartbeat"


def default_storage(name: str) -> str:
    return str(home() / "optuna" / f"{name}.journal")


def is_journal(url: str) -> bool:
    return "://" not in url


def backend(url: str) -> str:
    return "journal file" if is_journal(url) else url.split("://")[0].split("+")[0]


def preflight(url: str, n_workers: int, grace_s: int = GRACE_S) -> optuna.storages.BaseStorage:
    """Open the storage, refusing set-ups that would fail mid-sweep (before any training starts)."""
    if url.startswith("sqlite") and n_workers > 1:
        raise StorageError(f"storage `{url}`: SQLite locks under {n_workers} concurrent workers; use the default "
                           "journal file (leave `storage:` unset) or PostgreSQL for several workers")
    if is_journal(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    try:
        return RDBStorage(url, engine_kwargs=_connect_timeout(url), heartbeat_interval=HEARTBEAT_S,
                          grace_period=grace_s, failed_trial_callback=RetryFailedTrialCallback(max_retry=3))
    except Exception as err:  # the driver's error types differ per database
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(f"storage `{_redact(url)}` cannot be reached: {first}") from None


def _connect_timeout(url: str) -> dict[str, object]:
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 5}}
    if url.startswith("mysql"):
        return {"connect_args": {"connect_timeout": 5}}
    return {}


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class Heartbeat:
    """A background stamp on each trial this worker is running, so others can tell it is alive."""

    def __init__(self, storage: optuna.storages.BaseStorage, interval_s: float = HEARTBEAT_S) -> None:
        self.storage = storage
        self.interval_s = interval_s
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="foldsweep-heartbeat")
        self._thread.start()

    def hold(self, trial_ids: list[int]) -> None:
        with self._lock:
            self.trial_ids = set(trial_ids)
        self._stamp()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._stamp()

    def _stamp(self) -> None:
        with self._lock:
            ids = list(self.trial_ids)
        for trial_id in ids:
            try:
                if isinstance(self.storage, RDBStorage):
                    self.storage.record_heartbeat(trial_id)
                else:
                    self.storage.set_trial_system_attr(trial_id, LEASE, time.time())
            except Exception:  # the trial finished between the copy and the stamp: nothing to keep alive
                continue


def fail_stale_trials(study: optuna.Study, grace_s: float = GRACE_S) -> list[int]:
    """Fail trials whose worker stopped stamping them and enqueue a retry; returns failed trial numbers."""
    storage = study._storage
    if isinstance(storage, RDBStorage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        return sorted(before - after)
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stamp = trial.system_attrs.get(LEASE)
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        if now - (stamp or started) <= grace_s:
            continue
        if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            storage.set_trial_user_attr(trial._trial_id, "reason", "worker stopped answering (stale heartbeat)")
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            failed.append(trial.number)
    return failed
