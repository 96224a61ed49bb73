"""The plain MLP and its stacked form: same init, same forward, same batch norm, exact export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foldsweep.model import MLP, StackedMLP, build_mlp, n_parameters
from foldsweep.spec import ModelSpec

CPU = torch.device("cpu")


def _models(specs: list[ModelSpec], n_in: int = 7, n_out: int = 3) -> list[MLP]:
    return [build_mlp(n_in, n_out, spec, seed=10 + i) for i, spec in enumerate(specs)]


def test_build_mlp_is_seeded_and_leaves_the_global_stream_alone() -> None:
    spec = ModelSpec(width=16, depth=2)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    a = build_mlp(5, 2, spec, seed=3)
    assert torch.equal(torch.rand(3), expected_next)  # fork_rng: the caller's stream is untouched
    b = build_mlp(5, 2, spec, seed=3)
    c = build_mlp(5, 2, spec, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.hidden[0].weight, c.hidden[0].weight)


@pytest.mark.parametrize("init", ["default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_n_parameters_counts_the_module(init: str, batch_norm: bool) -> None:
    spec = ModelSpec(width=9, depth=3, init=init, batch_norm=batch_norm)
    model = build_mlp(11, 4, spec, seed=0)
    assert n_parameters(11, 4, spec) == sum(p.numel() for p in model.parameters())
    if init != "default":
        assert all(torch.count_nonzero(layer.bias) == 0 for layer in model.hidden)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "leaky_relu"])
def test_stacked_forward_equals_each_mlp_with_padding(activation: str) -> None:
    specs = [ModelSpec(width=w, depth=2, activation=activation) for w in (4, 13, 8)]
    models = _models(specs)
    net = StackedMLP(models, CPU)
    assert net.unit_mask.shape == (3, 1, 13)
    x = torch.randn(3, 10, 7)
    out = net.forward(x, None)
    for i, model in enumerate(models):
        torch.testing.assert_close(out[i], model.eval()(x[i]), atol=1e-6, rtol=1e-5)
    # padded units start at zero and carry nothing
    assert torch.count_nonzero(net.weights[0][0, :, 4:]) == 0
    assert torch.count_nonzero(net.weights[1][0, 4:, :]) == 0


def test_padded_units_get_no_gradient() -> None:
    models = _models([ModelSpec(width=3, depth=2), ModelSpec(width=6, depth=2)])
    net = StackedMLP(models, CPU)
    x = torch.randn(2, 5, 7)
    loss = net.forward(x, torch.ones(2, 5, 1)).pow(2).sum() + net.l1_norm().sum()
    grads = torch.autograd.grad(loss, net.params)
    assert torch.count_nonzero(grads[0][0, :, 3:]) == 0  # into padded units
    assert torch.count_nonzero(grads[1][0, 3:, :]) == 0  # out of padded units
    assert torch.count_nonzero(grads[2][0, 3:, :]) == 0
    assert torch.count_nonzero(grads[3][0, 3:]) == 0  # padded biases


def test_l1_norm_covers_linear_weights_only() -> None:
    models = _models([ModelSpec(width=5, depth=2, batch_norm=True), ModelSpec(width=8, depth=2, batch_norm=True)])
    net = StackedMLP(models, CPU)
    for i, model in enumerate(models):
        expected = sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.Linear))
        torch.testing.assert_close(net.l1_norm()[i], expected)


def test_batch_norm_training_matches_torch_and_ignores_padded_rows() -> None:
    models = _models([ModelSpec(width=5, depth=2, batch_norm=True), ModelSpec(width=8, depth=2, batch_norm=True)])
    net = StackedMLP(models, CPU)
    x = torch.randn(2, 12, 7)
    n_real = [12, 9]
    mask = torch.zeros(2, 12, 1)
    for i, n in enumerate(n_real):
        mask[i, :n] = 1
    x[1, 9:] = 1e3  # padded rows: must not move any statistic
    for _ in range(3):
        out = net.forward(x, mask)
    for i, (model, n) in enumerate(zip(models, n_real, strict=True)):
        model.train()
        for _ in range(3):
            expected = model(x[i, :n])
        torch.testing.assert_close(out[i, :n], expected, atol=1e-5, rtol=1e-4)
        for layer, norm in enumerate(model.norms):
            w = norm.num_features
            torch.testing.assert_close(net.running_mean[i, layer, :w], norm.running_mean)
            torch.testing.assert_close(net.running_var[i, layer, :w], norm.running_var)


def test_batch_norm_statistics_skip_a_model_with_no_rows_in_the_batch() -> None:
    """Uneven folds leave the smaller model empty batches at the end of an epoch; they are no data."""
    models = _models([ModelSpec(width=5, depth=1, batch_norm=True), ModelSpec(width=5, depth=1, batch_norm=True)])
    net = StackedMLP(models, CPU)
    net.forward(torch.randn(2, 6, 7), torch.ones(2, 6, 1))
    before_mean, before_var = net.running_mean[1].clone(), net.running_var[1].clone()
    mask = torch.ones(2, 6, 1)
    mask[1] = 0
    net.forward(torch.randn(2, 6, 7), mask)
    assert torch.equal(net.running_mean[1], before_mean)
    assert torch.equal(net.running_var[1], before_var)
    assert not torch.equal(net.running_mean[0], before_mean)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_export_gives_the_stacked_model_back(batch_norm: bool) -> None:
    specs = [ModelSpec(width=w, depth=2, batch_norm=batch_norm, activation="gelu") for w in (6, 11, 3)]
    models = _models(specs)
    net = StackedMLP(models, CPU)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.params:  # move away from the init so the copy is not trivially the template
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for _ in range(4):  # running statistics away from (0, 1)
            net.forward(torch.randn(3, 20, 7, generator=gen) * 2 + 1, torch.ones(3, 20, 1))
    x = torch.randn(3, 15, 7, generator=gen)
    with torch.no_grad():
        out = net.forward(x, None)
    for i, spec in enumerate(specs):
        plain = net.export(i, build_mlp(7, 3, spec, seed=99))
        assert not plain.training
        assert plain.hidden[0].out_features == spec.width
        with torch.no_grad():
            torch.testing.assert_close(plain(x[i]), out[i], atol=1e-5, rtol=1e-5)
