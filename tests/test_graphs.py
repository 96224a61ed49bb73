"""CUDA-graph capture: what a CPU can prove (the choice of mode, the refusals, and that an epoch moves no
tensor, which capture relies on) and, on a CUDA device, that captured training equals eager training.

The CUDA tests carry the `cuda` marker and "cuda" in their names: `pytest -m cuda` or `-k cuda`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch

from foldsweep import graphs
from foldsweep.data import load_dataset
from foldsweep.devices import resolve_devices
from foldsweep.errors import DeviceError, SpecError
from foldsweep.graphs import CapturedEpochs, layout
from foldsweep.spec import DataSpec, ModelSpec, TrainSpec, parse_spec
from foldsweep.train import BatchTrainer, FitJob, FitResult, fit_many

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FIELDS = ("train_loss", "val_loss", "val_metric", "valid_pred")


@pytest.fixture(scope="module")
def sonar() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(DataSpec(dataset="sonar"))
    return data.X, data.y


def _mixed_jobs(y: np.ndarray, n: int, *, patience: int = 2, epochs: int = 12) -> list[FitJob]:
    """`n` jobs of one structure (batch norm, plateau schedule) with every random regulariser and other
    per-model knobs, on folds of different sizes; a small patience so that models stop at different epochs."""
    draw = np.random.default_rng(3)
    jobs = []
    for i in range(n):
        rows = draw.permutation(len(y))
        n_train = 100 + 9 * (i % 5)
        model = ModelSpec(width=int(draw.choice([8, 16, 32])), dropout=float(draw.choice([0.0, 0.2])), batch_norm=True)
        train = TrainSpec(epochs=epochs, batch_size=16, lr=float(draw.choice([1e-3, 1e-2, 3e-2])),
                          noise=float(draw.choice([0.0, 0.1])), mixup=float(draw.choice([0.0, 0.3])),
                          l1=1e-5, grad_clip=1.0, label_smoothing=0.05, lr_schedule="plateau", patience=patience)
        jobs.append(FitJob(rows[:n_train], rows[n_train : n_train + 40], model, train, seed=500 + i))
    return jobs


def _assert_same(got: list[FitResult], expected: list[FitResult], atol: float) -> None:
    for a, b in zip(got, expected, strict=True):
        assert (a.epochs_run, a.best_epoch, a.stopped, a.diverged_at) == (b.epochs_run, b.best_epoch, b.stopped,
                                                                          b.diverged_at)
        for field in FIELDS:
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=atol, rtol=0)


# -- on any machine ------------------------------------------------------------------------------------------
def test_resources_cuda_graphs_defaults_to_auto_and_takes_three_values() -> None:
    base = {"name": "t", "data": {"dataset": "sonar"}}
    assert parse_spec(base).resources.cuda_graphs == "auto"
    for mode in ("auto", "on", "off"):
        assert parse_spec({**base, "resources": {"cuda_graphs": mode}}).resources.cuda_graphs == mode
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "resources": {"cuda_graphs": "yes"}}, source="s.yaml")
    assert str(err.value) == "s.yaml: `resources.cuda_graphs` Input should be 'auto', 'on' or 'off', got 'yes'"


def test_on_is_refused_on_a_cpu_with_the_key_named(sonar) -> None:
    X, y = sonar
    job = _mixed_jobs(y, 1)[0]
    with pytest.raises(DeviceError) as err:
        fit_many(torch.as_tensor(X), torch.as_tensor(y), [job], 2, "accuracy", cuda_graphs="on")
    assert str(err.value) == ("`resources.cuda_graphs` is 'on' but training runs on cpu: CUDA graphs need a CUDA "
                              "device; set it to 'auto' or 'off'")


def test_a_sweep_asking_for_graphs_on_a_cpu_is_refused_before_any_trial() -> None:
    spec = parse_spec({"name": "t", "data": {"dataset": "sonar"}, "resources": {"devices": "cpu", "cuda_graphs": "on"}})
    with pytest.raises(DeviceError, match=r"^`resources.cuda_graphs` is 'on' but training runs on cpu"):
        resolve_devices(spec)
    assert resolve_devices(spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"cuda_graphs": "auto"})})) == ["cpu"]


def test_auto_on_a_cpu_trains_eagerly_and_equals_off(sonar, monkeypatch) -> None:
    X, y = sonar
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    jobs = _mixed_jobs(y, 4, epochs=6)
    off = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=2, cuda_graphs="off")

    def no_capture(*args: object, **kwargs: object) -> None:
        raise AssertionError("a capture was attempted on a CPU")

    monkeypatch.setattr(CapturedEpochs, "__init__", no_capture)
    auto = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=2, cuda_graphs="auto")
    _assert_same(auto, off, atol=0.0)


def test_an_epoch_moves_no_tensor_and_retire_does(sonar) -> None:
    """What a replayed graph relies on: between reports every tensor the trainer holds stays where it
    was (changed in place), even as models stop; `retire` rebinds them, so the layout tells it apart."""
    X, y = sonar
    trainer = BatchTrainer(torch.as_tensor(X), torch.as_tensor(y), _mixed_jobs(y, 6, patience=1), 2, "roc_auc")
    before = layout(trainer)
    assert {"active", "best_loss", "plateau", "net.flat", "net.unit_hashes", "epoch_t", "history"} <= {
        name for name, *_ in before}
    trainer.run_epochs(4)
    trainer.settle()
    assert layout(trainer) == before
    assert not trainer.active.all() and trainer.active.any()  # some models stopped, some did not
    trainer.retire()
    assert layout(trainer) != before


class _FakeStream:
    def __init__(self, device: object = None) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass


class _FakeGraph:
    """A CUDA graph stand-in on a CPU: its replay runs the recorded epoch eagerly (see `_fake_cuda`)."""

    replay: Callable[[], None]


def _fake_cuda(monkeypatch) -> list[int]:
    """The CUDA calls `CapturedEpochs` makes, faked on a CPU to check its sequencing: a "capture" trains
    one epoch for real and then puts every tensor of the trainer back (a real capture runs nothing)."""
    monkeypatch.setattr("foldsweep.train.wants_capture", lambda mode, device: True)
    for name, fake in (("Stream", _FakeStream), ("current_stream", _FakeStream), ("CUDAGraph", _FakeGraph),
                       ("stream", lambda stream: contextlib.nullcontext()),
                       ("graph", lambda graph, stream: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, fake)
    captures: list[int] = []
    capture = CapturedEpochs._capture

    def recorded(self: CapturedEpochs) -> torch.cuda.CUDAGraph | None:
        held = [t for part in (self.trainer, self.trainer.net, self.trainer.transform) for value in vars(part).values()
                for t in graphs._tensors(value)]
        before = [t.clone() for t in held]
        graph = capture(self)
        with torch.no_grad():
            for t, saved in zip(held, before, strict=True):
                t.copy_(saved)
        captures.append(self.trainer.M)
        graph.replay = self.trainer.train_epoch  # type: ignore[union-attr]
        return graph

    monkeypatch.setattr(CapturedEpochs, "_capture", recorded)
    return captures


def test_captured_epochs_train_each_epoch_once_and_capture_again_after_retire(sonar, monkeypatch) -> None:
    """On a CPU with CUDA faked: a warm-up epoch, a capture, replays; after models retire, again; the
    models are the eager ones exactly (no epoch trained twice or left out, nothing replayed stale)."""
    X, y = sonar
    Xt, yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y)
    jobs = [FitJob(j.train_rows, j.valid_rows, j.model.model_copy(update={"width": 16}), j.train, j.seed)
            for j in _mixed_jobs(y, 12)]  # one width: one batch on a CPU too
    eager = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=3, on_report=_pruner(6, {4, 7}), cuda_graphs="off")
    captures = _fake_cuda(monkeypatch)
    captured = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=3, on_report=_pruner(6, {4, 7}), cuda_graphs="on")
    _assert_same(captured, eager, atol=0.0)
    assert captures[0] == 12 and len(captures) >= 2 and captures[-1] < 12
    assert {r.stopped for r in captured} == {True, False} and len({r.epochs_run for r in captured}) > 2


# -- on a CUDA device ----------------------------------------------------------------------------------------
def _count_captures(monkeypatch) -> list[int]:
    captures: list[int] = []
    capture = CapturedEpochs._capture

    def counted(self: CapturedEpochs) -> torch.cuda.CUDAGraph | None:
        captures.append(self.trainer.M)
        return capture(self)

    monkeypatch.setattr(CapturedEpochs, "_capture", counted)
    return captures


def _pruner(stop_at: int, stop: set[int]):  # type: ignore[no-untyped-def]
    """An on_report hook that prunes jobs `stop` at epoch `stop_at`."""
    def hook(ids: list[int], epoch: int, curves: np.ndarray) -> list[int]:
        return [i for i in ids if i in stop] if epoch == stop_at else []
    return hook


@needs_cuda
@pytest.mark.cuda
def test_cuda_captured_equals_eager_for_a_mixed_batch_that_stops_prunes_and_retires(sonar, monkeypatch) -> None:
    """Dropout, noise, mixup, batch norm, l1, clipping, smoothing, plateau; early stopping (patience 2)
    and two models pruned at the report of epoch 6, so the batch retires models and is captured again."""
    X, y = sonar
    Xt, yt = torch.as_tensor(X, dtype=torch.float64, device="cuda"), torch.as_tensor(y, device="cuda")
    jobs = _mixed_jobs(y, 12)
    eager = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=3, on_report=_pruner(6, {4, 7}), cuda_graphs="off")
    captures = _count_captures(monkeypatch)
    captured = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=3, on_report=_pruner(6, {4, 7}), cuda_graphs="on")
    _assert_same(captured, eager, atol=1e-9)
    assert len(captures) >= 2 and captures[-1] < captures[0]  # captured again, for a smaller batch
    assert {r.stopped for r in captured} == {True, False} and len({r.epochs_run for r in captured}) > 2


@needs_cuda
@pytest.mark.cuda
def test_cuda_captured_equals_eager_in_float32(sonar) -> None:
    X, y = sonar
    Xt, yt = torch.as_tensor(X, dtype=torch.float32, device="cuda"), torch.as_tensor(y, device="cuda")
    jobs = [FitJob(j.train_rows, j.valid_rows, j.model, j.train, j.seed, fixed_epochs=10) for j in _mixed_jobs(y, 10)]
    eager = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=5, cuda_graphs="off")
    captured = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=5, cuda_graphs="on")
    _assert_same(captured, eager, atol=1e-5)


@needs_cuda
@pytest.mark.cuda
def test_cuda_captured_matches_the_cpu_engine(sonar) -> None:
    """float64, so that what differs is only the devices' rounding (and no early-stopping decision flips)."""
    X, y = sonar
    jobs = _mixed_jobs(y, 8)
    hook = _pruner(6, {2})
    cpu = fit_many(torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y), jobs, 2, "accuracy", report_every=3,
                   on_report=hook, cuda_graphs="off")
    cuda = fit_many(torch.as_tensor(X, dtype=torch.float64, device="cuda"), torch.as_tensor(y, device="cuda"), jobs, 2,
                    "accuracy", report_every=3, on_report=hook, cuda_graphs="on")
    _assert_same(cuda, cpu, atol=1e-7)


@needs_cuda
@pytest.mark.cuda
def test_cuda_a_failed_capture_trains_eagerly_under_auto_and_raises_under_on(sonar, monkeypatch, caplog) -> None:
    X, y = sonar
    Xt, yt = torch.as_tensor(X, device="cuda"), torch.as_tensor(y, device="cuda")
    jobs = _mixed_jobs(y, 4, epochs=6)
    eager = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=3, cuda_graphs="off")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.torch.cuda, "graph", broken)
    with caplog.at_level(logging.WARNING, logger="foldsweep.graphs"):
        auto = fit_many(Xt, yt, jobs, 2, "accuracy", report_every=3, cuda_graphs="auto")
    _assert_same(auto, eager, atol=1e-5)
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA-graph capture failed, training eagerly (resources.cuda_graphs: auto): operation not permitted when "
        "stream is capturing"]
    with pytest.raises(RuntimeError, match="stream is capturing"):
        fit_many(Xt, yt, jobs, 2, "accuracy", report_every=3, cuda_graphs="on")
