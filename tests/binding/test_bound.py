"""BoundPrior: evaluating the penalty at the bound parameters or at given (effective-weight) tensors."""

import pytest
import torch

from priorzoo import BoundPrior, PriorModel
from priorzoo.prior import BoundPrior as BoundPriorFromPrior


def _prior_and_model(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    names = ["0.weight", "0.bias"]
    params = dict(model.named_parameters())
    mean = {n: torch.randn(params[n].shape, generator=gen) for n in names}
    var = {n: torch.rand(params[n].shape, generator=gen) + 0.5 for n in names}
    fac = {n: torch.randn(2, *params[n].shape, generator=gen) for n in names}
    prior = PriorModel.from_tensors(mean, var, fac, scale=2.0, exclude=["1.*"])
    return prior, model


def test_bound_prior_is_reexported_from_prior_module():
    assert BoundPrior is BoundPriorFromPrior
    assert BoundPrior.__module__ == "priorzoo.binding.bound"


def test_penalty_at_given_tensors_equals_penalty_of_a_model_holding_them():
    prior, model = _prior_and_model()
    bound = prior.bind(model)
    tensors = [torch.randn(p.shape, dtype=torch.float32, requires_grad=True) for p in bound.parameters]
    value = bound.penalty(tensors)
    value.backward()
    with torch.no_grad():
        for p, t in zip(bound.parameters, tensors):
            p.copy_(t)
    assert torch.allclose(value, bound.penalty(), rtol=1e-6)
    ref_value, ref_grads = bound.value_and_grad()
    for t, g in zip(tensors, ref_grads):
        assert torch.allclose(t.grad, g, rtol=1e-5, atol=1e-6)
    v2, g2 = bound.value_and_grad([t.detach() for t in tensors])
    assert torch.allclose(v2, ref_value) and all(torch.allclose(a, b) for a, b in zip(g2, ref_grads))
    assert torch.allclose(bound.log_prob([t.detach() for t in tensors]), bound.log_prob())


def test_gradient_flows_through_an_effective_weight():
    """A LoRA-style effective weight W₀ + B·A: the penalty's gradient reaches B and A by the chain rule."""
    prior, model = _prior_and_model(1)
    bound = prior.bind(model)
    w0 = bound.parameters[0].detach()
    b = torch.randn(4, 1, requires_grad=True)
    a = torch.randn(1, 3, requires_grad=True)
    bound.penalty([w0 + b @ a, bound.parameters[1].detach()]).backward()
    _, grads = bound.value_and_grad([(w0 + b @ a).detach(), bound.parameters[1].detach()])
    assert torch.allclose(b.grad, grads[0] @ a.detach().T, rtol=1e-5)
    assert torch.allclose(a.grad, b.detach().T @ grads[0], rtol=1e-5)


def test_tensors_of_the_wrong_count_or_shape_are_refused():
    prior, model = _prior_and_model()
    bound = prior.bind(model)
    with pytest.raises(ValueError, match="sequence of 2 tensors"):
        bound.penalty([torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="received one tensor"):
        bound.value_and_grad(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"`0.bias` must have shape \(4,\); received \(5,\)"):
        bound.penalty([torch.zeros(4, 3), torch.zeros(5)])
