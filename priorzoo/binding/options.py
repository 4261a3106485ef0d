"""Which parameters a prior binds to, as one validated object: :class:`BindOptions`.

The options of :meth:`priorzoo.PriorModel.bind` (``include``, ``exclude``, ``exclude_head``, ``allow_partial``,
``dtype``) are checked once, where they enter (``PriorModel.bind``'s keywords, ``PriorRegularizer``,
``PriorCallback``, ``PriorTrainer``, :class:`~priorzoo.finetune.PriorTerm`), and travel as this one object down to
``PriorModel.bind(model, options)`` instead of being forwarded one keyword at a time.

Example:
    >>> from priorzoo import BindOptions
    >>> BindOptions(exclude=["classifier.*"]).as_kwargs()["exclude"]
    ['classifier.*']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from priorzoo.binding.matching import Patterns

__all__ = ["BindOptions"]


@dataclass(frozen=True)
class BindOptions:
    """The keyword arguments of :meth:`priorzoo.PriorModel.bind` (and :class:`~priorzoo.finetune.PriorRegularizer`).

    Args:
        include, exclude: glob patterns / a predicate on the model's parameter names.
        exclude_head: leave the task head out (default).
        allow_partial: accept a prior covering only part of the model.
        dtype: the dtype the penalty is computed in (default float32).

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> lin = torch.nn.Linear(2, 2)
        >>> prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0)
        >>> len(prior.bind(lin, BindOptions(allow_partial=True)).parameters)
        1
    """

    include: Patterns = None
    exclude: Patterns = None
    exclude_head: bool = True
    allow_partial: bool = False
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("exclude_head", "allow_partial"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be True or False; received {getattr(self, name)!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"`dtype` must be a floating torch.dtype or None; received {self.dtype!r}")

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of ``PriorModel.bind`` / ``PriorRegularizer``.

        Example:
            >>> sorted(BindOptions().as_kwargs())
            ['allow_partial', 'dtype', 'exclude', 'exclude_head', 'include']
        """
        return {
            "include": self.include,
            "exclude": self.exclude,
            "exclude_head": self.exclude_head,
            "allow_partial": self.allow_partial,
            "dtype": self.dtype,
        }

    def match_kwargs(self) -> dict[str, Any]:
        """The options that choose the parameters, as keyword arguments of ``PriorModel.match``
        (``allow_partial`` goes to ``MatchResult.check``, ``dtype`` only to ``bind``).

        Example:
            >>> sorted(BindOptions().match_kwargs())
            ['exclude', 'exclude_head', 'include']
        """
        return {
            "include": self.include,
            "exclude": self.exclude,
            "exclude_head": self.exclude_head,
        }

    def check_match(self, prior: Any, model: Any) -> Any:
        """Match ``prior`` onto ``model`` with these options and check the result (``allow_partial``), without
        binding it: what a Trainer integration does before FSDP shards the model. Returns the match.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0)
            >>> BindOptions(allow_partial=True).check_match(prior, torch.nn.Linear(2, 2)).no_prior
            ['bias']
        """
        result = prior.match(model, **self.match_kwargs())
        result.check(allow_partial=self.allow_partial)
        return result
