"""One optimiser step of the Trainer with PriorCallback / PriorTrainer on a PEFT (LoRA) model equals the
hand-written step on ``mean CE + penalty/N`` (autograd through the adapters), for a tiny BERT and a tiny timm
ViT, with gradient accumulation 1 and 2; and the same for a plain loop with PriorRegularizer."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import TimmClassifier, bert_prior, timm_prior, tiny_bert
from finetune_helpers import image_examples, max_abs_diff, one_step_args, params_of, text_examples

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("timm")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from priorzoo.finetune import PriorCallback, PriorRegularizer, PriorTrainer, train_step  # noqa: E402

LR = 0.1
N = 10
TOL = 1e-5  # relative to the step's largest update


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


class MeanTrainer(Trainer):
    loss_is_scaled_for_ga = False  # the data term is the mean CE under accumulation (see PriorTrainer's docs)


class MeanPriorTrainer(PriorTrainer):
    loss_is_scaled_for_ga = False


def _setup(kind: str, n: int):
    """A LoRA model with non-zero lora_B (so ΔW ≠ 0 and both adapter gradients are non-zero), its prior, data."""
    if kind == "bert":
        base, data = tiny_bert(), text_examples(n)
        prior = bert_prior(base)
        config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    else:
        base, data = TimmClassifier(), image_examples(n)
        prior = timm_prior(base, prefix="model.")
        config = LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"])
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, prior, data


def _collate(data: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(d[k]) for d in data]) for k in data[0]}


def _hand_written_step(model, prior, data) -> dict[str, torch.Tensor]:
    """SGD on mean CE over the step's examples + penalty/N, by autograd on the PEFT model itself."""
    model = copy.deepcopy(model)
    model.train()
    batch = _collate(data)
    labels = batch.pop("labels")
    out = model(**batch)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    loss = torch.nn.functional.cross_entropy(logits.float(), labels) + prior.penalty(model) / N
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(LR * p.grad)
    return params_of(model)


@pytest.mark.parametrize(("kind", "ga"), [("bert", 1), ("bert", 2), ("timm", 1), ("timm", 2)])
@pytest.mark.parametrize("mode", ["callback", "mixin"])
def test_trainer_step_on_a_lora_model_equals_the_hand_written_step(kind, ga, mode, tmp_path):
    model, prior, data = _setup(kind, 4 * ga)
    expected = _hand_written_step(model, prior, data)
    before = params_of(model)
    args = one_step_args(tmp_path / "out", per_device=4, ga=ga, lr=LR)
    if mode == "callback":
        trainer = MeanTrainer(model=model, args=args, train_dataset=data, callbacks=[PriorCallback(prior, N)])
    else:
        trainer = MeanPriorTrainer(model=model, args=args, train_dataset=data, prior=prior, num_train_examples=N)
    reg = trainer.prior_regularizer if mode == "mixin" else None
    trainer.train()
    after = params_of(model)
    assert max_abs_diff(after, expected) <= TOL * max_abs_diff(expected, before)
    # the adapters moved, the base weights did not, and the prior's share of the step is visible
    names = [n for n in after if "lora_" in n]
    assert names and all(not torch.equal(after[n], before[n]) for n in names)
    assert all(torch.equal(after[n], before[n]) for n in after if "base_layer" in n)
    if reg is not None:
        assert [n.split(".")[-3] for n in reg.bound.parameter_names] == ["lora_A", "lora_B"] * (len(names) // 2)


def test_plain_loop_step_on_a_lora_model_equals_the_hand_written_step():
    model, prior, data = _setup("timm", 4)
    expected = _hand_written_step(model, prior, data)
    before = params_of(model)
    reg = PriorRegularizer(prior, model, num_train_examples=N)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = _collate(data)
    labels = batch.pop("labels")
    train_step(model, (batch["pixel_values"], labels), opt, regularizer=reg, forward=_timm_forward)
    assert max_abs_diff(params_of(model), expected) <= TOL * max_abs_diff(expected, before)


def _timm_forward(model, batch):
    x, y = batch
    return model(pixel_values=x)["logits"], y
