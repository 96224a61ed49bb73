"""CUDA-graph capture of the training epoch: one launch per epoch instead of thousands of kernels.

For the MLPs this tool trains, an epoch is thousands of tiny kernels and launching them is the whole
cost on a GPU (see DESIGN.md, "Where the time goes"). Between two reports the trainer's epoch is
graph-ready (`trainer`): static shapes, every random number a hash on the device, no host sync, and
every tensor it changes changed in place. So one epoch is recorded once and replayed for the others.

A replay reads and writes the addresses it was recorded with, so a graph is valid only while the
trainer's tensors stay where they were (`layout`); `retire` rebinds them (the batch shrinks) and the
next epoch is captured again. Capture records work without running it, and the warm-up before it is a
real epoch: no epoch is trained twice or left out, so captured and eager training give the same models.

`resources.cuda_graphs`: `auto` captures on CUDA and trains eagerly on a CPU or where capture fails
(one log line); `on` insists (refused on a CPU, a capture failure is raised); `off` is eager.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from foldsweep.devices import refuse_graphs_off_cuda
from foldsweep.spec import CudaGraphs
from foldsweep.trainer import BatchTrainer

__all__ = ["CapturedEpochs", "Layout", "layout", "log", "wants_capture"]

# (attribute, address, shape, strides) of every tensor the trainer holds
Layout = tuple[tuple[str, int, tuple[int, ...], tuple[int, ...]], ...]

log = logging.getLogger(__name__)


def wants_capture(mode: CudaGraphs, device: torch.device) -> bool:
    """Whether training on `device` is captured; `on` where no capture can apply is refused, not ignored."""
    if mode == "off":
        return False
    refuse_graphs_off_cuda(mode, str(device))
    return device.type == "cuda"


def layout(trainer: BatchTrainer) -> Layout:
    """Where every tensor of the trainer and its parts lives: what a captured epoch reads and writes.

    Compared once per report, never per epoch (the epoch itself binds no tensor: `train_epoch`).
    """
    parts = {"": trainer, "net.": trainer.net, "transform.": trainer.transform,
             "train_rows.": trainer.train_rows, "valid_rows.": trainer.valid_rows}
    return tuple((prefix + name, t.data_ptr(), tuple(t.shape), t.stride())
                 for prefix, part in parts.items() for name, value in vars(part).items() for t in _tensors(value))


def _tensors(value: object) -> Iterator[Tensor]:
    """The tensors in an attribute: itself, or those in its (nested) lists and tuples."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


class CapturedEpochs:
    """A trainer's epochs as replays of one captured epoch, captured again when its tensors move.

    For each layout: the first epoch runs eagerly on the capture's own stream (warm-up: cuBLAS handles,
    allocator blocks and autograd set up where the capture will need them; it is a counted epoch), the
    next is recorded (nothing runs) and then replayed, and later ones are replayed. Replays run on the
    current stream, so the host's reads at a report (`settle`, results) come after them.
    """

    def __init__(self, trainer: BatchTrainer, *, strict: bool) -> None:
        self.trainer, self.strict = trainer, strict
        self.stream = torch.cuda.Stream(trainer.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.layout: Layout | None = None  # the layout warmed up (and captured) for; None: warm up first
        self.failed = False  # a capture failed under `auto`: eager from here on

    def run_epochs(self, n: int) -> None:
        """`BatchTrainer.run_epochs`, each epoch a warm-up, a capture and replay, or a replay."""
        trainer = self.trainer
        if self.layout is not None and layout(trainer) != self.layout:
            self.graph, self.layout = None, None  # `retire` rebound the batch: warm up and capture again
        for _ in range(n):
            if trainer.epoch >= trainer.total_epochs:
                break
            self._epoch()
            trainer.epoch += 1

    def _epoch(self) -> None:
        if self.layout is None and not self.failed:
            self._warm_up()
            return
        if self.graph is None and not self.failed:
            self.graph = self._capture()
        if self.graph is None:
            self.trainer.train_epoch()
        else:
            self.graph.replay()

    def _warm_up(self) -> None:
        """One real epoch on the capture's stream (as the CUDA-graph docs ask), ordered with the current one."""
        current = torch.cuda.current_stream(self.trainer.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.trainer.train_epoch()
        current.wait_stream(self.stream)
        self.layout = layout(self.trainer)

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """Record one epoch; under `auto`, None (and one log line) if the capture fails."""
        trainer, graph = self.trainer, torch.cuda.CUDAGraph()
        hook, trainer.on_progress = trainer.on_progress, None  # recording is not training: no progress to show
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                trainer.train_epoch()
        except RuntimeError as err:
            if self.strict:
                raise
            self.failed = True
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("CUDA-graph capture failed, training eagerly (resources.cuda_graphs: auto): %s", first)
            return None
        finally:
            trainer.on_progress = hook
        return graph
