"""How many models fit in one batch: bytes per model against the memory there is.

The table itself is already in memory when training starts. Per model in the batch: parameters with
their gradients, optimiser state, scratch and the best epoch's copy; the activations of one mini-batch
forward and backward; the epoch's shuffle order (an int32 per training row); the best epoch's
validation predictions, made when the fit ends (and, for roc_auc, one score per validation row);
the history. Whatever the number of models, the batch also holds one validation chunk (its rows are
cut so that all models' inputs and activations stay near VALID_CHUNK_BYTES) and one slice of the
shuffle being sorted (`SORT_ROWS` keys): `FIXED_BYTES`. The budget is the memory that
is free (RAM on a CPU, with a safety fraction because other processes share it; free memory on a
GPU), capped by `resources.memory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil
import torch

from foldsweep.errors import FoldsweepError

__all__ = ["CPU_SAFE_FRACTION", "FIXED_BYTES", "GPU_SAFE_FRACTION", "SORT_BYTES", "SORT_ROWS", "VALID_CHUNK_BYTES",
           "MemoryBudgetError", "Shape", "available", "bytes_per_model", "models_per_batch", "valid_chunk"]

CPU_SAFE_FRACTION = 0.5  # of the RAM free when a batch starts: other workers and the MLflow writer share it
GPU_SAFE_FRACTION = 0.8  # of the GPU's free memory: the caching allocator fragments
VALID_CHUNK_BYTES = 64 * 2**20  # the inputs and activations of one validation chunk, all models together
SORT_ROWS = 2**21  # (models x rows) of the shuffle sorted at once (`trainer.BatchTrainer.order`)
SORT_BYTES = SORT_ROWS * 40  # its int64 keys, the sort's buffers and indices while they live
FIXED_BYTES = VALID_CHUNK_BYTES + SORT_BYTES


class MemoryBudgetError(FoldsweepError):
    """One model alone needs more memory than the budget allows."""


@dataclass(frozen=True)
class Shape:
    """What sets one model's memory: parameters, widest layer, rows and classes."""

    n_params: int
    n_in: int
    width: int
    depth: int
    n_out: int
    batch_size: int
    n_train: int  # the largest training set in the batch
    n_valid: int
    epochs: int
    itemsize: int


def bytes_per_model(s: Shape) -> int:
    """An upper estimate of one model's share of a batch, in bytes (`FIXED_BYTES` apart)."""
    params = s.n_params * s.itemsize * 7  # flat, 2 moments, grad buffer, scratch, grads, best epoch's copy
    widest = max(s.n_in, s.width, s.n_out)
    activations = s.batch_size * (s.n_in * 3 + s.depth * s.width * 6 + s.n_out * 4) * s.itemsize
    dropout_bits = s.batch_size * widest * 8 * 2  # int64 hashes of one layer's mask, two alive at once
    shuffle = s.n_train * 4  # the epoch's order, int32
    predictions = s.n_valid * (max(s.n_out, 1) + 1) * s.itemsize  # the best epoch's, and roc_auc's scores
    history = 5 * s.epochs * s.itemsize  # train loss, val loss, metric, plateau factor; a refit's replayed factors
    return params + activations + dropout_bits + shuffle + predictions + history


def valid_chunk(n_in: int, width: int, n_models: int, itemsize: int = 8) -> int:
    """Validation rows per chunk so that the (M, rows, n_in) inputs (gathered, then shifted and scaled)
    and (M, rows, width) activations stay near VALID_CHUNK_BYTES."""
    per_row = (3 * max(n_in, 1) + 3 * max(width, 1)) * itemsize * max(n_models, 1)
    return max(64, VALID_CHUNK_BYTES // per_row)


def available(device: torch.device, cap: int | None) -> int:
    """Bytes a batch may use on `device`: the safe share of what is free, at most `cap`."""
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0] * GPU_SAFE_FRACTION)
    else:
        free = int(psutil.virtual_memory().available * CPU_SAFE_FRACTION)
    return min(free, cap) if cap is not None else free


def models_per_batch(shape: Shape, budget: int, cap_given: bool) -> int:
    """How many models of `shape` fit in `budget` bytes; refuses (before training) if not even one does.

    The message says "out of memory", the words `sweep` reads as a configuration that does not fit (the
    trial fails as infeasible and the sampler is steered away), like an allocator's own refusal.
    """
    need = bytes_per_model(shape)
    fit = (budget - FIXED_BYTES) // need
    if fit < 1:
        where = "`resources.memory`" if cap_given else "the free memory"
        raise MemoryBudgetError(
            f"out of memory before training: one model needs ~{_mb(need + FIXED_BYTES)} (width {shape.width}, "
            f"batch_size {shape.batch_size}, "
            f"{shape.n_valid} validation rows) but {where} allows {_mb(budget)}; raise `resources.memory`, "
            "or lower `batch_size` / `width`")
    return int(fit)


def _mb(n: float) -> str:
    return f"{math.ceil(n / 2**20)} MB"
