"""Shared builders for the fine-tuning tests: data and Trainer arguments (the models and priors are in
tests/_models.py)."""

from __future__ import annotations

import torch
from _models import BERT_VOCAB

SEQ_LEN = 8


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
