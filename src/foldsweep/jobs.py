"""What the engine is asked to fit (`FitJob`), what it gives back (`FitResult`), and which jobs share a batch.

Models that share a structure (`structure_key`) can train as one batched model; on a CPU, widths far
apart are cut into bands (`group_jobs`), because a narrow model padded to a wide one costs the wide
one's arithmetic. Kept apart from the trainer so that callers (objective, sweep, outer, evaluate) can
build jobs without the training loop, and the loop without knowing who calls it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from foldsweep.model import MLP, n_parameters
from foldsweep.spec import ModelSpec, TrainSpec

__all__ = ["CPU_GROUP_BATCH", "CPU_GROUP_STEP_PARAMS", "FitJob", "FitResult", "group_jobs", "structure_key"]

# What one more batched group costs on a CPU, in parameters' worth of per-model work: its ~1 ms of fixed
# work per step, times the ~2x more epochs a group runs (until its slowest model stops) than its average
# model, over the ~10 ns one parameter of one model costs per step of CPU_GROUP_BATCH rows. Calibrated on
# sonar rounds of 48 and 192 models (1e5 to 3e5 within noise of each other, 1.7x faster than no cut at
# 192); see group_jobs. A parameter's work per step grows with the rows of the step, so a group of
# batch_size B weighs CPU_GROUP_STEP_PARAMS * CPU_GROUP_BATCH / B: with hundreds of rows per step, padding
# a narrow model to a wide one costs more than a group of its own. Below CPU_GROUP_BATCH rows the weight
# stays as calibrated: the optimizer's passes over a padded parameter do not shrink with the rows (twice
# the weight at batch 8 cut sonar rounds into fewer bands and cost ~15% of the engine's time).
CPU_GROUP_STEP_PARAMS = 200_000.0
CPU_GROUP_BATCH = 16  # rows per step of that calibration (sonar's searched batch sizes: 8, 16, 32)


@dataclass(frozen=True)
class FitJob:
    """One model to fit. `fixed_epochs` (refits) trains exactly that long and scores the last epoch.

    `seed` is the model's key: its initial weights and every random number it draws (shuffles, dropout,
    noise, mixup) come from it alone (`rng`), so the fit is the same in any batch. `plateau_factors`
    (a refit under `lr_schedule: plateau`) is the plateau factor of each epoch, replayed instead of the
    rule: a refit has no rows to watch for a plateau (`studies.plateau_replay` says which factors).
    """

    train_rows: np.ndarray
    valid_rows: np.ndarray
    model: ModelSpec
    train: TrainSpec
    seed: int
    fixed_epochs: int | None = None
    plateau_factors: tuple[float, ...] | None = None


@dataclass
class FitResult:
    train_loss: np.ndarray  # (epochs_run,)
    val_loss: np.ndarray
    val_metric: np.ndarray
    best_epoch: int  # 1-based; the epoch whose predictions `valid_pred` holds
    epochs_run: int
    valid_pred: np.ndarray  # probabilities (n, C) or values (n,)
    diverged_at: int | None
    stopped: bool  # stopped from outside (pruned) before it finished
    plateau_factor: np.ndarray  # (epochs_run,) the plateau schedule's LR factor each epoch trained with (else 1)
    model: MLP | None = None
    preprocess: dict[str, list[float] | list[int]] | None = None
    # a regression model outputs standardised values: prediction = output * y_scale + y_shift
    y_shift: float = 0.0
    y_scale: float = 1.0


def structure_key(job: FitJob) -> tuple[object, ...]:
    """Settings that change the shape of the computation; models that share them train together."""
    m, t = job.model, job.train
    return (m.depth, m.activation, m.batch_norm, t.optimizer, t.lr_schedule, t.step_size, t.gamma, t.epochs,
            t.batch_size, t.preprocess, t.select_k, t.patience, t.momentum)


def group_jobs(jobs: list[FitJob], n_in: int = 0, n_out: int = 0, split_cost: float | None = None
               ) -> list[list[int]]:
    """Jobs that train as one batched model: same structure, and widths close enough to share padding.

    A model padded to its group's widest one costs that one's arithmetic, while every extra group costs
    a fixed overhead per step (launches, Python). With `split_cost` (that overhead, in parameters'
    worth of per-model work at CPU_GROUP_BATCH rows a step, scaled to each group's batch size) each
    structure group is cut into width bands where the padding saved pays for the extra group; without
    it (a GPU, where launches are the cost) nothing is cut.
    """
    groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[structure_key(job)].append(i)
    if split_cost is None:
        return list(groups.values())
    scaled = {key: split_cost * min(1.0, CPU_GROUP_BATCH / jobs[ids[0]].train.batch_size)
              for key, ids in groups.items()}
    return [band for key, ids in groups.items() for band in _width_bands(jobs, ids, n_in, n_out, scaled[key])]


def _width_bands(jobs: list[FitJob], ids: list[int], n_in: int, n_out: int, split_cost: float) -> list[list[int]]:
    """Cut `ids`, sorted by width, where the cost sum(split_cost + n * params(widest)) is least (exact DP)."""
    widths = sorted({jobs[i].model.width for i in ids})
    count = [sum(jobs[i].model.width == w for i in ids) for w in widths]
    size = [n_parameters(n_in, n_out, jobs[ids[0]].model.model_copy(update={"width": w})) for w in widths]
    best, cut = [0.0] + [math.inf] * len(widths), [0] * (len(widths) + 1)
    for end in range(1, len(widths) + 1):
        for begin in range(end):  # one band: widths[begin:end], padded to widths[end - 1]
            cost = best[begin] + split_cost + sum(count[begin:end]) * size[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    bands, end = [], len(widths)
    while end > 0:
        bands.append({w for w in widths[cut[end] : end]})
        end = cut[end]
    return [[i for i in ids if jobs[i].model.width in band] for band in reversed(bands)]


