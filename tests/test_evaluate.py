"""The final model outside the engine: preprocessing, saved folders, and which rows it may learn from.

A saved model must give the engine's own predictions from raw feature values (classification with
batch norm and feature selection, regression in the target's units), load with
`torch.load(weights_only=True)`, refuse a tampered folder, and match prediction columns by name.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_spec

from foldsweep.data import load_dataset
from foldsweep.errors import DataError, FoldsweepError, ModelFolderError, SealError, SpecError
from foldsweep.evaluate import (
    FROM_RECORD,
    _check_model_is_of,
    development_rows,
    final_job,
    load_model,
    matching_record,
    predict_file,
    rows_hash,
    save_model,
    train_final,
)
from foldsweep.record import SweepRecord, create_or_resume
from foldsweep.spec import parse_spec
from foldsweep.splits import make_plan
from foldsweep.studies import replayed_factors


def _config(**overrides):
    return parse_spec(tiny_spec(**overrides) | {"search": {}})


def test_classification_model_with_batch_norm_and_selection_reproduces_the_engine(tmp_path: Path) -> None:
    config = _config(model={"width": 12, "depth": 2, "batch_norm": True, "dropout": 0.2},
                     train={"epochs": 5, "batch_size": 32, "select_k": 20, "preprocess": "minmax"})
    data = load_dataset(config.data)
    dev = make_plan(data, config.split).dev
    final, result = train_final(config, data, dev, epochs=5)
    assert final.prep.features is not None and len(final.prep.features) == 20
    assert result.epochs_run == 5 and result.best_epoch == 5  # fixed epochs: the last one, no selection
    np.testing.assert_allclose(final.predict(data.X[dev]), result.valid_pred, atol=1e-5)

    save_model(final, tmp_path / "m")
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert "norms.0.running_mean" in state
    again = load_model(tmp_path / "m")
    np.testing.assert_array_equal(again.predict(data.X), final.predict(data.X))


def test_regression_predictions_come_back_in_the_targets_units(tmp_path: Path) -> None:
    config = _config(data={"dataset": "diabetes"}, train={"epochs": 8, "batch_size": 64, "lr": 0.01},
                     split={"test_size": 0.25, "seed": 0, "outer": {"k": 2}, "inner": {"k": 2}})
    data = load_dataset(config.data)
    dev = make_plan(data, config.split).dev
    final, result = train_final(config, data, dev, epochs=8)
    assert final.prep.y_scale == pytest.approx(float(np.std(data.y[dev])), rel=1e-4)
    assert final.prep.y_shift == pytest.approx(float(np.mean(data.y[dev])), rel=1e-4)
    pred = final.predict(data.X[dev])
    np.testing.assert_allclose(pred, result.valid_pred, rtol=1e-5, atol=1e-3)
    assert abs(pred.mean() - data.y[dev].mean()) < 0.3 * data.y[dev].std()  # not standardised values

    save_model(final, tmp_path / "m")
    frame = pd.DataFrame(data.X[dev], columns=data.feature_names)
    predict_file(tmp_path / "m", _csv(frame, tmp_path / "rows.csv"), tmp_path / "p.csv")
    written = pd.read_csv(tmp_path / "p.csv")
    assert list(written.columns) == ["prediction"]
    np.testing.assert_allclose(written["prediction"], result.valid_pred, rtol=1e-5, atol=1e-3)


def test_a_changed_model_file_is_refused(tmp_path: Path) -> None:
    config = _config(train={"epochs": 2})
    data = load_dataset(config.data)
    final, _ = train_final(config, data, make_plan(data, config.split).dev, epochs=2)
    save_model(final, tmp_path / "m")
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    state["head.bias"] += 1.0
    torch.save(state, tmp_path / "m" / "model.pt")
    with pytest.raises(FoldsweepError, match=r"model.pt` does not match the hash in its provenance.json"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "preprocess.json").unlink()
    with pytest.raises(FoldsweepError, match=r"is not a model folder .*missing `preprocess.json`"):
        load_model(tmp_path / "m")


def test_prediction_columns_are_matched_by_name(tmp_path: Path) -> None:
    config = _config(train={"epochs": 2})
    data = load_dataset(config.data)
    final, _ = train_final(config, data, make_plan(data, config.split).dev, epochs=2)
    frame = pd.DataFrame(data.X[:5], columns=data.feature_names)
    shuffled = frame[list(reversed(frame.columns))].assign(label="R")  # other order, target present
    np.testing.assert_array_equal(final.prep.encode(shuffled, "x.csv"), data.X[:5])
    wrong = frame.drop(columns=["band_07", "band_08"]).assign(extra=1.0)
    with pytest.raises(DataError, match=r"^`x.csv` does not have the model's columns: missing `band_07`, `band_08`; "
                                        r"unexpected `extra`$"):
        final.prep.encode(wrong, "x.csv")
    with pytest.raises(DataError, match=r"column `band_01` of `x.csv` is not numeric"):
        final.prep.encode(frame.assign(band_01="a"), "x.csv")


@pytest.mark.parametrize("missing", ["error", "impute"])
def test_predict_follows_the_models_missing_policy(tmp_path: Path, missing: str) -> None:
    """`inf` and empty cells were filled in although the spec said `missing: error`; `impute` still fills them."""
    config = _config(train={"epochs": 2}, data={"dataset": "sonar", "missing": missing})
    data = load_dataset(config.data)
    final, _ = train_final(config, data, make_plan(data, config.split).dev, epochs=2)
    save_model(final, tmp_path / "m")
    frame = pd.DataFrame(data.X[:6], columns=data.feature_names)
    frame.loc[[1, 4], "band_03"] = np.inf
    rows = _csv(frame, tmp_path / "rows.csv")
    if missing == "impute":
        assert predict_file(tmp_path / "m", rows, tmp_path / "p.csv")["imputed"] == 2
        return
    with pytest.raises(DataError, match=r"^feature column `band_03` of `.*rows.csv` has 2 rows with NaN or inf; the "
                                        r"model was trained with data.missing: error"):
        predict_file(tmp_path / "m", rows, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_onehot_columns_are_encoded_as_in_training(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 80
    table = pd.DataFrame({"a": rng.normal(size=n), "color": rng.choice(["red", "green", "blue"], size=n),
                          "b": rng.normal(size=n)})
    table["y"] = np.where((table["color"] == "red") | (table["a"] > 0.5), "yes", "no")
    path = _csv(table, tmp_path / "colors.csv")
    config = _config(data={"dataset": None, "path": str(path), "target": "y", "categorical": "onehot"},
                     train={"epochs": 3})
    data = load_dataset(config.data)
    dev = make_plan(data, config.split).dev
    final, result = train_final(config, data, dev, epochs=3)
    assert final.prep.columns == ["a", "color", "b"]
    save_model(final, tmp_path / "m")
    rows = table.iloc[dev].drop(columns="y")
    predict_file(tmp_path / "m", _csv(rows, tmp_path / "rows.csv"), tmp_path / "p.csv")
    written = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(written[["prob_no", "prob_yes"]].to_numpy(), result.valid_pred, atol=1e-5)
    assert list(written["prediction"]) == [["no", "yes"][i] for i in result.valid_pred.argmax(1)]
    unseen = rows.assign(color="purple")
    with pytest.raises(DataError, match=r"category values the model never saw in training: `color_purple`"):
        predict_file(tmp_path / "m", _csv(unseen, tmp_path / "u.csv"), tmp_path / "p.csv")


def test_development_rows_come_from_the_record_or_the_same_seal(workdir: Path) -> None:
    config = _config()
    data = load_dataset(config.data)
    plan = make_plan(data, config.split)
    dev, source, notes = development_rows(config, data, None)  # no record, no provenance: sealed again
    assert np.array_equal(dev, plan.dev) and source.startswith("re-sealed") and notes == []

    create_or_resume(config, data, "unused")
    exported = config.model_copy(update={"provenance": {"sweep": "tiny", "spec_hash": config.spec_hash()}})
    record = matching_record(exported.provenance)
    assert record is not None and matching_record({"sweep": "tiny", "spec_hash": "another"}) is None
    dev, source, _ = development_rows(exported, data, record)
    assert source == FROM_RECORD and np.array_equal(dev, plan.dev)

    moved = data.__class__(**{**data.__dict__, "X": data.X[::-1].copy(), "y": data.y[::-1].copy(),
                              "row_hashes": data.row_hashes[::-1]})
    with pytest.raises(SealError, match=r"sealing it again gives other test rows"):
        development_rows(exported, moved, record)


def test_a_look_takes_only_a_model_of_this_sweeps_development_rows(workdir: Path) -> None:
    config = _config(train={"epochs": 2})
    data = load_dataset(config.data)
    record, plan, _ = create_or_resume(config, data, "unused")
    final, _ = train_final(config, data, plan.dev, epochs=2)
    final.provenance = {"sweep": "tiny", "data_fingerprint": data.fingerprint, "dev_rows_hash": rows_hash(plan.dev)}
    _check_model_is_of(final, record, plan.dev)
    final.provenance["dev_rows_hash"] = rows_hash(np.arange(len(data.y)))  # trained on every row, test rows too
    with pytest.raises(SealError, match=r"not trained on the development rows of `tiny`"):
        _check_model_is_of(final, record, plan.dev)
    final.provenance["sweep"] = "other"
    with pytest.raises(SealError, match=r"fit for sweep `other` .* not for `tiny`"):
        _check_model_is_of(final, record, plan.dev)


def test_a_model_fit_on_other_data_gets_a_note(workdir: Path) -> None:
    config = _config().model_copy(update={"provenance": {"sweep": "gone", "data_fingerprint": "0123456789abcdef"}})
    _, _, notes = development_rows(config, load_dataset(config.data), None)
    assert len(notes) == 1 and "data differs from the sweep's" in notes[0] and "will not accept" in notes[0]


def test_model_folder_files_are_plain_json_and_yaml(tmp_path: Path) -> None:
    config = _config(train={"epochs": 2})
    data = load_dataset(config.data)
    final, _ = train_final(config, data, make_plan(data, config.split).dev, epochs=2)
    save_model(final, tmp_path / "m")
    prep = json.loads((tmp_path / "m" / "preprocess.json").read_text())
    assert prep["classes"] == ["M", "R"] and prep["ignored_columns"] == ["label"]
    assert len(prep["fill"]) == len(prep["feature_names"]) == 60 and prep["selected_features"] is None
    assert load_model(tmp_path / "m").config.model == config.model


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    config = _config(train={"epochs": 2})
    data = load_dataset(config.data)
    final, _ = train_final(config, data, make_plan(data, config.split).dev, epochs=2)
    save_model(final, tmp_path / "m")
    return tmp_path / "m"


def _rehash(folder: Path, name: str) -> None:
    """What a forger would add: the edited file's new hash written into provenance.json."""
    provenance = json.loads((folder / "provenance.json").read_text())
    provenance["file_hashes"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "provenance.json").write_text(json.dumps(provenance))


@pytest.mark.parametrize(("name", "edit"), [
    ("config.yaml", lambda text: text.replace("activation: relu", "activation: tanh")),
    ("preprocess.json", lambda text: json.dumps({**json.loads(text),
                                                 "scale": [v * 2 for v in json.loads(text)["scale"]]})),
])
def test_every_file_that_decides_a_prediction_is_hashed(saved: Path, name: str, edit) -> None:
    """Only model.pt was checked: a changed activation or scaling changed predictions with exit 0."""
    before = load_model(saved).predict(np.ones((2, 60), dtype=np.float32))
    path = saved / name
    path.write_text(edit(path.read_text()))
    with pytest.raises(ModelFolderError, match=rf"^`.*m/{name}` does not match the hash in its provenance.json; "
                                               r"the folder was changed after `foldsweep fit` wrote it$"):
        load_model(saved)
    _rehash(saved, name)  # with the hash forged too, the edit is what it is: a different model
    assert not np.array_equal(load_model(saved).predict(np.ones((2, 60), dtype=np.float32)), before)


def test_a_folder_without_file_hashes_is_refused(saved: Path) -> None:
    provenance = json.loads((saved / "provenance.json").read_text())
    del provenance["file_hashes"]
    (saved / "provenance.json").write_text(json.dumps(provenance))
    with pytest.raises(ModelFolderError, match=r"records no file hashes, so the folder cannot be checked"):
        load_model(saved)
    (saved / "provenance.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"provenance.json` is not JSON"):
        load_model(saved)


class _Owned:
    def __reduce__(self):
        return (os.system, ("touch owned-by-model",))


def test_a_pickle_in_model_pt_is_one_line_and_never_runs(saved: Path, workdir: Path) -> None:
    torch.save({"head.bias": _Owned()}, saved / "model.pt")
    _rehash(saved, "model.pt")
    with pytest.raises(ModelFolderError, match=r"model.pt` is not a state dict of the network in config.yaml "
                                               r"\(torch, weights only: .*\)$") as info:
        load_model(saved)
    assert "\n" not in str(info.value) and not (workdir / "owned-by-model").exists()
    torch.save({"head.bias": torch.zeros(7)}, saved / "model.pt")  # loads, but not into this network
    _rehash(saved, "model.pt")
    with pytest.raises(ModelFolderError, match=r"is not a state dict of the network"):
        load_model(saved)


def test_a_python_tag_in_a_model_config_is_one_line_and_never_runs(saved: Path, workdir: Path) -> None:
    path = saved / "config.yaml"
    path.write_text(path.read_text() + 'extra: !!python/object/apply:os.system ["touch owned-by-config"]\n')
    _rehash(saved, "config.yaml")
    with pytest.raises(SpecError, match=r"config.yaml: line \d+, column \d+: refused: .*python/object/apply"
                                        r".*a model config holds plain values only$"):
        load_model(saved)
    assert not (workdir / "owned-by-config").exists()


def _look_in_child(home: str, barrier, results) -> None:
    """One of two processes racing through the ledger's real check-and-append."""
    os.environ["FOLDSWEEP_HOME"] = home
    record = SweepRecord.open("tiny")
    barrier.wait()
    try:
        with record.looking(False) as number:
            time.sleep(0.5)  # the refit and the scoring happen here: a wide window for the other process
            record.append_look({"look_number": number, "pid": os.getpid()})
        results.put("looked")
    except SealError:
        results.put("refused")


def test_two_looks_at_once_record_exactly_one(workdir: Path) -> None:
    """Without a lock both processes passed the one-look check and both looked."""
    config = _config()
    create_or_resume(config, load_dataset(config.data), "unused")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_look_in_child, args=(str(workdir / "mlruns"), barrier, results))
                for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert sorted(results.get(timeout=5) for _ in children) == ["looked", "refused"]
    ledger = SweepRecord.open("tiny").ledger
    assert [entry["look_number"] for entry in ledger] == [1]


@pytest.mark.slow
def test_two_foldsweep_test_processes_at_once_look_once(workdir: Path, write_spec) -> None:
    """The same race through the CLI: a finished sweep, then two `foldsweep test` started together."""
    spec = write_spec(tracking={"enabled": False})
    assert subprocess.run([sys.executable, "-m", "foldsweep", "run", str(spec)], capture_output=True,
                          timeout=300).returncode == 0
    procs = [subprocess.Popen([sys.executable, "-m", "foldsweep", "test", "tiny", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(code for code, _ in outcomes) == [0, 2], outcomes
    assert any("was already looked at 1 time(s)" in err for code, err in outcomes if code == 2)
    assert len(SweepRecord.open("tiny").ledger) == 1


# -- looks are counted by the sealed rows, across sweeps ---------------------------------------------------
def _sealed(name: str, **overrides) -> SweepRecord:
    """A sweep's record (seal and plan only: no training) under `name`, on the tiny sweep's data."""
    config = _config(**overrides).model_copy(update={"name": name})
    return create_or_resume(config, load_dataset(config.data), "unused")[0]


def _look_at(record: SweepRecord, *, again: bool = False) -> int:
    """The ledger's real check-and-append, as `look` makes it (the scoring between is not the point here)."""
    with record.looking(again) as number:
        return record.append_look({"look_number": number, "time": f"2026-12-08T00:00:{number:02d}+00:00",
                                   "score": 0.5, "again": again})


def test_a_fresh_or_renamed_sweep_of_the_same_rows_does_not_reset_the_ledger(workdir: Path) -> None:
    """`run --fresh` (name-2) and `--set name=...` seal the same rows again: their first look is a further one."""
    assert _look_at(_sealed("qs")) == 1
    for name in ("qs-2", "renamed"):
        record = _sealed(name)
        with pytest.raises(SealError, match=r"^the sealed test set of `" + name + r"` was already looked at 1 "
                                            r"time\(s\), last by sweep `qs` at .*: pass --again"):
            record.check_can_look(False)
    assert "--fresh" not in _refusal(_sealed("qs-2"))
    assert _look_at(_sealed("qs-2"), again=True) == 2
    assert [(look["sweep"], look["look_number"]) for look in SweepRecord.open("qs").ledger] == [("qs", 1),
                                                                                                  ("qs-2", 2)]


def test_another_seal_sharing_some_rows_counts_them_as_looked_at(workdir: Path) -> None:
    """A new split seed seals other rows, but the ones the first look scored are not fresh again."""
    _look_at(_sealed("qs"))
    other = _sealed("reseeded", split={"seed": 7})
    assert len(other.ledger) == 1 and 0 < other.ledger[0]["shared_rows"] < len(other.test_hashes)
    with pytest.raises(SealError, match="already looked at 1 time"):
        other.check_can_look(False)


def test_a_deleted_sweep_ledger_still_counts_its_looks(workdir: Path) -> None:
    record = _sealed("qs")
    _look_at(record)
    (record.folder / "ledger.json").unlink()
    assert len(SweepRecord.open("qs").ledger) == 1
    with pytest.raises(SealError, match="already looked at 1 time"):
        SweepRecord.open("qs").check_can_look(False)


def test_a_deleted_looks_folder_still_counts_the_sweeps_own_looks(workdir: Path) -> None:
    record = _sealed("qs")
    _look_at(record)
    for path in (workdir / "mlruns" / "looks").glob("look-*"):
        path.unlink()
    with pytest.raises(SealError, match="already looked at 1 time"):
        SweepRecord.open("qs").check_can_look(False)


@pytest.mark.parametrize("damage", [b"{not json", b"", b'{"looks": 1}', b"\xff\xfe"])
def test_a_damaged_sweep_ledger_is_one_line_never_no_looks(workdir: Path, damage: bytes) -> None:
    record = _sealed("qs")
    _look_at(record)
    (record.folder / "ledger.json").write_bytes(damage)
    for check in (lambda: SweepRecord.open("qs").check_can_look(True), lambda: SweepRecord.open("qs").ledger):
        with pytest.raises(SealError, match=r"ledger of sweep `qs` \(.*ledger.json\) is damaged .*never read as no "
                                            r"looks") as caught:
            check()
        assert "\n" not in str(caught.value)


def test_a_damaged_look_record_makes_every_look_a_further_one(workdir: Path) -> None:
    """Which rows a damaged look scored is unknown: any sweep's look needs `again`, and is then counted."""
    _look_at(_sealed("qs"))
    (look_file,) = (workdir / "mlruns" / "looks").glob("look-*.npz")
    look_file.write_bytes(look_file.read_bytes()[:40])
    elsewhere = _sealed("other", split={"seed": 3})
    assert "damaged" in _refusal(elsewhere) and str(look_file.relative_to(workdir)) in _refusal(elsewhere)
    assert _look_at(elsewhere, again=True) == 2
    assert look_file.is_file()  # kept as it was: it is the user's to restore


def _refusal(record: SweepRecord) -> str:
    with pytest.raises(SealError) as caught:
        record.check_can_look(False)
    return str(caught.value)


def test_the_final_fit_replays_the_plateau_cuts_its_exported_config_carries() -> None:
    plateau = {"train": {"epochs": 30, "lr_schedule": "plateau", "gamma": 0.5}}
    cuts = {"plateau_cuts": [[3, 9], [5]], "fold_best_epochs": [12, 10]}
    job = final_job(_config(**plateau, provenance=cuts), np.arange(50), 20)
    assert job.plateau_factors == replayed_factors([[3, 9], [5]], [12, 10], 20, 0.5)
    assert job.plateau_factors is not None and min(job.plateau_factors) < 1.0 and job.plateau_factors[0] == 1.0
    assert final_job(_config(**plateau), np.arange(50), 20).plateau_factors is None  # nothing recorded: factor 1
    assert final_job(_config(provenance=cuts), np.arange(50), 20).plateau_factors is None  # another schedule
    with pytest.raises(SpecError, match=r"^`provenance.plateau_cuts` must be a list of epoch lists, one per fold"):
        final_job(_config(**plateau, provenance={**cuts, "fold_best_epochs": [12]}), np.arange(50), 20)
