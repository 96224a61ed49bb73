"""Train many fold models at once: every fold of every trial in a batch is one stacked model.

`fit_many` is the engine's one entry point (sweep, outer refits, `fit` and `test` call it). It groups
jobs that can share a batch (`jobs.group_jobs`), cuts each group into batches that fit the memory there
is (`memory`), and runs each batch (`trainer.BatchTrainer`) with a report every `report_every` epochs.
This module knows nothing of Optuna or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from torch import Tensor

from foldsweep.graphs import CapturedEpochs, wants_capture
from foldsweep.jobs import CPU_GROUP_STEP_PARAMS, FitJob, FitResult, group_jobs, structure_key
from foldsweep.memory import Shape, available, models_per_batch
from foldsweep.model import n_parameters
from foldsweep.spec import CudaGraphs
from foldsweep.trainer import BatchTrainer, ProgressHook, plateau_cuts, schedule_factor

__all__ = ["CPU_GROUP_STEP_PARAMS", "BatchTrainer", "FitJob", "FitResult", "ProgressHook", "fit_many", "group_jobs",
           "plateau_cuts", "schedule_factor", "structure_key"]

StopHook = Callable[[list[int], int, np.ndarray], list[int]]


def fit_many(X: Tensor, y: Tensor, jobs: list[FitJob], n_classes: int, metric: str, *, report_every: int = 10,
             on_report: StopHook | None = None, keep_models: bool = False, memory: int | None = None,
             on_progress: ProgressHook | None = None, cuda_graphs: CudaGraphs = "auto",
             models_per_batch: int | None = None) -> list[FitResult]:
    """Fit every job; results in the order of `jobs`.

    Args:
        X: (N, F) features on the training device, float32 or float64 (the engine computes in X's dtype);
            NaN allowed (imputed per model). Held once: models keep indices into it, never copies.
        y: (N,) int64 class codes (`n_classes` > 0) or float values (`n_classes` == 0: regression).
        jobs: the models; each trains only on its `train_rows` and is scored on its `valid_rows`.
        report_every: epochs between host syncs; `on_report(job_ids, epoch, val_metric (len, epoch))`
            is called then and may return jobs to stop (pruned).
        keep_models: put each model's best-epoch weights in `FitResult.model`.
        memory: a cap in bytes (`resources.memory`) on what one batch may use; the batch is also sized
            to the free memory. A model that alone exceeds it raises `MemoryBudgetError` before training.
        on_progress: `(done_steps, total_steps, rows_done)` over the whole call (every batch's epochs as
            planned, one batch after another; models that stop early end it sooner; rows_done counts
            (row, model) pairs trained), from the host between steps of an epoch that runs longer than a
            second, at most once a second (no device sync added); not from inside a captured epoch (its
            replay runs no host code).
        cuda_graphs: `resources.cuda_graphs`: "auto" replays each batch's epochs as a captured CUDA graph
            on a CUDA device (eager on a CPU, and from a failed capture on), "on" the same but refused on a
            CPU (`DeviceError`) and a failed capture raised, "off" eager (`graphs`).
        models_per_batch: at most this many models in one batch (`resources.models_per_batch`); a group
            of jobs larger than that (or than memory holds) trains in several batches, one after another.
            Batches are cut in job order, so a multiple of the jobs per trial keeps each trial's folds in
            one batch (they share a structure and a width, so a group holds them together).

    Between reports, models that have stopped leave the batch (`retire`), so a group costs what its
    running models cost, not what its slowest model kept it busy for.
    """
    split = CPU_GROUP_STEP_PARAMS if X.device.type == "cpu" else None
    capture = wants_capture(cuda_graphs, X.device)
    budget = available(X.device, memory)
    batches = [batch for ids in group_jobs(jobs, X.shape[1], max(n_classes, 1), split)
               for batch in _sized(jobs, ids, X, n_classes, budget, memory is not None, models_per_batch)]
    results: list[FitResult | None] = [None] * len(jobs)
    planned = [_planned_steps(jobs, ids) for ids in batches]
    progress = None if on_progress is None else _CallProgress(on_progress, planned)
    for ids in batches:
        trainer = BatchTrainer(X, y, [jobs[i] for i in ids], n_classes, metric, keep_models=keep_models,
                               on_progress=progress)
        graphs = CapturedEpochs(trainer, strict=cuda_graphs == "on") if capture else None
        while not trainer.done:
            (graphs or trainer).run_epochs(report_every)
            trainer.settle()
            if on_report is not None:
                local = on_report(ids, trainer.epoch, trainer.metric_curves())
                trainer.stop([ids.index(i) for i in local])
            trainer.retire()
        for i, result in zip(ids, trainer.results()):
            results[i] = result
        if progress is not None:
            progress.next_batch(trainer.rows_done)
        capture = graphs is not None and not graphs.failed  # after a failed capture, the next batches train eagerly
    return [r for r in results if r is not None]


class _CallProgress:
    """A trainer's `on_progress` (steps and rows of its batch) as progress over the whole `fit_many` call."""

    def __init__(self, hook: ProgressHook, planned: list[int]) -> None:
        self.hook, self.planned, self.batch, self.rows = hook, planned, 0, 0

    def __call__(self, done: int, total: int, rows: int) -> None:
        self.hook(sum(self.planned[: self.batch]) + done, sum(self.planned), self.rows + rows)

    def next_batch(self, rows: int) -> None:
        self.batch, self.rows = self.batch + 1, self.rows + rows


def _planned_steps(jobs: list[FitJob], ids: list[int]) -> int:
    """A batch's steps if every model trains every epoch: its epochs x steps per epoch (`BatchTrainer`)."""
    group = [jobs[i] for i in ids]
    epochs = max(j.fixed_epochs or j.train.epochs for j in group)
    return epochs * math.ceil(max(len(j.train_rows) for j in group) / group[0].train.batch_size)


def _sized(jobs: list[FitJob], ids: list[int], X: Tensor, n_classes: int, budget: int, capped: bool,
           most: int | None) -> list[list[int]]:
    """Cut one group into batches that fit `budget` bytes (sized by its largest model and fold), of at
    most `most` models."""
    widest = max((jobs[i] for i in ids), key=lambda j: j.model.width)
    n_out = max(n_classes, 1)
    shape = Shape(n_params=n_parameters(X.shape[1], n_out, widest.model), n_in=X.shape[1], width=widest.model.width,
                  depth=widest.model.depth, n_out=n_out, batch_size=widest.train.batch_size,
                  n_train=max(len(jobs[i].train_rows) for i in ids), n_valid=max(len(jobs[i].valid_rows) for i in ids),
                  epochs=max(jobs[i].fixed_epochs or jobs[i].train.epochs for i in ids),
                  itemsize=X.element_size() if X.is_floating_point() else 4)
    per = min(models_per_batch(shape, budget, capped), most or len(ids))
    return [ids[a : a + per] for a in range(0, len(ids), per)]
