"""One optimiser step of the transformers Trainer with PriorCallback / PriorTrainer equals the step without
the prior minus lr·ρ·Σ⁻¹(w₀ − μ)/N, for a tiny BERT (forward takes **kwargs: the Trainer sums micro-batch
means) and a tiny timm model (no **kwargs: the Trainer divides by G), with gradient accumulation and bf16."""

from __future__ import annotations

import pytest
import torch
from _models import TimmClassifier, bert_prior, timm_prior, tiny_bert
from finetune_helpers import image_examples, max_abs_diff, one_step_args, params_of, text_examples

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from transformers import Trainer, TrainingArguments  # noqa: E402

from priorzoo.finetune import PriorCallback, PriorRegularizer, PriorTrainer  # noqa: E402

LR = 0.1
N = 10
TOL = 1e-6


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def _args(tmp_path, ga: int, bf16: bool, per_device: int = 4, **kw) -> TrainingArguments:
    return one_step_args(tmp_path / "out", per_device=per_device, ga=ga, lr=LR, bf16=bf16, **kw)


def _setup(kind: str, ga: int):
    if kind == "bert":
        model, data = tiny_bert(), text_examples(4 * ga)
        prior = bert_prior(model)
    else:
        model, data = TimmClassifier(), image_examples(4 * ga)
        prior = timm_prior(model, prefix="model.")
    return model, data, prior


def _one_step(kind: str, ga: int, bf16: bool, mode: str, tmp_path, **trainer_kw):
    model, data, prior = _setup(kind, ga)
    args = _args(tmp_path, ga, bf16)
    if mode == "none":
        trainer = Trainer(model=model, args=args, train_dataset=data, **trainer_kw)
    elif mode == "callback":
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[PriorCallback(prior, N)], **trainer_kw)
    else:
        trainer = PriorTrainer(
            model=model, args=args, train_dataset=data, prior=prior, num_train_examples=N, **trainer_kw
        )
    assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
    trainer.train()
    return model, prior, params_of(model), trainer.state.log_history


def _prior_gradient(model: torch.nn.Module, prior) -> tuple[dict[str, torch.Tensor], float]:
    """ρ·Σ⁻¹(w₀ − μ)/N per model parameter name, and ρ·penalty/N, at the model's (starting) weights."""
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    params = dict(model.named_parameters())
    grads = {m: g.reshape(params[m].shape) for m, g in zip(reg.match.matched.values(), reg.gradient())}
    assert max(float(g.abs().max()) for g in grads.values()) * LR > 1e-2  # the prior visibly moves the step
    return grads, float(reg().detach())


@pytest.mark.parametrize(
    ("kind", "ga", "bf16"),
    [("bert", 1, False), ("bert", 2, False), ("bert", 2, True), ("timm", 1, False), ("timm", 2, True)],
)
def test_step_equals_plain_step_minus_prior_gradient(kind, ga, bf16, tmp_path):
    model0, _, prior = _setup(kind, ga)  # model construction is seeded: the same w₀ in every run
    grads, value = _prior_gradient(model0, prior)

    _, _, w_plain, log_plain = _one_step(kind, ga, bf16, "none", tmp_path)
    expected = {n: w - LR * grads[n] if n in grads else w for n, w in w_plain.items()}
    for mode in ("callback", "mixin"):
        _, _, w_prior, log = _one_step(kind, ga, bf16, mode, tmp_path)
        assert max_abs_diff(w_prior, expected) < TOL, mode
        # the prior term is logged, once per step, with its value at the starting weights
        assert log[0]["prior_term"] == pytest.approx(value, rel=1e-5)
        if mode == "callback":  # the callback leaves the Trainer's loss alone
            assert log[0]["loss"] == pytest.approx(log_plain[0]["loss"], rel=1e-6)
        else:  # the mixin's logged loss includes the prior term exactly once
            assert log[0]["loss"] == pytest.approx(log_plain[0]["loss"] + value, rel=1e-5)
        assert log[-1]["train_prior_term"] == pytest.approx(value, rel=1e-5)


def test_bert_trainer_sums_micro_batch_means_under_accumulation(tmp_path):
    """Pins the transformers behaviour the docs describe: with G = 2 the BERT data loss is the SUM of the two
    micro-batch means (its forward takes **kwargs but ignores num_items_in_batch)."""
    _, _, _, log2 = _one_step("bert", 2, False, "none", tmp_path)
    model = tiny_bert()
    data = text_examples(8)
    with torch.no_grad():
        first = Trainer(model=model, args=_args(tmp_path, 2, False), train_dataset=data)
        batches = list(first.get_train_dataloader())
        means = [float(model(**b).loss) for b in batches[:2]]
    assert log2[0]["loss"] == pytest.approx(sum(means), rel=1e-5)


def test_mixin_with_compute_loss_func_and_accumulation(tmp_path):
    """compute_loss_func path: the Trainer counts the loss as scaled (no division by G); the prior enters once."""

    def loss_func(outputs, labels, num_items_in_batch=None):
        ce = torch.nn.functional.cross_entropy(outputs.logits.float(), labels, reduction="sum")
        return ce / num_items_in_batch

    model0, _, prior = _setup("bert", 2)
    grads, _ = _prior_gradient(model0, prior)
    _, _, w_plain, _ = _one_step("bert", 2, False, "none", tmp_path, compute_loss_func=loss_func)
    _, _, w_prior, _ = _one_step("bert", 2, False, "mixin", tmp_path, compute_loss_func=loss_func)
    expected = {n: w - LR * grads[n] if n in grads else w for n, w in w_plain.items()}
    assert max_abs_diff(w_prior, expected) < TOL


def test_mixin_accumulation_matches_one_big_batch_when_data_term_is_a_mean(tmp_path):
    """With `loss_is_scaled_for_ga = False` (the documented remedy for BERT) G = 2 micro-batches of 4 give
    the same step as one batch of 8: data term a mean, prior term once."""

    class MeanTrainer(PriorTrainer):
        loss_is_scaled_for_ga = False

    results = []
    for ga, per_device in ((2, 4), (1, 8)):
        model, _, prior = _setup("bert", 2)
        data = text_examples(8)
        args = _args(tmp_path, ga, False, per_device=per_device)
        MeanTrainer(model=model, args=args, train_dataset=data, prior=prior, num_train_examples=N).train()
        results.append(params_of(model))
    assert max_abs_diff(*results) < TOL


def test_callback_refuses_a_step_without_the_prior_gradient(tmp_path, monkeypatch):
    """If a Trainer steps without firing on_pre_optimizer_step, the callback stops training instead of
    silently fine-tuning without the prior."""
    from transformers.trainer_callback import CallbackHandler

    monkeypatch.setattr(CallbackHandler, "on_pre_optimizer_step", lambda self, args, state, control: control)
    with pytest.raises(RuntimeError, match="0 time"):
        _one_step("bert", 1, False, "callback", tmp_path)


def test_mixin_refuses_a_step_with_the_term_added_twice(tmp_path, monkeypatch):
    """If the last micro-batch were not flagged (every micro-batch looks like a sync step), the prior would
    enter G times: the mixin stops training instead."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "sync_gradients", property(lambda self: True))
    with pytest.raises(RuntimeError, match="2 time"):
        _one_step("bert", 2, False, "mixin", tmp_path)


def test_callback_and_trainer_default_num_train_examples_to_the_training_set_size(tmp_path):
    """Without ``num_train_examples``, PriorCallback (when training begins) and PriorTrainer take N =
    len(train_dataset), and take the same step as with N given."""
    results = []
    for mode in ("callback", "mixin"):
        model, data, prior = _setup("bert", 1)
        args = _args(tmp_path / mode, 1, False)
        if mode == "callback":
            cb = PriorCallback(prior)
            assert cb.num_train_examples is None
            Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
            assert cb.num_train_examples == len(data)
        else:
            trainer = PriorTrainer(model=model, args=args, train_dataset=data, prior=prior)
            assert trainer.num_train_examples == len(data)
            trainer.train()
        results.append(params_of(model))
    model, data, prior = _setup("bert", 1)
    cb = PriorCallback(prior, len(data))
    Trainer(model=model, args=_args(tmp_path / "given", 1, False), train_dataset=data, callbacks=[cb]).train()
    assert max_abs_diff(results[0], results[1]) < TOL
    assert max_abs_diff(results[0], params_of(model)) < TOL


def test_callback_without_num_train_examples_refuses_an_unsized_dataset(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(self.rows)

    model, data, prior = _setup("bert", 1)
    cb = PriorCallback(prior)
    trainer = Trainer(model=model, args=_args(tmp_path, 1, False), train_dataset=Stream(data), callbacks=[cb])
    with pytest.raises(ValueError, match="pass num_train_examples=N: the training dataset has no len"):
        trainer.train()
