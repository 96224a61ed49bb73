"""The nested loop, driven by ask/tell.

One Optuna study per outer fold (`<sweep>/outer-<i>`, searching on that fold's outer-train rows only)
and one `<sweep>/final` study on all development rows. Each round asks a few trials from every study
that still needs some and trains all their inner folds as one batch. What uses the searches' results
(the warm start of `final`, the refit and outer-test score per outer fold, the nested estimate) is
`outer`, which builds on this module; the work loop reaches it only through its `maintain` callback.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from foldsweep import profile, space
from foldsweep.compat import storage_of, trial_id
from foldsweep.data import Dataset
from foldsweep.errors import StoreError, SweepFailed
from foldsweep.objective import Pruning, TrialOutcome, outcome, trial_jobs
from foldsweep.slots import SlotSampler, slot_of, stored_slot
from foldsweep.spec import SweepSpec
from foldsweep.splits import Fold, FoldPlan
from foldsweep.storage import LOST, Heartbeat, holder, retry
from foldsweep.studies import FINISHED, IN_FLIGHT, TRIAL_RUNS, StudyRef, study_done
from foldsweep.tracking import NullTracker
from foldsweep.tracking.tracker import TrialRun
from foldsweep.train import FitJob, FitResult, ProgressHook, fit_many, plateau_cuts

__all__ = ["MEMORY_CONSTRAINT", "OUT_OF_MEMORY", "Progress", "Sweep", "ask_round", "generalization_gap",
           "open_studies", "reconcile_runs", "round_size", "run_round", "tell", "work"]

Progress = Callable[[str, dict[str, Any]], None]
OUT_OF_MEMORY = ("out of memory", "can't allocate memory")  # CUDA's and the CPU allocator's words
MEMORY_CONSTRAINT = "fits_memory"  # > 0 on a trial whose configuration ran out of memory


@dataclass
class Sweep:
    """Everything a worker needs: the spec, the data on its device, the plan and the studies."""

    spec: SweepSpec
    data: Dataset
    plan: FoldPlan
    studies: list[StudyRef]
    tracker: NullTracker
    device: torch.device
    heartbeat: Heartbeat | None = None
    X: torch.Tensor = field(init=False)
    y: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.X = torch.as_tensor(self.data.X, device=self.device)
        self.y = torch.as_tensor(self.data.y, device=self.device)

    @property
    def n_trials(self) -> int:
        return self.spec.optuna.n_trials

    def study(self, key: str) -> StudyRef:
        return next(s for s in self.studies if s.key == key)

    def budget(self, ref: StudyRef) -> int:
        """Trials a study may still sample; `final` keeps slots for the outer bests it is warm-started with."""
        counts = ref.counts()
        reserved = 0
        if ref.key == "final" and self.spec.optuna.warm_start_final and not ref.study.user_attrs.get("warm_started"):
            reserved = min(len(self.plan.outer), self.n_trials - 1)
        failed_budget = counts["failed"] < self.n_trials  # a study that keeps failing stops asking
        if not failed_budget:
            return 0
        running = counts["in_flight"] - counts["waiting"]  # waiting (enqueued) trials are what `ask` hands out first
        return max(0, self.n_trials - reserved - counts["finished"] - running)

    def done(self) -> bool:
        return all(study_done(ref, self.n_trials) for ref in self.studies)


def open_studies(spec: SweepSpec, plan: FoldPlan, storage: optuna.storages.BaseStorage,
                 maximize: bool) -> list[StudyRef]:
    keys = [(f"outer-{i}", plan.inner[i], i) for i in range(len(plan.outer))] + [("final", plan.final_inner, 1000)]
    refs = []
    for key, folds, offset in keys:
        study = optuna.create_study(storage=storage, study_name=f"{spec.name}/{key}", load_if_exists=True,
                                    direction="maximize" if maximize else "minimize",
                                    sampler=SlotSampler(space.sampler(spec, offset), spec.optuna.seed, key),
                                    pruner=space.pruner(spec))
        refs.append(StudyRef(key, study, folds, offset))
    return refs


# -- the worker loop --------------------------------------------------------------------------------------
def work(sweep: Sweep, worker: str, *, progress: Progress | None = None, maintain: Callable[[], None] | None = None,
         poll_s: float = 1.0) -> int:
    """Ask, train and tell rounds until every study has its trials; returns the trials this worker ran.

    `maintain` (the coordinator's chores: stale trials, warm start) runs between rounds.
    """
    ran = 0
    while True:
        with profile.phase(profile.ASK_TELL):
            if maintain is not None:
                maintain()
            before = _marks(sweep)
            asked = ask_round(sweep, worker)
        if not asked:
            _raise_if_all_failed(sweep)
            if sweep.done():
                return ran
            _raise_if_stuck(sweep, before)
            time.sleep(poll_s)  # other workers hold the remaining trials
            continue
        try:
            run_round(sweep, asked, worker, progress)
        except BaseException as err:  # Ctrl-C or a crash mid-round: record the trials, never leave them RUNNING
            _abandon(asked, f"interrupted ({type(err).__name__}) on {worker}")
            raise
        finally:
            if sweep.heartbeat is not None:
                sweep.heartbeat.hold([])  # told trials need no lease
        ran += len(asked)


def _marks(sweep: Sweep) -> tuple[tuple[Any, ...], ...]:
    """What another process's progress changes: each study's trial states and whether `final` is warm-started.

    Trials are only ever added and their states only move forward, so equal marks mean nothing happened.
    """
    return tuple((tuple(t.state for t in ref.study.get_trials(deepcopy=False)),
                  bool(ref.study.user_attrs.get("warm_started"))) for ref in sweep.studies)


def _raise_if_stuck(sweep: Sweep, before: tuple[tuple[Any, ...], ...]) -> None:
    """End a wait that nothing can end: nothing to ask, nothing running, and nothing changed during the ask.

    Only two things end a wait: a trial some worker runs (told, or failed once its lease runs out) and
    the coordinator's warm start of `final`. With neither, an unfinished study is one whose records do
    not add up (a damaged or edited journal), and waiting would be forever.
    """
    if _marks(sweep) != before or any(ref.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                                      for ref in sweep.studies):
        return
    final = sweep.study("final")
    if sweep.spec.optuna.warm_start_final and not final.study.user_attrs.get("warm_started") and all(
            study_done(ref, sweep.n_trials) for ref in sweep.studies if ref is not final):
        return  # a worker waits for the coordinator, which warm-starts `final` between its rounds
    stuck = next(ref for ref in sweep.studies if not study_done(ref, sweep.n_trials))
    counts = stuck.counts()
    raise StoreError(f"study {stuck.key} of sweep `{sweep.spec.name}` cannot go on: {counts['finished']} of "
                     f"{sweep.n_trials} trials finished, {counts['waiting']} queued, none running and none can be "
                     "asked, so its Optuna records do not add up (a damaged or edited journal?): rerun with --fresh "
                     "to start a new sweep beside it")


def _abandon(asked: list[tuple[StudyRef, optuna.trial.Trial]], reason: str) -> None:
    """Fail the trials in hand and queue each for a retry in its slot; a second Ctrl-C waits for this."""
    with _deferred_interrupt():
        for ref, trial in asked:
            try:
                trial.set_user_attr("reason", reason)
                trial.set_user_attr(LOST, True)
                ref.study.tell(trial, state=TrialState.FAIL)
            except Exception:  # already told before the interruption (or the disk is full): nothing to record
                continue
            try:
                retry(ref.study, storage_of(ref.study).get_trial(trial_id(trial)))  # as stored: slot, stamp
            except Exception:  # a full disk: the lost trial stays unqueued and a fresh trial takes its slot
                continue


def ask_round(sweep: Sweep, worker: str = "worker-0") -> list[tuple[StudyRef, optuna.trial.Trial]]:
    """One round: from every study that needs trials, the rest of its round of `trials_per_batch` slots.

    What a round holds depends on the spec alone, never on how many models one batch holds on this
    machine (`fit_many` trains a round larger than a batch in several). A round cut to fit a smaller
    batch would ask its later trials after the earlier ones were told (TPE would see another history),
    and studies taken one at a time would move the warm start of `final` to another point of its search.
    """
    distributions = space.distributions(sweep.spec)
    asked: list[tuple[StudyRef, optuna.trial.Trial]] = []
    try:
        for ref in sweep.studies:
            for _ in range(min(sweep.budget(ref), round_size(ref, sweep.spec.optuna.trials_per_batch))):
                with _deferred_interrupt():  # a trial Ctrl-C hits inside `ask` would be RUNNING and unknown
                    trial = ref.study.ask(distributions)
                    asked.append((ref, trial))  # from here on an interruption records it as failed
                trial.set_user_attr("worker", holder() | {"name": worker, "device": str(sweep.device), "asked": True})
                if sweep.heartbeat is not None:
                    sweep.heartbeat.add(trial_id(trial))
                if _surplus(ref, trial, sweep.n_trials):
                    ref.study.tell(trial, state=TrialState.FAIL)
                    asked.pop()
                    break
    except BaseException as err:  # Ctrl-C while asking: what was asked must not stay RUNNING
        _abandon(asked, f"interrupted ({type(err).__name__}) on {worker}")
        raise
    return asked


def round_size(ref: StudyRef, per_batch: int) -> int:
    """Trials to ask from this study now: the queued ones, then fresh ones up to the end of their round.

    Rounds cover slots [r * per_batch, (r + 1) * per_batch). A round cut by a crash is finished (its
    lost trials retried in their slots) before the next starts, as in an uninterrupted run.
    """
    trials = ref.study.get_trials(deepcopy=False)
    held = [slot_of(t, trials) for t in trials if not t.user_attrs.get(LOST)]
    waiting = [slot_of(t, trials) for t in trials if t.state == TrialState.WAITING]
    current = max(waiting) if waiting else max(held, default=-1) + 1
    end = (current // per_batch + 1) * per_batch
    return len(waiting) + max(0, end - (max(held, default=-1) + 1))


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block is done (main thread only; signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def run_round(sweep: Sweep, asked: list[tuple[StudyRef, optuna.trial.Trial]], worker: str,
              progress: Progress | None) -> None:
    """Train every inner fold of every asked trial as one batch, then tell each trial its outcome."""
    spec, started = sweep.spec, time.time()
    if sweep.heartbeat is not None:
        sweep.heartbeat.hold([trial_id(trial) for _, trial in asked])
    jobs: list[FitJob] = []
    owners: list[int] = []
    for t, (ref, trial) in enumerate(asked):
        config = spec.with_params(trial.params)
        fold_jobs = trial_jobs(config, ref.folds, (ref.key, stored_slot(trial)))
        jobs += fold_jobs
        owners += [t] * len(fold_jobs)
        with profile.phase(profile.TRACKING):
            sweep.tracker.open_trial(ref.study.user_attrs.get("mlflow_run_id", ""), _run_name(ref, trial), started)
    members = [[i for i, o in enumerate(owners) if o == t] for t in range(len(asked))]
    steps = _steps_hook(progress)
    with profile.phase(profile.TRAINING):
        if spec.optuna.pruner == "wilcoxon":
            outcomes = _fit_fold_by_fold(sweep, asked, jobs, members, steps)
        else:
            hook = Pruning([trial for _, trial in asked], owners, enabled=spec.optuna.pruner != "none")
            fits = _fit_batch(sweep, jobs, members, hook, steps)
            outcomes = [_outcome(sweep, ref.folds, fit) for (ref, _), fit in zip(asked, fits)]
    wall = time.time() - started
    for (ref, trial), result in zip(asked, outcomes):
        with profile.phase(profile.ASK_TELL):
            tell(sweep, ref, trial, result, worker, started, wall / len(asked))
        if progress is not None:
            progress("trial", {"study": ref.key, "number": trial.number, "state": result.state,
                               "value": result.value, "worker": worker})


def _steps_hook(progress: Progress | None) -> ProgressHook | None:
    """The engine's progress through a long round (`fit_many(on_progress=...)`) as `steps` events."""
    return None if progress is None else _Steps(progress)


class _Steps:
    """`fit_many`'s (done steps, planned steps, rows) as `steps` events with the rows trained per second
    since the last event (the first: since the round began)."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.mark, self.rows, self.done = progress, time.monotonic(), 0, 0

    def __call__(self, done: int, total: int, rows: int) -> None:
        now = time.monotonic()
        if done < self.done:  # the next `fit_many` call of the round (fold by fold): its rows count from 0
            self.rows = 0
        rate = (rows - self.rows) / max(now - self.mark, 1e-9)
        self.mark, self.rows, self.done = now, rows, done
        self.progress("steps", {"done": done, "total": total, "rows": rows, "rows_per_s": rate})


def _fit_fold_by_fold(sweep: Sweep, asked: list[tuple[StudyRef, optuna.trial.Trial]], jobs: list[FitJob],
                      members: list[list[int]], steps: ProgressHook | None) -> list[TrialOutcome]:
    """Wilcoxon pruning: a trial's inner folds are its pruning steps.

    Fold s of every trial still in the running trains as one batch; each trial then reports that fold's
    score as step s, and a trial that Optuna's WilcoxonPruner finds worse than the best trial, fold for
    fold, skips its remaining folds. Batching across trials instead of folds keeps the batch full.
    """
    fits: list[list[FitResult]] = [[] for _ in asked]
    settled: dict[int, TrialOutcome] = {}
    for s in range(max(len(rows) for rows in members)):
        alive = [t for t in range(len(asked)) if t not in settled and s < len(members[t])]
        stage = _fit_batch(sweep, [jobs[members[t][s]] for t in alive], [[n] for n in range(len(alive))], None, steps)
        for t, fit in zip(alive, stage):
            ref, trial = asked[t]
            if isinstance(fit, TrialOutcome):
                settled[t] = fit
                continue
            fits[t] += fit
            so_far = outcome(fits[t], ref.folds[: s + 1], sweep.data.y, sweep.data.metric)
            if so_far.state != "complete":
                settled[t] = so_far
                continue
            trial.report(so_far.fold_scores[-1], s)
            if s + 1 < len(members[t]) and trial.should_prune():
                settled[t] = TrialOutcome("pruned", None, [], so_far.best_epochs,
                                          f"pruned after fold {s + 1} of {len(members[t])} (Wilcoxon signed-rank "
                                          "test against the best trial)", results=fits[t])
    return [settled.get(t) or _outcome(sweep, ref.folds, fits[t]) for t, (ref, _) in enumerate(asked)]


def _outcome(sweep: Sweep, folds: list[Fold], fit: list[FitResult] | TrialOutcome) -> TrialOutcome:
    return fit if isinstance(fit, TrialOutcome) else outcome(fit, folds, sweep.data.y, sweep.data.metric)


def _fit_batch(sweep: Sweep, jobs: list[FitJob], members: list[list[int]], hook: Pruning | None,
               steps: ProgressHook | None) -> list[list[FitResult] | TrialOutcome]:
    """Each member's fits, all trained as one batch; if the batch raises, each member alone, so only the
    member at fault fails (with its reason as a TrialOutcome)."""
    try:
        results = fit_many(sweep.X, sweep.y, jobs, sweep.data.n_classes, sweep.data.metric,
                           report_every=sweep.spec.optuna.report_every, on_report=hook,
                           memory=sweep.spec.resources.memory, cuda_graphs=sweep.spec.resources.cuda_graphs,
                           on_progress=steps, models_per_batch=_models_per_batch(sweep))
        return [[results[i] for i in rows] for rows in members]
    except Exception as err:
        failed = _failure(err, sweep.device)
    _release(sweep.device)  # outside the except block: the traceback no longer holds the batch's tensors
    if len(members) == 1:
        return [failed]
    return [_fit_alone(sweep, jobs, rows, hook) for rows in members]


def _fit_alone(sweep: Sweep, jobs: list[FitJob], rows: list[int], hook: Pruning | None
               ) -> list[FitResult] | TrialOutcome:
    def report(ids: list[int], epoch: int, curves: np.ndarray) -> list[int]:
        return [rows.index(job) for job in hook([rows[i] for i in ids], epoch, curves)] if hook else []

    try:
        return fit_many(sweep.X, sweep.y, [jobs[i] for i in rows], sweep.data.n_classes, sweep.data.metric,
                        report_every=sweep.spec.optuna.report_every, on_report=report,
                        memory=sweep.spec.resources.memory, cuda_graphs=sweep.spec.resources.cuda_graphs,
                        models_per_batch=_models_per_batch(sweep))
    except Exception as err:
        failed = _failure(err, sweep.device)
    _release(sweep.device)
    return failed


def _failure(err: Exception, device: torch.device) -> TrialOutcome:
    """Out of memory is the configuration's fault (the sampler is steered away); anything else is recorded."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, torch.OutOfMemoryError) or any(s in text.lower() for s in OUT_OF_MEMORY):
        return TrialOutcome("failed", None, [], [], f"out of memory on {device}", infeasible=True)
    return TrialOutcome("failed", None, [], [], f"{type(err).__name__}: {text}"[:500])


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tell(sweep: Sweep, ref: StudyRef, trial: optuna.trial.Trial, result: TrialOutcome, worker: str,
         started: float, wall_s: float) -> None:
    """Log the trial to MLflow first, then tell Optuna (whose finished trials can no longer change)."""
    with profile.phase(profile.TRACKING):
        run_id = _log_trial(sweep, ref, trial, result, worker, started, wall_s)
    try:
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("fold_scores", result.fold_scores)
        trial.set_user_attr("best_epochs", result.best_epochs)
        trial.set_user_attr("mean_best_epoch", result.mean_best_epoch)
        if any(cuts := [plateau_cuts(r) for r in result.results]):  # what a refit replays (`outer.refit_job`)
            trial.set_user_attr("plateau_cuts", cuts)
        trial.set_user_attr("epochs_trained", sum(r.epochs_run for r in result.results))  # what pruning saves
        if result.fold_scores:
            trial.set_user_attr("gap", generalization_gap(result.results))
        if result.reason:
            trial.set_user_attr("reason", result.reason)
        if result.state == "complete":
            ref.study.tell(trial, result.value)
        elif result.infeasible:  # samplers ignore failed trials: a pruned one with a violated constraint steers TPE
            trial.set_constraint(MEMORY_CONSTRAINT, 1.0)
            ref.study.tell(trial, state=TrialState.PRUNED)
        else:
            ref.study.tell(trial, state=TrialState.PRUNED if result.state == "pruned" else TrialState.FAIL)
    except UpdateFinishedTrialError:  # this worker stalled past its lease: the trial was failed and re-queued
        return


def _log_trial(sweep: Sweep, ref: StudyRef, trial: optuna.trial.Trial, result: TrialOutcome, worker: str,
               started: float, wall_s: float) -> str:
    parent = ref.study.user_attrs.get("mlflow_run_id", "")
    if not sweep.tracker.enabled or not parent:
        return ""
    metric = sweep.data.metric
    curves: dict[str, np.ndarray] = {}
    fits = result.results
    if fits:
        for name, attr in (("train_loss", "train_loss"), ("val_loss", "val_loss"), (f"val_{metric}", "val_metric")):
            per_fold = [getattr(r, attr) for r in fits]
            curves[name] = _fold_mean_curve(per_fold)
            for i, curve in enumerate(per_fold):
                curves[f"fold_{i}/{name}"] = curve
    metrics: dict[str, float] = {"wall_s": wall_s, "best_epoch": float(result.mean_best_epoch)}
    if result.fold_scores:
        metrics |= {metric: float(np.mean(result.fold_scores)), f"{metric}_std": float(np.std(result.fold_scores))}
        metrics |= {f"fold_{i}/{metric}": s for i, s in enumerate(result.fold_scores)}
        metrics["generalization_gap"] = generalization_gap(fits)
    tags = {**_trial_tags(ref, trial.number, trial.params, result.state, result.reason),
            "foldsweep.device": str(sweep.device), "foldsweep.worker": worker}
    status = {"complete": "FINISHED", "pruned": "KILLED"}.get(result.state, "FAILED")
    return sweep.tracker.log_trial(parent, _run_name(ref, trial), _run_params(sweep, trial.params), metrics, curves,
                                   tags, status, started)


def _run_params(sweep: Sweep, searched: dict[str, Any]) -> dict[str, Any]:
    config = sweep.spec.with_params(searched)
    return {**{f"model.{k}": v for k, v in config.model.model_dump().items()},
            **{f"train.{k}": v for k, v in config.train.model_dump().items()}}


def _trial_tags(ref: StudyRef, number: int, searched: dict[str, Any], state: str, reason: str) -> dict[str, str]:
    shown = {"complete": "complete", "pruned": reason}.get(state, f"failed: {reason}")
    return {"foldsweep.state": shown, "optuna.study": ref.study.study_name, "optuna.trial_number": str(number),
            **{f"searched.{k}": str(v) for k, v in searched.items()}}


def _run_name(ref: StudyRef, trial: optuna.trial.Trial | optuna.trial.FrozenTrial) -> str:
    return f"{ref.key}/trial-{trial.number}"


def reconcile_runs(sweep: Sweep, ids: dict[str, str]) -> int:
    """Make every trial run agree with its Optuna trial (see `MlflowTracker.reconcile`); returns runs created.

    A trial whose run now has another id than the trial names (made again after the store was lost, say) is
    linked to it in the study's `TRIAL_RUNS`, which `studies.trial_run_id` reads first: a finished trial's
    own attributes cannot change.
    """
    created = 0
    for ref in sweep.studies:
        done = [t for t in ref.study.get_trials(deepcopy=False) if t.state.is_finished()]
        if ids.get(ref.key):
            named = {_run_name(ref, t): t for t in done}
            reconciled = sweep.tracker.reconcile(ids[ref.key], {k: _as_run(sweep, ref, t) for k, t in named.items()})
            created += reconciled.created
            _link_runs(ref, {str(named[k].number): run_id for k, run_id in reconciled.moved.items()})
    return created


def _link_runs(ref: StudyRef, moved: dict[str, str]) -> None:
    """Record which run holds each trial whose own `mlflow_run_id` is wrong (written only when it changed)."""
    if ref.study.user_attrs.get(TRIAL_RUNS, {}) != moved:
        ref.study.set_user_attr(TRIAL_RUNS, moved)


def _as_run(sweep: Sweep, ref: StudyRef, trial: optuna.trial.FrozenTrial) -> TrialRun:
    """A finished trial's run as Optuna recorded it: status, headline metrics, params and tags (no curves)."""
    state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, "failed")
    attrs = trial.user_attrs
    metrics = {"best_epoch": float(attrs["mean_best_epoch"])} if "mean_best_epoch" in attrs else {}
    scores = attrs.get("fold_scores") or []
    metric = sweep.data.metric
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        metrics[metric] = float(trial.value)
        if scores:
            metrics[f"{metric}_std"] = float(np.std(scores))
            metrics |= {f"fold_{i}/{metric}": float(s) for i, s in enumerate(scores)}
        if "gap" in attrs:
            metrics["generalization_gap"] = float(attrs["gap"])
    status = {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED")
    return TrialRun(status, metrics, _run_params(sweep, trial.params),
                    _trial_tags(ref, trial.number, trial.params, state, str(attrs.get("reason", ""))),
                    str(attrs.get("mlflow_run_id", "")))


def _surplus(ref: StudyRef, trial: optuna.trial.Trial, n_trials: int) -> bool:
    """Several workers may ask at once; a trial beyond the study's n_trials is given back as failed."""
    before = [t for t in ref.study.get_trials(deepcopy=False)
              if t.number < trial.number and t.state in FINISHED + IN_FLIGHT]
    if len(before) < n_trials:
        return False
    trial.set_user_attr("reason", "surplus: the study already had n_trials when this trial was asked")
    trial.set_user_attr(LOST, True)
    return True


def _raise_if_all_failed(sweep: Sweep) -> None:
    """A study that spent its budget without one complete trial stops the sweep, with the reasons counted."""
    for ref in sweep.studies:
        counts = ref.counts()
        spent = counts["failed"] >= sweep.n_trials or counts["finished"] >= sweep.n_trials
        if not spent or counts["in_flight"] or ref.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            continue
        reasons = Counter(str(t.user_attrs.get("reason", "unknown")).split(" (fold")[0]
                          for t in ref.study.get_trials(deepcopy=False, states=(TrialState.FAIL, TrialState.PRUNED))
                          if not t.user_attrs.get(LOST))
        summary = "; ".join(f"{n} x {r}" for r, n in reasons.most_common())
        raise SweepFailed(f"every trial of study {ref.key} failed ({summary})")


def _models_per_batch(sweep: Sweep) -> int:
    """Models one engine batch holds at most (memory may hold it to fewer): whole trials, at least one.

    On a CPU, batches of a few hundred models: the engine cuts them into width bands, and bigger batches
    amortise each band's fixed cost per step (measured on sonar: 16 fits/s at 48 models, 27 at 192).
    """
    cap = sweep.spec.resources.models_per_batch or (1024 if sweep.device.type == "cuda" else 256)
    folds = max(1, len(sweep.plan.final_inner))
    return max(1, cap // folds) * folds


def generalization_gap(fits: list[FitResult]) -> float:
    """Validation minus training loss at each fold's best epoch, mean over folds: how much it overfits."""
    return float(np.mean([r.val_loss[r.best_epoch - 1] - r.train_loss[r.best_epoch - 1] for r in fits]))


def _fold_mean_curve(curves: list[np.ndarray]) -> np.ndarray:
    """Mean over folds per epoch; a fold that stopped early holds its last value."""
    length = max(len(c) for c in curves)
    padded = np.stack([np.pad(c, (0, length - len(c)), mode="edge") if len(c) else np.full(length, np.nan)
                       for c in curves])
    if not length:
        return np.array([])
    seen = ~np.isnan(padded)
    totals = np.where(seen, padded, 0.0).sum(axis=0)
    counts = seen.sum(axis=0)
    return np.divide(totals, counts, out=np.full(length, np.nan), where=counts > 0)  # all-NaN epochs stay NaN
