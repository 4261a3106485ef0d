"""The flat prior term: one set of flat buffers, a bounded number of ops, IEEE products, F kept in its dtype."""

from __future__ import annotations

import pytest
import torch
from opcount import OpCounter

from priorzoo.gaussian import LowRankGaussian, ieee_fp32_matmul


def _blocks(n: int, k: int, factor_dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 2) if i % 2 else (5,) for i in range(n)]
    mean = [torch.randn(s, generator=gen) for s in shapes]
    var = [torch.rand(s, generator=gen) + 0.2 for s in shapes]
    fac = [(torch.randn((k, *s), generator=gen) * 0.3).to(factor_dtype) for s in shapes]
    w = [m + torch.randn(m.shape, generator=gen) for m in mean]
    return mean, var, fac, w


def _dense_reference(g: LowRankGaussian, w):
    cov = g.dense_covariance()
    r = torch.cat([b.reshape(-1) for b in w]).double() - g.mean_flat.double()
    sol = torch.linalg.solve(cov, r)
    return 0.5 * (r @ sol), sol


def test_buffers_are_flat_and_the_block_lists_are_views_of_them():
    mean, var, fac, _ = _blocks(7, 3)
    g = LowRankGaussian(mean, var, fac)
    assert g.mean_flat.shape == (g.numel,) and g.factor_flat.shape == (3, g.numel)
    for views, flat in ((g.mean, g.mean_flat), (g.inv_a, g.inv_a_flat), (g.factor, g.factor_flat)):
        assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views)


@pytest.mark.parametrize("factor_dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_factor_is_kept_in_its_dtype_and_accumulated_in_float32(factor_dtype):
    mean, var, fac, w = _blocks(9, 4, factor_dtype)
    g = LowRankGaussian(mean, var, fac, scale=3.0)
    assert g.factor_flat.dtype == factor_dtype and g.dtype == torch.float32
    k, p = 4, g.numel
    # memory: F once in its stored dtype, μ and A⁻¹ in float32, K×K float64 matrices
    assert g.nbytes == k * p * factor_dtype.itemsize + 2 * p * 4 + 2 * k * k * 8
    # the distribution is the one of the stored (rounded) factor, evaluated exactly
    g64 = LowRankGaussian([m.double() for m in mean], [v.double() for v in var], [f.double() for f in fac], scale=3.0)
    value, grads = g.value_and_grad(w)
    ref_value, ref_grad = _dense_reference(g64, [b.double() for b in w])
    assert float(value) == pytest.approx(float(ref_value), rel=1e-6)
    got = torch.cat(grads).double()
    assert float((got - ref_grad).norm() / ref_grad.norm()) < 1e-6
    loss_value = g.half_quad(w)
    assert float(loss_value) == pytest.approx(float(ref_value), rel=1e-6)


def test_a_half_precision_factor_is_streamed_in_chunks_without_a_full_float32_copy(monkeypatch):
    import priorzoo.gaussian as gaussian

    monkeypatch.setattr(gaussian, "_LOWP_SCRATCH", 64)  # force several chunks on a small prior
    mean, var, fac, w = _blocks(30, 4, torch.bfloat16)
    g = LowRankGaussian(mean, var, fac)
    assert g._chunk < g.numel  # several chunks
    ws = g.new_workspace()
    with OpCounter() as counter:
        value, grads = g.value_and_grad(w, workspace=ws)
    full_fp32 = 4 * g.numel * 4
    assert counter.largest < full_fp32  # no op produced a K×P float32 tensor
    g64 = LowRankGaussian([m.double() for m in mean], [v.double() for v in var], [f.double() for f in fac])
    ref_value, ref_grad = _dense_reference(g64, [b.double() for b in w])
    assert float(value) == pytest.approx(float(ref_value), rel=1e-6)
    assert float((torch.cat(grads).double() - ref_grad).norm() / ref_grad.norm()) < 1e-6


@pytest.mark.parametrize("n", [20, 200])
def test_value_and_grad_takes_a_fixed_number_of_ops_and_no_host_sync(n):
    mean, var, fac, w = _blocks(n, 5)
    g = LowRankGaussian(mean, var, fac, scale=2.0)
    ws = g.new_workspace()
    with OpCounter() as counter:
        g.value_and_grad(w, workspace=ws)
    assert counter.syncs == []
    assert len(counter.ops) <= 20, counter.ops
    wr = [b.clone().requires_grad_() for b in w]
    with OpCounter() as counter_loss:
        g.half_quad(wr).backward()
    assert counter_loss.syncs == []
    assert len(counter_loss.ops) <= 40, counter_loss.ops


def test_op_count_does_not_grow_with_the_number_of_blocks():
    counts = []
    for n in (10, 300):
        mean, var, fac, w = _blocks(n, 3)
        g = LowRankGaussian(mean, var, fac)
        ws = g.new_workspace()
        with OpCounter() as counter:
            g.value_and_grad(w, workspace=ws)
        counts.append(len(counter.ops))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("how", ["new", "legacy", "generic"])
def test_factor_products_run_in_ieee_fp32_whatever_the_global_tf32_setting(how):
    cuda = torch.backends.cuda.matmul
    mean, var, fac, w = _blocks(6, 3)
    try:
        if how == "new":
            cuda.fp32_precision = "tf32"
        elif how == "legacy":
            cuda.allow_tf32 = True
        else:
            torch.set_float32_matmul_precision("high")
        before = cuda.fp32_precision
        assert before == "tf32"
        with OpCounter() as counter:
            g = LowRankGaussian(mean, var, fac)  # the K×K capacitance product at construction
            g.value_and_grad(w)
            g.half_quad([b.clone().requires_grad_() for b in w]).backward()  # backward's pass over F too
        assert counter.product_precisions and set(counter.product_precisions) == {"ieee"}
        assert cuda.fp32_precision == before  # restored, through the API it was set with
        if how == "legacy":
            assert cuda.allow_tf32 is True  # still readable: the APIs were not mixed
        if how == "generic":
            assert torch.get_float32_matmul_precision() == "high"
    finally:
        if how == "generic":
            torch.set_float32_matmul_precision("highest")
        elif how == "legacy":
            cuda.allow_tf32 = False
        else:
            cuda.fp32_precision = "none"


def test_ieee_guard_is_a_no_op_when_nothing_reduces_precision():
    before = torch.backends.cuda.matmul.fp32_precision
    with ieee_fp32_matmul():
        assert torch.backends.cuda.matmul.fp32_precision == before


def test_the_given_factor_tensors_share_the_flat_buffer_so_f_is_held_once():
    mean, var, fac, w = _blocks(5, 3)
    before = [f.clone() for f in fac]
    g = LowRankGaussian(mean, var, fac)
    storage = g.factor_flat.untyped_storage().data_ptr()
    for f, b in zip(fac, before):
        assert f.untyped_storage().data_ptr() == storage  # the caller's tensors now live in the flat buffer
        assert torch.equal(f, b)  # with the same values
    value, grads = g.value_and_grad(w)
    ref = LowRankGaussian(mean, var, before).value_and_grad(w)
    assert torch.equal(value, ref[0]) and all(torch.equal(a, b) for a, b in zip(grads, ref[1]))
