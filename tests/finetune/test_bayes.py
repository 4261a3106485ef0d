"""BMA averages predictive probabilities (hand computation for S = 2, BN statistics refreshed per sample),
downstream SWAG, and SGLD's noise scale and stationary distribution."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _models import tiny_timm

from priorzoo import PriorModel
from priorzoo.finetune import SGLD, DownstreamSWAG, bma_predict
from priorzoo.finetune.bayes import (
    PredictiveAverager,
    average_predictive,
    has_batchnorm,
    refresh_batchnorm_,
    sample_into_,
)
from priorzoo.finetune.loop import train_step


def _loaders(seed: int = 0, n_eval: int = 6, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_eval, 3, size, size, generator=g)
    y = torch.tensor([i % 3 for i in range(n_eval)])
    eval_loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    bn_x = torch.randn(8, 3, size, size, generator=g) * 2 + 0.5
    bn_loader = [(bn_x[:4], y[:4]), (bn_x[4:], y[4:])]
    return eval_loader, bn_loader, x, y, bn_x


def _posterior_for(model: torch.nn.Module, variance: float = 1e-3, rank: int = 2) -> PriorModel:
    g = torch.Generator().manual_seed(7)
    params = dict(model.named_parameters())
    return PriorModel.from_tensors(
        {n: p.detach().clone() for n, p in params.items()},
        {n: torch.full_like(p, variance) for n, p in params.items()},
        {n: 0.01 * torch.randn((rank, *p.shape), generator=g) for n, p in params.items()},
    )


def test_average_predictive_is_the_mean_of_probabilities():
    p1 = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    p2 = torch.tensor([[0.5, 0.5], [0.6, 0.4]])
    avg = average_predictive([p1, p2])
    torch.testing.assert_close(avg, torch.tensor([[0.7, 0.3], [0.4, 0.6]]))
    torch.testing.assert_close(avg.sum(dim=1), torch.ones(2))
    with pytest.raises(ValueError):
        average_predictive([])


def test_bma_with_batchnorm_equals_hand_computation_for_two_samples():
    pytest.importorskip("timm")
    model = tiny_timm()
    assert has_batchnorm(model)
    posterior = _posterior_for(model)
    eval_loader, bn_loader, x, _, bn_x = _loaders()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    avg = bma_predict(
        model,
        posterior,
        {"test": eval_loader},
        num_samples=2,
        bn_loader=bn_loader,
        generator=torch.Generator().manual_seed(11),
    )
    probs = avg.probabilities("test")
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(6, dtype=probs.dtype))
    # the model is restored: parameters and BN buffers
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k

    # by hand: draw the same two samples, recompute BN statistics from scratch, average the softmaxes
    gen = torch.Generator().manual_seed(11)
    manual = []
    for _ in range(2):
        draw = posterior.sample(gen)
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(draw[n])
        bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        m.train()
        with torch.no_grad():
            m(bn_x[:4])
            m(bn_x[4:])
            m.eval()
            manual.append(torch.softmax(m(x).double(), dim=1))
    expected = (manual[0] + manual[1]) / 2
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    assert avg.num_samples == 2
    # and the refresh mattered: the stored (stale) statistics give other predictions
    with torch.no_grad():
        stale = torch.softmax(model.eval()(x).double(), dim=1)
    assert float((stale - manual[0]).abs().max()) > 1e-3


def test_batchnorm_model_without_bn_loader_is_refused():
    pytest.importorskip("timm")
    model = tiny_timm()
    eval_loader, *_ = _loaders()
    with pytest.raises(ValueError, match="bn_loader"):
        bma_predict(model, _posterior_for(model), eval_loader, num_samples=1)
    with pytest.raises(ValueError, match="num_samples"):
        bma_predict(model, _posterior_for(model), eval_loader, num_samples=0)


def test_refresh_batchnorm_equals_cumulative_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    data = [(torch.randn(5, 3), torch.zeros(5).long()) for _ in range(3)]
    assert refresh_batchnorm_(model, data)
    with torch.no_grad():
        h = torch.cat([model[0](x) for x, _ in data])
    torch.testing.assert_close(model[1].running_mean, h.mean(0))
    assert model[1].momentum == 0.1 and model.training  # settings restored
    assert not refresh_batchnorm_(torch.nn.Linear(2, 2), data)


def test_predictive_averager_refuses_shuffled_eval_loaders():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    calls = iter([torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 0])])

    class Shuffled:
        def __iter__(self):
            yield (x, next(calls))

    avg = PredictiveAverager(Shuffled())
    avg.add(lin)
    with pytest.raises(RuntimeError, match="shuffle"):
        avg.add(lin)


def test_downstream_swag_posterior_covers_the_head_and_predicts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swag = DownstreamSWAG(model, rank=3)
    for step in range(12):
        train_step(model, (x[step % 4 * 8 : step % 4 * 8 + 8], y[step % 4 * 8 : step % 4 * 8 + 8]), opt)
        if step >= 7:
            swag.collect()
    post = swag.posterior()
    assert post.names == [n for n, _ in model.named_parameters()]  # head `2.*` included
    assert post.rank == 3
    avg = swag.predict({"eval": [(x, y)]}, num_samples=4, generator=torch.Generator().manual_seed(0))
    probs = avg.probabilities("eval")
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(32, dtype=probs.dtype))
    m = avg.metrics("eval")
    assert m["num_samples"] == 4 and 0 <= m["ece"] <= 1
    # samples differ from the mean: the posterior has spread
    before = [p.detach().clone() for p in model.parameters()]
    sample_into_(model, post, torch.Generator().manual_seed(1))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------------- SGLD
def test_sgld_update_is_gradient_step_plus_noise_of_the_documented_scale():
    n_coords = 200_000
    w = torch.nn.Parameter(torch.zeros(n_coords))
    lr, n, temp = 0.05, 400, 0.5
    opt = SGLD([w], lr=lr, num_train_examples=n, temperature=temp, generator=torch.Generator().manual_seed(0))
    w.grad = torch.full((n_coords,), 2.0)
    opt.step()
    step = w.detach()
    expected_std = math.sqrt(2 * lr * temp / n)
    assert float(step.mean()) == pytest.approx(-lr * 2.0, abs=5 * expected_std / math.sqrt(n_coords))
    assert float(step.std()) == pytest.approx(expected_std, rel=0.01)
    assert SGLD.noise_std(opt.param_groups[0]) == pytest.approx(expected_std)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_sgld_samples_the_tempered_gaussian_posterior(temperature):
    """U(w) = N·ℓ(w) with ℓ = (w − m)²/(2Nσ²): the tempered posterior is N(m, σ²T)."""
    n, sigma2, m, chains = 100, 0.5, 1.5, 20_000
    w = torch.nn.Parameter(torch.zeros(chains))
    opt = SGLD([w], lr=0.5, num_train_examples=n, temperature=temperature, generator=torch.Generator().manual_seed(1))
    for _ in range(1500):
        w.grad = (w.detach() - m) / (n * sigma2)
        opt.step()
    samples = w.detach()
    # the discretised chain is an AR(1) with a = 1 − lr/(Nσ²): stationary variance (2·lr·T/N)/(1 − a²)
    # = σ²T/(1 − lr/(2Nσ²)) = 1.005·σ²T here, inside the 5% tolerance (sampling error ≈ 1%)
    assert float(samples.mean()) == pytest.approx(m, abs=0.03)
    assert float(samples.var()) == pytest.approx(sigma2 * temperature, rel=0.05)


def test_sgld_bad_arguments():
    w = torch.nn.Parameter(torch.zeros(2))
    for kwargs in ({"lr": 0.0}, {"lr": -1.0}, {"temperature": 0.0}, {"temperature": float("nan")}):
        args = {"lr": 0.1, "num_train_examples": 10, **kwargs}
        with pytest.raises(ValueError):
            SGLD([w], **args)


def test_downstream_swag_includes_the_task_head_of_timm_models():
    pytest.importorskip("timm")
    swag = DownstreamSWAG(tiny_timm(), rank=2)
    assert {"fc.weight", "fc.bias"} <= set(swag.collector.names)
