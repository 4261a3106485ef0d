r"""Fine-tune with a learned prior: the prior term for any loop, transformers integrations, λ selection, BMA, SGLD.

The objective for N training examples is ``mean CE + ρ·penalty/N`` with penalty = ½(w−μ)ᵀΣ⁻¹(w−μ)
(Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022); every entry point below gives the same update, from
one validated :class:`PriorTerm` (N, ρ, λ and the bind options, checked once where they enter):

- any loop: ``loss = criterion(out, y) + prior.penalty(model) / N``, or :class:`PriorRegularizer`
  (:func:`fit`, :func:`train_step`, :func:`evaluate` are a small plain loop around it);
- transformers: :class:`PriorCallback` (adds the analytic gradient before each optimiser step) or
  :class:`PriorTrainer` / :class:`PriorTrainerMixin` (adds the term inside ``compute_loss``);
- λ: a number, the prior's own (``recommended_scale``), :func:`tune_scale` (search on validation data,
  :class:`ScaleSearchResult`) or ``scale="learned"`` (:mod:`priorzoo.finetune.learned_scale`);
- Bayesian inference downstream: :class:`DownstreamSWAG`, :func:`bma_predict`, :class:`SGLD`,
  :func:`refresh_batchnorm_`; metrics: :func:`classification_metrics`.

The building blocks of the CLI and the demo's runs (optimiser factory, seeded loaders, grid search, SWAG and SGLD
phases) are in :mod:`priorzoo.finetune.runners`; the λ grid and the validation split in
:mod:`priorzoo.finetune.scale`.

``PriorCallback``, ``PriorTrainer`` and ``PriorTrainerMixin`` import transformers on first access only
(``pip install "priorzoo[transformers]"``); everything else needs only torch.

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> from priorzoo.finetune import PriorRegularizer
    >>> lin = torch.nn.Linear(3, 2)
    >>> prior = PriorModel.from_tensors({n: torch.zeros_like(p) for n, p in lin.named_parameters()}, variance=1.0)
    >>> reg = PriorRegularizer(prior, lin, num_train_examples=100)
    >>> reg.coefficient
    0.01
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from priorzoo.binding.batchnorm import refresh_batchnorm_
from priorzoo.finetune.bayes import SGLD, DownstreamSWAG, bma_predict
from priorzoo.finetune.loop import evaluate, fit, train_step
from priorzoo.finetune.metrics import classification_metrics
from priorzoo.finetune.regularizer import PriorRegularizer
from priorzoo.finetune.scale import ScaleSearchResult, tune_scale
from priorzoo.finetune.term import PriorTerm

if TYPE_CHECKING:
    from priorzoo.finetune.callback import PriorCallback
    from priorzoo.finetune.trainer import PriorTrainer, PriorTrainerMixin

__all__ = [
    "SGLD",
    "DownstreamSWAG",
    "PriorCallback",
    "PriorRegularizer",
    "PriorTerm",
    "PriorTrainer",
    "PriorTrainerMixin",
    "ScaleSearchResult",
    "bma_predict",
    "classification_metrics",
    "evaluate",
    "fit",
    "refresh_batchnorm_",
    "train_step",
    "tune_scale",
]

_LAZY = {
    "PriorCallback": "priorzoo.finetune.callback",
    "PriorTrainer": "priorzoo.finetune.trainer",
    "PriorTrainerMixin": "priorzoo.finetune.trainer",
}


def __getattr__(name: str) -> Any:
    """Import the transformers integrations on first access (they need ``priorzoo[transformers]``)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'priorzoo.finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
