"""Shared builders for the fine-tuning tests: tiny random-init BERT and timm models, priors, data, Trainer
arguments."""

from __future__ import annotations

import torch

from priorzoo import PriorModel

BERT_VOCAB = 100
SEQ_LEN = 8


def tiny_bert(num_labels: int = 3, seed: int = 0):
    """BertForSequenceClassification, 2 layers of width 32, no dropout (deterministic steps)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=BERT_VOCAB,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


class TimmClassifier(torch.nn.Module):
    """A timm model that returns a transformers-style output with the loss (forward has no **kwargs).

    Default: timm's ``test_vit`` at 32×32 (4 patches, 300k parameters, classifier ``head``), fast in fp32
    and bf16 on CPU.
    """

    def __init__(self, name: str = "test_vit", num_classes: int = 3, seed: int = 0, **timm_kwargs) -> None:
        super().__init__()
        import timm

        torch.manual_seed(seed)
        if name.startswith("test_vit"):
            timm_kwargs.setdefault("img_size", 32)
        self.model = timm.create_model(name, num_classes=num_classes, **timm_kwargs)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.model(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits.float(), labels)
        return out


def tiny_timm(num_classes: int = 3, seed: int = 0):
    """timm's `test_resnet` (373k parameters, batch norm), random init, classifier `fc`."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes)


def random_prior(
    named: dict[str, torch.Tensor],
    *,
    rank: int = 3,
    seed: int = 1,
    offset: float = 0.05,
    variance: float = 0.01,
    exclude: list[str] | None = None,
) -> PriorModel:
    """A SWAG-kind prior around ``named`` (mean = weights + offset·noise) with random variances/factors."""
    g = torch.Generator().manual_seed(seed)
    mean = {n: t.detach().float() + offset * torch.randn(t.shape, generator=g) for n, t in named.items()}
    var = {n: variance * (0.5 + torch.rand(t.shape, generator=g)) for n, t in named.items()}
    factor = {n: 0.02 * torch.randn((rank, *t.shape), generator=g) for n, t in named.items()} if rank > 0 else None
    return PriorModel.from_tensors(mean, var, factor, exclude=exclude or [])


def bert_prior(model, **kwargs) -> PriorModel:
    """A prior over the BERT backbone, named as in ``BertModel`` (no ``bert.`` prefix), pooler included."""
    named = {n.removeprefix("bert."): p for n, p in model.named_parameters() if n.startswith("bert.")}
    return random_prior(named, **kwargs)


def timm_prior(model, prefix: str = "", head: str = "head", **kwargs) -> PriorModel:
    """A prior over a timm model's backbone, excluding its classifier (``head`` for ViT, ``fc`` for ResNet)."""
    named = {n.removeprefix(prefix): p for n, p in model.named_parameters()}
    named = {n: p for n, p in named.items() if not n.startswith(head + ".")}
    return random_prior(named, exclude=[f"{head}.*"], **kwargs)


def text_examples(n: int, num_labels: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, BERT_VOCAB, (SEQ_LEN,), generator=g),
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": int(torch.randint(0, num_labels, (1,), generator=g)),
        }
        for _ in range(n)
    ]


def image_examples(n: int, num_classes: int = 3, size: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(3, size, size, generator=g),
            "labels": int(torch.randint(0, num_classes, (1,), generator=g)),
        }
        for _ in range(n)
    ]


def one_step_args(output_dir, *, per_device: int, ga: int, lr: float, **kw):
    """``TrainingArguments`` for one deterministic plain-SGD optimiser step on CPU: constant lr, no weight
    decay, no clipping, no checkpoints, every step logged."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        max_steps=kw.pop("max_steps", 1),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga,
        learning_rate=lr,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        **kw,
    )


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
