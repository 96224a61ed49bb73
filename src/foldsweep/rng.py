"""Counter-based random streams: every model draws from its own key, whoever its batch-mates are.

A fit must be a pure function of its configuration and seed. One generator shared by a batch breaks
that (a model's draws depend on how many numbers its mates took first), so every draw here is a hash
of (model key, stream, epoch, step, element coordinates), evaluated in a few integer kernels for all
models at once. Nothing is drawn on the host and no generator state advances, so a CUDA graph can
replay an epoch: the only changing input is the epoch counter, a device tensor.

The mixer is MurmurHash3's 32-bit finaliser in int64 arithmetic masked to 32 bits (a torch int64
multiply wraps, and the mask keeps the low 32 bits exact; every op used exists for int64 on a CPU and
on CUDA, which lack most uint32/uint64 kernels). Element coordinates enter as (row, column) hashed in
two stages, never as a flat index, so a model's draws do not depend on how wide its batch's padding is
(a model padded to a wider mate sees the same numbers on its own units). Every coordinate goes through
the full finaliser: the element stage mixes (row hash ^ column hash) again, for uniform draws and dropout
masks alike. One weaker round there (a multiply and a shift) left fixed pairs of hidden units correlated
under every key (units 17 and 42 at rate 0.5: +0.24). Worked in place, the full finaliser costs about
what that round did (a (32, 128, 256) mask on one CPU core: 6.9 vs 6.1 ms quiet, 13 vs 19 ms loaded).

Shapes: `key` (M,) int64 (each model's seed); `base` (M,) int64, a key mixed with a stream and
counters; draws are (M, rows, cols) or (M, n).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DROPOUT", "GAMMA_CANDIDATES", "MASK32", "MIXUP_GAMMA", "MIXUP_PARTNER", "NOISE", "NOISE_ANGLE",
           "SHUFFLE", "beta", "bits", "column_hashes", "dropout_threshold", "gamma", "keep_mask", "mix", "normal",
           "row_hashes", "steps", "stream", "uniform"]

MASK32 = 0xFFFFFFFF
_GOLDEN, _ROW, _COL = 0x9E3779B9, 0x85EBCA77, 0xC2B2AE3D
# stream ids: one per kind of draw, so no two uses of a model's key ever see the same numbers
SHUFFLE, DROPOUT, NOISE, NOISE_ANGLE, MIXUP_GAMMA, MIXUP_PARTNER = 1, 2, 3, 4, 5, 6
GAMMA_CANDIDATES = 12  # Marsaglia-Tsang accepts a candidate with p > 0.95: all 12 fail with p < 1e-15


def mix(x: Tensor) -> Tensor:
    """MurmurHash3 fmix32 of int64 values in [0, 2^32): a bijection with full avalanche (`x` is left as it is)."""
    return _mix_in_place(x.clone())


def _mix_in_place(h: Tensor) -> Tensor:
    """fmix32 written into `h`, a tensor the caller owns: no (M, B, W) temporaries beyond one shift's."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h &= MASK32
    h ^= h >> 13
    h *= 0xC2B2AE35
    h &= MASK32
    h ^= h >> 16
    return h


def _element_bits(per_row: Tensor, columns: Tensor) -> Tensor:
    """(M, rows, cols) hashes of (row, column) from fully mixed row hashes (M, rows) and column hashes (cols,)."""
    return _mix_in_place(per_row.unsqueeze(-1) ^ columns)


def stream(key: Tensor, kind: int, *counters: Tensor | int) -> Tensor:
    """(M,) base for one kind of draw at given counters (epoch, step, layer): int or 0-d device tensors."""
    h = mix((key & MASK32) ^ (kind * _GOLDEN & MASK32))
    for counter in counters:
        h = mix((h + counter * _GOLDEN) & MASK32)
    return h


def steps(base: Tensor, n: int) -> Tensor:
    """(M, n) bases, one per step (or step and layer) of an epoch, from one (M,) base: one kernel each."""
    return mix((base.unsqueeze(1) + torch.arange(n, device=base.device) * _GOLDEN) & MASK32)


def row_hashes(n: int, device: torch.device) -> Tensor:
    """(n,) hashes of row positions, computed once and combined with a base per step."""
    return mix(torch.arange(n, device=device) * _ROW & MASK32)


def column_hashes(n: int, device: torch.device) -> Tensor:
    """(n,) hashes of column positions (units, features)."""
    return mix(torch.arange(n, device=device) * _COL & MASK32)


def keep_mask(per_row: Tensor, columns: Tensor, threshold: Tensor, scale: Tensor) -> Tensor:
    """Scaled dropout masks (M, B, W): `scale` (= 1 / (1 - rate)) with probability 1 - rate, else 0.

    `per_row` (M, B): fully mixed hashes of (model, step, layer, row), from `mix(base ^ row_hashes)`;
    `columns` (W,) from `column_hashes`; `threshold` (M, 1, 1) int64 = rate * 2^32. The (M, B, W) stage,
    the costly one, is the same full finaliser as `bits` (in place), compared as an integer.
    """
    return torch.where(_element_bits(per_row, columns) >= threshold, scale, 0.0)


def dropout_threshold(rate: Tensor) -> Tensor:
    """The int64 threshold `keep_mask` compares with: a hash below rate * 2^32 drops the unit."""
    return (rate.double() * 2.0**32).to(torch.int64)


def bits(base: Tensor, rows: int, cols: int | None = None) -> Tensor:
    """32-bit hashes: (M, rows) from (model, row), or (M, rows, cols) from (model, row, column)."""
    index = torch.arange(rows, device=base.device)
    per_row = mix((base.unsqueeze(1) + index * _ROW) & MASK32)
    if cols is None:
        return per_row
    return _element_bits(per_row, column_hashes(cols, base.device))


def uniform(base: Tensor, rows: int, cols: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform draws in (0, 1] with 24 bits (never 0: safe under log), shape (M, rows[, cols])."""
    return ((bits(base, rows, cols) >> 8) + 1).to(dtype) * 2.0**-24


def normal(base_radius: Tensor, base_angle: Tensor, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """Standard normal draws by Box-Muller from two streams, shape (M, rows, cols)."""
    radius = torch.sqrt(-2.0 * torch.log(uniform(base_radius, rows, cols, dtype)))
    return radius * torch.cos(2 * math.pi * uniform(base_angle, rows, cols, dtype))


def beta(base: Tensor, alpha: Tensor) -> Tensor:
    """One Beta(alpha, alpha) draw per model, shape (M,), alpha (M,) > 0, as G1 / (G1 + G2)."""
    g = gamma(base, alpha.unsqueeze(1).expand(-1, 2))  # (M, 2)
    return g[:, 0] / (g[:, 0] + g[:, 1]).clamp(min=torch.finfo(g.dtype).tiny)


def gamma(base: Tensor, shape: Tensor) -> Tensor:
    """Gamma(shape, 1) draws, shape (M, n), by Marsaglia-Tsang with a fixed number of candidates.

    No host loop: GAMMA_CANDIDATES candidates are drawn at once and the first accepted one kept (all
    failing, p < 1e-15, falls back to the last candidate). Shapes below 1 use Gamma(a + 1) * U^(1/a).
    """
    M, n = shape.shape
    k = GAMMA_CANDIDATES
    boosted = shape < 1
    a = torch.where(boosted, shape + 1, shape)
    d = (a - 1 / 3).unsqueeze(-1)  # (M, n, 1)
    c = 1 / torch.sqrt(9 * d)
    # 3 uniforms per candidate (two for the normal, one to accept) + 1 for the boost, per (model, draw)
    u = uniform(base, n, 3 * k + 1, shape.dtype)  # (M, n, 3k + 1)
    z = torch.sqrt(-2 * torch.log(u[..., :k])) * torch.cos(2 * math.pi * u[..., k : 2 * k])
    v = (1 + c * z) ** 3
    log_v = torch.log(v.clamp(min=torch.finfo(v.dtype).tiny))
    accept = (v > 0) & (torch.log(u[..., 2 * k : 3 * k]) < 0.5 * z**2 + d - d * v + d * log_v)
    accept[..., -1] = True  # the fallback (p < 1e-15): the last candidate, clamped positive below
    first = accept.to(torch.int8).argmax(-1, keepdim=True)  # index of the first accepted candidate
    draw = (d * v.clamp(min=0)).gather(-1, first).squeeze(-1)  # (M, n)
    boost = u[..., -1] ** (1 / shape)
    return torch.where(boosted, draw * boost, draw)
