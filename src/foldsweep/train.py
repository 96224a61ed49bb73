"""Train many fold models at once: every fold of every trial in a batch is one stacked model.

For the small MLPs this tool targets, a fold fit costs launches and Python, not arithmetic, so M fits
run as one: batched matmuls over a leading model dimension, per-model hyperparameters as (M,) tensors,
data resident on the device, no host sync inside an epoch. Models are independent: each has its own
rows, preprocessing fitted on its own training rows (`preprocess`), its own optimiser state, early
stopping, and a step mask that freezes it when it stops. This module knows nothing of Optuna or MLflow.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from foldsweep.metrics import device_metric
from foldsweep.model import MLP, StackedMLP, build_mlp, n_parameters
from foldsweep.preprocess import fit_preprocessing, fit_targets, gather_rows, pad_rows
from foldsweep.spec import ModelSpec, TrainSpec

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
# What one more batched group costs on a CPU, in parameters' worth of per-model work: its ~1 ms of fixed
# work per step, times the ~2x more epochs a group runs (until its slowest model stops) than its average
# model, over the ~10 ns one parameter of one model costs per step. Calibrated on sonar rounds of 48 and
# 192 models (1e5 to 3e5 within noise of each other, 1.7x faster than no cut at 192); see group_jobs.
CPU_GROUP_STEP_PARAMS = 200_000.0


@dataclass(frozen=True)
class FitJob:
    """One model to fit. `fixed_epochs` (refits) trains exactly that long and scores the last epoch."""

    train_rows: np.ndarray
    valid_rows: np.ndarray
    model: ModelSpec
    train: TrainSpec
    seed: int
    fixed_epochs: int | None = None


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
    worth of per-model work) each structure group is cut into width bands where the padding saved pays
    for the extra group; without it (a GPU, where launches are the cost) nothing is cut.
    """
    groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[structure_key(job)].append(i)
    if split_cost is None:
        return list(groups.values())
    return [band for ids in groups.values() for band in _width_bands(jobs, ids, n_in, n_out, split_cost)]


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


StopHook = Callable[[list[int], int, np.ndarray], list[int]]


def fit_many(X: Tensor, y: Tensor, jobs: list[FitJob], n_classes: int, metric: str, *, report_every: int = 10,
             on_report: StopHook | None = None, keep_models: bool = False) -> list[FitResult]:
    """Fit every job; `on_report(job_ids, epoch, val_metric (len, epoch))` may return jobs to stop.

    Between reports, models that have stopped leave the batch (`retire`), so a group costs what its
    running models cost, not what its slowest model kept it busy for.
    """
    split = CPU_GROUP_STEP_PARAMS if X.device.type == "cpu" else None
    results: list[FitResult | None] = [None] * len(jobs)
    for ids in group_jobs(jobs, X.shape[1], max(n_classes, 1), split):
        trainer = BatchTrainer(X, y, [jobs[i] for i in ids], n_classes, metric, keep_models=keep_models)
        while not trainer.done:
            trainer.run_epochs(report_every)
            if on_report is not None:
                local = on_report(ids, trainer.epoch, trainer.metric_curves())
                trainer.stop([ids.index(i) for i in local])
            trainer.retire()
        for i, result in zip(ids, trainer.results()):
            results[i] = result
    return [r for r in results if r is not None]


class BatchTrainer:
    """M models of one structure, trained in lockstep until each stops.

    Per-model tensors have a leading model dimension over the models still in the batch (`slots` maps
    them to job positions); `retire` drops finished models from it. `history` and the finished results
    stay indexed by job position.
    """

    def __init__(self, X: Tensor, y: Tensor, jobs: list[FitJob], n_classes: int, metric: str,
                 keep_models: bool = False) -> None:
        self.jobs, self.metric, self.n_classes = jobs, metric, n_classes
        self.device = X.device
        self.regression = n_classes == 0
        first = jobs[0].train
        self.cfg = first
        self.M = M = len(jobs)
        self.slots = torch.arange(M, device=self.device)
        self.finished: dict[int, FitResult] = {}
        self.gen = torch.Generator(device=self.device).manual_seed(_mix_seeds(j.seed for j in jobs))
        self.np_rng = np.random.default_rng(_mix_seeds(j.seed for j in jobs))
        self.train_idx, self.train_mask, self.n_train = pad_rows([j.train_rows for j in jobs], self.device)
        self.valid_idx, self.valid_mask, _ = pad_rows([j.valid_rows for j in jobs], self.device)
        self.inputs, self.preprocess = fit_preprocessing(X, y, self.train_idx, self.train_mask, first,
                                                       [j.seed for j in jobs])
        self.targets, self.y_shift, self.y_scale = fit_targets(y, self.train_idx, self.train_mask, self.regression)
        self.x_valid = gather_rows(self.inputs, self.valid_idx)
        self.y_valid = self.targets.gather(1, self.valid_idx)
        n_in = self.inputs.shape[-1]
        self.templates = [build_mlp(n_in, max(n_classes, 1), j.model, j.seed) for j in jobs]
        self.net = StackedMLP(self.templates, self.device)
        self.keep_models = keep_models
        # what an exported model needs from its best epoch: the weights and the batch-norm statistics
        self.best_kept = [t.clone() for t in self._kept()]

        def vec(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=self.device)

        self.lr = vec([j.train.lr for j in jobs])
        self.wd = vec([j.train.weight_decay for j in jobs])
        self.l1 = vec([j.train.l1 for j in jobs])
        self.drop = vec([j.model.dropout for j in jobs]).view(M, 1, 1)
        self.clip = vec([j.train.grad_clip for j in jobs])
        self.noise = vec([j.train.noise for j in jobs]).view(M, 1, 1)
        self.smoothing = vec([j.train.label_smoothing for j in jobs]).view(M, 1)
        self.mixup = np.array([j.train.mixup for j in jobs])
        # which optional terms any model uses, decided once: no per-step test of a tensor
        self.uses = {"l1": any(j.train.l1 > 0 for j in jobs), "dropout": any(j.model.dropout > 0 for j in jobs),
                     "clip": any(j.train.grad_clip > 0 for j in jobs), "noise": any(j.train.noise > 0 for j in jobs),
                     "mixup": any(j.train.mixup > 0 for j in jobs),
                     "smoothing": any(j.train.label_smoothing > 0 for j in jobs)}
        self.max_epochs = vec([j.fixed_epochs or j.train.epochs for j in jobs])
        self.select_latest = torch.tensor([j.fixed_epochs is not None for j in jobs], device=self.device)
        self.flat_state = torch.zeros_like(self.net.flat)  # (M, P): momentum / Adam's first moment
        self.flat_state2 = torch.zeros_like(self.net.flat)  # Adam's second moment
        self.grad_buf, self.scratch = torch.empty_like(self.net.flat), torch.empty_like(self.net.flat)
        self._plan_batches()
        self.steps = torch.zeros(M, device=self.device)
        self.plateau = torch.ones(M, device=self.device)
        self.plateau_bad = torch.zeros(M, device=self.device)
        self.active = torch.ones(M, dtype=torch.bool, device=self.device)
        self.stopped = torch.zeros(M, dtype=torch.bool, device=self.device)
        self.best_loss = torch.full((M,), math.inf, device=self.device)
        self.best_epoch = torch.zeros(M, device=self.device)
        self.bad_epochs = torch.zeros(M, device=self.device)
        self.epochs_run = torch.zeros(M, device=self.device)
        self.diverged_at = torch.zeros(M, device=self.device)
        self.best_pred = torch.zeros_like(self._predict()[0])
        total = int(self.max_epochs.max().item())
        self.history = torch.full((3, M, total), math.nan, device=self.device)  # train loss, val loss, metric
        self.epoch = 0
        self.done = False

    # every tensor with a leading model dimension over the models in the batch, for `retire`
    PER_MODEL = ("slots", "train_idx", "train_mask", "n_train", "valid_idx", "valid_mask", "inputs", "targets",
                 "y_shift", "y_scale", "x_valid", "y_valid", "lr", "wd", "l1", "drop", "clip", "noise", "smoothing",
                 "mixup", "max_epochs", "select_latest", "flat_state", "flat_state2", "grad_buf", "scratch", "steps",
                 "plateau", "plateau_bad", "active", "stopped", "best_loss", "best_epoch", "bad_epochs", "epochs_run",
                 "diverged_at", "best_pred")

    @property
    def params(self) -> list[Tensor]:
        return self.net.params

    @property
    def state(self) -> list[Tensor]:
        """The first-moment (momentum) buffer as one view per parameter tensor."""
        return self.net.views(self.flat_state)

    def _kept(self) -> list[Tensor]:
        return [self.net.flat, self.net.running_mean, self.net.running_var] if self.keep_models else []

    # -- the loop -------------------------------------------------------------------------------------
    def run_epochs(self, n: int) -> None:
        for _ in range(n):
            if self.epoch >= self.history.shape[-1]:
                break
            self._train_epoch()
            self.epoch += 1
        self.done = bool(not self.active.any().item()) or self.epoch >= self.history.shape[-1]

    def _train_epoch(self) -> None:
        running = self.active.clone()
        keys = torch.rand(self.train_idx.shape, generator=self.gen, device=self.device)
        order = keys.masked_fill_(~self.train_mask, 2.0).argsort(1)  # each model's own rows first, shuffled
        rows_all = self.train_idx.gather(1, order)
        lr = self.lr * self.plateau * schedule_factor(self.cfg, self.epoch)
        losses, takes = [], []
        for start, real, has_rows in self.batches:
            rows = rows_all[:, start : start + self.cfg.batch_size]  # (M, B)
            data_loss = self._batch_loss(gather_rows(self.inputs, rows), self.targets.gather(1, rows), real)
            take = running & has_rows
            # every model's gradient, used only by those in `take` (see _step); a model whose loss is not
            # finite is flagged as diverged at the end of the epoch, its results from its best epoch before
            grads = torch.autograd.grad(data_loss.sum(), self.params)
            self._step(grads, lr, take)
            losses.append(data_loss.detach())
            takes.append(take)
        loss, taken = torch.stack(losses), torch.stack(takes)  # (steps, M)
        loss_sum = (torch.where(taken, loss, 0.0) * self.batch_rows).sum(0)
        self._end_epoch(running, loss_sum / self.n_train, (taken & ~torch.isfinite(loss)).any(0))

    def _plan_batches(self) -> None:
        """Per step of an epoch: where it starts, each model's real rows (M, B) and who has any (M,)."""
        position = torch.arange(self.train_idx.shape[1], device=self.device)
        self.batches = []
        for start in range(0, self.train_idx.shape[1], self.cfg.batch_size):
            real = (position[start : start + self.cfg.batch_size].unsqueeze(0) < self.n_train.unsqueeze(1)).float()
            self.batches.append((start, real, real.sum(1) > 0))
        self.batch_rows = torch.stack([real.sum(1) for _, real, _ in self.batches])  # (steps, M)

    def _batch_loss(self, x: Tensor, target: Tensor, real: Tensor) -> Tensor:
        """Mean loss over each model's real rows, shape (M,); noise and mixup on training batches only."""
        if self.uses["noise"]:
            x = x + self.noise * torch.randn(x.shape, generator=self.gen, device=x.device)
        lam = None
        if self.uses["mixup"]:
            alpha = np.maximum(self.mixup, 1e-3)
            draws = np.where(self.mixup > 0, self.np_rng.beta(alpha, alpha), 1.0)
            lam = torch.tensor(draws, dtype=torch.float32, device=x.device).view(-1, 1)
            partner = torch.randperm(x.shape[1], generator=self.gen, device=x.device)
            x = lam.unsqueeze(-1) * x + (1 - lam.unsqueeze(-1)) * x[:, partner]
        out = self.net.forward(x, real.unsqueeze(-1), self.drop if self.uses["dropout"] else None, self.gen)
        rows = self._row_loss(out, target)
        if lam is not None:
            rows = lam * rows + (1 - lam) * self._row_loss(out, target[:, partner])
        return (rows * real).sum(1) / real.sum(1).clamp(min=1)

    def _row_loss(self, out: Tensor, target: Tensor) -> Tensor:
        if self.regression:
            return (out[..., 0] - target) ** 2
        if not self.uses["smoothing"]:  # one fused kernel (and one backward node) instead of five
            return F.cross_entropy(out.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
        logp = F.log_softmax(out, -1)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (1 - self.smoothing) * nll + self.smoothing * (-logp.mean(-1))

    @torch.no_grad()
    def _step(self, grads: tuple[Tensor, ...], lr: Tensor, take: Tensor) -> None:
        """AdamW (decoupled weight decay) or SGD with momentum (L2 in the gradient), per model.

        The gradients are gathered into one (M, P) buffer laid out like `net.flat`, and every update is an
        in-place operation on whole buffers: a few passes over memory, and no fresh multi-megabyte tensor
        per step (on a CPU, allocating one costs more than the arithmetic). The L1 term's gradient,
        l1 * sign(W), is added here rather than traced: |W| has derivative sign(W), 0 at 0. Models outside
        `take` (stopped, or no rows in this batch) get zero-weight updates, which leave them bit for bit as
        they are; only a model whose gradient is not finite (it diverged: it is flagged and its results come
        from before) can turn NaN that way.
        """
        flat, s1, s2, tmp, mask = self.net.flat, self.flat_state, self.flat_state2, self.scratch, take.unsqueeze(1)
        grad = torch.cat([g.flatten(1) for g in grads], 1, out=self.grad_buf)
        if self.uses["l1"]:
            n = self.net.n_weights
            grad[:, :n].addcmul_(torch.sign(flat[:, :n], out=tmp[:, :n]), self.l1.unsqueeze(1))
        if self.uses["clip"]:
            norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
            clip = self.clip.unsqueeze(1)
            grad.mul_(torch.where(clip > 0, (clip / (norm + 1e-6)).clamp(max=1.0), 1.0))
        first = (self.steps == 0).unsqueeze(1)
        self.steps += take.float()
        on, lr_m, wd_m = mask.to(flat.dtype), lr.unsqueeze(1), self.wd.unsqueeze(1)
        if self.cfg.optimizer == "adamw":
            b1, b2 = ADAM_BETAS
            t = self.steps.clamp(min=1).unsqueeze(1)
            s1.lerp_(grad, (1 - b1) * on)
            s2.lerp_(torch.mul(grad, grad, out=tmp), (1 - b2) * on)
            denom = torch.sqrt(s2, out=tmp).mul_(torch.rsqrt(1 - b2**t)).add_(ADAM_EPS)
            flat.mul_(1 - lr_m * wd_m * on)
            flat.addcmul_(torch.div(s1, denom, out=tmp), -lr_m / (1 - b1**t) * on)
        else:
            grad.add_(flat * wd_m)
            s1.copy_(torch.where(mask, torch.where(first, grad, self.cfg.momentum * s1 + grad), s1))
            flat.sub_(lr_m * on * s1)

    @torch.no_grad()
    def _end_epoch(self, running: Tensor, train_loss: Tensor, nonfinite: Tensor) -> None:
        """Evaluate on validation rows, then early stopping and divergence, all on the device."""
        pred, val_loss = self._predict()
        metric = device_metric(self.metric, pred, self.y_valid if not self.regression else self._unscaled_valid(),
                               self.valid_mask.float())
        self.history[:, self.slots, self.epoch] = torch.where(running, torch.stack([train_loss, val_loss, metric]),
                                                              math.nan)
        improved = running & ((val_loss < self.best_loss) | self.select_latest)
        self.best_loss = torch.where(improved, val_loss, self.best_loss)
        self.best_epoch = torch.where(improved, self.epoch + 1, self.best_epoch)
        self.best_pred = torch.where(_per_model(improved, pred), pred, self.best_pred)
        for best, p in zip(self.best_kept, self._kept()):
            best.copy_(torch.where(_per_model(improved, p), p, best))
        self.bad_epochs = torch.where(improved, 0.0, self.bad_epochs + 1)
        self._plateau(improved, running)
        diverged = running & (nonfinite | ~torch.isfinite(val_loss))
        self.diverged_at = torch.where(diverged & (self.diverged_at == 0), self.epoch + 1.0, self.diverged_at)
        self.epochs_run += running.float()
        patience = torch.where(self.select_latest, math.inf, float(self.cfg.patience))
        self.active = running & ~diverged & (self.bad_epochs < patience) & (self.epochs_run < self.max_epochs)

    def _plateau(self, improved: Tensor, running: Tensor) -> None:
        if self.cfg.lr_schedule != "plateau":
            return
        self.plateau_bad = torch.where(improved, 0.0, self.plateau_bad + running.float())
        cut = self.plateau_bad >= max(1, self.cfg.patience // 2)
        self.plateau = torch.where(cut, self.plateau * self.cfg.gamma, self.plateau)
        self.plateau_bad = torch.where(cut, 0.0, self.plateau_bad)

    @torch.no_grad()
    def _predict(self) -> tuple[Tensor, Tensor]:
        """Validation predictions (probabilities or unscaled values) and loss per model."""
        out = self.net.forward(self.x_valid, None, None, None)
        mask = self.valid_mask.float()
        if self.regression:
            loss = (((out[..., 0] - self.y_valid) ** 2) * mask).sum(1) / mask.sum(1).clamp(min=1)
            return out[..., 0] * self.y_scale + self.y_shift, loss
        logp = F.log_softmax(out, -1)
        nll = -logp.gather(-1, self.y_valid.unsqueeze(-1)).squeeze(-1)
        return logp.exp(), (nll * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _unscaled_valid(self) -> Tensor:
        return self.y_valid * self.y_scale + self.y_shift

    # -- control and results --------------------------------------------------------------------------
    def stop(self, models: list[int]) -> None:
        """Freeze models (job positions) from outside (a pruned trial); they keep their best epoch so far.

        A model that already left the batch has finished on its own and stays as it finished.
        """
        live = [int(p) for p in self.slots.tolist()]
        positions = [live.index(m) for m in models if m in live]
        if positions:
            index = torch.tensor(positions, device=self.device)
            self.stopped[index] = self.active[index]
            self.active[index] = False
            self.done = bool(not self.active.any().item())

    def retire(self) -> None:
        """Move the models that stopped out of the batch: their results are final, their compute is saved."""
        active = self.active.tolist()
        if all(active) or not any(active):
            return
        leaving = [m for m, on in enumerate(active) if not on]
        for m, result in zip(leaving, self._results_of(leaving)):
            self.finished[int(self.slots[m])] = result
        keep = torch.tensor([m for m, on in enumerate(active) if on], device=self.device)
        for name in self.PER_MODEL:
            setattr(self, name, getattr(self, name)[keep.cpu().numpy() if name == "mixup" else keep])
        self.net.select(keep)
        self.best_kept = [t[keep] for t in self.best_kept]
        self.M = len(keep)
        self._plan_batches()

    def metric_curves(self) -> np.ndarray:
        return self.history[2, :, : self.epoch].cpu().numpy()

    def results(self) -> list[FitResult]:
        """Results by job position: those that left the batch early, then the rest from the batch."""
        live = self._results_of(list(range(self.M)))
        for m, result in zip(self.slots.tolist(), live):
            self.finished[int(m)] = result
        return [self.finished[i] for i in range(len(self.jobs))]

    def _results_of(self, models: list[int]) -> list[FitResult]:
        """FitResults of batch positions `models`, with their best epoch's predictions (and weights)."""
        history = self.history.cpu().numpy()
        epochs_run = self.epochs_run.long().cpu().tolist()
        best_epoch = self.best_epoch.long().cpu().tolist()
        diverged = self.diverged_at.long().cpu().tolist()
        stopped = self.stopped.cpu().tolist()
        pred = self.best_pred.cpu().numpy()
        y_shift, y_scale = self.y_shift[:, 0].cpu().tolist(), self.y_scale[:, 0].cpu().tolist()
        if self.keep_models and models:  # their best epoch's weights back into the batch, for `export` to read
            index = torch.tensor(models, device=self.device)  # (only theirs: the others may still be training)
            with torch.no_grad():
                for p, best in zip(self._kept(), self.best_kept):
                    p[index] = best[index]
        out = []
        for m in models:
            job = int(self.slots[m])
            n = epochs_run[m]
            out.append(FitResult(
                train_loss=history[0, job, :n], val_loss=history[1, job, :n], val_metric=history[2, job, :n],
                best_epoch=best_epoch[m], epochs_run=n, valid_pred=pred[m, : len(self.jobs[job].valid_rows)],
                diverged_at=diverged[m] or None, stopped=bool(stopped[m]),
                model=self.net.export(m, self.templates[job]) if self.keep_models else None,
                preprocess={k: v[job] for k, v in self.preprocess.items()},
                y_shift=y_shift[m], y_scale=y_scale[m]))
        return out


def schedule_factor(cfg: TrainSpec, epoch: int) -> float:
    """Learning-rate multiplier for a 0-based epoch (plateau is handled per model, on the device)."""
    if cfg.lr_schedule == "step":
        return cfg.gamma ** (epoch // cfg.step_size)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.lr_schedule == "one_cycle":
        warm = max(1, int(0.3 * cfg.epochs))
        if epoch < warm:
            return 0.04 + 0.96 * epoch / warm
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / max(1, cfg.epochs - warm)))
    return 1.0


def _mix_seeds(seeds: object) -> int:
    return hash(tuple(seeds)) % (2**63)  # type: ignore[arg-type]


def _per_model(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))
