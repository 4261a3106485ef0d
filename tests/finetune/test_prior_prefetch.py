"""PriorRegularizer.prefetch: the prior term computed in a background thread gives the same value and
gradient as computing it on the spot, is used at most once, never after the weights changed, and is what
PriorCallback / PriorTrainer / train_step actually use."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from _models import bert_prior, random_prior, tiny_bert
from finetune_helpers import one_step_args, text_examples

from priorzoo.finetune import PriorRegularizer, train_step
from priorzoo.finetune import _prefetch as prefetch_mod

N = 7


def _model_and_prior(rank: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    named = {n: p for n, p in model.named_parameters() if n.startswith("0.")}
    return model, random_prior(named, rank=rank, exclude=["2.*"])


def _grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _Spy:
    """Counts Prefetched.start calls and prefetched results actually used."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = self.used = 0
        start, take = prefetch_mod.Prefetched.start.__func__, PriorRegularizer._take_prefetched

        def counting_start(cls, bound, workspace=None):
            self.started += 1
            return start(cls, bound, workspace)

        def counting_take(reg):
            out = take(reg)
            self.used += out is not None
            return out

        monkeypatch.setattr(prefetch_mod.Prefetched, "start", classmethod(counting_start))
        monkeypatch.setattr(PriorRegularizer, "_take_prefetched", counting_take)


@pytest.mark.parametrize("rank", [0, 3])
def test_prefetched_term_equals_the_term_computed_on_the_spot(rank):
    model, prior = _model_and_prior(rank)
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    x = torch.randn(4, 5)
    (model(x).sum() + 3.0 * reg()).backward()  # weight 3 ≠ 1 exercises the backward's scaling
    expected_value, expected_grads = float(reg().detach()), _grads_of(model)
    model.zero_grad(set_to_none=True)

    assert reg.prefetch() is True
    term = reg()
    assert float(term.detach()) == pytest.approx(expected_value, rel=1e-12)
    (model(x).sum() + 3.0 * term).backward()
    got = _grads_of(model)
    assert got.keys() == expected_grads.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected_grads[n], rtol=1e-6, atol=1e-9)


def test_prefetched_gradient_and_add_to_grad_match():
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    expected = [g.clone() for g in reg.gradient()]
    expected_value = float(reg.add_to_grad_())
    expected_grad = _grads_of(model)
    model.zero_grad(set_to_none=True)

    reg.prefetch()
    for got, want in zip(reg.gradient(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    reg.prefetch()
    assert float(reg.add_to_grad_()) == pytest.approx(float(expected_value), rel=1e-12)
    for n, g in _grads_of(model).items():
        torch.testing.assert_close(g, expected_grad[n], rtol=0, atol=0)


def test_prefetch_runs_in_the_background():
    """The computation must not block prefetch(): it waits here for an event only this thread sets."""
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    bound = reg.bound
    release, running = threading.Event(), threading.Event()
    original = bound.value_and_grad

    def gated(**kwargs):
        running.set()
        assert release.wait(timeout=30), "prefetch() blocked the caller"
        return original(**kwargs)

    bound.value_and_grad = gated
    assert reg.prefetch()
    assert running.wait(timeout=30)  # started, and prefetch() has returned while it waits
    release.set()
    assert float(reg().detach()) == pytest.approx(float(original()[0]) / N)


def test_a_prefetched_term_is_used_once(monkeypatch):
    spy = _Spy(monkeypatch)
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    reg.prefetch()
    reg.prefetch()  # still valid: not started twice
    first, second = float(reg().detach()), float(reg().detach())
    assert (spy.started, spy.used) == (1, 1)
    assert first == pytest.approx(second, rel=1e-12)


def test_weights_changed_after_prefetch_are_never_used_stale():
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reg.prefetch()
    model(torch.randn(3, 5)).sum().backward()
    opt.step()  # in place: bumps the parameters' version counters
    with pytest.warns(RuntimeWarning, match="weights changed between prefetch"):
        value = float(reg().detach())
    fresh = PriorRegularizer(prior, model, num_train_examples=N, overlap=False)
    assert value == pytest.approx(float(fresh().detach()), rel=1e-12)
    reg.prefetch()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    with warnings.catch_warnings():  # warned once per regularizer
        warnings.simplefilter("error")
        assert float(reg().detach()) == pytest.approx(float(fresh().detach()), rel=1e-12)


def test_replaced_parameters_rebind_and_discard_the_prefetched_term():
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    reg.prefetch()
    model.double()  # new parameter tensors: a new binding
    with pytest.warns(RuntimeWarning, match="weights changed"):
        value = reg()
    assert value.dtype == torch.float32  # the penalty's compute dtype; the binding is new
    assert reg.bound.parameters[0].dtype == torch.float64


def test_errors_in_the_background_thread_reach_the_caller():
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N)

    def broken(**kwargs):
        raise FloatingPointError("boom in the prefetch thread")

    reg.bound.value_and_grad = broken
    reg.prefetch()
    with pytest.raises(FloatingPointError, match="boom in the prefetch thread"):
        reg.add_to_grad_()


def test_overlap_false_disables_prefetch(monkeypatch):
    spy = _Spy(monkeypatch)
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N, overlap=False)
    assert reg.prefetch() is False
    reg()
    assert spy.started == 0


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_overlap(bad):
    model, prior = _model_and_prior()
    with pytest.raises(TypeError, match="`overlap` must be True or False"):
        PriorRegularizer(prior, model, num_train_examples=N, overlap=bad)


def test_frozen_parameters_get_no_gradient_from_the_prefetched_term():
    model, prior = _model_and_prior()
    model[0].bias.requires_grad_(False)
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    reg.prefetch()
    reg().backward()
    assert model[0].bias.grad is None and model[0].weight.grad is not None


def test_train_step_uses_the_prefetched_term(monkeypatch):
    spy = _Spy(monkeypatch)
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(3):
            train_step(model, (torch.randn(4, 5), torch.tensor([0, 1, 2, 0])), opt, regularizer=reg)
    assert (spy.started, spy.used) == (3, 3)


@pytest.mark.parametrize("mode", ["callback", "mixin"])
def test_trainer_steps_use_the_prefetched_term(mode, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from priorzoo.finetune import PriorCallback, PriorTrainer

    spy = _Spy(monkeypatch)
    model, data = tiny_bert(), text_examples(8)
    prior = bert_prior(model)
    args = one_step_args(tmp_path / "out", per_device=2, ga=2, lr=0.1, bf16=False, max_steps=2)
    if mode == "callback":
        callback = PriorCallback(prior, N)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    else:
        trainer = PriorTrainer(model=model, args=args, train_dataset=data, prior=prior, num_train_examples=N)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.train()
    assert trainer.state.global_step == 2
    # one background computation per optimiser step, each used, the second started right after the first
    # optimiser step; the one started after the last step is dropped at the end of training
    assert (spy.started, spy.used) == (3, 2)
    reg = callback.regularizer if mode == "callback" else trainer.prior_regularizer
    assert reg._pending is None


@pytest.mark.parametrize("mode", ["callback", "mixin"])
def test_trainer_bad_overlap(mode, tmp_path):
    pytest.importorskip("transformers")
    from priorzoo.finetune import PriorCallback, PriorTrainer

    model = tiny_bert()
    prior = bert_prior(model)
    if mode == "callback":
        with pytest.raises(TypeError, match="`overlap` must be True or False"):
            PriorCallback(prior, N, overlap="no")
    else:
        args = one_step_args(tmp_path / "out", per_device=2, ga=1, lr=0.1, bf16=False)
        with pytest.raises(TypeError, match="`prior_overlap` must be True or False"):
            PriorTrainer(model=model, args=args, train_dataset=text_examples(2), prior=prior, prior_overlap="no")


def _workspace_pointers(reg: PriorRegularizer) -> set[int]:
    ws = reg._workspace
    return {t.data_ptr() for t in ws.work + ws.grad} if ws is not None else set()


def test_gradients_handed_out_never_alias_the_reused_workspace():
    model, prior = _model_and_prior()
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    reg.add_to_grad_()  # computed into the workspace; .grad gets tensors of its own
    first = _grads_of(model)
    assert reg._workspace is not None
    assert not {p.grad.data_ptr() for p in model.parameters() if p.grad is not None} & _workspace_pointers(reg)
    kept = reg.gradient()
    kept_copy = [k.clone() for k in kept]
    reg.prefetch()  # always into the workspace
    assert reg._pending.workspace is reg._workspace
    loss = reg()  # the loss path gets its own copy of the prefetched gradients
    reg.add_to_grad_()  # overwrites the workspace before `loss` is back-propagated
    loss.backward()
    for n, g in _grads_of(model).items():  # the weights did not move: three times the first gradient
        torch.testing.assert_close(g, 3 * first[n], rtol=1e-6, atol=1e-9)
    for k, c in zip(kept, kept_copy):
        assert torch.equal(k, c)
    reg.prefetch()  # again into the workspace, although the last prefetched term went into the loss
    assert reg._pending.workspace is reg._workspace
    reg().backward()
    assert not {p.grad.data_ptr() for p in model.parameters() if p.grad is not None} & _workspace_pointers(reg)
    for n, g in _grads_of(model).items():
        torch.testing.assert_close(g, 4 * first[n], rtol=1e-6, atol=1e-9)
