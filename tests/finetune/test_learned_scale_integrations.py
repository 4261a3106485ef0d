"""Learned scales through the transformers Trainer (PriorCallback, PriorTrainer: the same steps as a plain loop with
PriorRegularizer(scale="learned"), scales and σ logged) and through PEFT adapters (the learned λ of a LoRA model
equals that of its merged model at the same weights and σ, for a learned prior and for L2-SP on ΔW)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _models import bert_prior, tiny_bert
from finetune_helpers import max_abs_diff, one_step_args, params_of, text_examples

transformers = pytest.importorskip("transformers")

from priorzoo.finetune import PriorCallback, PriorRegularizer, PriorTrainer, train_step  # noqa: E402
from priorzoo.finetune.learned_scale import LearnedScale  # noqa: E402
from priorzoo.learn import isotropic_prior  # noqa: E402

LR = 0.1
N = 4
STEPS = 3


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def _reference(data) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """Plain loop: the whole (4-example) data set as one batch per step, PriorRegularizer(scale="learned")."""
    model = tiny_bert()
    reg = PriorRegularizer(bert_prior(model), model, num_train_examples=N, scale="learned", sigma_init=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batch = {k: torch.stack([torch.as_tensor(e[k]) for e in data]) for k in data[0]}
    for _ in range(STEPS):
        train_step(model, batch, opt, regularizer=reg)
    return params_of(model), reg.scales, reg.sigma


@pytest.mark.parametrize("mode", ["callback", "mixin"])
def test_trainer_steps_equal_the_plain_loop(mode, tmp_path):
    data = text_examples(N)
    expected, scales, sigma = _reference(data)
    model = tiny_bert()
    prior = bert_prior(model)
    args = one_step_args(tmp_path / "out", per_device=N, ga=1, lr=LR, max_steps=STEPS)
    if mode == "callback":
        cb = PriorCallback(prior, N, scale="learned", sigma_init=1e-2)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
        reg = None
    else:
        trainer = PriorTrainer(
            model=model, args=args, train_dataset=data, prior=prior, scale="learned", prior_sigma_init=1e-2
        )
    trainer.train()
    reg = cb.regularizer if mode == "callback" else trainer.prior_regularizer
    assert max_abs_diff(params_of(model), expected) < 1e-6
    assert reg.scales == pytest.approx(scales, rel=1e-6) and reg.sigma == pytest.approx(sigma, rel=1e-9)
    assert reg.sigma != pytest.approx(1e-2)  # σ moved
    logged = [h for h in trainer.state.log_history if "prior_sigma" in h and "loss" in h]
    assert len(logged) == STEPS and {"prior_scale_backbone", "prior_scale_head", "prior_term"} <= set(logged[-1])
    assert logged[-1]["prior_sigma"] == pytest.approx(sigma, rel=1e-9)


# ---------------------------------------------------------------------- PEFT
def _peft_and_merged():
    from peft import LoraConfig, get_peft_model

    from priorzoo.binding.peft import peft_view

    base = tiny_bert()
    prior = bert_prior(base)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # ΔW ≠ 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    merged = copy.deepcopy(model).merge_and_unload()
    view = peft_view(model)
    trainable = set(view.adapted) | {n for n, p in merged.named_parameters() if n.startswith("classifier.")}
    for n, p in merged.named_parameters():
        p.requires_grad_(n in trainable)
    return model, merged, prior


def _set_sigma(learned: LearnedScale, sigma: float) -> None:
    with torch.no_grad():
        learned.rho.fill_(sigma + math.log(-math.expm1(-sigma)))


@pytest.mark.parametrize("which", ["learned_prior", "l2sp_on_delta_w"])
def test_peft_learned_scales_equal_the_merged_model(which):
    pytest.importorskip("peft")
    model, merged, prior = _peft_and_merged()
    if which == "l2sp_on_delta_w":
        prior = isotropic_prior(model, 0.01)  # centred on W₀ + ΔW now
        with torch.no_grad():  # move the adapters so that the residual is not zero
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(1.5)
        merged = copy.deepcopy(model).merge_and_unload()
        for n, p in merged.named_parameters():
            p.requires_grad_(n.startswith("classifier.") or n.endswith(("query.weight", "value.weight")))
    values = {}
    for name, net in (("peft", model), ("merged", merged)):
        learned = LearnedScale(prior, net, num_train_examples=N)
        _set_sigma(learned, 0.02)
        values[name] = learned
    peft, ref = values["peft"], values["merged"]
    assert peft.groups[0].numel == ref.groups[0].numel  # D_g: the effective weights of the adapted layers
    assert peft.scales["backbone"] == pytest.approx(ref.scales["backbone"], rel=1e-5)
    assert peft.scales["head"] == pytest.approx(ref.scales["head"], rel=1e-6)
    assert peft.scales["backbone"] > 1.01 * 0.02**2 * (1 if which == "learned_prior" else 100)  # r ≠ 0 matters


def test_peft_training_with_learned_scale_moves_only_adapters_and_head():
    pytest.importorskip("peft")
    model, _, prior = _peft_and_merged()
    before = params_of(model)
    reg = PriorRegularizer(prior, model, num_train_examples=N, scale="learned")
    data = text_examples(N)
    batch = {k: torch.stack([torch.as_tensor(e[k]) for e in data]) for k in data[0]}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(2):
        train_step(model, batch, opt, regularizer=reg)
    after = params_of(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(("lora_" in n) or ("classifier" in n) for n in moved)


@pytest.mark.parametrize("scale", ["learned", 1e3])
def test_an_exception_in_a_step_leaves_the_mean_weights_and_no_thread_running(scale, tmp_path):
    """A forward that fails in the second step (an interrupt, a batch-norm error): PriorTrainer.train re-raises it
    after waiting for the prior term's background thread (left running, it aborted the interpreter at exit) and,
    with a learned scale, after putting w̄ back in place of the sample w̄ + σε."""
    data = text_examples(2 * N)
    model = tiny_bert()
    after_first: list[dict[str, torch.Tensor]] = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            after_first.append(params_of(model))

    calls = []

    def fail_second(_module, _inputs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stop")

    model.register_forward_pre_hook(fail_second)
    args = one_step_args(tmp_path / "out", per_device=N, ga=1, lr=LR, max_steps=2)
    trainer = PriorTrainer(
        model=model, args=args, train_dataset=data, prior=bert_prior(model), scale=scale, callbacks=[Record()]
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    reg = trainer.prior_regularizer
    assert reg._pending is None
    if reg.learned is not None:
        assert not reg.learned.perturbed and reg.learned._pending is None
    assert len(after_first) == 1 and max_abs_diff(params_of(model), after_first[0]) == 0.0


def test_accumulated_micro_batches_equal_one_big_batch():
    """PriorTrainer(scale="learned") with 2 micro-batches of 4 per optimiser step takes the steps of one batch of
    8: one sample w̄ + σε per step, the KL/D gradient and σ's step once per optimiser step, N (κ = D/N) unchanged
    (the data term a mean over micro-batches: `loss_is_scaled_for_ga = False`, the documented remedy for BERT)."""
    import tempfile

    class MeanTrainer(PriorTrainer):
        loss_is_scaled_for_ga = False

    data = text_examples(4 * N)
    runs = []
    for per_device, ga in ((2 * N, 1), (N, 2)):
        model = tiny_bert()
        with tempfile.TemporaryDirectory() as out:
            args = one_step_args(out, per_device=per_device, ga=ga, lr=LR, max_steps=2)
            trainer = MeanTrainer(
                model=model, args=args, train_dataset=data, prior=bert_prior(model), scale="learned",
                prior_sigma_init=1e-2,
            )  # fmt: skip
            trainer.train()
        reg = trainer.prior_regularizer
        runs.append((params_of(model), reg.scales, reg.sigma, reg.learned.kappa))
    (big, scales, sigma, kappa), (acc, acc_scales, acc_sigma, acc_kappa) = runs
    assert max_abs_diff(acc, big) < 1e-6 and acc_kappa == kappa
    assert acc_scales == pytest.approx(scales, rel=1e-5) and acc_sigma == pytest.approx(sigma, rel=1e-6)
    assert sigma != pytest.approx(1e-2)
