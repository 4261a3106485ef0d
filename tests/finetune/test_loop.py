"""Plain PyTorch / timm loops: the helpers give the hand-written `mean CE + penalty/N` step; the penalty
pulls toward μ with strength 1/λ; bad inputs fail clearly."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _models import bert_prior, random_prior, timm_prior, tiny_bert, tiny_bert_config, tiny_timm
from finetune_helpers import max_abs_diff, params_of, text_examples

from priorzoo import PriorMatchError, PriorModel
from priorzoo.errors import PriorFormatError
from priorzoo.finetune import SGLD, PriorRegularizer, train_step, tune_scale
from priorzoo.learn import isotropic_prior

N = 20
LR = 0.05


def _timm_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])


def test_plain_loop_step_equals_hand_written_step_timm():
    pytest.importorskip("timm")
    x, y = _timm_batch()
    results = []
    for use_helper in (True, False):
        model = tiny_timm()
        prior = timm_prior(model, head="fc")
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        if use_helper:
            reg = PriorRegularizer(prior, model, num_train_examples=N)
            out = train_step(model, (x, y), opt, regularizer=reg)
            assert out["prior_term"] > 0
        else:  # the one-liner of the docs, written by hand
            model.train()
            loss = F.cross_entropy(model(x), y) + prior.penalty(model) / N
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append(params_of(model))
    assert max_abs_diff(*results) < 1e-6
    # and the prior changed the step: compare with the step without it
    model = tiny_timm()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    train_step(model, (x, y), opt)
    assert max_abs_diff(results[0], params_of(model)) > 1e-3


def test_plain_loop_step_equals_hand_written_step_bert_bf16_autocast():
    pytest.importorskip("transformers")
    batch = {k: torch.stack([torch.as_tensor(e[k]) for e in text_examples(4)]) for k in ("input_ids", "labels")}
    results = []
    for use_helper in (True, False):
        model = tiny_bert()
        prior = bert_prior(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        if use_helper:
            reg = PriorRegularizer(prior, model, num_train_examples=N)
            train_step(model, dict(batch), opt, regularizer=reg, autocast_dtype=torch.bfloat16)
        else:
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=batch["input_ids"]).logits
            assert logits.dtype == torch.bfloat16  # autocast really ran
            loss = F.cross_entropy(logits.float(), batch["labels"]) + prior.penalty(model) / N
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append(params_of(model))
    assert max_abs_diff(*results) < 1e-6


def test_penalty_is_not_computed_in_bf16_under_autocast():
    model = torch.nn.Linear(64, 64, bias=False)
    prior = random_prior({"weight": model.weight}, rank=4, offset=0.3)
    reg = PriorRegularizer(prior, model, num_train_examples=1)
    exact = reg.penalty()
    exact.backward()
    exact_grad = model.weight.grad.clone()
    model.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reg.penalty()
    inside.backward()  # backward outside the autocast region, as torch.amp recommends
    assert inside.dtype == torch.float32
    assert float(inside.detach()) == pytest.approx(float(exact.detach()), rel=1e-7)
    # with the factor products in bf16 the value is off by ~6e-6 and the gradient by ~1e-3 relative
    torch.testing.assert_close(model.weight.grad, exact_grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- direction and 1/λ scaling
def _toy():
    torch.manual_seed(3)
    model = torch.nn.Linear(5, 3)
    g = torch.Generator().manual_seed(4)
    mean = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    var = {n: 0.5 + torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    factor = {n: 0.5 * torch.randn((2, *p.shape), generator=g) for n, p in model.named_parameters()}
    return model, PriorModel.from_tensors(mean, var, factor)


def test_penalty_gradient_points_to_the_mean_and_scales_as_one_over_lambda():
    model, prior = _toy()
    residual = torch.cat([(p.detach() - prior.mean[n]).flatten() for n, p in model.named_parameters()])
    grads = {}
    for lam in (1.0, 10.0, 1000.0):
        reg = PriorRegularizer(prior, model, num_train_examples=1, scale=lam)
        grads[lam] = torch.cat([g.flatten() for g in reg.gradient()])
        # −∇ is a descent direction for the distance to μ: ⟨∇, w − μ⟩ = (w−μ)ᵀΣ⁻¹(w−μ) > 0
        assert float(grads[lam] @ residual) > 0
    for lam in (10.0, 1000.0):
        torch.testing.assert_close(grads[lam] * lam, grads[1.0], rtol=1e-5, atol=1e-7)

    # a small gradient step on the prior term alone moves w toward μ by an amount ∝ 1/λ
    moved = {}
    for lam in (1.0, 10.0):
        m, _ = _toy()
        reg = PriorRegularizer(prior, m, num_train_examples=1, scale=lam)
        opt = torch.optim.SGD(m.parameters(), lr=1e-4)
        before = sum(float((p.detach() - prior.mean[n]).pow(2).sum()) for n, p in m.named_parameters())
        opt.zero_grad()
        reg().backward()
        opt.step()
        after = sum(float((p.detach() - prior.mean[n]).pow(2).sum()) for n, p in m.named_parameters())
        assert after < before
        moved[lam] = math.sqrt(before) - math.sqrt(after)
    assert moved[1.0] / moved[10.0] == pytest.approx(10.0, rel=1e-2)


def test_scale_argument_equals_with_scale_and_gradient_matches_autograd():
    model, prior = _toy()
    a = PriorRegularizer(prior, model, num_train_examples=7, prior_weight=2.0, scale=30.0)
    b = PriorRegularizer(prior.with_scale(30.0), model, num_train_examples=7, prior_weight=2.0)
    assert a.scale == b.scale == 30.0
    torch.testing.assert_close(a(), b())
    model.zero_grad()
    a().backward()
    auto = [p.grad.clone() for p in a.parameters]
    for g_auto, g in zip(auto, a.gradient()):
        torch.testing.assert_close(g_auto, g.reshape(g_auto.shape), rtol=1e-5, atol=1e-8)
    model.zero_grad()
    value = float(a.add_to_grad_())
    assert value == pytest.approx(float(a().detach()), rel=1e-6)
    for g_auto, p in zip(auto, a.parameters):
        torch.testing.assert_close(p.grad, g_auto, rtol=1e-5, atol=1e-8)


def test_regularizer_rebinds_after_the_model_moves_dtype():
    model, prior = _toy()
    reg = PriorRegularizer(prior, model, num_train_examples=5)
    before = reg.bound
    model.double()  # parameters replaced: the cached binding is stale
    value = reg()
    assert reg.bound is not before
    assert value.dtype == torch.float32  # computed in the prior's dtype (float32), whatever the model's


def test_l2sp_prior_is_isotropic_around_the_starting_weights_and_skips_the_head():
    pytest.importorskip("transformers")
    model = tiny_bert()
    prior = isotropic_prior(model, 0.01)
    assert prior.kind.value == "isotropic"
    assert not any(n.startswith("classifier") for n in prior.names)
    reg = PriorRegularizer(prior, model, num_train_examples=10)
    assert float(reg().detach()) == 0.0  # centred on the current weights
    with torch.no_grad():
        model.bert.pooler.dense.bias.add_(0.1)
    k = model.bert.pooler.dense.bias.numel()
    assert float(reg().detach()) == pytest.approx(0.5 * k * 0.01 / 0.01 / 10, rel=1e-5)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100", float("nan"), None])
def test_bad_num_train_examples(bad):
    model, prior = _toy()
    with pytest.raises(ValueError, match="num_train_examples"):
        PriorRegularizer(prior, model, num_train_examples=bad)
    pytest.importorskip("transformers")
    from priorzoo.finetune import PriorCallback

    with pytest.raises(ValueError, match="num_train_examples"):
        PriorCallback(prior, num_train_examples=bad)
    with pytest.raises(ValueError, match="num_train_examples"):
        SGLD(model.parameters(), lr=0.1, num_train_examples=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_scale(bad):
    model, prior = _toy()
    with pytest.raises(ValueError, match="λ"):
        PriorRegularizer(prior, model, num_train_examples=10, scale=bad)
    with pytest.raises(ValueError, match="λ"):
        tune_scale(prior, lambda: model, [], [], num_train_examples=10, grid=[1.0, bad])
    with pytest.raises(PriorFormatError, match="scale"):
        prior.with_scale(bad)
    pytest.importorskip("transformers")
    from priorzoo.finetune import PriorCallback

    with pytest.raises(ValueError, match="λ"):
        PriorCallback(prior, num_train_examples=10, scale=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_bad_prior_weight(bad):
    model, prior = _toy()
    with pytest.raises(ValueError, match="prior_weight"):
        PriorRegularizer(prior, model, num_train_examples=10, prior_weight=bad)


def test_prior_for_another_model_is_refused():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    bert = tiny_bert()
    resnet = tiny_timm()
    with pytest.raises(PriorMatchError, match="no prior parameter matches"):
        PriorRegularizer(bert_prior(bert), resnet, num_train_examples=10)
    # same architecture, another width: a shape mismatch, named
    from transformers import BertForSequenceClassification

    wider = BertForSequenceClassification(tiny_bert_config(hidden_size=48))
    with pytest.raises(PriorMatchError, match="another shape"):
        PriorRegularizer(bert_prior(bert), wider, num_train_examples=10)


def test_prior_for_another_model_fails_when_the_trainer_is_built(tmp_path):
    pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from _models import TimmClassifier

    from priorzoo.finetune import PriorCallback, PriorTrainer

    transformers.logging.set_verbosity_error()
    args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    data = text_examples(4)
    wrong = timm_prior(TimmClassifier(), prefix="model.")
    with pytest.raises(PriorMatchError):
        transformers.Trainer(model=tiny_bert(), args=args, train_dataset=data, callbacks=[PriorCallback(wrong, 4)])
    with pytest.raises(PriorMatchError):
        PriorTrainer(model=tiny_bert(), args=args, train_dataset=data, prior=wrong)
    model = tiny_bert()
    with pytest.raises(RuntimeError, match="twice"):
        PriorTrainer(
            model=model,
            args=args,
            train_dataset=data,
            prior=bert_prior(model),
            callbacks=[PriorCallback(bert_prior(model), 4)],
        )


def test_prior_dtype_and_device_are_handled():
    model, prior = _toy()
    ref = [g.clone() for g in PriorRegularizer(prior, model, num_train_examples=3).gradient()]
    # a float64 prior is used as is (computed in float64), a float16 one in float32: same gradient
    p64 = PriorModel.from_tensors(
        {n: t.double() for n, t in prior.mean.items()},
        {n: t.double() for n, t in prior.variance.items()},
        {n: t.double() for n, t in prior.cov_factor.items()},
    )
    for g, r in zip(PriorRegularizer(p64, model, num_train_examples=3).gradient(), ref):
        torch.testing.assert_close(g.float(), r, rtol=1e-5, atol=1e-7)
    p16 = PriorModel.from_tensors(
        {n: t.half() for n, t in prior.mean.items()},
        {n: t.half() for n, t in prior.variance.items()},
        {n: t.half() for n, t in prior.cov_factor.items()},
    )
    reg16 = PriorRegularizer(p16, model, num_train_examples=3)
    assert reg16.bound.gaussian.dtype == torch.float32
    # a bf16 model gets bf16 gradients of the float32 computation
    model_bf16, _ = _toy()
    model_bf16.to(torch.bfloat16)
    reg = PriorRegularizer(prior, model_bf16, num_train_examples=3)
    assert reg().dtype == torch.float32
    model_bf16.zero_grad()
    reg().backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model_bf16.parameters())
    # a prior on the meta device (no data) and a model on the meta device are refused clearly
    moved = PriorModel(
        prior.config,
        {n: t.to("meta") for n, t in prior.mean.items()},
        {n: t.to("meta") for n, t in prior.variance.items()},
        {n: t.to("meta") for n, t in prior.cov_factor.items()},
        validate=False,
    )
    with pytest.raises(ValueError, match="meta device"):
        PriorRegularizer(moved, model, num_train_examples=3)
    meta_model = torch.nn.Linear(5, 3, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        PriorRegularizer(prior, meta_model, num_train_examples=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check the CPU → GPU move")
def test_cpu_prior_is_moved_to_a_cuda_model():
    model, prior = _toy()
    ref = [g.clone() for g in PriorRegularizer(prior, model, num_train_examples=3).gradient()]
    model.cuda()
    reg = PriorRegularizer(prior, model, num_train_examples=3)
    assert reg.bound.device.type == "cuda"
    for g, r in zip(reg.gradient(), ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-5, atol=1e-6)


def test_trainer_setup_refusals():
    pytest.importorskip("transformers")
    from priorzoo.finetune.callback import check_trainer_setup

    ok = SimpleNamespace(deepspeed=None, fsdp=None, optim="sgd")
    check_trainer_setup(ok, where="PriorCallback", gradient_hook=True)
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        check_trainer_setup(
            SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, fsdp=None, optim="sgd"),
            where="PriorCallback",
            gradient_hook=True,
        )
    # FSDP is accepted here (FSDP2 binds to the shards; FSDP1 is refused later, from the parameters)
    check_trainer_setup(SimpleNamespace(deepspeed=None, fsdp="full_shard", optim="sgd"), where="x", gradient_hook=True)
    lomo = SimpleNamespace(deepspeed=None, fsdp=None, optim="adalomo")
    with pytest.raises(RuntimeError, match="inside backward"):
        check_trainer_setup(lomo, where="PriorCallback", gradient_hook=True)
    check_trainer_setup(lomo, where="PriorTrainer", gradient_hook=False)  # the loss path is fine


def test_fp16_gradients_are_unscaled_before_the_prior_gradient_is_added():
    """The callback's fp16 path: GradScaler-scaled gradients are unscaled once (public GradScaler API) before
    the prior gradient joins them, so the prior is not divided by the loss scale at the step."""
    pytest.importorskip("transformers")
    from priorzoo.finetune.callback import _unscale_if_needed

    model, _ = _toy()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    wrapped = SimpleNamespace(optimizer=opt, scaler=scaler)  # how accelerate's AcceleratedOptimizer looks
    _unscale_if_needed(wrapped)
    for p, g in zip(model.parameters(), scaled):
        torch.testing.assert_close(p.grad, g / 1024.0)
    _unscale_if_needed(wrapped)  # a second call (the Trainer already unscaled) is a no-op, not an error
    for p, g in zip(model.parameters(), scaled):
        torch.testing.assert_close(p.grad, g / 1024.0)
    _unscale_if_needed(SimpleNamespace(optimizer=opt, scaler=None))  # no scaler: nothing to do


def test_l2sp_prior_with_exclude_binds_to_its_model():
    import torch

    from priorzoo.finetune import PriorRegularizer
    from priorzoo.learn import isotropic_prior

    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    prior = isotropic_prior(m, 0.01, exclude="1.*")
    assert prior.names == ["0.weight", "0.bias"]
    reg = PriorRegularizer(prior, m, num_train_examples=10)
    assert reg().item() == 0.0


def test_evaluate_reports_diverged_weights_clearly():
    import pytest
    import torch

    from priorzoo.finetune import evaluate

    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    loader = [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(FloatingPointError, match="diverged"):
        evaluate(model, loader)
