"""The one door to Optuna's and MLflow's private parts.

foldsweep needs a few things neither library makes public: a study's storage and ids (to write a
trial's slot before its parameters are sampled, and to fail a dead worker's trial), the stale-trial
query behind Optuna's heartbeat, the journal's lock base class and operation codes, the samplers'
random state (reseeded per slot: the determinism promise rests on it), MLflow's schema revision and
its scoped tracking URI. Each is reached here and nowhere else (a test greps for it), and a missing
one is an error that names it and the supported versions, never a silent skip: a reseed that quietly
did nothing would make a resumed sweep sample other configurations with no word said.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from foldsweep.errors import FoldsweepError

if TYPE_CHECKING:
    import optuna
    from optuna.storages.journal._file import BaseJournalFileLock
    from optuna.storages.journal._storage import JournalOperation

__all__ = ["BaseJournalFileLock", "IncompatibleLibrary", "JournalOperation", "dispose_store_engine",
           "latest_schema_revision", "list_trials", "seed_sampler", "stale_trial_ids", "storage_of", "study_id",
           "trial_id", "use_tracking_uri"]

SUPPORTED = "optuna>=4.5,<6 and mlflow>=3.4,<4"


class IncompatibleLibrary(FoldsweepError):
    """An installed Optuna or MLflow lacks a private part foldsweep relies on."""


def __getattr__(name: str) -> Any:
    """The journal's lock base class and operation codes, imported on first use: the MLflow writer process
    reaches this module too, and must not pay for Optuna's import."""
    if name == "BaseJournalFileLock":
        from optuna.storages.journal._file import BaseJournalFileLock

        return BaseJournalFileLock
    if name == "JournalOperation":
        from optuna.storages.journal._storage import JournalOperation

        return JournalOperation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _required(owner: Any, name: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        raise IncompatibleLibrary(f"this Optuna/MLflow has no `{type(owner).__name__}.{name}`, which foldsweep "
                                  f"relies on; install versions in the supported range ({SUPPORTED})") from None


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage: trial attributes are written there before the sampler runs."""
    storage: optuna.storages.BaseStorage = _required(study, "_storage")
    return storage


def study_id(study: optuna.Study) -> int:
    return int(_required(study, "_study_id"))


def trial_id(trial: optuna.trial.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (not its number within the study)."""
    return int(_required(trial, "_trial_id"))


def list_trials(study: optuna.Study, *args: Any, **kwargs: Any) -> list[optuna.trial.FrozenTrial]:
    """`Study._get_trials`, which samplers call to read the history (with a cache `get_trials` lacks)."""
    trials: list[optuna.trial.FrozenTrial] = _required(study, "_get_trials")(*args, **kwargs)
    return trials


def stale_trial_ids(storage: optuna.storages.BaseStorage, of_study: int) -> list[int]:
    """Running trials whose heartbeat is older than the storage's grace period."""
    return list(_required(storage, "_get_stale_trial_ids")(of_study))


def seed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed every random state of a TPE, random or QMC sampler (TPE's startup trials, QMC's independent
    parameters come from an inner random sampler). Raises IncompatibleLibrary when none is found."""
    parts = [sampler, getattr(sampler, "_random_sampler", None), getattr(sampler, "_independent_sampler", None)]
    states = [getattr(part, "_rng", None) for part in parts if part is not None]
    seeded = 0
    for state in states:
        if state is not None:
            _required(state, "rng").seed(seed % 2**32)
            seeded += 1
    if not seeded:
        raise IncompatibleLibrary(f"cannot seed the random state of {type(sampler).__name__} (no `_rng`): a "
                                  f"resumed sweep would sample other configurations; install versions in the "
                                  f"supported range ({SUPPORTED})")


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`log_model`) pointed at `uri` for the block, then back."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def dispose_store_engine(client: Any) -> None:
    """Close an MlflowClient's database connections (a SQLite store folds its write-ahead log back in)."""
    _required(_required(_required(client, "_tracking_client"), "store"), "engine").dispose()


def latest_schema_revision() -> str:
    """The MLflow database schema this MLflow writes (a store's template is kept per revision)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return str(_get_latest_schema_revision())
