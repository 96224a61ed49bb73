"""The epoch loop: M models of one structure trained in lockstep, each as if it were alone.

For the small MLPs this tool targets, a fold fit costs launches and Python, not arithmetic, so M fits
run as one: batched matmuls over a leading model dimension, per-model hyperparameters as (M,) tensors.
Models are independent: each has its own rows (shared index arrays per fold), its own preprocessing
(`preprocess.Transform`, applied to every gathered batch), its own random stream (`rng`, keyed by its
seed), its own optimiser state, early stopping, and a step mask that freezes it when it stops.

Between two reports (`run_epochs`) shapes are static and nothing waits for the host: stopped models
are masked, not removed; counters that change (the epoch) are device tensors; every random number is
a hash computed on the device; every tensor an epoch changes is changed in place (`train_epoch`). Only
at a report boundary (`settle`, `stop`, `retire`, results) does the host read anything back. That is
what a captured CUDA graph (`graphs`) needs, and what keeps a GPU busy.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from foldsweep import rng
from foldsweep.jobs import FitJob, FitResult
from foldsweep.memory import SORT_ROWS, valid_chunk
from foldsweep.model import Dropout, StackedMLP, build_mlp
from foldsweep.preprocess import fit_targets, fit_transform, share_rows
from foldsweep.spec import TrainSpec
from foldsweep.validation import predictions, valid_targets, validate

__all__ = ["ADAM_BETAS", "ADAM_EPS", "PROGRESS_EVERY_S", "SORT_LAST", "BatchTrainer", "ProgressHook",
           "plateau_cuts", "schedule_factor"]

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
# Added to AdamW's second moments under the square root. torch's CPU sqrt takes ~10 ns more for each zero
# or subnormal input (1M values: 0.6 ms; half of them zero: 5.9 ms; all subnormal: 23 ms), and the stacked
# moments hold many (a narrow model's padding in a wide band, gradients too small to square). The floor is
# about 100 times the smallest normal float32 (1.2e-38); its root (1e-18) is under half a float32 ulp of
# ADAM_EPS, so a denominator changes only where the moment was that small and the sum sat at a rounding
# boundary.
_SQRT_FLOOR = 1e-36
PROGRESS_EVERY_S = 1.0
SORT_LAST = 2**33  # a shuffle key above every 32-bit hash: padded positions sort after real ones

# on_progress(done_steps, total_steps, rows_done) over a batch's epochs so far: steps as planned (total_epochs
# x steps per epoch: models that stop end it sooner) and (row, model) pairs gathered, padding included
ProgressHook = Callable[[int, int, int], None]


class BatchTrainer:
    """M models of one structure (`jobs.structure_key`), trained until each stops.

    Per-model tensors have a leading model dimension over the models still in the batch (`slots` maps
    them to job positions); `retire` drops finished models at a report boundary. `history`
    (jobs, epochs, 4: train loss, val loss, metric, plateau factor) and the finished results stay indexed
    by job position.
    The engine computes in X's dtype (float64 X: a float64 engine).
    """

    def __init__(self, X: Tensor, y: Tensor, jobs: list[FitJob], n_classes: int, metric: str, *,
                 keep_models: bool = False, on_progress: ProgressHook | None = None) -> None:
        self.jobs, self.metric, self.n_classes = jobs, metric, n_classes
        self.X, self.y, self.device = X.contiguous(), y, X.device  # (contiguous: batches gather from its flat view)
        self.dtype = X.dtype if X.is_floating_point() else torch.get_default_dtype()
        self.regression = n_classes == 0
        self.cfg = first = jobs[0].train
        self.M = M = len(jobs)
        self.keep_models, self.on_progress = keep_models, on_progress
        self.rows_done = 0  # (row, model) pairs of the epochs done, for `on_progress` (host count)
        self.slots = torch.arange(M, device=self.device)
        self.finished: dict[int, FitResult] = {}
        self.keys = torch.tensor([j.seed for j in jobs], dtype=torch.int64, device=self.device)
        self.train_rows = share_rows([j.train_rows for j in jobs], self.device)
        self.valid_rows = share_rows([j.valid_rows for j in jobs], self.device)
        self.n_train = self.train_rows.n[self.train_rows.of]  # (M,)
        self.transform = fit_transform(X, y, self.train_rows, first, [j.seed for j in jobs])
        self.y_shift, self.y_scale = fit_targets(y, self.train_rows, self.regression, self.dtype)  # (M, 1)
        features = self.transform.features
        n_in = X.shape[1] if features is None else features.shape[1]
        self.templates = [build_mlp(n_in, max(n_classes, 1), j.model, j.seed, self.dtype) for j in jobs]
        self.net = StackedMLP(self.templates, self.device)
        self._hyperparameters(jobs)
        self.targets = valid_targets(y, self.valid_rows, self.regression, self.dtype)
        self._remember_best()
        M_shape = (M,)
        self.flat_state = torch.zeros_like(self.net.flat)  # (M, P): momentum / Adam's first moment
        self.flat_state2 = torch.zeros_like(self.net.flat)  # Adam's second moment
        self.grad_buf, self.scratch = torch.empty_like(self.net.flat), torch.empty_like(self.net.flat)
        self._plan_batches()
        self.steps = self._vec([0.0] * M)
        self.plateau, self.plateau_bad = self._vec([1.0] * M), self._vec([0.0] * M)
        self.active = torch.ones(M_shape, dtype=torch.bool, device=self.device)
        self.stopped = torch.zeros(M_shape, dtype=torch.bool, device=self.device)
        self.best_loss = self._vec([math.inf] * M)
        self.best_epoch, self.diverged_at = (torch.zeros(M_shape, dtype=torch.int64, device=self.device)
                                             for _ in range(2))
        self.bad_epochs, self.epochs_run = self._vec([0.0] * M), self._vec([0.0] * M)
        self.total_epochs = max(j.fixed_epochs or j.train.epochs for j in jobs)
        self.history = torch.full((M, self.total_epochs, 4), math.nan, dtype=self.dtype, device=self.device)
        self.schedule = self._vec([schedule_factor(first, e) for e in range(self.total_epochs)])
        self._replays(jobs)
        self.epoch = 0  # host copy, for the loop; the device's own is `epoch_t`
        self.epoch_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.done = False

    def _vec(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=self.dtype, device=self.device)

    def _replays(self, jobs: list[FitJob]) -> None:
        """Each refit's plateau factors as (M, total_epochs) `replay`, its last one held to the end (ones for
        a model that follows the rule), and which models replay them (`replaying`, (M,))."""
        self.replay = torch.ones((len(jobs), self.total_epochs), dtype=self.dtype, device=self.device)
        for m, job in enumerate(jobs):
            if job.plateau_factors:
                given = self._vec(list(job.plateau_factors[: self.total_epochs]))
                self.replay[m, : len(given)] = given
                self.replay[m, len(given) :] = given[-1]
        self.replaying = torch.tensor([j.plateau_factors is not None for j in jobs], device=self.device)

    def _remember_best(self) -> None:
        """How each model's best epoch is remembered: by its weights (`best_kept`, made again into
        predictions when the fit ends) where they are fewer numbers than its validation predictions, or
        an exported model needs them; else by the predictions themselves (`best_pred`, (M, V[, C]); a
        copy of the weights every epoch would cost more than the epoch of a small table)."""
        n_out, V = max(self.n_classes, 1), self.valid_rows.width
        self.best_by_weights = self.keep_models or V * n_out > self.net.flat.shape[1]
        self.best_kept = [t.clone() for t in self._kept()] if self.best_by_weights else []
        shape = (self.M, 0 if self.best_by_weights else V) + (() if self.regression else (n_out,))
        self.best_pred = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _hyperparameters(self, jobs: list[FitJob]) -> None:
        """Per-model knobs as tensors, and which optional terms any model uses (decided once, on the host)."""
        M = len(jobs)
        self.lr = self._vec([j.train.lr for j in jobs])
        self.wd = self._vec([j.train.weight_decay for j in jobs])
        self.l1 = self._vec([j.train.l1 for j in jobs])
        self.drop = self._vec([j.model.dropout for j in jobs]).view(M, 1, 1)
        self.clip = self._vec([j.train.grad_clip for j in jobs])
        self.noise = self._vec([j.train.noise for j in jobs]).view(M, 1, 1)
        self.smoothing = self._vec([j.train.label_smoothing for j in jobs]).view(M, 1)
        self.mixup = self._vec([j.train.mixup for j in jobs])
        self.max_epochs = self._vec([j.fixed_epochs or j.train.epochs for j in jobs])
        self.select_latest = torch.tensor([j.fixed_epochs is not None for j in jobs], device=self.device)
        self.uses = {"l1": any(j.train.l1 > 0 for j in jobs), "dropout": any(j.model.dropout > 0 for j in jobs),
                     "clip": any(j.train.grad_clip > 0 for j in jobs), "noise": any(j.train.noise > 0 for j in jobs),
                     "mixup": any(j.train.mixup > 0 for j in jobs),
                     "smoothing": any(j.train.label_smoothing > 0 for j in jobs)}

    # every tensor with a leading model dimension over the models in the batch, for `retire`
    PER_MODEL = ("slots", "keys", "n_train", "y_shift", "y_scale", "lr", "wd", "l1", "drop", "clip", "noise",
                 "smoothing", "mixup", "max_epochs", "select_latest", "flat_state", "flat_state2", "grad_buf",
                 "scratch", "steps", "plateau", "plateau_bad", "replay", "replaying", "active", "stopped",
                 "best_loss", "best_epoch", "bad_epochs", "epochs_run", "diverged_at", "best_pred")

    @property
    def params(self) -> list[Tensor]:
        return self.net.params

    @property
    def state(self) -> list[Tensor]:
        """The first-moment (momentum) buffer as one view per parameter tensor."""
        return self.net.views(self.flat_state)

    def _kept(self) -> list[Tensor]:
        """What a model's best epoch is remembered by: its weights and batch-norm statistics (M, ...)."""
        return [self.net.flat, self.net.running_mean, self.net.running_var]

    # -- the loop: no host sync from here to `settle` ------------------------------------------------
    def run_epochs(self, n: int) -> None:
        """Train up to `n` epochs; models that stop meanwhile are masked (shapes stay as they are)."""
        for _ in range(n):
            if self.epoch >= self.total_epochs:
                break
            self.train_epoch()
            self.epoch += 1

    def train_epoch(self) -> None:
        """One epoch on the device; the caller advances the host's `epoch` (`graphs` replays this one).

        Every tensor it changes is changed in place and every tensor it reads was made before it (it binds
        none to the trainer): a replayed CUDA graph reads and writes the addresses it was captured with.
        """
        running = self.active.clone()
        order = self.order()[:, : self.train_width]
        plateau = torch.where(self.replaying, self.replay.index_select(1, self.epoch_t.view(1)).squeeze(1),
                              self.plateau)  # (M,) this epoch's plateau factor: the rule's, or a refit's replayed one
        lr = self.lr * plateau * self.schedule.index_select(0, self.epoch_t.view(1))
        # (steps, M), made before the steps: a small tensor kept from each step would sit above that step's
        # large freed blocks in the C heap and pin them (the process's memory grew with every step)
        loss = torch.empty((len(self.batches), self.M), dtype=self.dtype, device=self.device)
        taken = torch.empty((len(self.batches), self.M), dtype=torch.bool, device=self.device)
        streams = self._streams()
        self._next_progress = time.monotonic() + PROGRESS_EVERY_S
        for step, (start, real, has_rows) in enumerate(self.batches):
            rows = self.train_rows.model_rows(order[:, start : start + self.cfg.batch_size])  # (M, B)
            bases = {kind: base[:, step] for kind, base in streams.items()}
            data_loss = self._batch_loss(self.transform.apply(self.X, rows), self._targets(rows), real, bases)
            take = running & has_rows
            # every model's gradient, used only by those in `take` (see _step); a model whose loss is not
            # finite is flagged as diverged at the end of the epoch, its results from its best epoch before
            grads = torch.autograd.grad(data_loss.sum(), self.params)
            self._step(grads, lr, take)
            loss[step], taken[step] = data_loss.detach(), take
            self._progress(step + 1)
        if self.on_progress is not None:  # (host code: not run by a captured epoch's replays, which report nothing)
            self.rows_done += len(self.batches) * self.cfg.batch_size * self.M
        loss_sum = (torch.where(taken, loss, 0.0) * self.batch_rows).sum(0)
        self._end_epoch(running, loss_sum / self.rows_used, (taken & ~torch.isfinite(loss)).any(0), plateau)

    def order(self) -> Tensor:
        """This epoch's shuffle: (M, N) int32 positions into each model's rows, its own rows first.

        A hash of (model key, epoch, position) sorted: a model's order is its own whatever its batch
        (stable sort on integers: ties, and padding, cannot move it). Made for a few models at a time
        (the int64 keys and the sort's buffers cost ~40 bytes a row while they live) into one int32
        tensor: 4 bytes per training row and model is what stays, for the epoch only.
        """
        width = self.train_rows.width
        out = torch.empty((self.M, width), dtype=torch.int32, device=self.device)
        position = torch.arange(width, device=self.device)
        step = max(1, SORT_ROWS // width)
        for a in range(0, self.M, step):
            keys = rng.bits(rng.stream(self.keys[a : a + step], rng.SHUFFLE, self.epoch_t), width)
            keys = torch.where(position < self.n_train[a : a + step].unsqueeze(1), keys, SORT_LAST)
            out[a : a + step] = keys.argsort(dim=1, stable=True)
        return out

    def _streams(self) -> dict[int, Tensor]:
        """This epoch's random stream bases per kind of draw: (M, steps), dropout (M, steps, depth).

        A base is a hash of (model key, kind, epoch, step[, layer]), computed for every step at once so a
        step only takes a column; the count of steps does not enter it (a model's draws are the same in a
        batch whose largest fold makes more steps).
        """
        S, M = len(self.batches), self.M
        kinds = ([rng.NOISE, rng.NOISE_ANGLE] if self.uses["noise"] else []) + (
            [rng.MIXUP_GAMMA, rng.MIXUP_PARTNER] if self.uses["mixup"] else [])
        out = {kind: rng.steps(rng.stream(self.keys, kind, self.epoch_t), S) for kind in kinds}
        if self.uses["dropout"]:
            depth = self.net.depth
            out[rng.DROPOUT] = rng.steps(rng.stream(self.keys, rng.DROPOUT, self.epoch_t), S * depth).view(M, S, depth)
        return out

    def _plan_batches(self) -> None:
        """Per step of an epoch: where it starts, each model's real rows (M, B) and who has any (M,).

        With batch norm, a batch holding one row of a model is no batch for it (its variance is 0: the
        running variance would be pulled toward 0, and torch refuses such a batch in training): that row
        sits out the step, like `drop_last` for that one batch; the shuffle moves which row it is.
        Steps where every model has a full batch share one mask: only the last steps, where folds of
        different sizes run out, hold their own (masks for every step would cost 4 bytes a row and model).
        """
        self.train_width = width = max(self.train_rows.sizes)
        B, full_up_to = self.cfg.batch_size, min(self.train_rows.sizes)
        position = torch.arange(width, device=self.device)
        self.batches = []
        full: tuple[Tensor, Tensor] | None = None
        for start in range(0, width, B):
            if start + B <= full_up_to and full is not None:
                self.batches.append((start, *full))
                continue
            real = (position[start : start + B].unsqueeze(0) < self.n_train.unsqueeze(1)).to(self.dtype)
            if self.net.batch_norm:
                real = real * (real.sum(1, keepdim=True) != 1)
            self.batches.append((start, real, real.sum(1) > 0))
            if start + B <= full_up_to:
                full = real, self.batches[-1][2]
        self.batch_rows = torch.stack([real.sum(1) for _, real, _ in self.batches])  # (steps, M)
        self.rows_used = self.batch_rows.sum(0).clamp(min=1)  # (M,) rows one epoch trains on
        self._row_hashes = rng.row_hashes(self.cfg.batch_size, self.device)
        self._drop_constants = rng.dropout_threshold(self.drop), 1 / (1 - self.drop)
        self.valid_chunk = valid_chunk(self.X.shape[1], self.net.unit_mask.shape[-1], self.M, self.X.element_size())

    def _targets(self, rows: Tensor) -> Tensor:
        if not self.regression:
            return self.y[rows]
        return (self.y[rows].to(self.dtype) - self.y_shift) / self.y_scale

    def _batch_loss(self, x: Tensor, target: Tensor, real: Tensor, bases: dict[int, Tensor]) -> Tensor:
        """Mean loss over each model's real rows, shape (M,); noise and mixup on training batches only.

        `bases`: this step's stream base (M,) per kind of draw (dropout: (M, depth)), from `_streams`.
        """
        M, B, n_in = x.shape
        if self.uses["noise"]:
            x = x + self.noise * rng.normal(bases[rng.NOISE], bases[rng.NOISE_ANGLE], B, n_in, x.dtype)
        lam = partner = None
        if self.uses["mixup"]:  # lambda ~ Beta(a, a) per model and step; 1 (no mixing) for a model without mixup
            draw = rng.beta(bases[rng.MIXUP_GAMMA], self.mixup.clamp(min=1e-3))
            lam = torch.where(self.mixup > 0, draw, 1.0).view(M, 1)
            keys = rng.bits(bases[rng.MIXUP_PARTNER], B)
            partner = torch.where(real > 0, keys, SORT_LAST).argsort(dim=1, stable=True)  # real rows pair up
            x = lam.unsqueeze(-1) * x + (1 - lam.unsqueeze(-1)) * x.gather(1, partner.unsqueeze(-1).expand_as(x))
        dropout = None
        if self.uses["dropout"]:  # (M, depth, B): one mixing pass for every layer's rows
            rows = rng.mix(bases[rng.DROPOUT].unsqueeze(-1) ^ self._row_hashes[:B])
            dropout = Dropout(rows, *self._drop_constants)
        out = self.net.forward(x, real.unsqueeze(-1), dropout)
        rows = self._row_loss(out, target)
        if lam is not None and partner is not None:
            rows = lam * rows + (1 - lam) * self._row_loss(out, target.gather(1, partner))
        return (rows * real).sum(1) / real.sum(1).clamp(min=1)

    def _row_loss(self, out: Tensor, target: Tensor) -> Tensor:
        if self.regression:
            return (out[..., 0] - target) ** 2
        if not self.uses["smoothing"]:  # one fused kernel (and one backward node) instead of five
            return F.cross_entropy(out.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
        logp = F.log_softmax(out, -1)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (1 - self.smoothing) * nll + self.smoothing * (-logp.mean(-1))

    def _progress(self, done: int) -> None:
        """Tell `on_progress` how far a long epoch is, at most once a second, from the host's clock only."""
        if self.on_progress is None:
            return
        now = time.monotonic()
        if now >= self._next_progress:
            steps = len(self.batches)
            self.on_progress(self.epoch * steps + done, self.total_epochs * steps,
                             self.rows_done + done * self.cfg.batch_size * self.M)
            self._next_progress = now + PROGRESS_EVERY_S

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
        self.steps += take.to(self.dtype)
        on, lr_m, wd_m = mask.to(flat.dtype), lr.unsqueeze(1), self.wd.unsqueeze(1)
        if self.cfg.optimizer == "adamw":
            b1, b2 = ADAM_BETAS
            t = self.steps.clamp(min=1).unsqueeze(1)
            s1.lerp_(grad, (1 - b1) * on)
            s2.lerp_(torch.mul(grad, grad, out=tmp), (1 - b2) * on)
            denom = torch.add(s2, _SQRT_FLOOR, out=tmp).sqrt_().mul_(torch.rsqrt(1 - b2**t)).add_(ADAM_EPS)
            flat.mul_(1 - lr_m * wd_m * on)
            flat.addcmul_(torch.div(s1, denom, out=tmp), -lr_m / (1 - b1**t) * on)
        else:
            grad.add_(flat * wd_m)
            s1.copy_(torch.where(mask, torch.where(first, grad, self.cfg.momentum * s1 + grad), s1))
            flat.sub_(lr_m * on * s1)

    @torch.no_grad()
    def _end_epoch(self, running: Tensor, train_loss: Tensor, nonfinite: Tensor, plateau: Tensor) -> None:
        """Evaluate on validation rows, then early stopping and divergence, all on the device.

        A fixed-epoch model (`select_latest`: a refit) is scored on rows it must never learn from (an outer
        fold's test rows), so nothing it chooses may come from them: its best epoch is its last, it never
        stops early, and it has diverged only if its training loss did. One extreme held-out row can make
        its validation loss inf; counted as divergence, that would refit another configuration.
        """
        pred = None if self.best_by_weights else torch.empty_like(self.best_pred)
        val_loss, metric = validate(self.net, self.transform, self.X, self.valid_rows, self.targets, self.metric,
                                    self.y_shift, self.y_scale, regression=self.regression, chunk=self.valid_chunk,
                                    into=pred)
        values = torch.where(running, torch.stack([train_loss, val_loss, metric, plateau]), math.nan)  # (4, M)
        self.history.index_put_((self.slots, self.epoch_t.expand(self.M)), values.T)
        improved = running & ((val_loss < self.best_loss) | self.select_latest)
        self.best_loss.copy_(torch.where(improved, val_loss, self.best_loss))
        self.best_epoch.copy_(torch.where(improved, self.epoch_t + 1, self.best_epoch))
        if pred is not None:
            torch.where(_per_model(improved, pred), pred, self.best_pred, out=self.best_pred)
        for best, p in zip(self.best_kept, self._kept()):
            torch.where(_per_model(improved, p), p, best, out=best)  # in place: one pass, nothing allocated
        self.bad_epochs.copy_(torch.where(improved, 0.0, self.bad_epochs + 1))
        self._plateau(improved, running)
        diverged = running & (nonfinite | (~self.select_latest & ~torch.isfinite(val_loss)))
        self.diverged_at.copy_(torch.where(diverged & (self.diverged_at == 0), self.epoch_t + 1, self.diverged_at))
        self.epochs_run += running.to(self.dtype)
        patience = torch.where(self.select_latest, math.inf, float(self.cfg.patience))
        self.active.copy_(running & ~diverged & (self.bad_epochs < patience) & (self.epochs_run < self.max_epochs))
        self.epoch_t += 1

    def _plateau(self, improved: Tensor, running: Tensor) -> None:
        if self.cfg.lr_schedule != "plateau":
            return
        self.plateau_bad.copy_(torch.where(improved, 0.0, self.plateau_bad + running.to(self.dtype)))
        cut = self.plateau_bad >= max(1, self.cfg.patience // 2)
        self.plateau.copy_(torch.where(cut, self.plateau * self.cfg.gamma, self.plateau))
        self.plateau_bad.copy_(torch.where(cut, 0.0, self.plateau_bad))

    # -- report boundaries: here the host reads back ------------------------------------------------
    def settle(self) -> None:
        """After `run_epochs`: is every model done (one host sync)?"""
        self.done = bool(not self.active.any().item()) or self.epoch >= self.total_epochs

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
        keep_host = [m for m, on in enumerate(active) if on]
        keep = torch.tensor(keep_host, device=self.device)
        for name in self.PER_MODEL:
            setattr(self, name, getattr(self, name)[keep])
        self.net.select(keep)
        self.train_rows.select(keep, keep_host)
        self.valid_rows.select(keep, keep_host)
        self.transform.select(keep)
        self.best_kept = [t[keep] for t in self.best_kept]
        self.M = len(keep_host)
        self._plan_batches()

    def metric_curves(self) -> np.ndarray:
        """(jobs, epochs so far) of the validation metric, NaN where a model did not train; on the host."""
        return self.history[:, : self.epoch, 2].cpu().numpy()

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
        best_epoch, diverged = self.best_epoch.cpu().tolist(), self.diverged_at.cpu().tolist()
        stopped = self.stopped.cpu().tolist()
        pred = self._best_predictions(models)
        y_shift, y_scale = self.y_shift[:, 0].cpu().tolist(), self.y_scale[:, 0].cpu().tolist()
        if self.keep_models and models:  # their best epoch's weights back into the batch, for `export` to read
            index = torch.tensor(models, device=self.device)  # (only theirs: the others may still be training)
            with torch.no_grad():
                for p, best in zip(self._kept(), self.best_kept):
                    p[index] = best[index]
        out = []
        for i, m in enumerate(models):
            job = int(self.slots[m])
            n = epochs_run[m]
            out.append(FitResult(
                train_loss=history[job, :n, 0], val_loss=history[job, :n, 1], val_metric=history[job, :n, 2],
                best_epoch=best_epoch[m], epochs_run=n, valid_pred=pred[i, : len(self.jobs[job].valid_rows)],
                diverged_at=diverged[m] or None, stopped=bool(stopped[m]), plateau_factor=history[job, :n, 3],
                model=self.net.export(m, self.templates[job]) if self.keep_models else None,
                preprocess=self.transform.stats(m), y_shift=y_shift[m], y_scale=y_scale[m]))
        return out

    def _best_predictions(self, models: list[int]) -> np.ndarray:
        """Validation predictions of batch positions `models` at their best epoch (host, (len, V[, C])):
        kept, or computed again from the weights kept at that epoch as `validate` computed them then."""
        if not models:
            return np.zeros((0, self.valid_rows.width))
        index = torch.tensor(models, device=self.device)
        if not self.best_by_weights:
            return self.best_pred[index].cpu().numpy()
        net = self.net.subset(index, *self.best_kept)
        transform, rows = copy.copy(self.transform), copy.copy(self.valid_rows)
        transform.select(index)
        rows.select(index, models)
        return predictions(net, transform, self.X, rows, self.y_shift[index], self.y_scale[index],
                           regression=self.regression, chunk=self.valid_chunk).cpu().numpy()


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


def plateau_cuts(result: FitResult) -> list[int]:
    """The 0-based epochs, up to the fit's best, that trained at a lower plateau factor than the one before.

    What a refit of the configuration replays (`studies.plateau_replay`); the cuts after the best epoch
    came while the fit no longer improved, and the refit's epoch count does not reach past that epoch.
    """
    factor = result.plateau_factor[: result.best_epoch]
    return [int(e) for e in np.flatnonzero(factor[1:] < factor[:-1]) + 1]


def _per_model(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))
