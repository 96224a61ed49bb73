"""foldsweep from Python: the same sweeps as the CLI, with DataFrames in and a result object out.

    import foldsweep
    result = foldsweep.run("sweeps/quickstart.yaml")                 # or a dict, or a SweepSpec
    result = foldsweep.run(spec, data=frame, target="label")          # a pandas DataFrame, or (X, y)
    result.nested.mean, result.best_params, result.report(), result.plots()
    model = result.fit("models/sonar"); model.predict(new_rows)
    result.test()                                                     # the one look at the sealed test rows
    foldsweep.open("quickstart")                                      # a sweep run before, from anywhere

The CLI is a shell over these functions (one code path, so both give the same numbers). In-memory
data is hashed exactly like the same table read from a file, so it is sealed, fingerprinted and
resumed the same way; the spec records it as `data.frame` (a label), and fit/test/resume need the
same table passed again: a different one is refused. Errors are `FoldsweepError`s with the CLI's
one-line messages; nothing here exits the process or installs signal handlers. Ctrl-C (a
KeyboardInterrupt in a kernel) leaves a resumable sweep: `run` the same spec and data again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from foldsweep.errors import DataError, FoldsweepError
from foldsweep.result import FittedModel, SweepResult, fit_model, model_info
from foldsweep.spec import SweepSpec, build_spec, load_spec

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from foldsweep.data import Dataset

    TableLike: TypeAlias = "pd.DataFrame | tuple[pd.DataFrame | np.ndarray, pd.Series | np.ndarray | Sequence[Any]]"

__all__ = ["fit", "load_model", "open", "run", "status"]

SpecLike: TypeAlias = "str | Path | dict[str, Any] | SweepSpec"
FRAME_LABEL = "dataframe"  # data.frame of a sweep on a DataFrame (a spec may name it itself)
ARRAYS_LABEL = "arrays"  # ... and on (X, y) arrays
ARRAY_TARGET = "target"  # the label column's name for (X, y) arrays when `target` is not given


def run(spec: SpecLike, *, data: TableLike | None = None, target: str | None = None,
        overrides: Sequence[str] = (), fresh: bool = False, storage: str | None = None,
        progress: bool = True) -> SweepResult:
    """Run (or resume) a nested sweep and return its result.

    Args:
        spec: a sweep file's path, a dict of the same keys, or a `SweepSpec`.
        data: the rows instead of the spec's data: a DataFrame (n rows, features + the target column), or
            `(X, y)` with X (n, features) as an array or DataFrame and y (n,). The spec's `data.dataset` /
            `data.path` give way to `data.frame`; its other `data` keys (task, metric, missing, ...) apply.
            In-memory rows run in this process (`resources.workers: 1`).
        target: the label column (overrides `data.target`); for `(X, y)` it names y (default `target`).
        overrides: `key.path=value` strings, as `--set` on the command line.
        fresh: start a new sweep beside an existing one of the same name (`NAME-2`, ...).
        storage: an Optuna storage URL (overrides the spec's `storage`).
        progress: show progress bars and the studies table (a terminal or Jupyter); False shows nothing.

    Returns:
        The finished sweep's `SweepResult`.

    Raises:
        FoldsweepError: bad spec or data, a refused resume (other settings or other rows), a sweep whose
            every trial failed, or one another process is running (`SweepBusy`: add workers with
            `foldsweep worker` instead). KeyboardInterrupt passes through; finished trials are kept.
    """
    from foldsweep import profile
    from foldsweep.tracking.writer import discard_early, start_early

    if data is not None and isinstance(spec, dict) and "data" not in spec:  # the rows come from Python alone
        spec = spec | {"data": {"frame": FRAME_LABEL, "target": target or ARRAY_TARGET}}
    sweep_spec = _spec(spec, overrides)
    if sweep_spec.tracking.enabled:
        start_early(sweep_spec.tracking.uri)  # MLflow's import in the writer process overlaps torch's here
    try:
        with profile.phase(profile.STARTUP):
            from foldsweep.console import Display
            from foldsweep.record import fresh_name
            from foldsweep.runlock import SweepBusy, sole_run
            from foldsweep.storage import default_storage
            from foldsweep.workers import run_sweep
        dataset = None
        if data is not None:
            sweep_spec, dataset = _in_memory(sweep_spec, data, target)
        elif target is not None:
            sweep_spec = _with_data(sweep_spec, {"target": target})
        if fresh:
            sweep_spec = sweep_spec.model_copy(update={"name": fresh_name(sweep_spec.name)})
        url = storage or sweep_spec.storage or default_storage(sweep_spec.name)
        with sole_run(sweep_spec.name, url), _optuna_quiet(), Display(quiet=not progress) as display:
            summary = run_sweep(sweep_spec, storage=storage, progress=display.event, data=dataset)
    except SweepBusy:
        discard_early(wait=False)  # refused at once: the writer ends by itself once its warm-up is done
        raise
    except KeyboardInterrupt as stop:
        if hasattr(stop, "add_note"):  # Python 3.11+: shown under the traceback in a notebook
            stop.add_note(f"foldsweep: finished trials of `{sweep_spec.name}` are kept; run the same spec (and "
                          "data) again to resume")
        raise
    finally:
        discard_early()
    return SweepResult(str(summary["sweep"]), data=dataset, summary=summary)


def open(name: str, *, data: TableLike | None = None) -> SweepResult:  # noqa: A001 (foldsweep.open, as the issue asks)
    """The result of a sweep run before (finished or not), by name, from the record under `mlruns/`.

    Args:
        name: the sweep's name (`foldsweep status` lists them).
        data: the sweep's table, when it was run on in-memory rows and you want to `fit` or `test`: a
            DataFrame or `(X, y)` as given to `run`. It must be the same rows; other rows are refused.
    """
    result = SweepResult(name)
    if data is None:
        return result
    spec = result.spec
    _, dataset = _in_memory(spec, data, spec.data.target)
    return SweepResult(name, data=dataset)


def fit(config: SpecLike, *, out: str | Path, data: TableLike | None = None) -> FittedModel:
    """Train an exported config on all development rows and save the model folder (as `foldsweep fit`).

    Args:
        config: an exported config (`foldsweep export`, `SweepResult.export`) as a path, dict or SweepSpec.
        out: the model folder to write; it must not hold a model yet.
        data: the rows when the config's data is in memory (`data.frame`), as given to `run`.
    """
    if isinstance(config, (str, Path)) and data is None:
        return fit_model(Path(config), Path(out), None)  # the file's own name in messages
    spec = _spec(config, ())
    dataset = _in_memory(spec, data, spec.data.target)[1] if data is not None else None
    return fit_model(spec, Path(out), dataset)


def load_model(folder: str | Path) -> FittedModel:
    """A model folder written by `fit` (its weights are checked against the hash in its provenance)."""
    from foldsweep.evaluate import load_model as load

    final = load(Path(folder))
    return FittedModel(final, Path(folder), model_info(final, Path(folder)))


def status(name: str | None = None) -> list[dict[str, Any]]:
    """Per sweep (every recorded one without `name`): studies, workers, the estimate (`foldsweep status`)."""
    from foldsweep.record import home

    names = [name] if name else sorted(p.name for p in (home() / "sweeps").glob("*") if (p / "record.json").exists())
    return [SweepResult(n).status() for n in names]


# -- helpers -----------------------------------------------------------------------------------------------------
@contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna's INFO lines ("A new study created ...") would interleave with the display; the caller's own
    setting comes back afterwards (the CLI sets WARNING, or DEBUG with --debug, once for the process)."""
    import optuna

    before = optuna.logging.get_verbosity()
    if before == optuna.logging.INFO:  # Optuna's default; DEBUG (foldsweep --debug) is left as asked
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _spec(spec: SpecLike, overrides: Sequence[str]) -> SweepSpec:
    """Any accepted form of a spec, overrides applied and validated once."""
    if isinstance(spec, SweepSpec):
        return build_spec(spec.model_dump(mode="json"), list(overrides), source="spec") if overrides else spec
    if isinstance(spec, dict):
        return build_spec(spec, list(overrides), source="spec dict")
    if isinstance(spec, (str, Path)):
        return load_spec(spec, list(overrides))
    raise FoldsweepError(f"spec must be a file path, a dict or a SweepSpec, got {type(spec).__name__}")


def _with_data(spec: SweepSpec, changes: dict[str, Any]) -> SweepSpec:
    raw = spec.model_dump(mode="json")
    raw["data"] = raw["data"] | changes
    return build_spec(raw, source="spec")


def _in_memory(spec: SweepSpec, data: TableLike, target: str | None) -> tuple[SweepSpec, Dataset]:
    """The spec with `data.frame` as its source and one worker, and the rows as a Dataset (file-equal hashes)."""
    from foldsweep.data import dataset_from_frame

    frame, label, column = _as_frame(data, target or spec.data.target)
    changes: dict[str, Any] = {"dataset": None, "path": None, "frame": spec.data.frame or label, "target": column}
    memory = _with_data(spec, changes)
    if memory.resources.workers is None:
        raw = memory.model_dump(mode="json")
        raw["resources"]["workers"] = 1
        memory = build_spec(raw, source="spec")
    return memory, dataset_from_frame(frame, memory.data, name=memory.data.frame or label)


def _as_frame(data: TableLike, target: str | None) -> tuple[pd.DataFrame, str, str | None]:
    """(table, label for data.frame, target column) from a DataFrame or an (X, y) pair."""
    import numpy as np
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data, FRAME_LABEL, target
    if not (isinstance(data, tuple) and len(data) == 2):
        raise DataError(f"data must be a pandas DataFrame or an (X, y) pair, got {type(data).__name__}")
    X, y = data
    features = X if isinstance(X, pd.DataFrame) else pd.DataFrame(np.asarray(X))
    if features.ndim != 2 or features.shape[1] == 0:
        raise DataError(f"X must be 2-dimensional (rows, features), got shape {np.shape(X)}")
    if not isinstance(X, pd.DataFrame):
        features.columns = [f"x{i}" for i in range(features.shape[1])]
    labels = np.asarray(y)
    if labels.ndim != 1 or len(labels) != len(features):
        raise DataError(f"y must be 1-dimensional with one value per row of X ({len(features)}), got shape "
                        f"{labels.shape}")
    column = target or ARRAY_TARGET
    if column in features.columns:
        raise DataError(f"X already has a column `{column}`; name y otherwise with target=...")
    return features.assign(**{column: labels}), ARRAYS_LABEL, column
