"""Baselines: isotropic L2-SP prior and the diagonal empirical-Fisher prior."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from priorzoo import PriorModel
from priorzoo.learn import empirical_fisher, fisher_prior, isotropic_prior


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _ce(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _data(n_batches: int = 3, size: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, generator=gen), torch.randint(0, 2, (size,), generator=gen)) for _ in range(n_batches)
    ]


def test_isotropic_prior_is_l2_sp(tmp_path) -> None:
    net = _net()
    prior = isotropic_prior(net, variance=0.25, exclude="2.*")
    assert prior.kind.value == "isotropic" and prior.rank == 0
    assert prior.names == ["0.weight", "0.bias"]
    assert torch.equal(prior.mean["0.weight"], net[0].weight.detach())
    # penalty = ‖w − w⁰‖² / (2σ²): L2-SP
    with torch.no_grad():
        net[0].weight.add_(0.1)
    assert float(prior.penalty(net).detach()) == pytest.approx(12 * 0.01 / (2 * 0.25), rel=1e-5)
    loaded = PriorModel.from_pretrained(prior.save_pretrained(tmp_path / "p"))
    assert loaded.kind.value == "isotropic" and loaded.config.learning["variance"] == 0.25
    with pytest.raises(ValueError, match="`variance` must be a finite number > 0"):
        isotropic_prior(net, variance=0.0)


def test_empirical_fisher_equals_per_example_squared_gradients() -> None:
    net = _net()
    data = _data()
    fisher, n = empirical_fisher(net, data, _ce, exclude="2.*")
    assert n == 15 and list(fisher) == ["0.weight", "0.bias"]
    expected = torch.zeros_like(net[0].weight)
    for x, y in data:
        for i in range(len(x)):
            net.zero_grad()
            _ce(net, (x[i : i + 1], y[i : i + 1])).backward()
            expected += net[0].weight.grad ** 2
    assert torch.allclose(fisher["0.weight"], expected / 15, rtol=1e-5)
    assert net.training  # mode restored


def test_batch_fisher_uses_batch_size_times_squared_mean_gradient() -> None:
    net = _net()
    data = _data(n_batches=2, size=4)
    fisher, n = empirical_fisher(net, data, _ce, exclude="2.*", per_example=False)
    expected = torch.zeros_like(net[0].bias)
    for batch in data:
        net.zero_grad()
        _ce(net, batch).backward()
        expected += 4 * net[0].bias.grad ** 2
    assert n == 8 and torch.allclose(fisher["0.bias"], expected / 8, rtol=1e-5)


def test_fisher_prior_variance_formula() -> None:
    net = _net()
    data = _data()
    fisher, n = empirical_fisher(net, data, _ce, exclude="2.*")
    prior = fisher_prior(net, data, _ce, exclude="2.*", prior_precision=2.0)
    assert prior.kind.value == "diagonal"
    assert torch.allclose(prior.variance["0.weight"], 1.0 / (n * fisher["0.weight"] + 2.0), rtol=1e-5)
    assert prior.config.learning["num_examples"] == 15
    assert prior.config.exclude == ["2.*"]


def test_fisher_prior_with_precomputed_fisher_is_checked() -> None:
    lin = nn.Linear(2, 1)
    good = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
    p = fisher_prior(lin, fisher=good, num_examples=3, prior_precision=1.0)
    assert p.variance["weight"].tolist() == [[0.25, 0.25]] and p.variance["bias"].tolist() == [1.0]
    with pytest.raises(ValueError, match="`num_examples` must be a positive integer"):
        fisher_prior(lin, fisher=good)
    with pytest.raises(ValueError, match="lacks selected parameter"):
        fisher_prior(lin, fisher={"weight": torch.ones(1, 2)}, num_examples=3)
    with pytest.raises(ValueError, match=r"has shape \(2,\)"):
        fisher_prior(lin, fisher={"weight": torch.ones(2), "bias": torch.zeros(1)}, num_examples=3)
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        fisher_prior(lin, fisher={"weight": -torch.ones(1, 2), "bias": torch.zeros(1)}, num_examples=3)
    with pytest.raises(ValueError, match="needs `loader` and `loss_fn`"):
        fisher_prior(lin)
    with pytest.raises(ValueError, match="`prior_precision` must be a finite number > 0"):
        fisher_prior(lin, fisher=good, num_examples=3, prior_precision=0.0)


def test_fisher_needs_data() -> None:
    with pytest.raises(ValueError, match="no examples"):
        empirical_fisher(_net(), [], _ce)


def test_diagonal_laplace_of_linear_regression_is_exact() -> None:
    """For a linear-Gaussian model the empirical Fisher at the least-squares solution with noise σ² gives
    precision Σ_n x_n² r_n²/σ⁴ per weight; check the prior against that closed form."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, generator=gen)
    y = x @ torch.tensor([1.0, -1.0]) + 0.1 * torch.randn(20, generator=gen)
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.linalg.lstsq(x, y.unsqueeze(1)).solution.T)
    sigma2 = 0.5

    def nll(model: nn.Module, batch) -> torch.Tensor:
        return (0.5 * (model(batch[0]).view(-1) - batch[1]).pow(2) / sigma2).mean()

    prior = fisher_prior(lin, [(x, y)], nll, prior_precision=1e-3)
    r = x @ lin.weight.detach().view(-1) - y
    precision = (x**2 * (r**2).unsqueeze(1)).sum(0) / sigma2**2 + 1e-3
    assert torch.allclose(prior.variance["weight"].view(-1), 1 / precision, rtol=1e-4)
