"""Devices and processes: one worker per (device, slot), all pulling trials from one Optuna storage.

`run_sweep` is the coordinator: it seals and plans, opens the MLflow runs, starts the other local
workers as `foldsweep worker` processes (CUDA_VISIBLE_DEVICES set before torch is imported), works as
worker 0 itself, then refits and summarises. A `foldsweep worker` on another machine takes the same
path through the same storage, so there is one code path for one GPU, eight, or a cluster.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import torch

from foldsweep import __version__, profile
from foldsweep.compat import storage_of
from foldsweep.crash import crash_point
from foldsweep.data import Dataset, load_dataset
from foldsweep.devices import resolve_devices
from foldsweep.errors import DataError, DiskFull, FoldsweepError
from foldsweep.outer import refit_outer, summarize, warm_start_final
from foldsweep.pictures import PENDING, mark_pending, pictures_drawn
from foldsweep.record import SweepRecord, create_or_resume, fresh_name, plan_hash
from foldsweep.spec import SweepSpec
from foldsweep.splits import FoldPlan, make_plan
from foldsweep.storage import Heartbeat, default_storage, fail_stale_trials, notice, preflight, redact, write_error
from foldsweep.studies import holders, study_status
from foldsweep.sweep import Progress, Sweep, open_studies, reconcile_runs, work
from foldsweep.tracking import NullTracker, make_tracker
from foldsweep.tracking.store import portable_uri

__all__ = ["HELPER_WAIT_S", "INTERRUPT_GRACE_S", "PARENT_ENV", "STALE_CHECK_S", "Helpers", "disk_full_in_one_line",
           "join_sweep", "run_sweep", "worker_slots"]

STALE_CHECK_S = 10.0
PARENT_ENV = "FOLDSWEEP_COORDINATOR_PID"
INTERRUPT_GRACE_S = 5.0  # after Ctrl-C, helpers in the terminal's process group stop by themselves
HELPER_WAIT_S = 600  # helpers start before the coordinator has opened MLflow and created the studies


def worker_slots(spec: SweepSpec, devices: list[str]) -> list[str]:
    """One entry per worker process: a device name, repeated `workers_per_device` times on GPUs.

    On a CPU the default is one worker: a second one measured 0.95x the trials per minute of one on 2
    cores (the MLflow writer already uses the other), and with one worker the same spec and seed give
    the same trials and the same nested estimate on every run. More workers are asked for by name.
    """
    if devices == ["cpu"]:
        return ["cpu"] * (spec.resources.workers or 1)
    slots = [d for d in devices for _ in range(spec.resources.workers_per_device)]
    return slots[: spec.resources.workers] if spec.resources.workers else slots


@contextmanager
def disk_full_in_one_line() -> Iterator[None]:
    """A full disk, wherever it is met (journal, record, MLflow's database), ends the command in one line.

    Every store writes atomically or repairs itself on the next open, so the rerun resumes.
    """
    try:
        yield
    except FoldsweepError:
        raise
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise write_error(err, getattr(err, "filename", None) or "the sweep's files") from None
    except Exception as err:  # MLflow and SQLAlchemy wrap SQLite's error in their own types
        if "disk is full" not in str(err) and "No space left" not in str(err):
            raise
        raise DiskFull("disk full while writing the MLflow store: nothing finished is lost; free space and "
                       "rerun the same command to resume") from None


@disk_full_in_one_line()
def run_sweep(spec: SweepSpec, *, base_dir: Path | None = None, fresh: bool = False, storage: str | None = None,
              progress: Progress | None = None, data: Dataset | None = None) -> dict[str, Any]:
    """The whole nested sweep (or the rest of it, when rerun): returns the summary `--json` prints.

    `data` is the loaded table when it is in memory (`data.frame`); else the spec's data is loaded here.
    """
    started = time.time()
    if fresh:
        spec = spec.model_copy(update={"name": fresh_name(spec.name)})
    with profile.phase(profile.DATA):
        data = data if data is not None else load_dataset(spec.data, base_dir)
        devices = resolve_devices(spec)
        slots = worker_slots(spec, devices)
        if spec.data.frame is not None and len(slots) > 1:
            raise DataError(f"data.frame `{spec.data.frame}` is in this process's memory: the {len(slots)} workers "
                            "cannot read it; set resources.workers: 1, or write the table to a file (data.path)")
        url = storage or spec.storage or default_storage(spec.name)
        optuna_storage = preflight(url, len(slots))
        record, plan, resumed = create_or_resume(spec, data, url)
    helpers = Helpers(record.folder / "spec.yaml", url, slots, record.folder)  # they start up while MLflow opens
    tracker: NullTracker = NullTracker()
    try:
        with profile.phase(profile.STORE):
            tracker = make_tracker(spec.tracking, spec.name)
            sweep = _open(spec, data, plan, optuna_storage, tracker, slots[0])
            ids = _open_runs(sweep, record, tracker, devices, resumed)
    except BaseException:
        helpers.interrupt()
        helpers.stop()
        tracker.close()
        raise
    if progress is not None:
        progress("start", {"sweep": spec.name, "resumed": resumed, "workers": slots, "storage": redact(url),
                           "notes": plan.notes, "n_trials": spec.optuna.n_trials, "studies": len(sweep.studies)})
    summary = _coordinate(sweep, record, tracker, ids, helpers, progress)
    fits = sum(len(ref.folds) * len(ref.study.get_trials(deepcopy=False)) for ref in sweep.studies)
    return summary | {"mlflow": {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
                                 "run_id": ids.get("sweep", "")},
                      "storage": redact(url), "fold_fits": fits + len(plan.outer),
                      "wall_s": round(time.time() - started, 2), "resumed": resumed, "workers": len(slots),
                      "devices": devices}


def _coordinate(sweep: Sweep, record: SweepRecord, tracker: NullTracker, ids: dict[str, str], helpers: Helpers,
                progress: Progress | None) -> dict[str, Any]:
    """Work as worker-0 beside the helpers, then refit and summarise; the MLflow runs are closed on any exit."""
    sweep.heartbeat = Heartbeat(storage_of(sweep.studies[0].study))
    try:
        _set_threads(sweep.device)
        work(sweep, "worker-0", progress=progress, maintain=_chores(sweep, progress, helpers))
        _report_failed(helpers.stop(), progress)  # their last trial runs are written before MLflow is checked
        return _finish(sweep, record, tracker, ids, progress)
    except BaseException as err:
        ctrl_c = isinstance(err, KeyboardInterrupt)
        # a note of ours (the summary recorded, the pictures not yet handed over) says why: this process may
        # live on (a notebook), and would otherwise seem to be logging them still
        with contextlib.suppress(Exception):
            pictures_drawn(record.folder / PENDING, os.getpid(),
                           failure=f"the sweep stopped ({type(err).__name__}) before it handed them over")
        helpers.interrupt(grace_s=INTERRUPT_GRACE_S if ctrl_c else 0.0)
        status = "KILLED" if ctrl_c else "FAILED"
        for run_id in ids.values():
            tracker.finish(run_id, status)
        raise
    finally:
        with profile.phase(profile.SHUTDOWN):
            sweep.heartbeat.close()
            _report_failed(helpers.stop(), progress)
            tracker.close()


def _report_failed(failed: list[dict[str, Any]], progress: Progress | None) -> None:
    for helper in failed:
        if progress is not None:
            progress("worker_failed", helper)


@disk_full_in_one_line()
def join_sweep(spec: SweepSpec, *, storage: str, base_dir: Path | None = None, device: str | None = None,
               name: str | None = None, threads: int | None = None, wait_s: float = 0.0) -> int:
    """`foldsweep worker`: take trials of a running sweep until every study is done.

    `wait_s` lets a batch job start its workers before (or with) the coordinator.
    """
    data = load_dataset(spec.data, base_dir)
    plan = make_plan(data, spec.split)
    optuna_storage = preflight(storage, 2)
    follow = _follow_coordinator()
    _wait_for_sweep(optuna_storage, spec.name, storage, wait_s, follow)
    name = name or f"{platform.node()}-{os.getpid()}"
    device = device or resolve_devices(spec)[0]
    sweep = _open(spec, data, plan, optuna_storage, make_tracker(spec.tracking, spec.name), device)
    _check_same_sweep(sweep, data, plan)
    sweep.heartbeat = Heartbeat(optuna_storage)
    if threads:
        torch.set_num_threads(threads)
    else:
        _set_threads(sweep.device)
    try:
        ran = work(sweep, name, maintain=_worker_chores(sweep, follow))
    except BaseException:
        sweep.tracker.abandon("KILLED")
        raise
    finally:
        sweep.heartbeat.close()
    sweep.tracker.flush()  # trial runs are written in the background; land them before the process ends
    sweep.tracker.close()
    return ran


def _worker_chores(sweep: Sweep, follow: Callable[[], None]) -> Callable[[], None]:
    """Every worker also fails trials of dead workers, so a sweep whose coordinator died still recovers them."""
    last = [time.time()]

    def maintain() -> None:
        follow()
        if time.time() - last[0] >= STALE_CHECK_S:
            last[0] = time.time()
            for ref in sweep.studies:
                fail_stale_trials(ref.study)

    return maintain


def _wait_for_sweep(storage: optuna.storages.BaseStorage, name: str, url: str, wait_s: float,
                    follow: Callable[[], None]) -> None:
    deadline = time.time() + wait_s
    while f"{name}/final" not in optuna.get_all_study_names(storage):
        follow()
        if time.time() >= deadline:
            waited = f" after waiting {wait_s:.0f}s" if wait_s else ""
            raise FoldsweepError(f"no sweep `{name}` in storage `{redact(url)}`{waited}; start it with "
                                 "`foldsweep run SPEC --storage URL` (or give the worker --wait SECONDS)")
        time.sleep(min(2.0, max(0.1, deadline - time.time())))


def _open(spec: SweepSpec, data: Dataset, plan: FoldPlan, storage: optuna.storages.BaseStorage,
          tracker: NullTracker, device: str) -> Sweep:
    refs = open_studies(spec, plan, storage, data.maximize)
    return Sweep(spec=spec, data=data, plan=plan, studies=refs, tracker=tracker,
                 device=torch.device("cuda:0" if device.startswith("cuda") and _pinned() else device))


def _pinned() -> bool:
    return len(os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")) == 1 and torch.cuda.device_count() == 1


def _open_runs(sweep: Sweep, record: SweepRecord, tracker: NullTracker, devices: list[str],
               resumed: bool) -> dict[str, str]:
    """Sweep run and one run per study, created once; a rerun reopens them and closes runs a crash left open."""
    known: dict[str, str] = record.meta.get("mlflow_runs", {})
    tags = {"foldsweep.version": __version__, "foldsweep.spec_hash": sweep.spec.spec_hash(),
            "foldsweep.data_fingerprint": sweep.data.fingerprint, "foldsweep.devices": ",".join(devices),
            "foldsweep.host": platform.node(), "foldsweep.storage": redact(record.meta["storage"]),
            "torch.version": str(torch.__version__), "optuna.version": optuna.__version__}
    # each id is in the record as soon as its run exists, before anything else is written: a kill in
    # between (a journal write below, say) must not make the rerun create the run a second time
    ids = {"sweep": tracker.sweep_run(sweep.spec.name, tags, known.get("sweep"))}
    record.update(mlflow_runs=ids, tracking_uri=portable_uri(tracker.tracking_uri), experiment_id=tracker.experiment_id)
    for ref in sweep.studies:
        ids[ref.key] = tracker.study_run(ids["sweep"], ref.key, known.get(ref.key))
        record.update(mlflow_runs=ids)
    for ref in sweep.studies:
        if ids[ref.key]:
            ref.study.set_user_attr("mlflow_run_id", ids[ref.key])
        ref.study.set_user_attr("spec_hash", sweep.spec.spec_hash())
        ref.study.set_user_attr("plan_hash", record.meta["plan_hash"])
    changes = [f"n_trials {c['n_trials'][0]} -> {c['n_trials'][1]}" for c in record.meta.get("changes", [])
               if "n_trials" in c]  # an extended sweep says so where its runs are read
    tracker.log_values(ids["sweep"], {}, tags={"foldsweep.spec_hash": sweep.spec.spec_hash(),
                                               "foldsweep.n_trials": str(sweep.n_trials),
                                               **({"foldsweep.changes": "; ".join(changes)} if changes else {})})
    if resumed:  # what a killed process left: its trials RUNNING in Optuna, its trial runs in any state
        for ref in sweep.studies:
            fail_stale_trials(ref.study)
        created = reconcile_runs(sweep, ids)
        if tracker.recreated:
            _relog_refits(sweep, ids)
            notice(f"the MLflow store {tracker.tracking_uri} had lost this sweep's runs (deleted or replaced): made "
                   f"the sweep and study runs again and {created} trial runs from Optuna's records (without "
                   "per-epoch curves)")
    return ids


def _relog_refits(sweep: Sweep, ids: dict[str, str]) -> None:
    """Outer refits done before the MLflow store was lost: their scores on the study runs made anew."""
    for ref in sweep.studies:
        refit = ref.study.user_attrs.get("refit")
        if refit:
            sweep.tracker.log_values(ids[ref.key], {k: float(refit[k]) for k in
                                                    ("outer_test_score", "best_inner_value", "optimism")},
                                     tags={"best_trial": str(refit["best_trial"])})


def _check_same_sweep(sweep: Sweep, data: Dataset, plan: FoldPlan) -> None:
    attrs = sweep.study("final").study.user_attrs
    if attrs.get("spec_hash") not in (None, sweep.spec.spec_hash()):
        raise FoldsweepError(f"this spec differs from the one sweep `{sweep.spec.name}` runs with "
                             f"(spec hash {sweep.spec.spec_hash()} vs {attrs['spec_hash']}); use the same file")
    if attrs.get("plan_hash") not in (None, plan_hash(plan, len(data.row_hashes))):
        raise FoldsweepError(f"the data here gives another fold plan than sweep `{sweep.spec.name}` uses "
                             f"(data fingerprint {data.fingerprint}); point the worker at the same data")


def _chores(sweep: Sweep, progress: Progress | None, helpers: Helpers) -> Any:
    """Between rounds: warm start `final`, fail trials of dead workers, report progress and failed helpers."""
    last = [0.0]

    def maintain() -> None:
        warm_start_final(sweep)
        for failed in helpers.failures():
            if progress is not None:
                progress("worker_failed", failed)
        if time.time() - last[0] >= STALE_CHECK_S:
            last[0] = time.time()
            for ref in sweep.studies:
                for number in fail_stale_trials(ref.study):
                    if progress is not None:
                        progress("stale", {"study": ref.key, "number": number})
        if progress is not None:
            progress("status", {"rows": study_status(sweep.studies, sweep.n_trials), "workers": holders(sweep.studies)})

    return maintain


def _finish(sweep: Sweep, record: SweepRecord, tracker: NullTracker, ids: dict[str, str],
            progress: Progress | None) -> dict[str, Any]:
    """Refit the outer bests, summarise, write the report; each phase is announced to `progress`."""
    def phase(name: str, total: int = 1) -> None:
        if progress is not None:  # with the studies' rows: after the refits they hold the outer-test scores
            progress("phase", {"phase": name, "total": total, "rows": study_status(sweep.studies, sweep.n_trials)})

    from foldsweep.report import log_pictures_later, log_sweep_artifacts

    phase("refits", len(sweep.studies) - 1)
    with profile.phase(profile.REFITS):
        refits = refit_outer(sweep)
    with profile.phase(profile.REPORT):
        summary = summarize(sweep, refits)
        if tracker.enabled:  # from the summary on the sweep counts as finished: the note says what is still due
            mark_pending(record.folder, os.getpid(), sweep=True)
        record.update(summary=summary)
        crash_point("summary")  # finished in the record, the report and pictures not yet in MLflow
        phase("report")
        log_sweep_artifacts(sweep, record, tracker, ids, summary)
    with profile.phase(profile.SHUTDOWN):
        reconcile_runs(sweep, ids)  # a trial run a killed helper or writer left behind ends as Optuna says
        for key in (*[ref.key for ref in sweep.studies], "sweep"):
            tracker.finish(ids[key])
        log_pictures_later(sweep, record, tracker, ids, summary)
    phase("done")
    return summary


def _follow_coordinator() -> Callable[[], None]:
    """A local helper stops taking trials once the coordinator that started it is gone.

    Without it, helpers orphaned by a killed coordinator would wait forever for the warm start of
    `final`, which only the coordinator does. Workers started by hand have no coordinator to follow.
    """
    parent = int(os.environ.get(PARENT_ENV, "0"))

    def maintain() -> None:
        if parent and os.getppid() != parent:
            raise FoldsweepError(f"the coordinator (pid {parent}) is gone; rerun `foldsweep run` to continue")

    return maintain


class Helpers:
    """The coordinator's local `foldsweep worker` processes; each writes to `<record>/logs/worker-N.log`."""

    def __init__(self, spec_file: Path, storage: str, slots: list[str], folder: Path) -> None:
        (folder / "logs").mkdir(exist_ok=True)
        self.logs = [folder / "logs" / f"worker-{n}.log" for n in range(1, len(slots))]
        self.procs = [self._start(spec_file, storage, device, n, log)
                      for n, (device, log) in enumerate(zip(slots[1:], self.logs), start=1)]
        self.reported: set[int] = set()
        self.interrupted = False

    @staticmethod
    def _start(spec_file: Path, storage: str, device: str, n: int, log: Path) -> subprocess.Popen[bytes]:
        env = dict(os.environ) | {PARENT_ENV: str(os.getpid())}
        if device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device[5:]  # before the child imports torch
        cmd = [sys.executable, "-m", "foldsweep", "worker", str(spec_file), "--storage", storage, "--device", device,
               "--name", f"worker-{n}", "--threads", "1", "--wait", str(HELPER_WAIT_S), "--quiet"]
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def failures(self) -> list[dict[str, Any]]:
        """Helpers that exited with an error since the last call (the sweep goes on without them)."""
        found: list[dict[str, Any]] = []
        if self.interrupted:  # they were told to stop; how they stopped is no news
            return found
        for n, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code not in (None, 0, 130) and n not in self.reported:
                self.reported.add(n)
                found.append({"worker": f"worker-{n}", "code": code, "log": str(self.logs[n - 1])})
        return found

    def interrupt(self, grace_s: float = 0.0) -> None:
        """Stop the helpers with one SIGINT each, after `grace_s` for those a terminal's Ctrl-C already reached.

        A second SIGINT would only cut short a helper that is recording its trials as failed.
        """
        self.interrupted = True
        deadline = time.time() + grace_s
        while time.time() < deadline and any(proc.poll() is None for proc in self.procs):
            time.sleep(0.1)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)

    def stop(self) -> list[dict[str, Any]]:
        """Wait for the helpers (they stop once every study is done); returns the ones that failed."""
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return self.failures()


def _set_threads(device: torch.device) -> None:
    """One torch thread per CPU worker; the cores are used by running one worker per core instead.

    The engine's operations are small (a few MB at most): OpenMP threads splitting them wait on each
    other more than they compute, and far more when another process holds a core. Measured with 48
    sonar fits on 2 cores: 3.7 s with one thread, 24-112 s with two.
    """
    if device.type == "cpu":
        torch.set_num_threads(1)
