"""priorzoo: a zoo of learned Bayesian priors for transfer learning.

Learn a Gaussian posterior over a backbone's weights on a source task (SWAG), save and share it like
pre-trained weights, and use it as the prior of a downstream fine-tuning run (Shwartz-Ziv et al.,
"Pre-Train Your Loss: Easy Bayesian Transfer Learning with Informative Priors", NeurIPS 2022).

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> prior = PriorModel.from_tensors(mean={"w": torch.zeros(3)}, variance={"w": torch.ones(3)})
    >>> float(prior.log_prob({"w": torch.zeros(3)}))  # doctest: +ELLIPSIS
    -2.75...
"""

from __future__ import annotations

from priorzoo._version import __version__
from priorzoo.binding import sharded as _sharded  # noqa: F401 (registers the FSDP2 binding with PriorModel.bind)
from priorzoo.binding.bound import BoundPrior
from priorzoo.binding.matching import MatchResult
from priorzoo.binding.options import BindOptions
from priorzoo.errors import PriorFormatError, PriorMatchError, PriorNotFoundError
from priorzoo.format.config import PriorConfig, PriorKind
from priorzoo.prior import PriorModel

__all__ = [
    "BindOptions",
    "BoundPrior",
    "MatchResult",
    "PriorConfig",
    "PriorFormatError",
    "PriorKind",
    "PriorMatchError",
    "PriorModel",
    "PriorNotFoundError",
    "__version__",
]
