"""The MLflow run tree of a real tiny sweep, read back with `MlflowClient` (real SQLite store, no mocks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import fill_disk, mounted_tmpfs, tiny_spec, wait_for_pictures
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_procs import check_consistent, check_runs_match_trials, finish, start, trials

from foldsweep import space
from foldsweep.crash import CRASH_ENV
from foldsweep.pictures import PENDING, mark_pending, pictures_drawn, pictures_note, sweep_pictures
from foldsweep.report import build_report
from foldsweep.spec import SweepSpec, TrackingSpec, parse_spec
from foldsweep.storage import preflight
from foldsweep.tracking import MlflowTracker, provenance_tags
from foldsweep.tracking.store import _migrate, create_store
from foldsweep.workers import run_sweep

# Percentile 1 prunes every trial that is not about the best so far at a report; with one trial per round,
# most of the later trials of each study are pruned.
PRUNING = {"n_trials": 4, "trials_per_batch": 1, "n_startup_trials": 1, "report_every": 2, "pruner": "percentile",
           "percentile": 1.0}
PLOTS = {"optimization_history.png", "outer_scores.png", "param_importances.png", "parallel_coordinates.png",
         "learning_curves.png"}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny sweep with pruning, run once for every test here; its run tree and studies."""
    folder = tmp_path_factory.mktemp("swept")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("FOLDSWEEP_HOME", raising=False)
        spec = parse_spec(tiny_spec(train={"epochs": 8, "patience": 8, "batch_size": 32}, optuna=PRUNING))
        summary = run_sweep(spec)
        wait_for_pictures(folder / "mlruns" / "sweeps" / "tiny")
        storage = preflight(str(folder / summary["storage"]), 1)
        studies = {key: optuna.load_study(study_name=f"tiny/{key}", storage=storage)
                   for key in ("outer-0", "outer-1", "final")}
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = client.search_runs([summary["mlflow"]["experiment_id"]], max_results=1000)
    return {"summary": summary, "client": client, "runs": {r.info.run_id: r for r in runs}, "studies": studies}


def _children(swept: dict[str, Any], parent: str) -> list[Any]:
    return [r for r in swept["runs"].values() if r.data.tags.get("mlflow.parentRunId", "") == parent]


def test_one_sweep_run_one_run_per_study_one_per_trial(swept: dict[str, Any]) -> None:
    sweep_runs = _children(swept, "")
    assert [r.info.run_id for r in sweep_runs] == [swept["summary"]["mlflow"]["run_id"]]
    study_runs = {r.info.run_name: r for r in _children(swept, sweep_runs[0].info.run_id)}
    assert set(study_runs) == {"outer-0", "outer-1", "final"}
    assert len(swept["runs"]) == 1 + 3 + sum(len(s.trials) for s in swept["studies"].values())
    for key, study in swept["studies"].items():
        trial_runs = {r.info.run_id: r for r in _children(swept, study_runs[key].info.run_id)}
        assert len(study.trials) == PRUNING["n_trials"]
        for trial in study.trials:  # the Optuna trial names its run, and the run names the trial
            run = trial_runs[trial.user_attrs["mlflow_run_id"]]
            assert run.info.run_name == f"{key}/trial-{trial.number}"
            assert run.data.tags["optuna.trial_number"] == str(trial.number)
            assert run.data.tags["optuna.study"] == f"tiny/{key}"


def test_a_trial_run_holds_params_fold_scores_and_per_epoch_curves(swept: dict[str, Any]) -> None:
    trial = swept["studies"]["final"].best_trial
    run = swept["runs"][trial.user_attrs["mlflow_run_id"]]
    assert run.info.status == "FINISHED" and run.data.tags["foldsweep.state"] == "complete"
    assert run.data.params["train.lr"] == str(trial.params["lr"])
    assert run.data.params["model.width"] == str(trial.params["width"])
    assert run.data.metrics["accuracy"] == pytest.approx(trial.value)
    assert {"fold_0/accuracy", "fold_1/accuracy", "accuracy_std", "best_epoch", "generalization_gap",
            "wall_s"} <= set(run.data.metrics)
    for key in ("val_loss", "train_loss", "val_accuracy", "fold_0/val_loss", "fold_1/train_loss"):
        steps = [m.step for m in swept["client"].get_metric_history(run.info.run_id, key)]
        assert len(steps) >= 2 and steps == sorted(set(steps)), key


def test_a_pruned_trial_run_says_at_which_epoch(swept: dict[str, Any]) -> None:
    pruned = [t for s in swept["studies"].values() for t in s.trials if t.state == TrialState.PRUNED]
    assert pruned, "the percentile pruner pruned nothing; the test sweep must prune"
    for trial in pruned:
        run = swept["runs"][trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["foldsweep.state"] == f"pruned at epoch {max(trial.intermediate_values)}"
        assert run.info.status == "KILLED"
        steps = swept["client"].get_metric_history(run.info.run_id, "val_loss")
        assert max(m.step for m in steps) == max(trial.intermediate_values)  # the curve stops where it was pruned


def test_study_runs_carry_their_headline_metrics(swept: dict[str, Any]) -> None:
    study_runs = {r.info.run_name: r for r in _children(swept, swept["summary"]["mlflow"]["run_id"])}
    for key, study in swept["studies"].items():
        metrics = study_runs[key].data.metrics
        states = [t.state for t in study.trials]
        assert metrics["best_inner_value"] == pytest.approx(study.best_value)
        assert metrics["n_complete"] == states.count(TrialState.COMPLETE)
        assert metrics["n_pruned"] == states.count(TrialState.PRUNED)
        assert metrics["n_failed"] == 0
    assert {"outer_test_score", "optimism"} <= set(study_runs["outer-0"].data.metrics)


def test_sweep_run_has_artifacts_plots_provenance_and_system_metrics(swept: dict[str, Any]) -> None:
    run_id = swept["summary"]["mlflow"]["run_id"]
    client, run = swept["client"], swept["runs"][run_id]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "report.md", "spec.yaml", "best_config.yaml", "plan.json", "plots"} <= top
    assert {Path(a.path).name for a in client.list_artifacts(run_id, "plots")} == PLOTS
    tags = run.data.tags
    assert tags["mlflow.version"] and tags["python.version"] and tags["scikit-learn.version"]
    assert "mlflow.source.git.commit" not in tags  # the sweep ran in a folder that is no git checkout
    assert {"nested_mean", "nested_ci95_low", "nested_ci95_high", "optimism"} <= set(run.data.metrics)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_system_metrics_follow_the_flag(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = {}
    for enabled in (True, False):
        tracker = MlflowTracker(TrackingSpec(uri=uri, artifact_location=str(tmp_path / "artifacts"),
                                             system_metrics=enabled), "flags")
        run_id = tracker.sweep_run("flags", {}, None)
        tracker.finish(run_id)  # finished at once: the last sample taken on the way out is all there is
        logged[enabled] = {k for k in MlflowClient(uri).get_run(run_id).data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= logged[True]
    assert logged[False] == set()


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_provenance_names_the_commit_of_a_checkout_and_whether_it_was_dirty(tmp_path: Path) -> None:
    assert "mlflow.source.git.commit" not in provenance_tags(tmp_path)
    _git(tmp_path, "init", "-q")
    (tmp_path / "sweep.yaml").write_text("name: a\n")
    _git(tmp_path, "add", "sweep.yaml")
    _git(tmp_path, "commit", "-q", "-m", "first")
    tags = provenance_tags(tmp_path)
    assert tags["mlflow.source.git.commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert tags["foldsweep.git_dirty"] == "false"
    (tmp_path / "sweep.yaml").write_text("name: b\n")
    assert provenance_tags(tmp_path)["foldsweep.git_dirty"] == "true"


RACER = """
import sys, time
from pathlib import Path
from foldsweep.spec import TrackingSpec
from foldsweep.tracking import MlflowTracker
go = Path(sys.argv[1])
while not go.exists():  # both processes have imported everything: they open the store at the same moment
    time.sleep(0.005)
print(MlflowTracker(TrackingSpec(uri=sys.argv[2], artifact_location=sys.argv[3]), "race").experiment_id)
"""


def test_two_processes_creating_one_fresh_store_at_once_both_succeed(tmp_path: Path) -> None:
    """Issue 12 item 5: two sweeps started at once in a fresh folder raced MLflow's schema migrations."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**os.environ, "FOLDSWEEP_CACHE": str(tmp_path / "cache")}  # no template yet: the slow path races too
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "go"), uri, str(tmp_path / "artifacts")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1.0)
    (tmp_path / "go").touch()
    outputs = [racer.communicate(timeout=300) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err[-2000:] for _, err in outputs]
    ids = {out.strip() for out, _ in outputs}
    experiments = [e for e in MlflowClient(uri).search_experiments() if e.name == "race"]
    assert ids == {experiments[0].experiment_id} and len(experiments) == 1


def test_a_store_made_from_the_template_is_what_mlflow_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copied schema is MLflow's own; the Default experiment is made anew for the new folder."""
    monkeypatch.setenv("FOLDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    made = [create_store(f"sqlite:///{tmp_path / name / 'mlflow.db'}") for name in ("a", "b", "b")]
    assert made == [True, True, False]
    assert len(list((tmp_path / "cache").glob("mlflow-schema-*.db"))) == 1
    monkeypatch.delenv("FOLDSWEEP_CACHE")
    _migrate(tmp_path / "direct.db")  # what MLflow alone creates
    tables = [_tables(tmp_path / "b" / "mlflow.db"), _tables(tmp_path / "direct.db")]
    assert tables[0] == tables[1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == str(tmp_path / "mlruns" / "0")
    assert client.get_experiment(client.create_experiment("x")).name == "x"


def _tables(path: Path) -> dict[str, list[str]]:
    """Each table's and index's definition, its lines sorted: MLflow's migrations order constraints by chance."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'index')").fetchall()
    return {name: sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()) for name, sql in rows}


@pytest.mark.slow
def test_two_runs_of_one_sweep_started_at_once_in_a_fresh_folder_make_one_store_and_one_tree(write_spec,
                                                                                            workdir: Path) -> None:
    """Issue 12 item 5 as the user met it: the second `foldsweep run` died with `duplicate column name: step`.
    Since issue 23 item 3 one of them runs the sweep and the other refuses in one line, unless it came second."""
    spec = write_spec(optuna={"n_trials": 2, "trials_per_batch": 1})
    runs = [start("run", str(spec), "--json", cwd=workdir) for _ in range(2)]
    results = [finish(run, timeout=600) for run in runs]
    assert sorted(code for code, _, _ in results) in ([0, 0], [0, 2]), [err[-2000:] for _, _, err in results]
    assert all("Traceback" not in err for _, _, err in results)
    for code, _, err in results:
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "is being run by pid" in err, err
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["tiny"]
    summary = json.loads(next(out for code, out, _ in results if code == 0).strip().splitlines()[-1])
    check_consistent("mlruns/optuna/tiny.journal", summary)


def test_the_writer_process_ends_quietly_when_its_parent_dies_before_a_reply(tmp_path: Path) -> None:
    """A coordinator killed while the writer was creating a run left a BrokenPipeError traceback (crash point
    mlflow-2-KILL-2): the writer's reply found the pipe closed. It now ends quietly, as on a lost recv."""
    import socket
    from multiprocessing.connection import Connection

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ours, theirs = socket.socketpair()
    command = [sys.executable, "-c", "from foldsweep.tracking.writer import _writer_main; _writer_main()",
               str(theirs.fileno())]
    child = subprocess.Popen(command, pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True)
    theirs.close()
    conn = Connection(ours.detach())
    conn.send(("post", None, ("open", (uri, "gone", str(tmp_path / "artifacts"), False))))
    conn.send(("call", 0, ("open_trial", ("parent-run", "outer-0/trial-0", time.time()))))  # takes a while
    conn.close()  # ... and the parent is gone before the writer answers
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0 and "Traceback" not in err, err


def test_a_failure_in_the_writer_process_reaches_the_sweep_as_its_own_one_line_error(tmp_path: Path) -> None:
    """Runs are written in another process now: what fails there must still end as the one line it would be
    here (a store that cannot be opened, a refused write), never as a traceback or a silent loss."""
    from foldsweep.errors import FoldsweepError, MachineError

    (tmp_path / "blocker").write_text("a file where the store's folder should be")
    spec = TrackingSpec(uri=f"sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}",
                        artifact_location=str(tmp_path / "artifacts"))
    with pytest.raises(MachineError, match=r"^File exists: `.*blocker`$"):
        MlflowTracker(spec, "refused")

    tracker = MlflowTracker(TrackingSpec(uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                         artifact_location=str(tmp_path / "artifacts")), "posted")
    tracker.log_values("no-such-run", {"x": 1.0})  # sent without waiting: the failure comes with the flush
    with pytest.raises(FoldsweepError, match=r"^the MLflow writer failed 1 time\(s\); first: log_values: "
                                             r"MLflow failed: MlflowException: Run with id=no-such-run not found"):
        tracker.flush()
    tracker.flush()  # reported once
    tracker.close()


def _plots(summary: dict[str, Any]) -> set[str]:
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    return {Path(a.path).name for a in client.list_artifacts(summary["mlflow"]["run_id"], "plots")}


def test_the_sweep_returns_before_its_pictures_are_drawn_and_they_follow(workdir: Path) -> None:
    """Issue 14: the end of a sweep waited ~2 s for matplotlib and fANOVA. Now every run is finished when
    `run_sweep` returns, and the writer draws and logs the pictures after, noting so in the record."""
    summary = run_sweep(parse_spec(tiny_spec()))
    record = workdir / "mlruns" / "sweeps" / "tiny"
    assert "still being drawn" in pictures_note(record)
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = client.search_runs([summary["mlflow"]["experiment_id"]], max_results=1000)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {a.path for a in client.list_artifacts(summary["mlflow"]["run_id"])} >= {"summary.json", "report.md"}
    wait_for_pictures(record)
    assert not (record / PENDING).exists() and _plots(summary) == PLOTS


def test_pictures_a_stopped_writer_never_logged_are_reported_and_a_rerun_draws_them(workdir: Path) -> None:
    spec = parse_spec(tiny_spec())
    summary = run_sweep(spec)
    record = workdir / "mlruns" / "sweeps" / "tiny"
    pid = int(json.loads((record / PENDING).read_text())["pid"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "still being drawn" in pictures_note(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    note = build_report("tiny")["pictures_note"]
    assert f"the process drawing them (pid {pid}) stopped" in note and "rerun `foldsweep run`" in note
    assert _plots(summary) < PLOTS  # killed at once: before it had drawn them all
    again = run_sweep(spec)  # the sweep is complete: nothing is trained, the pictures are drawn again
    assert again["nested"] == summary["nested"] and again["fold_fits"] == summary["fold_fits"]
    wait_for_pictures(record)
    assert _plots(summary) == PLOTS and build_report("tiny")["pictures_note"] == ""
    assert "A new study created in memory" not in (record / "logs" / "pictures.log").read_text()


def test_a_pipe_the_sweep_printed_into_closes_when_the_command_ends(workdir: Path) -> None:
    """The writer inherited the command's output: `foldsweep run ... | tee log` (or a script reading the output)
    would wait for its pictures. From the hand-over on, its output goes to the record's logs/pictures.log."""
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(), sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "foldsweep", "run", "tiny.yaml", "--json"], cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = workdir / "mlruns" / "sweeps" / "tiny"
    assert "still being drawn" in pictures_note(record)
    wait_for_pictures(record)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 kB file system: writes past it fail with ENOSPC."""
    yield from mounted_tmpfs(tmp_path / "disk", "64k")


def test_pictures_lost_to_a_full_disk_say_so_in_the_note_and_leave_no_temporary_file(small_disk: Path) -> None:
    """The disk that made logging the pictures fail also made writing the reason fail: the note kept only the pid,
    `report` said the drawing process had "stopped", a 0-byte pictures.tmp stayed, and nothing said why."""
    folder = small_disk / "sweeps" / "tiny"
    folder.mkdir(parents=True)
    note = mark_pending(folder, os.getpid())
    fill_disk(small_disk)
    pictures_drawn(note, os.getpid(), failure="OSError: [Errno 28] No space left on device: 'plots/outer_scores.png'")
    assert pictures_note(folder).startswith("the sweep's MLflow pictures were not logged (OSError: [Errno 28] No "
                                            "space left on device")
    assert sorted(p.name for p in folder.iterdir()) == [PENDING]


def test_a_damaged_note_does_not_read_as_pictures_logged(tmp_path: Path) -> None:
    """A note cut short (the disk filled while its reason was written over it) read as no note: 'logged'."""
    (tmp_path / PENDING).write_text('{"pid": 123, "since": 1.0, "failed": "OSError: [Errno 28] No spa')
    assert pictures_note(tmp_path).startswith("the sweep's MLflow pictures may not have been logged")


def test_a_note_whose_pid_now_belongs_to_another_process_is_not_still_being_drawn(tmp_path: Path) -> None:
    """After a reboot (or pids wrapping round) the killed writer's pid is another program's: `report` said the
    pictures were "still being drawn" by it for ever, and never that a rerun would draw them."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        mark_pending(tmp_path, other.pid)
        note = pictures_note(tmp_path)
    finally:
        other.kill()
        other.wait()
    assert note.startswith(f"the sweep's MLflow pictures were not logged: the process drawing them (pid {other.pid}) "
                           "stopped")


def test_ctrl_c_after_the_pictures_were_handed_over_leaves_the_finished_runs_finished(workdir: Path) -> None:
    """Ctrl-C between the hand-over and the command's end marked the sweep run and the study runs KILLED, every
    one of them already FINISHED with its report (and waited for the pictures to be drawn first)."""
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(), sort_keys=False))
    code, _, err = finish(start("run", "tiny.yaml", cwd=workdir, env={CRASH_ENV: "pictures:1:INT"}))
    assert code == 130, err
    record = workdir / "mlruns" / "sweeps" / "tiny"
    wait_for_pictures(record)
    meta = json.loads((record / "record.json").read_text())
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([meta["experiment_id"]], max_results=1000)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {Path(a.path).name for a in client.list_artifacts(meta["mlflow_runs"]["sweep"], "plots")} == PLOTS


def test_a_sweep_stopped_between_its_summary_and_the_hand_over_says_its_pictures_were_not_logged(
        workdir: Path) -> None:
    """Stopped once its summary was recorded (so `report` shows it as finished) but before the pictures were handed
    to the writer, the sweep left no note: its MLflow run had no report and no plots, and `report` said nothing."""
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(), sort_keys=False))
    code, _, err = finish(start("run", "tiny.yaml", cwd=workdir, env={CRASH_ENV: "summary:1:INT"}))
    assert code == 130, err
    note = build_report("tiny")["pictures_note"]
    assert note.startswith("the sweep's MLflow pictures were not logged (the sweep stopped (KeyboardInterrupt) before "
                           "it handed them over); rerun `foldsweep run`"), note
    summary = run_sweep(parse_spec(tiny_spec()))  # nothing is trained: the report and pictures are logged
    wait_for_pictures(workdir / "mlruns" / "sweeps" / "tiny")
    assert _plots(summary) == PLOTS and build_report("tiny")["pictures_note"] == ""


def test_a_sweep_killed_between_its_summary_and_the_hand_over_says_so(workdir: Path) -> None:
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(), sort_keys=False))
    code, _, err = finish(start("run", "tiny.yaml", cwd=workdir, env={CRASH_ENV: "summary:1:KILL"}))
    assert code == -signal.SIGKILL, err
    note = build_report("tiny")["pictures_note"]
    assert note.startswith("the sweep's MLflow pictures were not logged: the sweep (pid ") and "stopped before it " \
        "handed them over; rerun `foldsweep run`" in note, note


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def _trial_of_a_killed_worker(study: optuna.Study, spec: SweepSpec) -> optuna.trial.Trial:
    """A trial as a worker killed mid-round leaves it: asked, its parameters written, RUNNING under a dead pid."""
    trial = study.ask(space.distributions(spec))
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": _dead_pid(), "name": "worker-9",
                                   "asked": True})
    return trial


def test_trials_failed_after_a_kill_end_with_one_run_each_that_names_them(workdir: Path) -> None:
    """Issue 23 item 4: a trial failed by the stale-trial reaper had no run (it needs none, said the reconcile),
    or kept the bare run its killed worker had opened: a FAILED run with no `optuna.trial_number`."""
    spec = parse_spec(tiny_spec())
    summary = run_sweep(spec)
    storage = preflight(summary["storage"], 1)
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    study_runs = json.loads((workdir / "mlruns" / "sweeps" / "tiny" / "record.json").read_text())["mlflow_runs"]
    opened = _trial_of_a_killed_worker(optuna.load_study(study_name="tiny/outer-0", storage=storage), spec)
    client.create_run(summary["mlflow"]["experiment_id"], run_name=f"outer-0/trial-{opened.number}",
                      tags={"mlflow.parentRunId": study_runs["outer-0"]})  # what `open_trial` leaves
    _trial_of_a_killed_worker(optuna.load_study(study_name="tiny/outer-1", storage=storage), spec)  # no run at all

    extended = parse_spec(tiny_spec(optuna={**tiny_spec()["optuna"], "n_trials": 3}))  # room for their retries
    again = run_sweep(extended)
    found = trials(again["storage"], "tiny")
    assert [t.state for t in found["outer-0"] if t.number == opened.number] == [TrialState.FAIL]
    assert sum(t.state == TrialState.FAIL for ts in found.values() for t in ts) == 2
    check_runs_match_trials(again["storage"], again)


def test_trials_rebuilt_after_a_deleted_store_lead_to_their_new_runs(workdir: Path) -> None:
    """Issue 23 item 4: a finished Optuna trial cannot change its `mlflow_run_id`, so after the store was deleted
    and its runs made again from Optuna's record, the trial still named its old, gone run. `trial_run_id` names
    the run now holding it, for every trial, as the pictures and any other reader of a trial's run look it up."""
    from foldsweep.studies import open_existing, trial_run_id

    spec = parse_spec(tiny_spec())
    run_sweep(spec)
    wait_for_pictures(workdir / "mlruns" / "sweeps" / "tiny")  # the writer is done with the store
    for path in (workdir / "mlruns").glob("mlflow.db*"):
        path.unlink()
    again = run_sweep(spec)
    client = MlflowClient(again["mlflow"]["tracking_uri"])
    runs = {r.info.run_id: r for r in client.search_runs([again["mlflow"]["experiment_id"]], max_results=1000)}
    _, refs = open_existing("tiny")
    for ref in refs:
        for trial in ref.study.get_trials(deepcopy=False):
            run = runs.get(trial_run_id(ref, trial))
            assert run is not None, (ref.key, trial.number)
            assert run.data.tags["optuna.study"] == ref.study.study_name
            assert run.data.tags["optuna.trial_number"] == str(trial.number)
            assert run.data.tags["foldsweep.backfilled"] == "true"
    assert all(best.run_id in runs for best in sweep_pictures(refs, [], "accuracy").best)
