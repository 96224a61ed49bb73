"""The on-device AUC against sklearn's, ties included (it feeds the pruners and the learning curves)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from foldsweep.metrics import auc

# float32 in, float32 out: the rank sums are exact (int64) and the one division is done in float64, so
# the only error is rounding the result to float32, at most half an ulp below 1 (2^-25 = 3e-8)
FLOAT32_ATOL = 2**-24


def _padded(scores: list[np.ndarray], labels: list[np.ndarray], dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, V) scores, labels and masks; padding holds garbage (a high score, class 1) that must not count."""
    width = max(len(s) for s in scores)
    score = torch.full((len(scores), width), 0.99, dtype=dtype)
    y = torch.ones((len(scores), width), dtype=torch.int64)
    mask = torch.zeros((len(scores), width), dtype=dtype)
    for m, (s, t) in enumerate(zip(scores, labels)):
        score[m, : len(s)], y[m, : len(t)], mask[m, : len(s)] = torch.as_tensor(s, dtype=dtype), torch.as_tensor(t), 1
    return score, y, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auc_uses_mid_ranks_for_ties_as_sklearn_does(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(4)
    sizes = [30, 17, 400, 9, 1000]
    labels = [rng.integers(0, 2, n) for n in sizes]
    for t in labels:
        t[:2] = [0, 1]  # both classes in every model
    scores = [rng.random(30).round(1),  # many ties
              np.full(17, 0.3),  # a constant score: 0.5 (a model that has not learnt anything yet)
              rng.random(400),  # no ties
              np.where(labels[3] == 1, 0.7, 0.2),  # perfectly separated, with ties inside each class
              rng.integers(0, 5, 1000) / 4]  # five values among a thousand rows
    got = auc(*_padded(scores, labels, dtype))
    assert got.dtype == dtype
    # sklearn on the very values the device ranked (float32 scores widened exactly), so ties are the same
    expected = [skm.roc_auc_score(t, np.asarray(torch.as_tensor(s, dtype=dtype), dtype=np.float64))
                for s, t in zip(scores, labels)]
    assert expected[1] == 0.5 and expected[3] == 1.0
    atol = FLOAT32_ATOL if dtype == torch.float32 else 1e-15
    np.testing.assert_allclose(got.numpy().astype(np.float64), expected, rtol=0, atol=atol)


def test_auc_is_exact_on_many_rows_in_float32() -> None:
    """120,000 rows: the rank sums (~5e9) would lose digits as float32 sums; counted in int64 they do not."""
    rng = np.random.default_rng(5)
    t = rng.integers(0, 2, 120_000)
    s = (rng.random(120_000) * 0.5 + 0.3 * t).round(3).astype(np.float32)
    got = auc(*_padded([s], [t], torch.float32))
    assert abs(got.item() - skm.roc_auc_score(t, s.astype(np.float64))) <= FLOAT32_ATOL


def test_auc_of_rows_of_one_class_is_one_half() -> None:
    """As the host's `metrics.score` says for a fold with one class (AUC is undefined there)."""
    got = auc(*_padded([np.array([0.1, 0.4, 0.8]), np.array([0.2, 0.9])], [np.ones(3, int), np.zeros(2, int)],
                       torch.float32))
    np.testing.assert_array_equal(got.numpy(), [0.5, 0.5])
