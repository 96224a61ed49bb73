"""The MLP, as one plain module and as many stacked models trained at once.

`MLP` is the model a user gets back (`fit`, `predict`). `StackedMLP` holds M of them as stacked
tensors with a leading model dimension, so one batched matmul runs every fold of every trial in a
batch; it is initialised by stacking `MLP` instances, so both start from identical weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from foldsweep import rng
from foldsweep.spec import ModelSpec

__all__ = ["ACTIVATIONS", "BN_EPS", "BN_MOMENTUM", "MLP", "Dropout", "StackedMLP", "build_mlp", "n_parameters"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "leaky_relu": F.leaky_relu}
BN_MOMENTUM, BN_EPS = 0.1, 1e-5


@dataclass(frozen=True)
class Dropout:
    """One training step's dropout: `rows` (M, depth, B) hashes of (model key, step, layer, row) from
    `rng`, `threshold` (M, 1, 1) int64 (rate * 2^32) and `scale` (M, 1, 1) = 1 / (1 - rate)."""

    rows: Tensor
    threshold: Tensor
    scale: Tensor


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> dropout, `depth` times, then a linear head."""

    def __init__(self, n_in: int, n_out: int, spec: ModelSpec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.activation = spec.activation
        self.hidden = nn.ModuleList()
        self.norms = nn.ModuleList()
        width_in = n_in
        for _ in range(spec.depth):
            self.hidden.append(nn.Linear(width_in, spec.width, dtype=dtype))
            self.norms.append(nn.BatchNorm1d(spec.width, dtype=dtype) if spec.batch_norm else nn.Identity())
            width_in = spec.width
        self.head = nn.Linear(width_in, n_out, dtype=dtype)
        self.dropout = nn.Dropout(spec.dropout)
        _initialise(self.linears()[:-1], spec.init)

    def linears(self) -> list[nn.Linear]:
        """The hidden layers and the head, in order."""
        return [cast(nn.Linear, layer) for layer in self.hidden] + [self.head]

    def forward(self, x: Tensor) -> Tensor:
        for linear, norm in zip(self.hidden, self.norms):
            x = self.dropout(ACTIVATIONS[self.activation](norm(linear(x))))
        return self.head(x)


def _initialise(layers: list[nn.Linear], init: str) -> None:
    if init == "default":
        return
    fn = getattr(nn.init, f"{init}_")
    for layer in layers:
        if init.startswith("kaiming"):
            fn(layer.weight, nonlinearity="relu")
        else:
            fn(layer.weight)
        nn.init.zeros_(layer.bias)


def build_mlp(n_in: int, n_out: int, spec: ModelSpec, seed: int, dtype: torch.dtype | None = None) -> MLP:
    """A seeded MLP whose weights do not depend on anything else the process has drawn.

    `dtype` (default: torch's default dtype) is the dtype the weights are drawn in, so a float64 model
    starts from the same weights as one built under `torch.set_default_dtype(torch.float64)`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(n_in, n_out, spec, dtype)


class StackedMLP:
    """M MLPs of one depth/activation/batch-norm layout; narrower ones padded with dead units.

    Shapes: weights[l] (M, in, out), biases[l] (M, out); padded units have zero weights and are
    multiplied by `unit_mask` (M, 1, W) after the activation, so they never carry signal or gradient.
    Every trained tensor is a view into one (M, P) buffer, `flat`, so an optimiser updates all of them
    with a handful of whole-buffer operations instead of a handful per tensor; the weights come first,
    so `flat[:, :n_weights]` is what L1 penalises.
    """

    def __init__(self, models: list[MLP], device: torch.device) -> None:
        first = models[0]
        self.activation = first.activation
        self.batch_norm = isinstance(first.norms[0], nn.BatchNorm1d)
        self.depth = len(first.hidden)
        self.n_out = first.head.out_features
        widths = [m.linears()[0].out_features for m in models]
        width = max(widths)
        n_in = first.linears()[0].in_features
        dtype = first.head.weight.dtype
        self.unit_mask = torch.stack([(torch.arange(width) < w).to(dtype) for w in widths]).unsqueeze(1).to(device)
        weights, biases = [], []
        for layer in range(self.depth + 1):
            fan_in = n_in if layer == 0 else width
            fan_out = first.head.out_features if layer == self.depth else width
            linears = [m.linears()[layer] for m in models]
            W = torch.zeros(len(models), fan_in, fan_out, dtype=dtype)
            b = torch.zeros(len(models), fan_out, dtype=dtype)
            for i, lin in enumerate(linears):
                W[i, : lin.in_features, : lin.out_features] = lin.weight.detach().T
                b[i, : lin.out_features] = lin.bias.detach()
            weights.append(W)
            biases.append(b)
        shape = (len(models), self.depth, width)
        norms = [torch.ones(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)]
        trained = [*weights, *biases, *(norms if self.batch_norm else [])]
        self.shapes = [t.shape[1:] for t in trained]
        self.n_weights = sum(w[0].numel() for w in weights)
        self.flat = torch.cat([t.flatten(1) for t in trained], 1).to(device)  # (M, P)
        if not self.batch_norm:  # fixed at identity: not trained, not in `flat`
            self.bn_scale, self.bn_shift = norms[0].to(device), norms[1].to(device)
        self._link()
        self.running_mean = torch.zeros(shape, device=device, dtype=dtype)
        self.running_var = torch.ones(shape, device=device, dtype=dtype)
        self.unit_hashes = rng.column_hashes(width, device)  # dropout masks' unit positions, made once

    def _link(self) -> None:
        """(Re)create the trained tensors as leaf views of `flat`."""
        self._params = [view.requires_grad_() for view in self.views(self.flat)]
        self.weights = self._params[: self.depth + 1]
        self.biases = self._params[self.depth + 1 : 2 * self.depth + 2]
        if self.batch_norm:
            self.bn_scale, self.bn_shift = self._params[2 * self.depth + 2 :]

    @property
    def params(self) -> list[Tensor]:
        return self._params

    def views(self, buffer: Tensor) -> list[Tensor]:
        """A (M, P) buffer laid out like `flat` (optimiser state, gradients) as one view per trained tensor."""
        out, start = [], 0
        for shape in self.shapes:
            size = shape.numel()
            out.append(buffer[:, start : start + size].view(buffer.shape[0], *shape))
            start += size
        return out

    def select(self, keep: Tensor) -> None:
        """Keep only models `keep` (indices), in that order: finished models stop costing compute."""
        self.flat = self.flat[keep]
        self.unit_mask, self.running_mean, self.running_var = (
            self.unit_mask[keep], self.running_mean[keep], self.running_var[keep])
        if not self.batch_norm:
            self.bn_scale, self.bn_shift = self.bn_scale[keep], self.bn_shift[keep]
        self._link()

    def subset(self, keep: Tensor, flat: Tensor, running_mean: Tensor, running_var: Tensor) -> StackedMLP:
        """Models `keep` as a stack of their own holding other weights and statistics (M, ...) for
        them (their best epoch's); this stack is left as it is."""
        part = copy.copy(self)
        part.select(keep)  # rebinds the copy's tensors, never this stack's
        part.flat, part.running_mean, part.running_var = flat[keep], running_mean[keep], running_var[keep]
        part._link()
        return part

    def forward(self, x: Tensor, row_mask: Tensor | None, dropout: Dropout | None = None) -> Tensor:
        """x (M, B, F) -> logits (M, B, C). `row_mask` (M, B, 1) marks real rows (training only).

        `dropout`: each model's keep mask is a hash of its own key, step, layer, row and unit (`rng`), the
        same whoever shares its batch.
        """
        h = x
        for layer in range(self.depth):
            h = torch.baddbmm(self.biases[layer].unsqueeze(1), h, self.weights[layer])  # (M, B, W)
            if self.batch_norm:
                h = self._batch_norm(h, layer, row_mask)
            h = ACTIVATIONS[self.activation](h) * self.unit_mask
            if dropout is not None:  # the scaled keep mask is made outside autograd
                h = h * rng.keep_mask(dropout.rows[:, layer], self.unit_hashes, dropout.threshold, dropout.scale)
        return torch.baddbmm(self.biases[-1].unsqueeze(1), h, self.weights[-1])

    def _batch_norm(self, h: Tensor, layer: int, row_mask: Tensor | None) -> Tensor:
        if row_mask is None:  # evaluation: running statistics
            mean, var = self.running_mean[:, layer].unsqueeze(1), self.running_var[:, layer].unsqueeze(1)
        else:
            n = row_mask.sum(1, keepdim=True).clamp(min=1)  # (M, 1, 1)
            mean = (h * row_mask).sum(1, keepdim=True) / n
            var = (((h - mean) * row_mask) ** 2).sum(1, keepdim=True) / n
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp(min=1)
                # a model with no rows in this batch (uneven folds, last batches) keeps its statistics
                momentum = BN_MOMENTUM * (row_mask.sum(1) > 0).to(h.dtype)  # (M, 1)
                # (the trainer never hands a model a batch of one row: its variance would be 0, see _plan_batches)
                self.running_mean[:, layer].lerp_(mean.squeeze(1), momentum)
                self.running_var[:, layer].lerp_(unbiased.squeeze(1), momentum)
        normed = (h - mean) / torch.sqrt(var + BN_EPS)
        return normed * self.bn_scale[:, layer].unsqueeze(1) + self.bn_shift[:, layer].unsqueeze(1)

    def l1_norm(self) -> Tensor:
        """Sum of |weights| per model (biases and batch-norm excluded), shape (M,)."""
        return sum(W.abs().sum(dim=(1, 2)) for W in self.weights)  # type: ignore[return-value]

    def export(self, index: int, template: MLP) -> MLP:
        """Model `index` as a plain MLP (its real width, no padding), for saving and prediction."""
        model = template
        with torch.no_grad():
            for layer, lin in enumerate(model.linears()):
                lin.weight.copy_(self.weights[layer][index, : lin.in_features, : lin.out_features].T.cpu())
                lin.bias.copy_(self.biases[layer][index, : lin.out_features].cpu())
            for layer, norm in enumerate(model.norms):
                if isinstance(norm, nn.BatchNorm1d):
                    assert norm.running_mean is not None and norm.running_var is not None  # tracked by default
                    w = norm.num_features
                    norm.weight.copy_(self.bn_scale[index, layer, :w].cpu())
                    norm.bias.copy_(self.bn_shift[index, layer, :w].cpu())
                    norm.running_mean.copy_(self.running_mean[index, layer, :w].cpu())
                    norm.running_var.copy_(self.running_var[index, layer, :w].cpu())
        return model.eval()


def n_parameters(n_in: int, n_out: int, spec: ModelSpec) -> int:
    widths = [n_in] + [spec.width] * spec.depth + [n_out]
    return sum(a * b + b for a, b in zip(widths, widths[1:])) + (2 * spec.width * spec.depth if spec.batch_norm else 0)

