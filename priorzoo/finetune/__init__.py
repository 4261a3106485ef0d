r"""Fine-tune with a learned prior: transformers callback and Trainer, plain loops, λ selection, BMA, SGLD.

The objective for N training examples is ``mean CE + ρ·penalty/N`` with penalty = ½(w−μ)ᵀΣ⁻¹(w−μ)
(Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022); every entry point below gives the same update:

- any loop: ``loss = criterion(out, y) + prior.penalty(model) / N``, or :class:`PriorRegularizer`;
- transformers: :class:`PriorCallback` (adds the analytic gradient before each optimiser step) or
  :class:`PriorTrainer` / :class:`PriorTrainerMixin` (adds the term inside ``compute_loss``);
- λ selection: :func:`tune_scale`; Bayesian inference: :class:`DownstreamSWAG`, :func:`bma_predict`,
  :class:`SGLD`; metrics: :func:`classification_metrics`.

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

from priorzoo.finetune.bayes import (
    SGLD,
    DownstreamSWAG,
    PredictiveAverager,
    average_predictive,
    bma_predict,
    refresh_batchnorm_,
)
from priorzoo.finetune.loop import evaluate, fit, l2sp_prior, predict_proba, train_step
from priorzoo.finetune.metrics import accuracy, classification_metrics, expected_calibration_error, nll
from priorzoo.finetune.regularizer import PriorRegularizer
from priorzoo.finetune.runners import seeded_loader
from priorzoo.finetune.scale import ScaleSearchResult, log_grid, split_train_validation, tune_scale

if TYPE_CHECKING:
    from priorzoo.finetune.callback import PriorCallback
    from priorzoo.finetune.trainer import PriorTrainer, PriorTrainerMixin

__all__ = [
    "SGLD",
    "DownstreamSWAG",
    "PredictiveAverager",
    "PriorCallback",
    "PriorRegularizer",
    "PriorTrainer",
    "PriorTrainerMixin",
    "ScaleSearchResult",
    "accuracy",
    "average_predictive",
    "bma_predict",
    "classification_metrics",
    "evaluate",
    "expected_calibration_error",
    "fit",
    "l2sp_prior",
    "log_grid",
    "nll",
    "predict_proba",
    "refresh_batchnorm_",
    "seeded_loader",
    "split_train_validation",
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
