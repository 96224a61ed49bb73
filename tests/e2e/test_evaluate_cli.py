"""Honest evaluation through the CLI, on one finished CSV sweep with planted duplicate rows.

The sweep, its export and a `fit` run once per module (25-35 s on 2 cores, the cost of all five tests);
each test works in that folder. Only the look test touches the ledger; the edit test puts the CSV back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow.artifacts
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import fill_disk, mounted_tmpfs, tiny_spec
from mlflow import MlflowClient

from foldsweep.cli import cli
from foldsweep.data import load_dataset
from foldsweep.evaluate import load_model, train_final
from foldsweep.record import SweepRecord
from foldsweep.spec import DataSpec, SplitSpec, load_spec
from foldsweep.splits import seal_test_set

SPLIT = {"test_size": 0.25, "seed": 0, "outer": {"k": 2}, "inner": {"k": 2}, "duplicates": "drop"}
CROSSING, WITHIN = 4, 2  # planted: dev rows copying a sealed test row, dev rows copying another dev row


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _planted_sonar(path: Path) -> pd.DataFrame:
    """Sonar with 4 dev rows overwritten by copies of sealed test rows and 2 by copies of a dev row.

    Labels are untouched, so the stratified seal (which only sees labels) picks the same test rows.
    """
    data = load_dataset(DataSpec(dataset="sonar"))
    dev, test = seal_test_set(data, SplitSpec(**SPLIT))
    X = data.X.copy()
    used: list[int] = []
    for t in test[:CROSSING]:
        d = next(int(r) for r in dev if data.y[r] == data.y[t] and r not in used)
        X[d] = X[t]
        used.append(d)
    rest = [int(r) for r in dev if r not in used]
    X[rest[1]] = X[rest[0]]
    X[rest[2]] = X[rest[0]]
    frame = pd.DataFrame(X, columns=data.feature_names)
    frame["label"] = [data.classes[i] for i in data.y]
    frame.to_csv(path, index=False)
    return frame


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("evaluate")
    frame = _planted_sonar(folder / "sonar.csv")
    spec = tiny_spec(data={"dataset": None, "path": "sonar.csv", "target": "label"}, split=SPLIT)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("FOLDSWEEP_HOME", raising=False)
        code, stdout, stderr = _run("run", "tiny.yaml")
        assert code == 0, stderr
        code, _, stderr = _run("export", "tiny", "-o", "best.yaml")
        assert code == 0, stderr
        code, fitted, stderr = _run("fit", "best.yaml", "-o", "models/final", "--json")
        assert code == 0, stderr
    return {"folder": folder, "frame": frame, "run_output": stdout, "fit": json.loads(fitted)}


@pytest.fixture
def in_sweep(swept: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(swept["folder"])
    monkeypatch.delenv("FOLDSWEEP_HOME", raising=False)
    return swept


def test_planted_duplicates_are_counted_and_dropped_from_development(in_sweep: dict) -> None:
    note = (f"{CROSSING} development rows have the features of a sealed test row and {WITHIN} development rows those "
            "of another development row (split.duplicates: {}; labels not compared)")
    assert f"note: {note.format('drop')}: dropped" in in_sweep["run_output"]
    code, stdout, _ = _run("validate", "tiny.yaml", "--set", "split.duplicates=warn")
    assert code == 0 and f"{note.format('warn')}: kept;" in " ".join(stdout.split())
    kept = json.loads(_run("validate", "tiny.yaml", "--set", "split.duplicates=warn", "--json")[1])
    dropped = json.loads(_run("validate", "tiny.yaml", "--json")[1])
    assert kept["dev_rows"] - dropped["dev_rows"] == CROSSING + WITHIN

    plan = SweepRecord.open("tiny").plan
    rows = list(in_sweep["frame"].itertuples(index=False))
    test_rows = {rows[i] for i in plan.test}
    dev_rows = [rows[i] for i in plan.dev]
    assert not test_rows & set(dev_rows) and len(set(dev_rows)) == len(dev_rows)
    for fold in plan.outer:
        assert not set(fold.train) & set(plan.test) and not set(fold.valid) & set(plan.test)


def test_fit_then_predict_reproduces_the_engines_predictions(in_sweep: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    info = in_sweep["fit"]
    record = SweepRecord.open("tiny")
    plan = record.plan
    assert info["dev_source"] == "the sweep's plan" and info["dev_rows"] == len(plan.dev)

    config = load_spec("best.yaml")
    final, result = train_final(config, load_dataset(config.data), plan.dev, info["epochs"])
    assert final.model_hash == info["model_hash"]  # the engine run below is the run `fit` did
    rows = in_sweep["frame"].iloc[plan.dev]
    rows.to_csv("dev_rows.csv", index=False)  # the target column is present: it is ignored
    code, _, stderr = _run("predict", "models/final", "dev_rows.csv", "-o", "pred.csv")
    assert code == 0, stderr
    pred = pd.read_csv("pred.csv")
    np.testing.assert_allclose(pred[["prob_M", "prob_R"]].to_numpy(), result.valid_pred, atol=1e-5)
    assert list(pred["prediction"]) == [["M", "R"][i] for i in result.valid_pred.argmax(1)]

    rows.drop(columns=["label", "band_05"]).to_csv("short.csv", index=False)
    code, _, stderr = _run("predict", "models/final", "short.csv", "-o", "pred2.csv")
    assert code == 2 and stderr.strip() == "error: `short.csv` does not have the model's columns: missing `band_05`"
    assert not Path("pred2.csv").exists()

    provenance = json.loads(Path("models/final/provenance.json").read_text())
    assert provenance["data_fingerprint"] == record.meta["fingerprint"] and provenance["sweep"] == "tiny"
    client = MlflowClient(provenance["mlflow"]["tracking_uri"])
    run = client.get_run(provenance["mlflow"]["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == record.meta["mlflow_runs"]["sweep"]
    assert run.data.tags["foldsweep.model_hash"] == info["model_hash"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", provenance["mlflow"]["tracking_uri"])  # models:/ URIs resolve there
    logged = mlflow.pytorch.load_model(provenance["mlflow"]["model_uri"])
    x = torch.randn(4, final.prep.n_inputs)
    torch.testing.assert_close(logged(x), load_model(Path("models/final")).net(x))

    code, _, stderr = _run("fit", "best.yaml", "-o", "models/final")
    assert code == 2 and "`models/final` already holds a model" in stderr


def test_the_sealed_test_set_is_looked_at_once_unless_again(in_sweep: dict) -> None:
    code, stdout, stderr = _run("test", "tiny", "--model", "models/final", "--json")
    assert code == 0, stderr
    first = json.loads(stdout)
    assert first["look_number"] == 1 and first["again"] is False and 0 <= first["score"] <= 1
    assert first["model_hash"] == in_sweep["fit"]["model_hash"] and first["model"] == "models/final"

    code, _, stderr = _run("test", "tiny")
    assert code == 2
    assert re.fullmatch(r"error: the sealed test set of `tiny` was already looked at 1 time\(s\), last by sweep `tiny` "
                        r"at \S+; a further look biases it: pass --again to look anyway \(it will be counted\)",
                        stderr.strip()), stderr
    assert len(SweepRecord.open("tiny").ledger) == 1

    code, stdout, stderr = _run("test", "tiny", "--again", "--json")
    assert code == 0, stderr
    second = json.loads(stdout)
    assert second["look_number"] == 2 and second["again"] is True
    # without --model the look refits the exported config: the very model `fit` saved
    assert second["model_hash"] == first["model_hash"] and second["score"] == first["score"]
    ledger = SweepRecord.open("tiny").ledger
    assert [entry["look_number"] for entry in ledger] == [1, 2]

    report = json.loads(_run("report", "tiny", "--json")[1])
    assert report["test_look_count"] == 2 and [lk["score"] for lk in report["test_looks"]] == [first["score"]] * 2
    assert _run("report", "tiny", "--markdown", "report.md")[0] == 0
    assert "**2 looks**" in Path("report.md").read_text()
    exported = yaml.safe_load(_run("export", "tiny")[1])
    assert exported["provenance"]["test_looks"] == 2

    meta = SweepRecord.open("tiny").meta
    client = MlflowClient(meta["tracking_uri"])
    sweep_run = meta["mlflow_runs"]["sweep"]
    history = client.get_metric_history(sweep_run, "test_score")
    assert sorted(m.step for m in history) == [1, 2]
    assert client.get_run(sweep_run).data.tags["foldsweep.test_looks"] == "2"
    logged_report = Path(mlflow.artifacts.download_artifacts(run_id=sweep_run, artifact_path="report.md",
                                                             tracking_uri=meta["tracking_uri"]))
    assert "**2 looks**" in logged_report.read_text()
    _the_looks_survive_a_fresh_run_and_a_deleted_or_damaged_ledger()


def _the_looks_survive_a_fresh_run_and_a_deleted_or_damaged_ledger() -> None:
    """`run --fresh` seals the same rows as `tiny-2`; its first look is look 3, and says who looked before."""
    code, _, stderr = _run("run", "tiny.yaml", "--fresh")
    assert code == 0, stderr
    code, _, stderr = _run("test", "tiny-2", "--model", "models/final")
    assert code == 2 and "already looked at 2 time(s), last by sweep `tiny` at" in stderr and "--fresh" not in stderr
    ledger = Path("mlruns/sweeps/tiny/ledger.json")
    kept = ledger.read_bytes()
    ledger.unlink()
    try:
        assert json.loads(_run("report", "tiny", "--json")[1])["test_look_count"] == 2
        ledger.write_bytes(kept[: len(kept) // 2])
        for command in (("test", "tiny", "--again"), ("report", "tiny")):
            code, _, stderr = _run(*command)
            assert code == 2 and stderr.count("\n") == 1 and "ledger.json) is damaged" in stderr, (command, stderr)
    finally:
        ledger.write_bytes(kept)


@pytest.mark.parametrize("damage", ["record.json cut", "plan.npz flipped"])
def test_damaged_record_files_are_one_line_naming_the_file(in_sweep: dict, damage: str) -> None:
    name, how = damage.split()
    path = Path("mlruns/sweeps/tiny") / name
    kept = path.read_bytes()
    path.write_bytes(kept[: len(kept) // 2] if how == "cut" else kept[:60] + bytes([kept[60] ^ 0xFF]) + kept[61:])
    try:
        commands = [("status", "tiny"), ("test", "tiny", "--again"), ("report", "tiny"), ("export", "tiny")]
        if name == "record.json":
            commands.append(("run", "tiny.yaml"))
        for command in commands:
            code, stdout, stderr = _run(*command)
            assert (code, stderr.count("\n")) == (2, 1) and str(path) in stderr, (command, stderr)
    finally:
        path.write_bytes(kept)
    assert path.read_bytes() == kept


def test_report_shows_overfitting_diagnostics_of_every_study(in_sweep: dict) -> None:
    report = json.loads(_run("report", "tiny", "--json")[1])
    assert [d["study"] for d in report["diagnostics"]] == ["outer-0", "outer-1", "final"]
    for row in report["diagnostics"]:
        assert len(row["best_epochs"]) == 2 and all(1 <= e <= 6 for e in row["best_epochs"])
        assert row["epoch_budget"] == 6 and isinstance(row["gap"], float)
    code, stdout, _ = _run("report", "tiny")
    assert code == 0 and "overfitting diagnostics" in stdout and "hyperparameter stability" in stdout
    # the spread printed beside the estimate is the outer scores' standard deviation, and says so (it was a bare ±)
    assert "±" not in stdout and "±" not in in_sweep["run_output"]
    assert "sd of 2 outer-fold scores" in " ".join(in_sweep["run_output"].split())
    code, _, _ = _run("report", "tiny", "--markdown", "labelled.md")
    assert "the unweighted mean of 2 outer-fold scores (their standard deviation" in Path("labelled.md").read_text()


def test_an_edited_test_row_makes_the_look_refuse(in_sweep: dict) -> None:
    path = Path("sonar.csv")
    original = path.read_text()
    test_row = int(SweepRecord.open("tiny").plan.test[0])
    frame = pd.read_csv(path)
    frame.loc[test_row, "band_10"] += 0.001
    try:
        frame.to_csv(path, index=False)
        code, _, stderr = _run("test", "tiny", "--again")
    finally:
        path.write_text(original)
    assert code == 2
    assert stderr.startswith("error: data of `tiny` changed since the sweep was sealed (1 sealed test rows differ")


def test_export_to_a_full_disk_leaves_no_file(in_sweep: dict, tmp_path: Path) -> None:
    """It left a 0-byte `best.yaml`; now the error is one line and nothing is there (nor a temporary file)."""
    for disk in mounted_tmpfs(tmp_path / "disk", "64k"):
        fill_disk(disk)
        for command in (("export", "tiny", "-o", str(disk / "best.yaml")),
                        ("report", "tiny", "--markdown", str(disk / "report.md"))):
            code, _, stderr = _run(*command)
            assert code == 2 and stderr.count("\n") == 1 and "No space left on device" in stderr, (command, stderr)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_reading_a_sweep_needs_no_write(in_sweep: dict) -> None:
    """`status`, `report` and `export` refused on a read-only mlruns/ because they took the journal's lock for
    writing; reading a finished sweep writes nothing."""
    import os
    import subprocess

    folder = Path("mlruns").resolve()
    expected = {cmd: _run(*cmd, "--json")[1] if cmd[0] != "export" else _run(*cmd)[1]
                for cmd in (("status", "tiny"), ("report", "tiny"), ("export", "tiny"))}
    for lock in folder.glob("optuna/*.flock"):
        lock.unlink()  # the worst case: no lock file to open for reading either
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
            pytest.skip("cannot bind-mount here")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        undo = ["umount", str(folder)]
    else:
        subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        undo = ["chmod", "-R", "u+w", str(folder)]
    try:
        for cmd, before in expected.items():
            code, stdout, stderr = _run(*cmd, *(("--json",) if cmd[0] != "export" else ()))
            assert code == 0, (cmd, stderr)
            if cmd[0] != "status":  # status carries the time since each study's last heartbeat
                assert stdout == before, cmd
    finally:
        subprocess.run(undo, check=True)
