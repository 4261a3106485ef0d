"""The learned scales of the data-emphasized ELBO (priorzoo.finetune.learned_scale): the closed-form λ_g is the
minimiser of the KL objective (dense torch reference at small P), tr(S⁻¹) by Woodbury equals the dense trace, the
gradients equal autograd's through a dense KL, λ grows with the distance of the task's solution from the prior
mean, the regulariser/loop entry points, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, kl_divergence

from priorzoo import PriorModel
from priorzoo.finetune import PriorRegularizer, fit
from priorzoo.finetune.learned_scale import LearnedScale, group_of, trace_inverse

P_IN, P_OUT = 3, 4  # a Linear(3, 4) backbone layer: P = 16 prior weights


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(P_IN, P_OUT), torch.nn.Tanh(), torch.nn.Linear(P_OUT, 2))


def _prior(net: torch.nn.Module, kind: str, *, scale: float = 1.0, eps: float = 0.0, seed: int = 1) -> PriorModel:
    """A prior over the first layer (`0.*`) with a mean away from the weights; the head `2.*` is excluded."""
    g = torch.Generator().manual_seed(seed)
    mean = {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for n, p in net.named_parameters() if n[0] == "0"}
    if kind == "isotropic":
        variance: dict | float = 0.5
    else:
        variance = {n: 0.1 + torch.rand(m.shape, generator=g) for n, m in mean.items()}
    factor = {n: 0.4 * torch.randn(3, *m.shape, generator=g) for n, m in mean.items()} if kind == "lowrank" else None
    return PriorModel.from_tensors(mean, variance=variance, cov_factor=factor, scale=scale, eps=eps, exclude=["2.*"])


def _set_sigma(learned: LearnedScale, sigma: float) -> None:
    with torch.no_grad():
        learned.rho.fill_(sigma + math.log(-math.expm1(-sigma)))


def _dense_shape(prior: PriorModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, S) dense, float64, S = Σ/λ₀ = diag(v) + FᵀF + (ε/λ₀)I over the prior's flattened parameters."""
    names = prior.names
    mu = torch.cat([prior.mean[n].reshape(-1) for n in names]).double()
    v = torch.cat([prior.variance[n].reshape(-1) for n in names]).double()
    s = torch.diag(v + prior.eps / prior.scale)
    if prior.cov_factor is not None:
        f = torch.cat([prior.cov_factor[n].reshape(prior.rank, -1) for n in names], dim=1).double()
        s = s + f.T @ f
    return mu, s


def _flat(net: torch.nn.Module, prefix: str) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for n, p in net.named_parameters() if n.startswith(prefix)]).double()


def _dense_kl(wbar: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    q = MultivariateNormal(wbar, covariance_matrix=sigma**2 * torch.eye(len(wbar), dtype=torch.float64))
    return kl_divergence(q, MultivariateNormal(mu, covariance_matrix=cov))


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "lowrank"])
@pytest.mark.parametrize(("scale", "eps"), [(1.0, 0.0), (50.0, 0.2)])
def test_closed_form_scale_is_the_minimiser_of_the_kl(kind, scale, eps):
    net = _net()
    prior = _prior(net, kind, scale=scale, eps=eps)
    learned = LearnedScale(prior, net, num_train_examples=10)
    sigma = 0.07
    _set_sigma(learned, sigma)
    mu, shape = _dense_shape(prior)
    wbar = _flat(net, "0.")
    sig = torch.tensor(sigma, dtype=torch.float64)
    # minimise KL(q ‖ N(μ, λS)) over log λ numerically (golden section on a bracket, then Newton-free polish)
    lo, hi = math.log(1e-6), math.log(1e6)
    gr = (math.sqrt(5) - 1) / 2
    f = lambda t: float(_dense_kl(wbar, sig, mu, math.exp(t) * shape))  # noqa: E731
    a, b = lo, hi
    for _ in range(200):
        c, d = b - gr * (b - a), a + gr * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    numeric = math.exp((a + b) / 2)
    assert learned.scales["backbone"] == pytest.approx(numeric, rel=1e-6)
    # and the same λ by the formula, written with the dense inverse
    r = wbar - mu
    s_inv = torch.linalg.inv(shape)
    formula = float((r @ s_inv @ r + sigma**2 * torch.trace(s_inv)) / len(r))
    assert learned.scales["backbone"] == pytest.approx(formula, rel=1e-6)
    # the head: a zero-mean isotropic prior N(0, λ_head I)
    head = _flat(net, "2.")
    assert learned.scales["head"] == pytest.approx(float((head @ head + sigma**2 * len(head)) / len(head)), rel=1e-6)


def test_low_rank_prior_against_torch_low_rank_normal():
    """The KL value the step returns equals torch's LowRankMultivariateNormal KL at the learned λ (divided by D)."""
    net = _net()
    prior = _prior(net, "lowrank")
    learned = LearnedScale(prior, net, num_train_examples=10)
    _set_sigma(learned, 0.05)
    kl_over_d = learned.add_to_grad_()  # no sample drawn: the step is taken at w̄
    lam = learned.scales
    # add_to_grad_ stepped σ; the KL was computed with σ = 0.05
    sig = torch.tensor(0.05, dtype=torch.float64)
    names = prior.names
    mu = torch.cat([prior.mean[n].reshape(-1) for n in names]).double()
    v = torch.cat([prior.variance[n].reshape(-1) for n in names]).double()
    f = torch.cat([prior.cov_factor[n].reshape(3, -1) for n in names], dim=1).double()
    lr_prior = LowRankMultivariateNormal(mu, math.sqrt(lam["backbone"]) * f.T, lam["backbone"] * v)
    wbar = _flat(net, "0.")
    q = MultivariateNormal(wbar, covariance_matrix=sig**2 * torch.eye(len(wbar), dtype=torch.float64))
    head = _flat(net, "2.")
    kl_head = _dense_kl(head, sig, torch.zeros_like(head), lam["head"] * torch.eye(len(head), dtype=torch.float64))
    expected = (float(kl_divergence(q, lr_prior)) + float(kl_head)) / (len(wbar) + len(head))
    assert float(kl_over_d) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "lowrank"])
def test_gradients_equal_autograd_through_the_dense_kl(kind):
    net = _net()
    prior = _prior(net, kind)
    learned = LearnedScale(prior, net, num_train_examples=10, sigma_lr=1e-12)
    sigma = 0.03
    _set_sigma(learned, sigma)
    lam = learned.scales
    mu, shape = _dense_shape(prior)
    wbar = _flat(net, "0.").requires_grad_(True)
    head = _flat(net, "2.").requires_grad_(True)
    sig = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
    d = len(wbar) + len(head)
    eye = torch.eye(len(head), dtype=torch.float64)
    total = (
        _dense_kl(wbar, sig, mu, lam["backbone"] * shape)
        + _dense_kl(head, sig, torch.zeros_like(head), lam["head"] * eye)
    ) / d
    total.backward()
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, dkl_dsigma = learned._solve(learned._sigma_tensor(), add_grad=True)
    got_w = torch.cat([p.grad.reshape(-1) for n, p in net.named_parameters() if n[0] == "0"]).double()
    got_h = torch.cat([p.grad.reshape(-1) for n, p in net.named_parameters() if n[0] == "2"]).double()
    assert torch.allclose(got_w, wbar.grad, rtol=1e-5, atol=1e-9)
    assert torch.allclose(got_h, head.grad, rtol=1e-5, atol=1e-9)
    assert float(dkl_dsigma) == pytest.approx(float(sig.grad), rel=1e-6)


def test_sigma_gradient_of_the_data_term_is_the_reparameterised_one():
    """restore_() returns Σ ε·∂NLL/∂w at the sample: the derivative of the sampled loss in σ (fixed ε)."""
    net = _net()
    learned = LearnedScale(_prior(net, "diagonal"), net, num_train_examples=10, seed=3)
    _set_sigma(learned, 0.1)
    x, y = torch.randn(6, P_IN), torch.tensor([0, 1, 0, 1, 1, 0])
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    learned.perturb_()
    noise = {n: (p.detach() - before[n]) / 0.1 for n, p in net.named_parameters()}
    torch.nn.functional.cross_entropy(net(x), y).backward()
    dot = learned.restore_()
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), before[n])  # w̄ restored exactly

    def loss_at(s: float) -> torch.Tensor:
        fn = torch.func.functional_call
        return torch.nn.functional.cross_entropy(fn(net, {n: before[n] + s * noise[n] for n in before}, (x,)), y)

    s = torch.tensor(0.1, requires_grad=True)
    loss_at(s).backward()
    assert float(dot) == pytest.approx(float(s.grad), rel=1e-4)


def test_trace_inverse_by_woodbury_equals_the_dense_trace():
    net = _net()
    prior = _prior(net, "lowrank", scale=7.0, eps=0.3)
    gauss = prior.gaussian()
    dense = gauss.dense_covariance()
    assert float(trace_inverse(gauss)) == pytest.approx(float(torch.trace(torch.linalg.inv(dense))), rel=1e-6)


def test_learned_scale_grows_with_the_distance_of_the_solution_from_the_prior_mean():
    """Same prior (centred on the pre-trained weights of a softmax regression), two tasks labelled by a teacher
    0.1 (near) or 3.0 (far) away from the prior mean per weight: the learned λ is larger on the far task by a
    wide margin (measured: 0.0046 vs 0.22)."""
    torch.manual_seed(0)
    pretrained = torch.nn.Linear(10, 3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 10, generator=g)
    learned_scales, distances = {}, {}
    for task, shift in (("near", 0.1), ("far", 3.0)):
        teacher = copy.deepcopy(pretrained)
        with torch.no_grad():
            teacher.weight.add_(shift * torch.randn(teacher.weight.shape, generator=g))
            y = teacher(x).argmax(dim=1)
        net = copy.deepcopy(pretrained)
        prior = PriorModel.from_tensors({n: p.detach().clone() for n, p in net.named_parameters()}, variance=1.0)
        reg = PriorRegularizer(prior, net, num_train_examples=256, scale="learned", exclude_head=False, sigma_init=1e-2)
        data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
        fit(net, data, torch.optim.Adam(net.parameters(), lr=3e-2), regularizer=reg, epochs=60)
        learned_scales[task] = reg.scales["backbone"]
        distances[task] = sum(float((p.detach() - prior.mean[n]).pow(2).sum()) for n, p in net.named_parameters())
    assert distances["far"] > 10 * distances["near"]
    assert learned_scales["far"] > 10 * learned_scales["near"], learned_scales


def test_regularizer_and_fit_with_learned_scale():
    net = _net()
    prior = _prior(net, "diagonal")
    reg = PriorRegularizer(prior, net, num_train_examples=24, scale="learned", groups="layer")
    assert sorted(reg.scales) == ["0", "head"]
    assert reg.coefficient == pytest.approx(1 / 26) and reg.sigma == pytest.approx(1e-3)
    data = [(torch.randn(8, P_IN), torch.randint(0, 2, (8,))) for _ in range(3)]
    result = fit(net, data, torch.optim.SGD(net.parameters(), lr=0.1), regularizer=reg, epochs=2)
    assert result.steps == 6 and result.history[-1]["prior_term"] != 0.0
    assert reg.sigma != pytest.approx(1e-3) and not reg.learned.perturbed
    with pytest.raises(RuntimeError, match="scale='learned'"):
        reg()
    post = reg.learned.posterior()
    assert post.names == [n for n, _ in net.named_parameters()]


def test_group_specifications():
    assert group_of("bert.encoder.layer.3.attention.self.query.weight", "block") == "bert.encoder.layer.3"
    assert group_of("bert.encoder.layer.3.attention.self.query.weight", "layer") == (
        "bert.encoder.layer.3.attention.self.query"
    )
    assert group_of("x.weight", "default") == "backbone"
    net = _net()
    learned = LearnedScale(_prior(net, "isotropic"), net, num_train_examples=4, groups=lambda n: n.split(".")[-1])
    assert learned.group_names == ["weight", "bias", "head"]


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", [-1e-3, float("nan"), 0.0])
def test_bad_sigma_init_is_refused(value):
    net = _net()
    with pytest.raises(ValueError, match="`sigma_init`"):
        LearnedScale(_prior(net, "isotropic"), net, num_train_examples=4, sigma_init=value)


def test_bad_sigma_lr_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="`sigma_lr`"):
        PriorRegularizer(_prior(net, "isotropic"), net, num_train_examples=4, scale="learned", sigma_lr=float("nan"))


def test_unknown_group_spec_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="`groups` must be one of 'default', 'layer', 'block'"):
        PriorRegularizer(_prior(net, "isotropic"), net, num_train_examples=4, scale="learned", groups="per-layer")


def test_unknown_scale_string_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="'learnt'"):
        PriorRegularizer(_prior(net, "isotropic"), net, num_train_examples=4, scale="learnt")


def test_prior_weight_other_than_one_is_refused_with_learned_scale():
    net = _net()
    with pytest.raises(ValueError, match="`prior_weight` must be 1"):
        PriorRegularizer(_prior(net, "isotropic"), net, num_train_examples=4, scale="learned", prior_weight=2.0)


@pytest.mark.parametrize("kind", ["isotropic", "lowrank"])
def test_overlapped_steps_equal_steps_computed_on_the_spot(kind):
    """The background thread (prior term at the saved w̄, next ε) changes nothing: same weights, λ_g and σ."""
    results = []
    for overlap in (True, False):
        net = _net()
        reg = PriorRegularizer(_prior(net, kind), net, num_train_examples=24, scale="learned", overlap=overlap)
        assert reg.learned.overlap is overlap
        data = [
            (torch.randn(8, P_IN, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1] * 4))
            for i in range(3)
        ]
        fit(net, data, torch.optim.SGD(net.parameters(), lr=0.1), regularizer=reg, epochs=2)
        results.append(({n: p.detach().clone() for n, p in net.named_parameters()}, reg.scales, reg.sigma))
    (w1, s1, sig1), (w2, s2, sig2) = results
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    assert s1 == s2 and sig1 == sig2


@pytest.mark.parametrize("scale", ["learned", 1.0])
def test_an_exception_in_train_step_leaves_the_mean_weights_and_no_thread_running(scale):
    """A forward that fails in the second `train_step` (an interrupt, a batch-norm error) propagates after the prior
    term's background work has finished (left running, it aborted the interpreter at exit) and, with a learned scale,
    after w̄ is back in place of the sample w̄ + σε."""
    from priorzoo.finetune import train_step

    net = _net()
    reg = PriorRegularizer(_prior(net, "lowrank"), net, num_train_examples=8, scale=scale, overlap=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g))
    train_step(net, batch, opt, regularizer=reg)
    after_first = {n: p.detach().clone() for n, p in net.named_parameters()}

    def fail(_module, _inputs):
        raise KeyboardInterrupt("stop")

    handle = net.register_forward_pre_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        train_step(net, batch, opt, regularizer=reg)
    handle.remove()
    assert reg._pending is None
    if reg.learned is not None:
        assert not reg.learned.perturbed and reg.learned._pending is None
    assert all(torch.equal(p, after_first[n]) for n, p in net.named_parameters())
    train_step(net, batch, opt, regularizer=reg)  # and training goes on from there
