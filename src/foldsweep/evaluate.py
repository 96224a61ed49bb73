"""The final model and the one deliberate look at the sealed test set.

`fit` trains an exported configuration on every development row (the sweep's own rows when its
record is here, else the same seal redone from the split seed) and saves a model folder that needs
nothing from foldsweep's training code to be used: weights, the preprocessing fitted on those rows,
the config and provenance. `look` is the only code that scores the sealed test rows: it first proves
the data is the data that was sealed, refuses a second look unless asked, and writes the look to the
ledger before anything shows the number.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import sklearn
import torch
import yaml

from foldsweep import __version__
from foldsweep.data import Dataset, load_dataset
from foldsweep.errors import DataError, FoldsweepError, ModelFolderError, SealError, SpecError, SweepFailed
from foldsweep.metrics import score
from foldsweep.model import MLP
from foldsweep.objective import job_seed
from foldsweep.record import SweepRecord
from foldsweep.spec import SweepSpec, load_spec, parse_spec, read_yaml
from foldsweep.splits import make_plan, sealed_rows_seen, seen_note
from foldsweep.studies import replayed_factors
from foldsweep.tables import read_header, read_table
from foldsweep.tracking import NullTracker, make_tracker
from foldsweep.train import FitJob, FitResult, fit_many

__all__ = ["FROM_RECORD", "HASHED_FILES", "MODEL_FILES", "FinalModel", "Preprocessing", "development_rows",
           "final_job", "final_seed", "fit_config", "load_model", "look", "matching_record", "predict_file",
           "prediction_table", "rows_hash", "save_model", "sweep_tracker", "train_final", "versions"]

MODEL_FILES = ("model.pt", "config.yaml", "preprocess.json", "provenance.json")
HASHED_FILES = MODEL_FILES[:3]  # everything that decides a prediction; provenance.json holds their hashes
FROM_RECORD = "the sweep's plan"


@dataclass(frozen=True)
class Preprocessing:
    """What stands between a table's columns and the network's inputs, fitted on the development rows."""

    columns: list[str]  # columns a prediction file must hold, by name
    feature_names: list[str]  # the model's features after one-hot encoding
    ignored: list[str]  # target, group and time columns: allowed in a prediction file, never used
    onehot: bool
    fill: np.ndarray  # (F,) float32, per encoded feature
    shift: np.ndarray
    scale: np.ndarray
    features: np.ndarray | None  # indices kept by select_k
    task: str
    metric: str
    classes: list[str] | None
    y_shift: float
    y_scale: float

    @property
    def n_inputs(self) -> int:
        return len(self.features) if self.features is not None else len(self.feature_names)

    def inputs(self, X: np.ndarray) -> np.ndarray:
        """The trainer's own steps in its order: impute, scale, select (float32, like the trainer)."""
        X = np.where(np.isfinite(X), X, self.fill[None, :]).astype(np.float32)
        X = (X - self.shift) / self.scale
        return X[:, self.features] if self.features is not None else X

    def encode(self, frame: pd.DataFrame, source: str) -> np.ndarray:
        """Columns by name, one-hot categories as in training; a mismatch is refused, never guessed."""
        present = [str(c) for c in frame.columns]
        missing = [c for c in self.columns if c not in present]
        extra = [c for c in present if c not in self.columns and c not in self.ignored]
        if missing or extra:
            problems = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"]
                                                                                 if extra else [])
            raise DataError(f"`{source}` does not have the model's columns: {'; '.join(problems)}")
        table = frame[self.columns]
        text = [c for c in self.columns if not pd.api.types.is_numeric_dtype(table[c])
                and not pd.api.types.is_bool_dtype(table[c])]
        if text and not self.onehot:
            raise DataError(f"column `{text[0]}` of `{source}` is not numeric; the model was trained on numbers")
        if text:
            table = pd.get_dummies(table, columns=text, dtype=float)
            unseen = [str(c) for c in table.columns if c not in self.feature_names]
            if unseen:
                raise DataError(f"`{source}` has category values the model never saw in training: {_names(unseen)}")
            table = table.reindex(columns=self.feature_names, fill_value=0.0)
        return table.to_numpy(dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "classes": self.classes, "columns": self.columns,
                "ignored_columns": self.ignored, "onehot": self.onehot, "feature_names": self.feature_names,
                "fill": self.fill.tolist(), "shift": self.shift.tolist(), "scale": self.scale.tolist(),
                "selected_features": self.features.tolist() if self.features is not None else None,
                "y_shift": self.y_shift, "y_scale": self.y_scale}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Preprocessing:
        def vec(key: str) -> np.ndarray:
            return np.asarray(raw[key], dtype=np.float32)

        selected = raw["selected_features"]
        return cls(columns=raw["columns"], feature_names=raw["feature_names"], ignored=raw["ignored_columns"],
                   onehot=raw["onehot"], fill=vec("fill"), shift=vec("shift"), scale=vec("scale"),
                   features=np.asarray(selected, dtype=np.int64) if selected is not None else None,
                   task=raw["task"], metric=raw["metric"], classes=raw["classes"], y_shift=float(raw["y_shift"]),
                   y_scale=float(raw["y_scale"]))


@dataclass
class FinalModel:
    """A trained network with its preprocessing: predicts from raw feature values."""

    net: MLP
    prep: Preprocessing
    config: SweepSpec
    provenance: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n, C) or values in the target's units (n,), from encoded features."""
        with torch.no_grad():
            out = self.net(torch.from_numpy(self.prep.inputs(X)))
        if self.prep.classes is not None:
            return torch.softmax(out, -1).numpy()
        return out[:, 0].numpy() * self.prep.y_scale + self.prep.y_shift

    def weights(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.net.state_dict(), buffer)
        return buffer.getvalue()

    @property
    def model_hash(self) -> str:
        """sha256 of model.pt: the same weights always serialise to the same bytes."""
        return hashlib.sha256(self.weights()).hexdigest()


# -- training the final model -------------------------------------------------------------------------------
def final_job(config: SweepSpec, dev: np.ndarray, epochs: int) -> FitJob:
    """All development rows, a fixed epoch count; the valid rows are the training rows themselves,
    which is harmless because nothing is selected on them (no early stopping with fixed epochs); under
    `lr_schedule: plateau` the cuts the searched fits made, replayed as in the outer refits (`plateau_replay`)."""
    return FitJob(dev, dev, config.model, config.train, final_seed(config), fixed_epochs=epochs,
                  plateau_factors=_plateau_factors(config, epochs))


def _plateau_factors(config: SweepSpec, epochs: int) -> tuple[float, ...] | None:
    provenance = config.provenance or {}
    cuts, best = provenance.get("plateau_cuts"), provenance.get("fold_best_epochs")
    if config.train.lr_schedule != "plateau" or cuts is None:
        return None
    if not (isinstance(cuts, list) and all(isinstance(c, list) and all(isinstance(e, int) for e in c) for c in cuts)
            and isinstance(best, list) and len(best) == len(cuts) and all(isinstance(e, int) and e > 0 for e in best)):
        raise SpecError("`provenance.plateau_cuts` must be a list of epoch lists, one per fold of "
                        "`provenance.fold_best_epochs` (positive epochs), as `foldsweep export` writes them")
    return replayed_factors(cuts, best, epochs, config.train.gamma)


def final_seed(config: SweepSpec) -> int:
    """The same for `fit` and `test`, so both train the same weights from the same config."""
    return job_seed(config.optuna.seed, "final", "refit")


def train_final(config: SweepSpec, data: Dataset, dev: np.ndarray, epochs: int) -> tuple[FinalModel, FitResult]:
    """One model on the CPU: for a single small MLP a GPU only adds launch overhead."""
    X, y = torch.as_tensor(data.X), torch.as_tensor(data.y)
    [result] = fit_many(X, y, [final_job(config, dev, epochs)], data.n_classes, data.metric, keep_models=True)
    if result.diverged_at:
        raise SweepFailed(f"the final fit diverged (loss NaN/inf at epoch {result.diverged_at}); "
                          "lower `train.lr` in the config")
    assert result.model is not None and result.preprocess is not None
    stats = result.preprocess
    selected = stats.get("features")
    prep = Preprocessing(
        columns=_input_columns(config, data), feature_names=data.feature_names,
        ignored=[c for c in (data.target, config.data.group, config.data.time) if c],
        onehot=config.data.categorical == "onehot", fill=np.asarray(stats["fill"], dtype=np.float32),
        shift=np.asarray(stats["shift"], dtype=np.float32), scale=np.asarray(stats["scale"], dtype=np.float32),
        features=np.asarray(selected, dtype=np.int64) if selected is not None else None, task=data.task,
        metric=data.metric, classes=data.classes, y_shift=result.y_shift, y_scale=result.y_scale)
    return FinalModel(result.model, prep, config), result


def development_rows(config: SweepSpec, data: Dataset, record: SweepRecord | None
                     ) -> tuple[np.ndarray, str, list[str]]:
    """The rows the final model may learn from, where they came from, and notes for the user.

    The stored plan of the exporting sweep (`record`, when it is here) if the data is unchanged; else
    the seal is redone from the config's split seed, and the record's test rows must come out the same.
    """
    provenance = config.provenance or {}
    if record is not None and record.meta["fingerprint"] == data.fingerprint:
        return record.plan.dev, FROM_RECORD, []
    plan = make_plan(data, config.split)
    notes = list(plan.notes)
    if record is not None:
        resealed = np.asarray(data.row_hashes)[plan.test]
        if not np.array_equal(resealed, record.test_hashes):
            raise SealError(f"data differs from what sweep `{record.name}` sealed, and sealing it again gives other "
                            "test rows: the final model could train on sealed test rows; use the sweep's data")
    elif provenance.get("data_fingerprint") not in (None, data.fingerprint):
        notes.append(f"the data differs from the sweep's (fingerprint {data.fingerprint}, sweep "
                     f"{provenance['data_fingerprint']}): sealed test rows may be among the training rows, "
                     "so `foldsweep test` will not accept this model")
    return plan.dev, f"re-sealed with split.seed={config.split.seed}", notes


def fit_config(config_path: Path | SweepSpec, out: Path, *, data: Dataset | None = None) -> dict[str, Any]:
    """`foldsweep fit`: train the exported config on all development rows and save the model folder.

    `config_path` is an exported config's file or the loaded config; `data` is the table when the
    config's data is in memory (`data.frame`), else it is loaded from the config.
    """
    config = config_path if isinstance(config_path, SweepSpec) else load_spec(config_path)
    source_name = "config" if isinstance(config_path, SweepSpec) else str(config_path)
    if config.search:
        raise SpecError(f"{source_name}: `search` is not empty; `foldsweep fit` trains one configuration: "
                        "export one with `foldsweep export SWEEP -o best.yaml`")
    if (out / "model.pt").exists():
        raise FoldsweepError(f"`{out}` already holds a model; pick another -o folder or remove it")
    provenance = config.provenance or {}
    record = matching_record(provenance)
    data = data if data is not None else load_dataset(config.data)
    dev, source, notes = development_rows(config, data, record)
    epochs = int(provenance.get("refit_epochs", config.train.epochs))
    final, result = train_final(config, data, dev, epochs)
    final.provenance = {
        "sweep": provenance.get("sweep"), "sweep_spec_hash": provenance.get("spec_hash"),
        "config_hash": config.spec_hash(), "data_fingerprint": data.fingerprint, "dev_source": source,
        "dev_rows": len(dev), "dev_rows_hash": rows_hash(dev), "epochs": epochs, "seed": final_seed(config),
        # a resubstitution score (the rows it trained on): a sanity check, never an estimate
        "train_score": score(data.metric, data.y[dev], result.valid_pred), "metric": data.metric,
        "created": _now(), "versions": versions(),
    }
    logged = _save_and_track(final, record, out)
    return {"folder": str(out), "model_hash": final.model_hash, "epochs": epochs, "dev_rows": len(dev),
            "dev_source": source, "train_score": final.provenance["train_score"], "metric": data.metric,
            "notes": notes, "mlflow": logged}


def _save_and_track(final: FinalModel, record: SweepRecord | None, out: Path) -> dict[str, str]:
    """Save the folder, with the MLflow model run (a child of the sweep's run when the record is here)."""
    tracker = sweep_tracker(record) if record is not None else make_tracker(final.config.tracking, final.config.name)
    parent = record.meta.get("mlflow_runs", {}).get("sweep", "") if record is not None else ""
    params = {"epochs": final.provenance["epochs"], "dev_rows": final.provenance["dev_rows"],
              **((final.config.provenance or {}).get("best_params") or {})}
    logged = tracker.log_model(parent, "final-model", final.net, final.prep.n_inputs, params=params,
                               tags={"foldsweep.model_hash": final.model_hash, "foldsweep.kind": "final-model"})
    if logged:
        final.provenance["mlflow"] = logged
    save_model(final, out)
    if logged:
        tracker.log_files(logged["run_id"], [(out / name, "model_folder") for name in MODEL_FILES[1:]])
    return logged


# -- the model folder --------------------------------------------------------------------------------------
def save_model(final: FinalModel, folder: Path) -> None:
    """The four files; provenance.json carries the sha256 of the other three, which `load_model` checks.

    Every file that decides a prediction is hashed: the weights, the config (activation, width, ...) and
    the preprocessing (scaling, imputation, classes).
    """
    contents = {"model.pt": final.weights(),
                "config.yaml": yaml.safe_dump(final.config.model_dump(mode="json"), sort_keys=False).encode(),
                "preprocess.json": json.dumps(final.prep.to_json(), indent=1).encode()}
    final.provenance["model_hash"] = final.model_hash
    final.provenance["file_hashes"] = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    (folder / "provenance.json").write_text(json.dumps(final.provenance, indent=1, default=str))


def load_model(folder: Path) -> FinalModel:
    """Weights through `torch.load(weights_only=True)`: a model folder can never run code when loaded.

    Every file is checked against the hashes in provenance.json before it is parsed, and whatever is
    wrong with a folder becomes one ModelFolderError naming the file.
    """
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(f"`{folder}` is not a model folder from `foldsweep fit` (missing {_names(missing)})")
    provenance = _json_file(folder / "provenance.json")
    files = {name: (folder / name).read_bytes() for name in HASHED_FILES}
    _check_hashes(folder, provenance, files)
    config = parse_spec(read_yaml(folder / "config.yaml", what="model config"), source=str(folder / "config.yaml"))
    try:
        prep = Preprocessing.from_json(json.loads(files["preprocess.json"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ModelFolderError(f"`{folder}/preprocess.json` is not foldsweep's preprocessing: {err!r}") from None
    net = MLP(prep.n_inputs, max(len(prep.classes or []), 1), config.model)
    try:
        state = torch.load(io.BytesIO(files["model.pt"]), weights_only=True, map_location="cpu")
        net.load_state_dict(state)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        problem = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelFolderError(f"`{folder}/model.pt` is not a state dict of the network in config.yaml "
                               f"(torch, weights only: {problem[:200]})") from None
    return FinalModel(net.eval(), prep, config, provenance)


def _check_hashes(folder: Path, provenance: dict[str, Any], files: dict[str, bytes]) -> None:
    recorded = provenance.get("file_hashes")
    if not isinstance(recorded, dict):
        raise ModelFolderError(f"`{folder}/provenance.json` records no file hashes, so the folder cannot be "
                               "checked; fit the model again with this version of foldsweep")
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != recorded.get(name):
            raise ModelFolderError(f"`{folder}/{name}` does not match the hash in its provenance.json; "
                                   "the folder was changed after `foldsweep fit` wrote it")


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are
        raise ModelFolderError(f"`{path}` is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"`{path}` is not a JSON object")
    return value


def predict_file(folder: Path, data_path: Path, out: Path) -> dict[str, Any]:
    """`foldsweep predict`: the same columns by name, the same preprocessing, one row out per row in."""
    final = load_model(folder)
    if not data_path.is_file():
        raise DataError(f"data file `{data_path}` not found")
    X = final.prep.encode(read_table(data_path), str(data_path))
    if final.config.data.missing == "error":
        _refuse_missing(X, final.prep.feature_names, str(data_path))
    table = prediction_table(final, X)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return {"rows": len(table), "output": str(out), "imputed": int((~np.isfinite(X)).sum())}


def _refuse_missing(X: np.ndarray, names: list[str], source: str) -> None:
    """A model trained under `data.missing: error` never learnt what a filled-in value means: refused, as there."""
    bad = ~np.isfinite(X)
    if bad.any():
        column = int(np.flatnonzero(bad.any(axis=0))[0])
        raise DataError(f"feature column `{names[column]}` of `{source}` has {int(bad[:, column].sum())} rows with "
                        "NaN or inf; the model was trained with data.missing: error, so it does not fill them in")


def prediction_table(final: FinalModel, X: np.ndarray) -> pd.DataFrame:
    """One row out per encoded row in (`Preprocessing.encode`): `prediction` (the label or value), and
    `prob_<class>` per class."""
    pred = final.predict(X)
    if final.prep.classes is None:
        return pd.DataFrame({"prediction": pred})
    labels = np.asarray(final.prep.classes, dtype=object)[pred.argmax(1)]
    return pd.DataFrame({"prediction": labels} | {f"prob_{c}": pred[:, i] for i, c in enumerate(final.prep.classes)})


# -- the sealed test look ----------------------------------------------------------------------------------
def look(name: str, again: bool = False, model_dir: Path | None = None, *, data: Dataset | None = None
         ) -> dict[str, Any]:
    """Score the sealed test rows once; the ledger has the look before anything prints it.

    `data` is the table when the sweep's data is in memory (`data.frame`); it must be the sealed one.
    """
    from foldsweep.export import export_best
    from foldsweep.report import refresh_report

    record = SweepRecord.open(name)
    if "summary" not in record.meta:
        raise FoldsweepError(f"sweep `{name}` has not finished; finish it with `foldsweep run` before the test look")
    data = data if data is not None else load_dataset(record.spec.data)
    record.verify_data(data)
    record.check_can_look(again)  # fail fast; checked again under the ledger's lock below
    plan = record.plan
    with record.looking(again) as number:
        if model_dir is not None:
            final = load_model(model_dir)
            _check_model_is_of(final, record, plan.dev)
            source = str(model_dir)
        else:
            config = parse_spec(export_best(name), source=f"export of {name}")
            final, _ = train_final(config, data, plan.dev, int((config.provenance or {})["refit_epochs"]))
            source = "refit of the final config on all development rows"
        test_score = score(data.metric, data.y[plan.test], final.predict(data.X[plan.test]))
        entry = {"time": _now(), "score": test_score, "metric": data.metric, "model_hash": final.model_hash,
                 "again": again, "look_number": number, "test_rows": len(plan.test), "model": source}
        seen = sealed_rows_seen(data, plan.dev, plan.test)  # test rows the model trained on lift this score
        entry |= {"test_rows_in_dev": seen["test_rows_in_dev"], "optimistic_by_up_to": seen["share"],
                  "note": seen_note(seen)}
        record.append_look(entry)
    report = refresh_report(record)
    run_id = record.meta.get("mlflow_runs", {}).get("sweep", "")
    if run_id:
        tracker = sweep_tracker(record)
        tracker.log_step(run_id, {"test_score": test_score}, number, tags={"foldsweep.test_looks": str(number)})
        tracker.log_files(run_id, [(report, "")])
    return entry | {"sweep": name, "nested": record.meta["summary"]["nested"]}


def _check_model_is_of(final: FinalModel, record: SweepRecord, dev: np.ndarray) -> None:
    """A model for the look must come from this sweep's data and have learnt from its development rows only."""
    prov = final.provenance
    if prov.get("sweep") != record.name or prov.get("data_fingerprint") != record.meta["fingerprint"]:
        raise SealError(f"this model was fit for sweep `{prov.get('sweep')}` on data {prov.get('data_fingerprint')}, "
                        f"not for `{record.name}` on data {record.meta['fingerprint']}")
    if prov.get("dev_rows_hash") != rows_hash(dev):
        raise SealError(f"this model was not trained on the development rows of `{record.name}` "
                        f"(its rows: {prov.get('dev_source')}); fit it where the sweep's record is")


# -- small helpers -----------------------------------------------------------------------------------------
def sweep_tracker(record: SweepRecord) -> NullTracker:
    """The tracker the sweep itself wrote to (its recorded, absolute tracking URI)."""
    spec = record.spec
    uri = record.meta.get("tracking_uri") or spec.tracking.uri
    return make_tracker(spec.tracking.model_copy(update={"uri": uri}), spec.name)


def rows_hash(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def versions() -> dict[str, str]:
    return {"foldsweep": __version__, "torch": str(torch.__version__), "optuna": optuna.__version__,
            "scikit-learn": sklearn.__version__, "numpy": np.__version__, "python": platform.python_version()}


def matching_record(provenance: dict[str, Any]) -> SweepRecord | None:
    """The exporting sweep's record, when it is here and is the same sweep (same spec hash)."""
    name = provenance.get("sweep")
    if not name:
        return None
    try:
        record = SweepRecord.open(name)
    except FoldsweepError:
        return None
    return record if record.meta["spec_hash"] == provenance.get("spec_hash") else None


def _input_columns(config: SweepSpec, data: Dataset) -> list[str]:
    """With one-hot encoding the file's own column names (before encoding); else the features themselves."""
    if config.data.categorical != "onehot" or config.data.path is None:
        return list(data.feature_names)
    header = read_header(Path(config.data.path))
    return [c for c in header if c not in (config.data.target, config.data.group, config.data.time)]


def _names(names: list[str], shown: int = 6) -> str:
    quoted = ", ".join(f"`{n}`" for n in names[:shown])
    return quoted + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
