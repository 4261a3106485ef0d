r"""Fine-tune with a learned prior: transformers callback and Trainer, plain loops, λ selection, BMA, SGLD.

The objective for N training examples is ``mean CE + ρ·penalty/N`` with penalty = ½(w−μ)ᵀΣ⁻¹(w−μ)
(Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022); every entry point below gives the same update:

- any loop: ``loss = criterion(out, y) + prior.penalty(model) / N``, or :class:`PriorRegularizer`;
- transformers: :class:`PriorCallback` (adds the analytic gradient before each optimiser step) or
  :class:`PriorTrainer` / :class:`PriorTrainerMixin` (adds the term inside ``compute_loss``);
- λ selection: :func:`tune_scale`; Bayesian inference: :class:`DownstreamSWAG`, :func:`bma_predict`,
  :class:`SGLD`; metrics: :func:`classification_metrics`;
- running methods (:mod:`priorzoo.finetune.runners`): :func:`make_optimizer`, :func:`seeded_loader`,
  :func:`fit_fresh`, :func:`grid_search`, :func:`fit_swag_posterior`, :func:`run_sgld`, with the bind options
  as one :class:`BindOptions`.

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
import warnings
from typing import TYPE_CHECKING, Any

from priorzoo.binding.batchnorm import refresh_batchnorm_
from priorzoo.finetune.bayes import SGLD, DownstreamSWAG, bma_predict
from priorzoo.finetune.loop import evaluate, fit, train_step
from priorzoo.finetune.metrics import classification_metrics
from priorzoo.finetune.options import BindOptions
from priorzoo.finetune.regularizer import PriorRegularizer
from priorzoo.finetune.runners import (
    fit_fresh,
    fit_swag_posterior,
    grid_search,
    make_optimizer,
    run_sgld,
    seeded_loader,
)
from priorzoo.finetune.scale import ScaleSearchResult, log_grid, split_train_validation, tune_scale

if TYPE_CHECKING:
    from priorzoo.finetune.callback import PriorCallback
    from priorzoo.finetune.trainer import PriorTrainer, PriorTrainerMixin

__all__ = [
    "SGLD",
    "BindOptions",
    "DownstreamSWAG",
    "PriorCallback",
    "PriorRegularizer",
    "PriorTrainer",
    "PriorTrainerMixin",
    "ScaleSearchResult",
    "bma_predict",
    "classification_metrics",
    "evaluate",
    "fit",
    "fit_fresh",
    "fit_swag_posterior",
    "grid_search",
    "log_grid",
    "make_optimizer",
    "refresh_batchnorm_",
    "run_sgld",
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

# names this package exported before 0.2; they still work (from their modules) with a DeprecationWarning
_MOVED = {
    "PredictiveAverager": "priorzoo.finetune.bayes",
    "accuracy": "priorzoo.finetune.metrics",
    "average_predictive": "priorzoo.finetune.bayes",
    "expected_calibration_error": "priorzoo.finetune.metrics",
    "nll": "priorzoo.finetune.metrics",
    "predict_proba": "priorzoo.finetune.loop",
}


def __getattr__(name: str) -> Any:
    """Import the transformers integrations on first access (they need ``priorzoo[transformers]``)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        warnings.warn(
            f"`priorzoo.finetune.{name}` is deprecated and will be removed in priorzoo 0.3; import it from "
            f"`{_MOVED[name]}`",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'priorzoo.finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
