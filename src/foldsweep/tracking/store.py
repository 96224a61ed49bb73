"""Where the MLflow store lives, how it is created, and how to write to it when processes share one SQLite file.

Every writer (the tracker, its writer process, the UI) resolves the store the same way, so relative
paths, creation, WAL mode and lock retries are decided once here.

Creating a fresh SQLite store means MLflow's schema migrations: seconds (3.6 s on 2 cores) and not
safe when two processes do it at once (both migrate; one dies with `duplicate column name`). So a
fresh store is created under a file lock, as a copy of a schema template: an empty store that MLflow's
own migrations built once per machine and MLflow schema revision (the revision names the template, so a
template can only ever be copied into an MLflow that expects exactly its schema). The template holds no
rows that depend on a folder: its Default experiment (which records an absolute artifact path) is
removed, and MLflow recreates it, for the new folder, when it first opens the copy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from foldsweep.compat import latest_schema_revision
from foldsweep.errors import StoreError

__all__ = ["CACHE_ENV", "LOCK_TIMEOUT_S", "create_store", "open_experiment", "portable_uri", "warm_up"]

T = TypeVar("T")
CACHE_ENV = "FOLDSWEEP_CACHE"  # where the schema template is kept (default: ~/.cache/foldsweep)
LOCK_TIMEOUT_S = 600.0  # a first creation that waits on MLflow's migrations under a busy machine


def _absolute_sqlite(uri: str) -> str:
    """A relative sqlite path is pinned to the current folder so worker processes all hit one file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def portable_uri(uri: str) -> str:
    """A sqlite store inside the working folder as a path relative to it (`sqlite:///mlruns/mlflow.db`).

    What a record keeps: a project folder copied elsewhere then logs into its own copy of the store,
    not the original's. Anything else is kept as given.
    """
    absolute = _absolute_sqlite(uri)
    prefix = "sqlite:///"
    if not absolute.startswith(prefix):
        return uri
    path, here = Path(absolute[len(prefix):]), Path.cwd().resolve()
    return prefix + str(path.relative_to(here)) if path.is_relative_to(here) else absolute


def _artifact_root(location: str) -> str:
    """A local folder as an absolute file URI (what MLflow stores); any other URI as given."""
    return location if "://" in location else Path(location).resolve().as_uri()


def _ensure_sqlite_folder(uri: str) -> None:
    """Create the database's folder, and refuse at once where SQLite could not write: MLflow would retry
    opening it for minutes (145 s measured on a read-only mlruns/) before giving up."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise StoreError(f"the MLflow database cannot be opened: its folder `{folder}` is not writable "
                             "(set tracking.uri, or run where mlruns/ is writable)")


def create_store(uri: str) -> bool:
    """Make sure a SQLite store at `uri` exists with MLflow's full schema; True if this call created it.

    Safe when several processes call it at once (one creates, the others wait for the lock and then
    find it made). Other stores (a tracking server, PostgreSQL) are MLflow's business: nothing to do.
    """
    if not uri.startswith("sqlite:///"):
        return False
    _ensure_sqlite_folder(uri)
    path = Path(uri[len("sqlite:///"):])
    if _has_schema(path):
        return False
    with FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
        if _has_schema(path):
            return False
        template = _schema_template()
        if template is None:  # no writable cache: MLflow migrates the store in place, still under the lock
            _migrate(path)
        else:
            _copy_atomically(template, path)
    return True


def warm_up(uri: str) -> None:
    """Pay MLflow's one-time costs (schema revision, SQLAlchemy's engine and mappers: ~0.5 s) before the store
    is needed, without creating it: on the store itself if it exists, else on a scratch copy of the template.

    Best effort: whatever fails here fails again, and is reported, when the store is opened for real.
    """
    from mlflow import MlflowClient

    with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as scratch:
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None or not _has_schema(path):
            template = _schema_template()
            if template is None:
                return
            path = Path(scratch) / "warm.db"
            shutil.copyfile(template, path)
        MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)


def open_experiment(client: Any, name: str, artifact_location: str) -> str:
    """The id of experiment `name`, created if missing; a process that loses the race to create it takes the
    winner's."""
    experiment = _retry(lambda: client.get_experiment_by_name(name))
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(_retry(lambda: client.create_experiment(
            name, artifact_location=f"{_artifact_root(artifact_location)}/{name}",
            tags={"mlflow.experimentKind": "custom_model_development"})))
    except Exception as err:  # MLflow's RESOURCE_ALREADY_EXISTS: another sweep created it just now
        experiment = _retry(lambda: client.get_experiment_by_name(name))
        if experiment is None:
            raise err from None
        return str(experiment.experiment_id)


def _has_schema(path: Path) -> bool:
    """A store that some MLflow has finished creating: it has its `alembic_version` row (written last)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as db:
            return db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.OperationalError:  # no such table yet (a creation in progress or one that died)
        return False


def _schema_template() -> Path | None:
    """The empty store for this MLflow schema revision, built once (under a lock) by MLflow's own migrations.

    None when there is no writable cache folder.
    """
    folder = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "foldsweep")
    template = folder / f"mlflow-schema-{_schema_revision()}.db"
    if _has_schema(template):
        return template
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{template}.lock", timeout=LOCK_TIMEOUT_S):
            if not _has_schema(template):
                _build_template(template)
    except OSError:
        return None
    return template


@functools.cache
def _schema_revision() -> str:
    """The schema revision this MLflow expects (parsed from its migration scripts: ~0.3 s, so once)."""
    return latest_schema_revision()


def _build_template(template: Path) -> None:
    """Migrate a scratch store, drop its folder-specific rows, and move it into place in one rename."""
    with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
        built = Path(scratch) / "store.db"
        _migrate(built)
        with contextlib.closing(sqlite3.connect(built)) as db:
            db.execute("DELETE FROM experiment_tags")
            db.execute("DELETE FROM experiments")
            db.commit()
        os.replace(built, template)


def _migrate(path: Path) -> None:
    """MLflow creates the tables of an empty SQLite file (all its migrations) when it first opens it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{path}", path.parent.as_uri())
    store.engine.dispose()


def _copy_atomically(template: Path, path: Path) -> None:
    """A reader never sees half a store: copy beside the target, then rename over it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    shutil.copyfile(template, partial)
    os.replace(partial, path)


def _write_ahead_log(uri: str) -> None:
    """Put a SQLite store in WAL mode (it stays so): one fsync per commit instead of three, and readers
    (the UI, other workers) no longer wait for writers. Measured here: 40 trial runs in 7 s instead of 15 s.
    Best effort: a store another process holds busy right now keeps its mode until the next sweep."""
    if not uri.startswith("sqlite:///"):
        return
    try:
        with contextlib.closing(sqlite3.connect(uri[len("sqlite:///"):], timeout=1.0)) as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError:
        return


def _retry(call: Callable[[], T], attempts: int = 8) -> T:
    """SQLite allows one writer at a time: a worker that finds it locked waits and tries again."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # MLflow wraps the driver's error in its own exception types
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")
