"""The maths of priorzoo.gaussian against torch.distributions.LowRankMultivariateNormal and dense algebra."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal

from priorzoo.errors import PriorFormatError
from priorzoo.gaussian import LowRankGaussian

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def random_prior(rank: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mean = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    var = [torch.rand(s, generator=g, dtype=dtype) + 0.1 for s in SHAPES]
    fac = [torch.randn((rank, *s), generator=g, dtype=dtype) * 0.5 for s in SHAPES] if rank else None
    return mean, var, fac


def flat(blocks):
    return torch.cat([b.reshape(-1) for b in blocks])


def reference(mean, var, fac, scale, eps):
    mu = flat(mean)
    diag = flat(var) * scale + eps
    if fac is None:
        cov_factor = torch.zeros(mu.numel(), 1, dtype=mu.dtype)
    else:
        cov_factor = math.sqrt(scale) * torch.cat([f.reshape(f.shape[0], -1) for f in fac], dim=1).T
    return LowRankMultivariateNormal(mu, cov_factor, diag)


@pytest.mark.parametrize("rank", [0, 1, 5])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 37.0, 1e8])
@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_log_prob_matches_lowrank_mvn(rank, scale, eps):
    mean, var, fac = random_prior(rank)
    g = LowRankGaussian(mean, var, fac, scale=scale, eps=eps)
    ref = reference(mean, var, fac, scale, eps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        w = [m + math.sqrt(scale) * torch.randn(m.shape, generator=gen, dtype=m.dtype) for m in mean]
        expected = ref.log_prob(flat(w))
        got = g.log_prob(w)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-8), (got, expected)


@pytest.mark.parametrize("rank", [0, 1, 5])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e8])
def test_penalty_gradient_equals_autograd_of_neg_log_prob(rank, scale):
    mean, var, fac = random_prior(rank, seed=3)
    g = LowRankGaussian(mean, var, fac, scale=scale)
    ref = reference(mean, var, fac, scale, 0.0)
    gen = torch.Generator().manual_seed(4)
    w = [(m + torch.randn(m.shape, generator=gen, dtype=m.dtype)).requires_grad_() for m in mean]
    g.half_quad(w).backward()
    ours = flat([x.grad for x in w])
    w2 = flat([x.detach() for x in w]).requires_grad_()
    (-ref.log_prob(w2)).backward()
    assert torch.allclose(ours, w2.grad, rtol=1e-9, atol=1e-12 / scale)
    # and the value: penalty = −log_prob − normaliser
    val = g.half_quad([x.detach() for x in w])
    assert torch.allclose(val, -ref.log_prob(w2.detach()) - g.log_normalizer, rtol=1e-9)


def test_quadratic_form_matches_dense_inverse():
    mean, var, fac = random_prior(4, seed=5)
    g = LowRankGaussian(mean, var, fac, scale=2.5, eps=0.3)
    cov = g.dense_covariance()
    w = [m + 1.0 for m in mean]
    r = flat(w) - flat(mean)
    expected = 0.5 * r @ torch.linalg.solve(cov, r)
    assert torch.allclose(g.half_quad(w), expected, rtol=1e-10)
    assert torch.allclose(flat(g.grad_half_quad(w)), torch.linalg.solve(cov, r), rtol=1e-9)
    assert torch.allclose(g.logdet, torch.logdet(cov), rtol=1e-10)


def test_float32_inputs_give_float32_penalty_and_grads_close_to_float64():
    mean, var, fac = random_prior(5, seed=6)
    g64 = LowRankGaussian(mean, var, fac, scale=3.0)
    g32 = LowRankGaussian([m.float() for m in mean], [v.float() for v in var], [f.float() for f in fac], scale=3.0)
    w = [(m.float() + 0.5).requires_grad_() for m in mean]
    val = g32.half_quad(w)
    assert val.dtype == torch.float32
    val.backward()
    assert all(x.grad.dtype == torch.float32 for x in w)
    ref = g64.half_quad([x.detach().double() for x in w])
    assert torch.allclose(val.double(), ref, rtol=1e-5)


def test_bfloat16_parameters_get_bfloat16_grads():
    mean, var, fac = random_prior(2, dtype=torch.float32)
    g = LowRankGaussian(mean, var, fac)
    w = [(m + 1).to(torch.bfloat16).requires_grad_() for m in mean]
    g.half_quad(w).backward()
    assert all(x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in w)


@pytest.mark.parametrize("rank", [0, 3])
def test_sample_covariance(rank):
    mean, var, fac = random_prior(rank, seed=7)
    g = LowRankGaussian(mean, var, fac, scale=0.5, eps=0.1)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([flat(g.sample(gen)) for _ in range(20_000)])
    assert draws.shape[1] == g.numel
    assert torch.allclose(draws.mean(0), flat(mean), atol=0.05)
    emp = torch.cov(draws.T)
    assert torch.allclose(emp, g.dense_covariance(), atol=0.06)


@pytest.mark.parametrize("rank", [0, 3])
def test_sample_stream_is_per_block(rank):
    """A seed gives the draws of ζ ~ N(0, I_K) then one ξ_b ~ N(0, I) per block (the stream the demo's BMA
    table was recorded with), whatever the flat layout inside."""
    shapes = [(3, 17), (5,), (2, 1, 3)]  # sizes that are not multiples of torch's vectorised randn width
    g0 = torch.Generator().manual_seed(3)
    mean = [torch.randn(s, generator=g0) for s in shapes]
    var = [torch.rand(s, generator=g0) + 0.1 for s in shapes]
    fac = [torch.randn((rank, *s), generator=g0) for s in shapes] if rank else None
    g = LowRankGaussian(mean, var, fac, scale=2.0, eps=0.5)
    draw = g.sample(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    zeta = torch.randn(rank, generator=gen) if rank else None
    for i, (m, v, s) in enumerate(zip(mean, var, shapes)):
        xi = torch.randn(m.numel(), generator=gen)
        expected = m.reshape(-1) + (2.0 * v.reshape(-1) + 0.5).sqrt() * xi
        if zeta is not None:
            expected = expected + math.sqrt(2.0) * (zeta @ fac[i].reshape(rank, -1))
        assert torch.allclose(draw[i], expected.reshape(s), rtol=1e-5, atol=1e-6)


def test_isotropic_special_case():
    mean = [torch.zeros(10, dtype=torch.float64)]
    g = LowRankGaussian(mean, [torch.full((10,), 2.0, dtype=torch.float64)], scale=3.0)
    w = [torch.ones(10, dtype=torch.float64)]
    assert math.isclose(float(g.half_quad(w)), 0.5 * 10 / 6.0, rel_tol=1e-12)
    expected = -0.5 * 10 / 6.0 - 0.5 * 10 * math.log(2 * math.pi * 6.0)
    assert math.isclose(float(g.log_prob(w)), expected, rel_tol=1e-12)


def test_large_block_accumulates_in_float64():
    # 4M float32 elements with mean 0, variance 1, w = 1: ½ rᵀΣ⁻¹r = 2M exactly
    n = 4_000_000
    g = LowRankGaussian([torch.zeros(n)], [torch.ones(n)], [torch.zeros(2, n)])
    assert float(g.half_quad([torch.ones(n)])) == pytest.approx(n / 2, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 0.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_bad_scalars(kwargs, match):
    mean, var, fac = random_prior(1)
    with pytest.raises(PriorFormatError, match=match):
        LowRankGaussian(mean, var, fac, **kwargs)


def test_zero_variance_without_eps_is_singular():
    with pytest.raises(PriorFormatError, match="singular"):
        LowRankGaussian([torch.zeros(3)], [torch.tensor([1.0, 0.0, 1.0])], names=["layer.weight"])
    # with eps > 0 it is fine
    LowRankGaussian([torch.zeros(3)], [torch.tensor([1.0, 0.0, 1.0])], eps=1e-6)


def test_underflowing_variance_is_reported():
    with pytest.raises(PriorFormatError, match="overflows"):
        LowRankGaussian([torch.zeros(3)], [torch.full((3,), 1e-44)])


def test_factor_with_wrong_rank_or_size():
    with pytest.raises(PriorFormatError, match="cov_factor"):
        LowRankGaussian(
            [torch.zeros(3), torch.zeros(2)],
            [torch.ones(3), torch.ones(2)],
            [torch.ones(2, 3), torch.ones(3, 2)],
        )
    with pytest.raises(PriorFormatError, match="cov_factor"):
        LowRankGaussian([torch.zeros(3)], [torch.ones(3)], [torch.ones(2, 4)])


def test_non_finite_factor_is_refused():
    with pytest.raises(PriorFormatError, match="capacitance"):
        LowRankGaussian([torch.zeros(3)], [torch.ones(3)], [torch.tensor([[1.0, float("inf"), 0.0]])])


def test_wrong_number_of_blocks_at_evaluation():
    g = LowRankGaussian([torch.zeros(3)], [torch.ones(3)])
    with pytest.raises(PriorFormatError, match="expected 1 blocks"):
        g.half_quad([torch.zeros(3), torch.zeros(1)])
    with pytest.raises(PriorFormatError, match="elements"):
        g.half_quad([torch.zeros(4)])


def test_value_and_grad_matches_autograd():
    mean, var, fac = random_prior(3, seed=11)
    g = LowRankGaussian(mean, var, fac, scale=5.0)
    w = [(m + 0.3).requires_grad_() for m in mean]
    g.half_quad(w).backward()
    value, grads = g.value_and_grad([x.detach() for x in w])
    assert torch.allclose(value, g.half_quad([x.detach() for x in w]))
    for x, gr in zip(w, grads):
        assert torch.allclose(x.grad.reshape(-1), gr)


def test_autocast_does_not_change_the_penalty():
    mean, var, fac = random_prior(4, seed=12, dtype=torch.float32)
    g = LowRankGaussian(mean, var, fac, scale=2.0)
    w = [(m + 0.5).requires_grad_() for m in mean]
    ref = g.half_quad(w)
    ref.backward()
    ref_grads = [x.grad.clone() for x in w]
    for x in w:
        x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = g.half_quad(w)
        val.backward()
    assert val.dtype == torch.float32
    assert torch.equal(val, ref)
    for x, r in zip(w, ref_grads):
        assert torch.equal(x.grad, r)


def test_capacitance_chunking_matches_dense():
    # a block wider than one chunk (65,536 columns) exercises the chunked G Gᵀ accumulation
    gen = torch.Generator().manual_seed(13)
    n = 70_000
    f = torch.randn(3, n, generator=gen, dtype=torch.float64) * 0.01
    v = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    g = LowRankGaussian([torch.zeros(n, dtype=torch.float64)], [v], [f], scale=3.0)
    expected = torch.eye(3, dtype=torch.float64) + 3.0 * (f / (3.0 * v)) @ f.T
    assert torch.allclose(g.chol @ g.chol.T, expected, rtol=1e-12)


@pytest.mark.parametrize("rank", [0, 3])
def test_value_and_grad_into_a_workspace_matches_the_analytic_gradient_and_is_reused(rank):
    mean, var, fac = random_prior(rank, seed=12)
    g = LowRankGaussian(mean, var, fac, scale=2.5, eps=1e-3)
    ref = reference(mean, var, fac, 2.5, 1e-3)
    ws = g.new_workspace()
    gen = torch.Generator().manual_seed(13)
    for _ in range(2):  # the second evaluation overwrites the first one's buffers
        w = [m + torch.randn(m.shape, generator=gen, dtype=m.dtype) for m in mean]
        value, grads = g.value_and_grad(w, workspace=ws)
        w2 = flat(w).requires_grad_()
        (-ref.log_prob(w2)).backward()
        assert torch.allclose(flat(grads), w2.grad, rtol=1e-9, atol=1e-12)
        assert torch.allclose(value, -ref.log_prob(w2.detach()) - g.log_normalizer, rtol=1e-9)
        assert [x.data_ptr() for x in grads] == [x.data_ptr() for x in ws.grad]


def test_workspace_of_another_gaussian_is_refused():
    mean, var, fac = random_prior(2)
    a, b = LowRankGaussian(mean, var, fac), LowRankGaussian(mean, var, fac)
    with pytest.raises(ValueError, match="workspace was made by another LowRankGaussian"):
        a.value_and_grad(mean, workspace=b.new_workspace())
