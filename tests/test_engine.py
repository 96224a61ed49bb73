"""The engine's promises beyond equivalence: a fit independent of its batch-mates (random streams),
batch norm without one-row batches, no host sync between reports, memory-sized batches, progress."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from foldsweep import memory, rng
from foldsweep.data import load_dataset
from foldsweep.errors import SpecError
from foldsweep.memory import MemoryBudgetError, Shape
from foldsweep.model import build_mlp, n_parameters
from foldsweep.spec import DataSpec, ModelSpec, TrainSpec, parse_spec
from foldsweep.train import BatchTrainer, FitJob, fit_many


@pytest.fixture(scope="module")
def sonar() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(DataSpec(dataset="sonar"))
    return data.X, data.y


# -- random streams ------------------------------------------------------------------------------------------
def test_uniform_draws_are_uniform_and_independent_across_models_and_steps() -> None:
    keys = torch.arange(64, dtype=torch.int64) * 7919
    u = rng.uniform(rng.stream(keys, rng.DROPOUT, 3, 5), 40, 50)  # (64, 40, 50)
    assert 0 < u.min() and u.max() <= 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    other = rng.uniform(rng.stream(keys, rng.DROPOUT, 3, 6), 40, 50)  # the next step
    neighbours = torch.stack([u[:, :, :-1].flatten(), u[:, :, 1:].flatten()])  # adjacent units
    for pair in (torch.stack([u.flatten(), other.flatten()]), neighbours, torch.stack([u[:-1].flatten(),
                                                                                        u[1:].flatten()])):
        assert abs(torch.corrcoef(pair)[0, 1].item()) < 0.01
    # a model's draws depend on its key only: the same with other models beside it
    alone = rng.uniform(rng.stream(keys[5:6], rng.DROPOUT, 3, 5), 40, 50)
    assert torch.equal(alone[0], u[5])


def test_beta_draws_match_the_distribution() -> None:
    from scipy import stats

    for alpha in (0.2, 1.0, 2.5):
        keys = torch.arange(20_000, dtype=torch.int64)
        draws = rng.beta(rng.stream(keys, rng.MIXUP_GAMMA, 0, 0), torch.full((20_000,), alpha, dtype=torch.float64))
        assert torch.isfinite(draws).all() and (draws >= 0).all() and (draws <= 1).all()
        assert stats.kstest(draws.numpy(), stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_normal_draws_match_the_distribution() -> None:
    from scipy import stats

    keys = torch.arange(50, dtype=torch.int64)
    z = rng.normal(rng.stream(keys, rng.NOISE, 0), rng.stream(keys, rng.NOISE_ANGLE, 0), 20, 40, torch.float64)
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3


def test_dropout_masks_drop_at_each_models_rate() -> None:
    rate = torch.tensor([0.0, 0.1, 0.5, 0.9]).view(4, 1, 1)
    rows = rng.mix(rng.steps(rng.stream(torch.arange(4) + 11, rng.DROPOUT, 0), 1)[:, :1] ^ rng.row_hashes(500, "cpu"))
    mask = rng.keep_mask(rows, rng.column_hashes(300, "cpu"), rng.dropout_threshold(rate), 1 / (1 - rate))
    dropped = (mask == 0).float().mean((1, 2))
    torch.testing.assert_close(dropped, rate.flatten(), atol=0.005, rtol=0)
    torch.testing.assert_close(mask.mean((1, 2)), torch.ones(4), atol=0.02, rtol=0)  # scaled: mean 1


def test_mix_is_murmur3s_finaliser_with_int64_wrapping_as_uint32() -> None:
    """The int64 arithmetic (products up to 2^64 wrap, masked to 32 bits) against numpy's uint32, where
    wrapping is defined; the input is left as it was."""
    x = np.random.default_rng(0).integers(0, 2**32, 10_000, dtype=np.uint64).astype(np.uint32)
    x[:3] = [0, 1, 2**32 - 1]
    expected = x.copy()
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        expected ^= expected >> np.uint32(shift)
        expected *= np.uint32(factor)
    expected ^= expected >> np.uint32(16)
    given = torch.as_tensor(x.astype(np.int64))
    kept = given.clone()
    np.testing.assert_array_equal(rng.mix(given).numpy(), expected.astype(np.int64))
    assert torch.equal(given, kept)


def _dropout_masks(key: int, rate: float, steps: int, rows: int, units: int) -> torch.Tensor:
    """Dropped (1) or kept (0) per draw, (steps * rows, units): one layer's masks over `steps` steps, as the
    trainer makes them (a base per step, its rows mixed in, then the units)."""
    per_step = rng.steps(rng.stream(torch.tensor([key]), rng.DROPOUT, 0), steps)  # (1, steps)
    per_row = rng.mix(per_step.unsqueeze(-1) ^ rng.row_hashes(rows, "cpu")).view(1, -1)  # (1, steps * rows)
    rate_t = torch.full((1, 1, 1), rate)
    mask = rng.keep_mask(per_row, rng.column_hashes(units, "cpu"), rng.dropout_threshold(rate_t), 1 / (1 - rate_t))
    return (mask[0] == 0).double()


@pytest.mark.parametrize("key", [11, 12, 13])
def test_dropout_masks_of_two_units_are_uncorrelated(key: int) -> None:
    """Every pair of 64 units over 51,200 draws: a pair beyond 4 standard errors of zero correlation comes
    by chance with p = 6.3e-5, so 0.13 of the 2,016 pairs are expected (3 or more: p < 4e-4)."""
    dropped = _dropout_masks(key, 0.5, 100, 512, 64)
    corr = torch.corrcoef(dropped.T)
    pairs = corr[tuple(torch.triu_indices(64, 64, 1))]
    assert (pairs.abs() > 4 / math.sqrt(len(dropped))).sum().item() <= 2
    assert pairs.abs().max().item() < 0.03


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_masks_drop_each_unit_at_the_rate(rate: float) -> None:
    dropped = _dropout_masks(7, rate, 100, 512, 64)
    se = math.sqrt(rate * (1 - rate) / len(dropped))
    assert ((dropped.mean(0) - rate).abs() > 4 * se).sum().item() <= 1


def _mixed_jobs(y: np.ndarray, n: int) -> list[FitJob]:
    """`n` jobs of one structure with every random regulariser, on 5 folds of different sizes."""
    rng_np = np.random.default_rng(0)
    jobs = []
    for i in range(n):
        rows = rng_np.permutation(len(y))
        n_train = 100 + 9 * (i % 5)
        model = ModelSpec(width=int(rng_np.choice([8, 16, 24, 48, 64])), dropout=float(rng_np.choice([0.0, 0.2, 0.4])))
        train = TrainSpec(epochs=6, batch_size=16, lr=float(rng_np.choice([1e-3, 3e-3, 1e-2])),
                          noise=float(rng_np.choice([0.0, 0.1])), mixup=float(rng_np.choice([0.0, 0.3])),
                          weight_decay=1e-3)
        jobs.append(FitJob(rows[:n_train], rows[n_train : n_train + 40], model, train, seed=1000 + i, fixed_epochs=6))
    return jobs


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_fit_is_the_same_alone_in_a_batch_of_50_and_grouped_otherwise(sonar, dtype: str) -> None:
    """Minibatches, dropout, noise and mixup: every random number of the model is its own.

    In float64 the three agree to 1e-10 (what differs is only the padding width, which sums zeros in
    another order); in float32 that rounding is visible but small (measured: < 1e-5 here).
    """
    X, y = sonar
    Xt, yt = torch.as_tensor(X.astype(dtype)), torch.as_tensor(y)
    mates = _mixed_jobs(y, 49)
    target = FitJob(*_fold(y), ModelSpec(width=24, dropout=0.3),
                    TrainSpec(epochs=6, batch_size=16, lr=3e-3, noise=0.1, mixup=0.3), seed=424242, fixed_epochs=6)
    alone = fit_many(Xt, yt, [target], 2, "accuracy")[0]
    in_batch = fit_many(Xt, yt, [*mates[:20], target, *mates[20:]], 2, "accuracy", report_every=2)[20]
    other_group = fit_many(Xt, yt, [mates[3], target, mates[7]], 2, "accuracy", report_every=3)[1]
    atol = 1e-10 if dtype == "float64" else 1e-5
    for got in (in_batch, other_group):
        for field in ("train_loss", "val_loss", "val_metric", "valid_pred"):
            np.testing.assert_allclose(getattr(got, field), getattr(alone, field), atol=atol, rtol=0)
    # control: the streams do matter (another seed trains differently)
    reseeded = FitJob(target.train_rows, target.valid_rows, target.model, target.train, seed=7, fixed_epochs=6)
    assert not np.allclose(fit_many(Xt, yt, [reseeded], 2, "accuracy")[0].train_loss, alone.train_loss, atol=1e-3)


def _fold(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.random.default_rng(5).permutation(len(y))
    return rows[:131], rows[131:171]


# -- batch norm and a one-row last batch ------------------------------------------------------------------------
def test_batch_norm_skips_a_one_row_batch_like_a_careful_torch_loop(sonar) -> None:
    """17 rows in batches of 8: torch refuses the last batch (one row: no variance), so a careful loop
    skips it; the engine must end with the same running statistics and outputs as torch's BatchNorm1d
    fed the same two batches (weights held still by a negligible learning rate, in float64)."""
    X, y = sonar
    rows = np.random.default_rng(1).permutation(len(y))
    spec = ModelSpec(width=6, depth=2, batch_norm=True)
    job = FitJob(rows[:17], rows[17:60], spec, TrainSpec(batch_size=8, epochs=1, optimizer="sgd", lr=1e-300,
                                                         momentum=0.0), seed=3, fixed_epochs=1)
    trainer = BatchTrainer(torch.as_tensor(X.astype(np.float64)), torch.as_tensor(y), [job], 2, "accuracy")
    order = torch.as_tensor(job.train_rows)[trainer.order()[0]]
    trainer.run_epochs(1)
    inputs = trainer.transform.apply(trainer.X, order.unsqueeze(0))[0]  # the epoch's rows, in its order
    model = build_mlp(60, 2, spec, seed=3, dtype=torch.float64).train()
    with torch.no_grad():
        model(inputs[:8])
        model(inputs[8:16])
        with pytest.raises(ValueError, match="more than 1 value"):
            model(inputs[16:17])  # what torch says of the lone row
    for layer, norm in enumerate(model.norms):
        torch.testing.assert_close(trainer.net.running_mean[0, layer], norm.running_mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(trainer.net.running_var[0, layer], norm.running_var, atol=1e-12, rtol=0)
    valid = trainer.transform.apply(trainer.X, torch.as_tensor(job.valid_rows).unsqueeze(0))[0]
    with torch.no_grad():
        expected = model.eval()(valid).softmax(-1)
    torch.testing.assert_close(trainer.results()[0].valid_pred, expected.numpy(), atol=1e-10, rtol=0)


# -- no host sync between reports ------------------------------------------------------------------------------
class SyncCounter(TorchFunctionMode):
    """Counts calls that make a CUDA device wait for the host (or the host for the device)."""

    NAMES = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero",
             "tensor", "as_tensor", "masked_select", "unique", "repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        to_cpu = name == "to" and any(str(a) == "cpu" or a is torch.device("cpu") for a in [*args[1:],
                                                                                          *kwargs.values()])
        bool_index = name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        if name in self.NAMES or to_cpu or bool_index:
            self.calls.append(name)
        return func(*args, **kwargs)


def test_the_counter_sees_host_syncs() -> None:
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x.sum().item()
        _ = x[x > 2]
        bool(x[0] > 1)
        torch.tensor([1.0])
        x.to("cpu")
        x.tolist()
    assert counter.calls == ["item", "__getitem__", "__bool__", "tensor", "to", "tolist"]


def test_no_host_sync_inside_the_epochs_between_reports(sonar) -> None:
    """Everything on: minibatches, dropout, noise, mixup, l1, clipping, smoothing, batch norm, plateau,
    uneven folds, regression-free metric on the device, models stopping (patience 1) mid-run."""
    X, y = sonar
    jobs = [FitJob(j.train_rows, j.valid_rows, j.model.model_copy(update={"batch_norm": True}),
                   j.train.model_copy(update={"l1": 1e-4, "grad_clip": 1.0, "label_smoothing": 0.1,
                                              "lr_schedule": "plateau", "patience": 1, "epochs": 8}), j.seed)
            for j in _mixed_jobs(y, 6)]
    trainer = BatchTrainer(torch.as_tensor(X), torch.as_tensor(y), jobs, 2, "roc_auc")
    with SyncCounter() as counter:
        trainer.run_epochs(5)
    assert counter.calls == []
    trainer.settle()  # the report boundary syncs, once
    assert trainer.epoch == 5 and not trainer.done


# -- memory ------------------------------------------------------------------------------------------------------
def _shape(**change: int) -> Shape:
    base = {"n_params": 10_000, "n_in": 40, "width": 64, "depth": 2, "n_out": 2, "batch_size": 256,
            "n_train": 100_000, "n_valid": 30_000, "epochs": 100, "itemsize": 4}
    return Shape(**{**base, **change})  # type: ignore[arg-type]


def test_bytes_per_model_grow_with_what_a_model_holds() -> None:
    base = memory.bytes_per_model(_shape())
    more_rows = memory.bytes_per_model(_shape(n_train=200_000))
    assert (more_rows - base) / 100_000 == 4  # an int32 index per training row, for the epoch
    more_valid = memory.bytes_per_model(_shape(n_valid=130_000))
    assert (more_valid - base) / 100_000 == 12  # the best epoch's probabilities (2 classes) and a score
    assert memory.bytes_per_model(_shape(n_params=20_000)) > base
    assert memory.bytes_per_model(_shape(batch_size=4096)) > base
    assert memory.models_per_batch(_shape(), memory.FIXED_BYTES + 100 * base, cap_given=True) == 100


def test_one_model_over_the_budget_is_refused_before_training(sonar) -> None:
    X, y = sonar
    job = FitJob(*_fold(y), ModelSpec(width=512), TrainSpec(epochs=3), seed=0)
    with pytest.raises(MemoryBudgetError, match=r"`resources.memory` allows 1 MB"):
        fit_many(torch.as_tensor(X), torch.as_tensor(y), [job], 2, "accuracy", memory=2**20)


def test_a_memory_cap_splits_the_batch_and_changes_no_result(sonar, monkeypatch) -> None:
    X, y = sonar
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    jobs = _mixed_jobs(y, 6)
    sizes: list[int] = []
    init = BatchTrainer.__init__

    def record(self, X, y, jobs, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(jobs))
        init(self, X, y, jobs, *args, **kwargs)

    whole = fit_many(Xt, yt, jobs, 2, "accuracy")
    monkeypatch.setattr(BatchTrainer, "__init__", record)
    widest = max((j.model for j in jobs), key=lambda m: m.width)
    one = memory.bytes_per_model(Shape(n_params=n_parameters(60, 2, widest), n_in=60, width=widest.width, depth=2,
                                       n_out=2, batch_size=16, n_train=136, n_valid=40, epochs=6, itemsize=4))
    split = fit_many(Xt, yt, jobs, 2, "accuracy", memory=memory.FIXED_BYTES + int(2.5 * one))
    assert max(sizes) <= 2 and sum(sizes) == 6
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(a.val_loss, b.val_loss, atol=1e-5, rtol=0)


def test_a_cap_on_models_per_batch_splits_the_batch_and_changes_no_result(sonar, monkeypatch) -> None:
    """A round larger than `resources.models_per_batch` trains in several batches (the sweep asks rounds
    by the spec alone, whatever a batch holds on the machine)."""
    X, y = sonar
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    jobs = [FitJob(j.train_rows, j.valid_rows, _mixed_jobs(y, 1)[0].model, j.train, j.seed, fixed_epochs=6)
            for j in _mixed_jobs(y, 6)]  # one structure and width: one group
    whole = fit_many(Xt, yt, jobs, 2, "accuracy")
    sizes: list[int] = []
    init = BatchTrainer.__init__

    def record(self, X, y, jobs, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(jobs))
        init(self, X, y, jobs, *args, **kwargs)

    monkeypatch.setattr(BatchTrainer, "__init__", record)
    split = fit_many(Xt, yt, jobs, 2, "accuracy", models_per_batch=4)
    assert sizes == [4, 2]
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(a.val_loss, b.val_loss, atol=1e-5, rtol=0)


def test_a_batch_holds_no_tensor_of_models_by_rows() -> None:
    """What a model holds grows with its parameters, never with the rows of the table: after an epoch no
    tensor of the batch has (models x validation rows) elements (the targets and masks are kept once per
    fold, the best epoch's predictions are made when the fit ends), and the shuffle is int32."""
    from foldsweep.graphs import _tensors

    gen = np.random.default_rng(0)
    X = torch.as_tensor(gen.normal(size=(6000, 10)))
    y = torch.as_tensor((X[:, 0] > 0).long().numpy())
    folds = [np.arange(6000)[np.arange(6000) % 3 != k] for k in range(3)]
    jobs = [FitJob(folds[k], np.arange(k, 6000, 3), ModelSpec(width=8), TrainSpec(epochs=2, batch_size=512),
                   seed=i * 3 + k) for i in range(4) for k in range(3)]
    for metric in ("accuracy", "log_loss", "r2"):
        regression = metric == "r2"
        trainer = BatchTrainer(X, X[:, 1] if regression else y, jobs, 0 if regression else 2, metric)
        assert trainer.order().dtype == torch.int32
        trainer.run_epochs(1)
        parts = [trainer, trainer.net, trainer.transform, trainer.train_rows, trainer.valid_rows]
        held = [t for part in parts for name, value in vars(part).items() if name not in ("X", "y")  # the table
                for t in _tensors(value)]
        assert max(t.numel() for t in held) < len(jobs) * 2000  # the largest: 3 folds' 4000 training rows
        assert all(r.valid_pred.shape[0] == 2000 for r in trainer.results())


def test_best_epoch_predictions_are_those_it_was_scored_on(sonar) -> None:
    """The predictions given back are the best epoch's, kept (a small table) or made again from the best
    epoch's weights (here: as an exported model needs them): their loss is the validation loss recorded
    at that epoch (float64), for fits whose best epoch is not their last."""
    X, y = sonar
    jobs = [FitJob(*_fold(y), ModelSpec(width=32), TrainSpec(epochs=30, batch_size=8, lr=0.05, patience=30),
                   seed=s) for s in range(3)]
    for keep_models in (False, True):
        results = fit_many(torch.as_tensor(X.astype(np.float64)), torch.as_tensor(y), jobs, 2, "accuracy",
                           report_every=7, keep_models=keep_models)
        assert any(r.best_epoch < r.epochs_run for r in results)
        for job, r in zip(jobs, results):
            loss = -np.log(r.valid_pred[np.arange(len(job.valid_rows)), y[job.valid_rows]]).mean()
            assert loss == pytest.approx(r.val_loss[r.best_epoch - 1], abs=1e-10)


@pytest.mark.parametrize(("text", "expected"), [("4GB", 4 * 2**30), ("512MB", 512 * 2**20), ("1.5gb", int(1.5 * 2**30)),
                                                ("1000", 1000)])
def test_resources_memory_reads_sizes(text: str, expected: int) -> None:
    spec = parse_spec({"name": "t", "data": {"dataset": "sonar"}, "resources": {"memory": text}})
    assert spec.resources.memory == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "0MB", "4 PB"])
def test_resources_memory_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "t", "data": {"dataset": "sonar"}, "resources": {"memory": text}}, source="s.yaml")
    assert str(err.value) == (f"s.yaml: `resources.memory` is not a memory size: write e.g. 512MB, 4GB or 1.5GB, "
                              f"got {text!r}")


# -- progress ------------------------------------------------------------------------------------------------------
def test_long_epochs_report_progress_and_short_ones_do_not(sonar, monkeypatch) -> None:
    X, y = sonar
    calls: list[tuple[int, int, int]] = []
    job = FitJob(*_fold(y), ModelSpec(width=8), TrainSpec(epochs=2, batch_size=8), seed=0)
    fit_many(torch.as_tensor(X), torch.as_tensor(y), [job], 2, "accuracy", on_progress=lambda *a: calls.append(a))
    assert calls == []  # an epoch of a few milliseconds says nothing
    clock = iter(range(0, 10**6, 1))  # a host clock that moves 1 s per reading: every epoch is "long"
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    fit_many(torch.as_tensor(X), torch.as_tensor(y), [job], 2, "accuracy", on_progress=lambda *a: calls.append(a))
    steps = math.ceil(131 / 8)  # per epoch; the hook counts over the call's 2 epochs
    assert calls and all(total == 2 * steps and 1 <= done <= 2 * steps and rows == done * 8
                         for done, total, rows in calls)
    assert max(done for done, _, _ in calls) > steps  # the second epoch goes on from the first
