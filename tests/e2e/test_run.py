"""The spine end to end through the CLI: run, status, export, re-load the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from scipy import stats

from foldsweep.cli import cli
from foldsweep.record import SweepRecord
from foldsweep.spec import load_spec


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_run_prints_the_summary_json_and_logs_one_child_run_per_trial(write_spec, workdir) -> None:
    spec = write_spec()
    code, stdout, _ = _run("run", str(spec), "--json")
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert set(summary) >= {"sweep", "metric", "nested", "final", "optimism", "mlflow", "storage", "fold_fits",
                            "wall_s"}
    assert summary["metric"] == "accuracy"
    assert len(summary["nested"]["outer"]) == 2
    record = SweepRecord("tiny", workdir / "mlruns/sweeps/tiny")
    nested, plan, refits = summary["nested"], record.plan, record.meta["summary"]["outer_refits"]
    outer = np.array(nested["outer"])
    ratio = np.mean([len(f.valid) for f in plan.outer]) / np.mean([len(f.train) for f in plan.outer])
    between = np.sqrt((1 / len(outer) + ratio) * outer.var(ddof=1))
    rows = np.sqrt(np.mean([r["outer_test_se"] ** 2 for r in refits]) / len(outer))
    half = stats.norm.ppf(0.975) * max(between, rows)
    assert nested["mean"] == pytest.approx(outer.mean())
    assert nested["ci95"] == pytest.approx([max(0.0, outer.mean() - half), min(1.0, outer.mean() + half)])
    assert nested["interval"].startswith("95% normal: mean ± 1.96 · max(per-row SE")
    assert summary["sealed_test"]["test_rows_in_dev"] == 0 and summary["refit_fallbacks"] == []
    assert set(summary["final"]["best_params"]) == {"lr", "weight_decay", "l1", "dropout", "batch_size", "width"}

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = client.search_runs([summary["mlflow"]["experiment_id"]])
    by_parent: dict[str, list] = {}
    for run in runs:
        by_parent.setdefault(run.data.tags.get("mlflow.parentRunId", ""), []).append(run)
    sweep_runs = by_parent[""]
    assert [r.info.run_id for r in sweep_runs] == [summary["mlflow"]["run_id"]]
    studies = by_parent[summary["mlflow"]["run_id"]]
    assert sorted(r.info.run_name for r in studies) == ["final", "outer-0", "outer-1"]
    for study in studies:
        trials = by_parent.get(study.info.run_id, [])
        assert len(trials) == 2, study.info.run_name  # n_trials=2, no failures
    assert all(r.info.status == "FINISHED" for r in runs)


def test_rerun_resumes_without_training_again_and_export_round_trips(write_spec, workdir) -> None:
    spec = write_spec()
    assert _run("run", str(spec), "--json")[0] == 0
    code, stdout, _ = _run("run", str(spec), "--json")
    assert code == 0
    again = json.loads(stdout.strip().splitlines()[-1])
    assert again["resumed"] is True

    code, stdout, _ = _run("status", "tiny", "--json")
    studies = json.loads(stdout)[0]["studies"]
    assert [s["finished"] for s in studies] == [2, 2, 2]  # a rerun trains nothing more

    code, _, stderr = _run("export", "tiny", "-o", str(workdir / "best.yaml"))
    assert code == 0, stderr
    exported = load_spec(workdir / "best.yaml")
    assert exported.search == {}
    assert exported.provenance is not None and exported.provenance["sweep"] == "tiny"
    best = exported.provenance["best_params"]
    assert exported.train.lr == best["lr"] and exported.model.width == best["width"]
    assert exported.model.dropout == best["dropout"] and exported.train.batch_size == best["batch_size"]
    assert exported.train.l1 == best["l1"] and exported.train.weight_decay == best["weight_decay"]


QUICKSTART = Path(__file__).resolve().parents[2] / "sweeps" / "quickstart.yaml"


@pytest.mark.slow
def test_the_quickstart_prints_the_same_estimate_on_every_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default (no `resources.workers`), two runs in fresh folders give the same nested estimate."""
    monkeypatch.delenv("FOLDSWEEP_HOME", raising=False)
    summaries = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        code, stdout, stderr = _run("run", str(QUICKSTART), "--json")
        assert code == 0, stderr
        summaries.append(json.loads(stdout.strip().splitlines()[-1]))
    first, second = summaries
    assert first["workers"] == second["workers"] == 1
    assert first["nested"] == second["nested"] and first["final"] == second["final"]


def test_a_round_with_long_epochs_shows_its_steps_in_the_live_display(write_spec, workdir, monkeypatch) -> None:
    """The engine's progress reaches the display through a real sweep. Every step counts as "long"
    here (the engine reports after PROGRESS_EVERY_S, set to 0), so sonar stands in for a big table."""
    import io

    from rich.console import Console

    from foldsweep import trainer
    from foldsweep.console import Display
    from foldsweep.workers import run_sweep

    monkeypatch.setattr(trainer, "PROGRESS_EVERY_S", 0.0)
    display = Display(quiet=False, console=Console(file=io.StringIO(), force_terminal=True, width=150))
    steps, seen = [], []

    def event(kind: str, info: dict) -> None:
        display.event(kind, info)
        if kind == "steps":
            steps.append(info)
            view = Console(file=io.StringIO(), force_terminal=True, width=150, color_system=None)
            view.print(display._view())
            seen.append(next(line for line in view.file.getvalue().splitlines() if "rows/s" in line))

    with display:
        run_sweep(load_spec(write_spec(tracking={"enabled": False})), progress=event)
    assert steps and all(0 < s["done"] <= s["total"] and s["rows"] > 0 and s["rows_per_s"] > 0 for s in steps)
    assert any(b["done"] > a["done"] for a, b in zip(steps, steps[1:]))  # it moves within a round
    for s, line in zip(steps, seen):  # the bar as it stood after each event: steps, rows/s, ETA
        assert line.lstrip().startswith("steps (") and f"{s['done']}/{s['total']}" in line and "ETA" in line
    assert not any(t.description.startswith("steps") for t in display.bars.tasks)  # gone once the trials land
