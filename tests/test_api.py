"""The Python API on real stores: DataFrames in, results out, the same seal and ledger as the CLI."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import tiny_spec

import foldsweep
from foldsweep.data import _bundled, dataset_from_frame, load_dataset
from foldsweep.errors import DataError, SealError, SpecError, SplitError
from foldsweep.spec import DataSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def sonar() -> pd.DataFrame:
    return _bundled("sonar")[0].to_pandas()


def untracked(**overrides: object) -> dict:
    return tiny_spec(tracking={"enabled": False}, **overrides)


def test_a_frame_hashes_like_the_same_table_read_from_a_file(tmp_path: Path) -> None:
    frame = sonar()
    frame.to_csv(tmp_path / "sonar.csv", index=False)
    from_file = load_dataset(DataSpec(path=str(tmp_path / "sonar.csv"), target="label"))
    from_frame = dataset_from_frame(frame, DataSpec(frame="df", target="label"), name="df")
    assert np.array_equal(from_frame.row_hashes, from_file.row_hashes)
    assert from_frame.fingerprint == from_file.fingerprint
    assert "label" in frame.columns  # the caller's frame is left as it was
    edited = frame.copy()
    edited.iloc[3, 0] += 0.001
    assert dataset_from_frame(edited, DataSpec(frame="df", target="label"), name="df").fingerprint \
        != from_file.fingerprint


def test_bad_input_is_refused_with_one_line_before_anything_trains(workdir: Path) -> None:
    frame = sonar()
    with pytest.raises(DataError, match=r"^data must be a pandas DataFrame or an \(X, y\) pair, got list$"):
        foldsweep.run(untracked(), data=[[1, 2]], progress=False)
    with pytest.raises(DataError, match=r"^y must be 1-dimensional with one value per row of X \(208\)"):
        foldsweep.run(untracked(), data=(frame.drop(columns="label"), frame["label"][:10]), progress=False)
    with pytest.raises(DataError, match=r"^column `labl` not found in `dataframe` \(did you mean `label`\?\)"):
        foldsweep.run(untracked(), data=frame, target="labl", progress=False)
    with pytest.raises(DataError, match=r"is in this process's memory: the 2 workers cannot read it"):
        foldsweep.run(untracked(resources={"devices": "cpu", "workers": 2}), data=frame, target="label",
                      progress=False)
    with pytest.raises(SpecError, match=r"^spec dict: `optuna.n_trials` "):
        foldsweep.run(untracked(), data=frame, target="label", overrides=["optuna.n_trials=0"], progress=False)
    with pytest.raises(foldsweep.FoldsweepError, match=r"^no sweep named `tiny`"):
        foldsweep.open("tiny")
    assert not (workdir / "mlruns" / "sweeps" / "tiny").exists()  # refused input leaves no record behind


def test_a_sweep_on_a_frame_resumes_on_the_same_rows_and_refuses_others(workdir: Path) -> None:
    frame = sonar()
    result = foldsweep.run(untracked(), data=frame, target="label", progress=False)
    assert result.spec.data.frame == "dataframe" and result.spec.resources.workers == 1
    n = result.nested
    assert len(n.outer) == 2 and n.ci95[0] <= n.mean <= n.ci95[1] and n.metric == "accuracy"
    assert n.optimism == pytest.approx(float(np.mean(n.optimism_per_fold)))
    assert set(result.best_params) == {"lr", "weight_decay", "l1", "dropout", "batch_size", "width"}

    trials = result.trials_dataframe()
    assert sorted(trials["study"].unique()) == ["final", "outer-0", "outer-1"] and len(trials) == 6
    assert trials.groupby("study")["value"].max()["final"] == result.final_value

    again = foldsweep.run(untracked(), data=frame, target="label", progress=False)
    assert again.summary["resumed"] is True and again.nested == n
    assert len(again.trials_dataframe()) == 6  # nothing trained twice
    with pytest.raises(SplitError, match=r"^data of sweep `tiny` changed since it started"):
        foldsweep.run(untracked(), data=frame.iloc[::-1], target="label", progress=False)

    status = foldsweep.status("tiny")[0]
    assert status["data"].startswith("in-memory table `dataframe`") and status["nested"]["mean"] == n.mean


def test_fit_and_test_need_the_same_rows_again_and_the_ledger_counts_looks(workdir: Path) -> None:
    frame = sonar()
    X, y = frame.drop(columns="label").to_numpy(), frame["label"].to_numpy()
    result = foldsweep.run(untracked(), data=(X, y), progress=False)
    assert result.spec.data.frame == "arrays" and result.spec.data.target == "target"

    reopened = foldsweep.open("tiny")
    with pytest.raises(DataError, match=r"^data.frame `arrays` is an in-memory table, not a file"):
        reopened.test()
    with pytest.raises(SealError, match=r"^data of `tiny` changed since the sweep was sealed"):
        foldsweep.open("tiny", data=(X[::-1], y[::-1])).test()

    model = result.fit(workdir / "model")
    labels = model.predict(X[:20])
    proba = model.predict_proba(X[:20])
    assert set(labels) <= {"M", "R"} and proba.shape == (20, 2)
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert list(np.asarray(model.classes)[proba.argmax(1)]) == list(labels)
    assert foldsweep.load_model(workdir / "model").model_hash == model.model_hash

    look = foldsweep.open("tiny", data=(X, y)).test(model=model)
    assert look["look_number"] == 1 and look["model_hash"] == model.model_hash
    with pytest.raises(SealError, match=r"^the sealed test set of `tiny` was already looked at 1 time\(s\)"):
        result.test()
    second = result.test(again=True)
    assert second["look_number"] == 2 and [lk["again"] for lk in result.test_looks] == [False, True]


def test_fit_without_a_folder_keeps_the_model_in_the_record_and_reuses_it(workdir: Path) -> None:
    frame = sonar()
    result = foldsweep.run(untracked(), data=frame, target="label", progress=False)
    first = result.fit()
    assert first.folder.resolve() == (workdir / "mlruns" / "sweeps" / "tiny" / "model").resolve()
    written = (first.folder / "model.pt").stat().st_mtime_ns
    second = result.fit()
    assert second.model_hash == first.model_hash and (first.folder / "model.pt").stat().st_mtime_ns == written
    assert list(second.predict(frame.head(8))) == list(first.predict(frame.head(8)))


def test_report_and_plots_render_for_people_and_notebooks(workdir: Path) -> None:
    result = foldsweep.run(untracked(), data=sonar(), target="label", progress=False)
    shown = result.report()
    assert shown.data["nested"]["mean"] == result.nested.mean
    bundle = shown._repr_mimebundle_()
    assert f"{result.nested.mean:.4f}" in bundle["text/plain"] and "<pre" in bundle["text/html"]
    assert "in-memory table `dataframe`" in str(shown)
    for knob, value in result.best_params.items():
        shown_value = f"{value:.4g}" if isinstance(value, float) else str(value)
        assert any(knob in line and shown_value in line for line in str(shown).splitlines()), knob
    assert "nested accuracy" in result._repr_mimebundle_()["text/html"]
    assert repr(result).startswith("SweepResult('tiny': nested accuracy ")
    figures = result.plots()
    assert {"optimization_history", "outer_scores"} <= set(figures)
    assert "learning_curves" not in figures  # tracking is off: no curves were kept to draw
    path = workdir / "outer.png"
    figures["outer_scores"].savefig(path)
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_ctrl_c_in_a_kernel_leaves_a_resumable_sweep_and_no_signal_handler(workdir: Path) -> None:
    """SIGINT is how Jupyter interrupts a kernel; after it the same call resumes and completes the sweep."""
    spec = untracked(optuna={"n_trials": 4, "trials_per_batch": 1, "n_startup_trials": 1, "report_every": 2})
    frame = sonar()
    before = signal.getsignal(signal.SIGINT)
    journal = workdir / "mlruns" / "optuna" / "tiny.journal"

    def interrupt_after_first_trial() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if journal.exists():
                storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
                names = optuna.get_all_study_names(storage)
                if any(t.state == optuna.trial.TrialState.COMPLETE for name in names
                       for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)):
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=interrupt_after_first_trial, daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt) as stopped:
        foldsweep.run(spec, data=frame, target="label", progress=False)
    watcher.join()
    assert "finished trials of `tiny` are kept" in "".join(getattr(stopped.value, "__notes__", []))
    assert signal.getsignal(signal.SIGINT) is before
    resumed = foldsweep.run(spec, data=frame, target="label", progress=False)
    assert resumed.summary["resumed"] is True
    counts = resumed.trials_dataframe().query("state == 'complete'").groupby("study").size()
    assert counts.to_dict() == {"final": 4, "outer-0": 4, "outer-1": 4}


@pytest.mark.slow
def test_the_quickstart_example_runs(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    loader = importlib.util.spec_from_file_location("quickstart_example", EXAMPLES / "quickstart.py")
    assert loader is not None and loader.loader is not None
    example = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(example)
    result = example.main(n_trials=2, epochs=4, model_dir=str(workdir / "models" / "qs"))
    printed = capsys.readouterr().out
    assert result.name == "quickstart-py" and len(result.test_looks) == 1
    assert f"nested accuracy: {result.nested.mean:.3f}" in printed
    assert "sealed test accuracy" in printed
