"""The tests' one set of tiny models and priors (random init, fixed seeds, fast on CPU).

Tiny BERTs are 2 layers of width 32 unless a test needs another shape; priors are built around a model's own
weights so that a test can check the maths against an analytic answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from priorzoo import PriorModel

BERT_VOCAB = 100


def tiny_bert_config(
    num_labels: int | None = None,
    *,
    vocab_size: int = BERT_VOCAB,
    hidden_size: int = 32,
    intermediate_size: int = 37,
    max_position_embeddings: int = 32,
    dropout: float | None = None,
    **kwargs: Any,
):
    """A 2-layer, 2-head ``BertConfig`` (width 32, 32 positions); ``dropout=0.0`` makes steps deterministic."""
    from transformers import BertConfig

    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        **kwargs,
    )


def tiny_bert(num_labels: int = 3, seed: int = 0):
    """BertForSequenceClassification, 2 layers of width 32, no dropout (deterministic steps)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels, dropout=0.0))


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


def mean_prior(named: Iterable[tuple[str, torch.Tensor]], *, variance: float = 0.01, exclude=()) -> PriorModel:
    """A diagonal prior centred on the given ``(name, tensor)`` pairs with one variance."""
    mean = {n: p.detach().clone() for n, p in named}
    return PriorModel.from_tensors(mean, variance=variance, exclude=exclude)


def shaped_prior(
    shapes: dict[str, tuple[int, ...]],
    *,
    rank: int = 3,
    seed: int = 0,
    variance: tuple[float, float] = (1.0, 0.05),
    factor_std: float = 0.3,
    factor_dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> PriorModel:
    """A SWAG-kind prior over tensors of the given shapes, no model needed: mean ~ N(0, 1), variance
    a·U(0, 1) + b with ``variance = (a, b)``, factor rows ~ N(0, factor_std²) (``rank`` 0: diagonal only);
    ``kwargs`` go to :meth:`PriorModel.from_tensors` (scale, eps, backbone, ...)."""
    g = torch.Generator().manual_seed(seed)
    a, b = variance
    mean = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    var = {n: torch.rand(s, generator=g) * a + b for n, s in shapes.items()}
    fac = {n: (factor_std * torch.randn((rank, *s), generator=g)).to(factor_dtype) for n, s in shapes.items()}
    return PriorModel.from_tensors(mean, var, fac if rank else None, **kwargs)


def prior_folder_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a prior folder's safetensors file(s), by stored name (all shards together)."""
    from safetensors.torch import load_file

    from priorzoo.format.files import prior_files

    out: dict[str, torch.Tensor] = {}
    for name, path in prior_files(folder).items():
        if name.endswith(".safetensors"):
            out.update(load_file(str(path)))
    return out


def rewrite_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a prior's safetensors file by ``tensors``, keeping its header metadata (its save id included), as
    a hand edit that keeps the file in its save would: the loader then judges the tensors, not the save."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
