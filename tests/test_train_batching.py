"""How the engine packs models: width bands, and stopped models leaving their batch.

Both change which batch a model computes in; neither may change what it learns. With full-batch
steps and no dropout a model's training is deterministic, so the test compares against each model
trained alone. In float64: in float32 another padding width sums in another order, and Adam turns that
rounding in near-zero gradients into visible drift (1e-4 within a few epochs with batch norm); in
float64 both agree to 1e-9, which pins the bookkeeping, not the rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from foldsweep.data import load_dataset
from foldsweep.spec import DataSpec, ModelSpec, TrainSpec
from foldsweep.train import CPU_GROUP_STEP_PARAMS, BatchTrainer, FitJob, fit_many, group_jobs

FULL_BATCH = 256


@pytest.fixture
def sonar():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    data = load_dataset(DataSpec(dataset="sonar"))
    yield torch.as_tensor(data.X.astype(np.float64)), torch.as_tensor(data.y)
    torch.set_default_dtype(before)


def _jobs(widths: list[int], epochs: int = 8, patience: int = 100, batch_norm: bool = False,
          fixed: int | None = None) -> list[FitJob]:
    rng = np.random.default_rng(0)
    jobs = []
    for i, width in enumerate(widths):
        rows = rng.permutation(208)
        n = 110 + 7 * (i % 8)  # uneven training sets
        spec = TrainSpec(epochs=epochs, patience=patience, batch_size=FULL_BATCH, lr=3e-3 * (1 + i % 3),
                         weight_decay=1e-3, l1=1e-4)
        jobs.append(FitJob(rows[:n], rows[n : n + 30 + i % 5], ModelSpec(width=width, batch_norm=batch_norm), spec,
                           seed=i, fixed_epochs=fixed))
    return jobs


def _assert_same(results, reference) -> None:
    for got, want in zip(results, reference, strict=True):
        assert got.epochs_run == want.epochs_run and got.best_epoch == want.best_epoch
        np.testing.assert_allclose(got.val_loss, want.val_loss, atol=1e-8, rtol=0)
        np.testing.assert_allclose(got.valid_pred, want.valid_pred, atol=1e-8, rtol=0)
        for a, b in zip(got.model.state_dict().values(), want.model.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-8, rtol=0)  # the exported best-epoch weights too


@pytest.mark.parametrize("batch_norm", [False, True])
def test_fit_many_with_bands_and_retiring_equals_one_batch_per_model(sonar, monkeypatch, batch_norm: bool) -> None:
    """The whole packing policy at once: many widths, early stopping, reports every 2 epochs."""
    X, y = sonar
    # the narrow models stop early (patience 3), the wide ones run all 30 epochs (refit-style)
    jobs = (_jobs([8, 9, 10, 11, 12, 13] * 2, epochs=30, patience=3, batch_norm=batch_norm)
            + _jobs([128, 100, 120], 30, 3, batch_norm=batch_norm, fixed=30))
    assert len(group_jobs(jobs, 60, 2, CPU_GROUP_STEP_PARAMS)) > 1  # the bands really are cut
    sizes = []
    retire = BatchTrainer.retire
    monkeypatch.setattr(BatchTrainer, "retire", lambda self: retire(self) or sizes.append(self.M))
    packed = fit_many(X, y, jobs, 2, "accuracy", report_every=2, keep_models=True)
    assert min(sizes) < 12  # stopped models really left their batch mid-training
    alone = [fit_many(X, y, [job], 2, "accuracy", report_every=2, keep_models=True)[0] for job in jobs]
    assert len({r.epochs_run for r in packed}) > 2  # models stopped at different epochs
    _assert_same(packed, alone)


def test_width_bands_follow_the_cost_rule() -> None:
    jobs = _jobs([8] * 20 + [128] * 20)
    assert sorted(map(len, group_jobs(jobs, 60, 2, CPU_GROUP_STEP_PARAMS))) == [20, 20]  # padding 8 -> 128 costs
    assert len(group_jobs(jobs, 60, 2, None)) == 1  # no split cost given (a GPU): one batch
    few = [FitJob(j.train_rows, j.valid_rows, j.model, j.train.model_copy(update={"batch_size": 16}), j.seed)
           for j in _jobs([8, 128])]
    assert len(group_jobs(few, 60, 2, CPU_GROUP_STEP_PARAMS)) == 1  # one model's padding < a group's cost ...
    assert len(group_jobs(_jobs([8, 128]), 60, 2, CPU_GROUP_STEP_PARAMS)) == 2  # ... but not at 256 rows a step


def test_small_batches_are_cut_as_at_the_calibrated_size() -> None:
    """Scaling the split cost by 16 / batch_size doubled it at batch 8: sonar rounds were cut into fewer
    bands, every model paid Adam's passes over its widest mate's parameters, and `bench_engine.py speed`
    went from 4.4-4.7 to 5.1-5.2 CPU s. Below the calibration's 16 rows a step the cost is left as it was
    (the optimizer's work per parameter does not shrink with the rows)."""
    widths = [16] * 10 + [128] * 10  # cut in two at the calibrated cost, not at twice it

    def bands(batch_size: int) -> list[list[int]]:
        jobs = [FitJob(j.train_rows, j.valid_rows, j.model, j.train.model_copy(update={"batch_size": batch_size}),
                       j.seed) for j in _jobs(widths)]
        return sorted(group_jobs(jobs, 60, 2, CPU_GROUP_STEP_PARAMS))

    assert bands(8) == bands(16) and len(bands(16)) == 2
