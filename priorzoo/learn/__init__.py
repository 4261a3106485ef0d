"""Learn priors: SWAG from any training loop, source objectives, and the isotropic / Fisher baselines.

* :class:`SWAGCollector` — streaming SWAG statistics (Maddox et al. 2019) over a backbone's parameters;
  ``collect()`` at each snapshot, ``to_prior()`` → :class:`~priorzoo.PriorModel`.
* :class:`ConstantLRSchedule`, :class:`CyclicCosineSchedule` — SWA learning-rate schedules that also say
  when to snapshot.
* :class:`ShardedSWAGCollector` — what ``SWAGCollector`` builds on an FSDP2 model: each process collects its
  own shards and ``save_prior()`` writes one prior folder from them (:mod:`priorzoo.learn.sharded_swag`).
* :func:`swag_fit` — a complete SGD + SWAG loop for timm / plain PyTorch models;
  :class:`SWAGCallback` — the same inside a transformers ``Trainer`` (needs ``priorzoo[transformers]``).
* Objectives: :class:`CrossEntropyObjective`, :class:`SimCLRObjective` (projection head not in the
  prior), :class:`MaskedLMObjective`.
* Baselines: :func:`isotropic_prior` (L2-SP), :func:`empirical_fisher` + :func:`fisher_prior`
  (diagonal Laplace / EWC-style).

Example:
    >>> import torch
    >>> from priorzoo.learn import isotropic_prior
    >>> prior = isotropic_prior(torch.nn.Linear(3, 2), variance=0.01)
    >>> prior.kind.value, prior.names
    ('isotropic', ['weight', 'bias'])
"""

from __future__ import annotations

from typing import Any

from priorzoo.learn.baselines import empirical_fisher, fisher_prior, isotropic_prior
from priorzoo.learn.callbacks import swag_fit
from priorzoo.learn.objectives import (
    CrossEntropyObjective,
    ImageAugment,
    MaskedLMObjective,
    ProjectionHead,
    SimCLRObjective,
    backbone_features,
    mask_tokens,
    nt_xent_loss,
)
from priorzoo.learn.recommended_scale import recommend_scale
from priorzoo.learn.schedules import ConstantLRSchedule, CyclicCosineSchedule
from priorzoo.learn.sharded_swag import ShardedSWAGCollector
from priorzoo.learn.swag import SWAGCollector

__all__ = [
    "ConstantLRSchedule",
    "CrossEntropyObjective",
    "CyclicCosineSchedule",
    "ImageAugment",
    "MaskedLMObjective",
    "ProjectionHead",
    "SWAGCallback",
    "SWAGCollector",
    "ShardedSWAGCollector",
    "SimCLRObjective",
    "backbone_features",
    "empirical_fisher",
    "fisher_prior",
    "isotropic_prior",
    "mask_tokens",
    "nt_xent_loss",
    "recommend_scale",
    "swag_fit",
]


def __getattr__(name: str) -> Any:
    # SWAGCallback subclasses transformers.TrainerCallback: built on first access so that importing
    # priorzoo.learn never imports transformers (an ImportError then names `pip install "priorzoo[transformers]"`)
    if name == "SWAGCallback":
        from priorzoo.learn.callbacks import _make_callback_class

        return _make_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
