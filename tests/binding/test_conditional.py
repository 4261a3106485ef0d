"""The frozen rule: frozen blocks are held at their values. The binding of a partly frozen model equals the joint
quadratic form, its gradient is the conditional Gaussian's (dense analytic answer), and only the trained blocks
are evaluated per step."""

from __future__ import annotations

import math

import pytest
import torch

from priorzoo import PriorModel
from priorzoo.binding.conditional import ConditionalBoundPrior
from priorzoo.finetune import PriorRegularizer


def _net_and_prior(rank: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    g = torch.Generator().manual_seed(seed + 1)
    named = dict(net.named_parameters())
    mean = {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for n, p in named.items()}
    var = {n: 0.1 + torch.rand(p.shape, generator=g) for n, p in named.items()}
    factor = {n: 0.5 * torch.randn((rank, *p.shape), generator=g) for n, p in named.items()} if rank else None
    prior = PriorModel.from_tensors(mean, var, factor, scale=2.0, eps=0.01)
    return net, prior


@pytest.mark.parametrize("rank", [0, 3])
def test_partly_frozen_binding_is_the_joint_density_and_the_conditional_gradient(rank):
    net, prior = _net_and_prior(rank)
    net[0].requires_grad_(False)
    net[2].bias.requires_grad_(False)
    bound = prior.bind(net)
    assert isinstance(bound, ConditionalBoundPrior)
    assert bound.frozen_names == ["0.weight", "0.bias", "2.bias"]
    assert [id(p) for p in bound.parameters] == [id(net[1].weight), id(net[1].bias), id(net[2].weight)]
    assert bound.gaussian.numel == 5 * 3 + 3 + 3 * 2  # per step: the trained blocks only

    # dense oracle in float64: Σ, r, the joint value, its log-density and the conditional gradient
    g = prior.gaussian()
    cov = g.dense_covariance()
    w = torch.cat([p.detach().double().reshape(-1) for p in net.parameters()])
    mu = torch.cat([prior.mean[n].double().reshape(-1) for n in prior.names])
    r = w - mu
    prec = torch.linalg.inv(cov)
    assert float(bound.penalty()) == pytest.approx(0.5 * float(r @ prec @ r), rel=1e-6)
    want_logp = torch.distributions.MultivariateNormal(mu, cov).log_prob(w)
    assert float(bound.log_prob()) == pytest.approx(float(want_logp), rel=1e-6)

    sizes = [p.numel() for p in net.parameters()]
    trained = torch.cat([torch.full((n,), p.requires_grad) for n, p in zip(sizes, net.parameters())])
    t, f = trained.nonzero().squeeze(1), (~trained).nonzero().squeeze(1)
    # the conditional N(μ_t + Σ_tf Σ_ff⁻¹ r_f, Σ_tt − Σ_tf Σ_ff⁻¹ Σ_ft): its gradient at w_t equals the joint's
    s_tf_ff = cov[t][:, f] @ torch.linalg.inv(cov[f][:, f])
    mu_c = mu[t] + s_tf_ff @ r[f]
    cov_c = cov[t][:, t] - s_tf_ff @ cov[f][:, t]
    want_grad = torch.linalg.solve(cov_c, w[t] - mu_c)
    value, grads = bound.value_and_grad()
    got = torch.cat([gi.reshape(-1).double() for gi in grads])
    assert torch.allclose(got, want_grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(got, (prec @ r)[t], rtol=1e-4, atol=1e-6)
    bound.penalty().backward()
    assert net[0].weight.grad is None and net[2].bias.grad is None
    assert torch.allclose(torch.cat([p.grad.reshape(-1).double() for p in bound.parameters]), got, rtol=1e-5)
    # the conditional Gaussian the binding evaluates per step is the analytic one
    assert torch.allclose(torch.cat([m.double() for m in bound.gaussian.mean]), mu_c, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bound.gaussian.dense_covariance(), cov_c, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(value))


def test_a_changed_frozen_weight_rebinds():
    net, prior = _net_and_prior()
    net[0].requires_grad_(False)
    reg = PriorRegularizer(prior, net, num_train_examples=10, overlap=False)
    first = reg.bound
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not first.is_current() and reg.bound is not first
    joint = prior.gaussian().half_quad(list(net.parameters()))
    assert float(reg.bound.penalty()) == pytest.approx(float(joint), rel=1e-6)
    net[0].requires_grad_(True)  # unfreezing changes the trained set: re-bound as a plain BoundPrior
    assert type(reg.bound).__name__ == "BoundPrior"


def test_fully_trainable_and_fully_frozen_models_keep_the_plain_binding():
    net, prior = _net_and_prior()
    assert type(prior.bind(net)).__name__ == "BoundPrior"
    net.requires_grad_(False)
    assert type(prior.bind(net)).__name__ == "BoundPrior"


def test_regularizer_step_on_a_partly_frozen_model_matches_autograd_of_the_joint_term():
    net, prior = _net_and_prior()
    net[1].requires_grad_(False)
    reg = PriorRegularizer(prior, net, num_train_examples=7)
    reg.prefetch()  # the background path gives the same gradient
    reg.add_to_grad_()
    got = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    for p in net.parameters():
        p.grad = None
    (prior.gaussian().half_quad(list(net.parameters())) / 7).backward()
    want = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))


def test_evaluating_at_given_tensors_is_the_joint_density():
    net, prior = _net_and_prior()
    net[0].requires_grad_(False)
    bound = prior.bind(net)
    tensors = [p.detach() + 0.1 for p in net.parameters()]
    joint = prior.gaussian()
    assert float(bound.penalty(tensors)) == pytest.approx(float(joint.half_quad(tensors)), rel=1e-6)
    assert float(bound.log_prob(tensors)) == pytest.approx(float(joint.log_prob(tensors)), rel=1e-9)
    value, grads = bound.value_and_grad(tensors)
    assert float(value) == pytest.approx(float(joint.half_quad(tensors)), rel=1e-6)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in tensors]
    with pytest.raises(ValueError, match="one per prior parameter"):
        bound.penalty(tensors[:2])
