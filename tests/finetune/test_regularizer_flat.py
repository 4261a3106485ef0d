"""PriorRegularizer on the flat prior term: a fixed number of ops and no host sync per step, F held once,
``torch.compile(fullgraph=True)`` traces the loss path, the Trainer callback's log stays on the device."""

from __future__ import annotations

import pytest
import torch
from opcount import OpCounter

from priorzoo import PriorModel
from priorzoo.finetune import PriorRegularizer


def _model_and_prior(n: int, k: int = 4, factor_dtype=torch.float32, seed: int = 0):
    model = torch.nn.ModuleList([torch.nn.Linear(3, 2) for _ in range(n // 2)])
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    mean = {nm: p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for nm, p in params.items()}
    var = {nm: torch.rand(p.shape, generator=gen) + 0.5 for nm, p in params.items()}
    fac = {nm: (0.3 * torch.randn(k, *p.shape, generator=gen)).to(factor_dtype) for nm, p in params.items()}
    return model, PriorModel.from_tensors(mean, var, fac, scale=2.0)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("n", [20, 200])
def test_add_to_grad_is_a_bounded_number_of_ops_without_host_sync(n):
    model, prior = _model_and_prior(n)
    assert len(list(model.parameters())) == n
    reg = PriorRegularizer(prior, model, num_train_examples=10, overlap=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.add_to_grad_()  # warm (workspace allocated)
    with OpCounter() as counter:
        value = reg.add_to_grad_()
    assert counter.syncs == []
    assert len(counter.ops) <= 40, counter.ops
    assert isinstance(value, torch.Tensor) and value.dim() == 0


def test_add_to_grad_op_count_is_flat_in_the_tensor_count():
    counts = []
    for n in (20, 200):
        model, prior = _model_and_prior(n)
        reg = PriorRegularizer(prior, model, num_train_examples=10, overlap=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        reg.add_to_grad_()
        with OpCounter() as counter:
            reg.add_to_grad_()
        counts.append(len(counter.ops))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("n", [20, 200])
def test_loss_path_forward_backward_is_a_bounded_number_of_ops_without_host_sync(n):
    model, prior = _model_and_prior(n)
    reg = PriorRegularizer(prior, model, num_train_examples=10, overlap=False)
    with OpCounter() as counter:
        reg().backward()  # .grad is None before: autograd stores views of one flat gradient
    assert counter.syncs == []
    assert len(counter.ops) <= 40, counter.ops


def test_add_to_grad_equals_the_loss_path():
    model, prior = _model_and_prior(12, factor_dtype=torch.bfloat16)
    reg = PriorRegularizer(prior, model, num_train_examples=7, overlap=False)
    value = reg()
    value.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    got_value = reg.add_to_grad_()  # .grad created
    got = _grads(model)
    reg.add_to_grad_()  # .grad accumulated with the foreach add
    assert float(got_value) == pytest.approx(float(value.detach()), rel=1e-6)
    for a, b, p in zip(expected, got, model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.grad, 2 * a, rtol=1e-5, atol=1e-7)


def test_the_binding_holds_the_factor_once_in_its_stored_dtype():
    model, prior = _model_and_prior(10, k=3, factor_dtype=torch.bfloat16)
    reg = PriorRegularizer(prior, model, num_train_examples=7, overlap=False)
    g = reg.bound.gaussian
    p = sum(t.numel() for t in model.parameters())
    storages = {}
    for value in vars(g).values():
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    # F (K×P bfloat16) + μ and A⁻¹ (P float32 each) + K×K float64 (chol, λC⁻¹) + 0-dim log-dets
    assert g.factor_flat.dtype == torch.bfloat16
    assert sum(storages.values()) == 3 * p * 2 + 2 * p * 4 + 2 * 9 * 8 + 2 * 8
    assert g.nbytes == 3 * p * 2 + 2 * p * 4 + 2 * 9 * 8


def test_torch_compile_fullgraph_traces_the_loss_path():
    """With backend="aot_eager" (dynamo + AOT autograd); inductor's C++ compile takes ~40 s on this
    machine, too slow for the suite."""
    model, prior = _model_and_prior(6)
    reg = PriorRegularizer(prior, model, num_train_examples=5, overlap=False)
    x = torch.randn(4, 3)

    def loss_fn(x):
        return sum(layer(x).sum() for layer in model) + reg()

    eager = loss_fn(x)
    eager.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_the_callback_log_stays_on_the_device_until_logged():
    pytest.importorskip("transformers")
    from priorzoo.finetune.callback import _PriorTermLog

    log = _PriorTermLog()
    with OpCounter() as counter:
        for v in (1.0, 2.0, 4.0):
            log.add(torch.tensor(v))
    assert counter.syncs == []
    assert log.entries({"loss": 0.0, "train_loss": 0.0}, "prior_term") == {
        "prior_term": pytest.approx(7 / 3),
        "train_prior_term": pytest.approx(7 / 3),
    }


def test_a_callback_step_waits_for_nothing():
    pytest.importorskip("transformers")
    from priorzoo.finetune import PriorCallback

    model, prior = _model_and_prior(200)
    cb = PriorCallback(prior, num_train_examples=10, overlap=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    cb.on_pre_optimizer_step(None, None, None, model=model)  # binds
    with OpCounter() as counter:
        cb.on_pre_optimizer_step(None, None, None, model=model)
    assert counter.syncs == []
    assert len(counter.ops) <= 40, counter.ops
