"""What a prior is to the code below the :class:`priorzoo.PriorModel` facade: its config and its named tensors.

The save code (:mod:`priorzoo.format.serialization`) and the binding (:mod:`priorzoo.binding`) read a prior through
:class:`PriorRecord`, a structural type that ``PriorModel`` satisfies, so that they never import the class built
on top of them (no import circle, type-only imports included).

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> prior = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0)
    >>> isinstance(prior, PriorRecord)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor

from priorzoo.format.config import PriorConfig

__all__ = ["PriorRecord"]


@runtime_checkable
class PriorRecord(Protocol):
    """A prior's config and tensors, ``name -> tensor`` in the prior's own names (``names`` gives their order):
    the diagonal ``variance`` v, the mean μ, the low-rank factor F (``None`` for rank 0; ``[K, *shape]`` per name),
    the batch-norm ``buffers`` it carries, and the scale λ and jitter ε of Σ = λ(diag v + FᵀF) + εI."""

    config: PriorConfig
    mean: Mapping[str, Tensor]
    variance: Mapping[str, Tensor]
    cov_factor: Mapping[str, Tensor] | None
    buffers: Mapping[str, Tensor]

    @property
    def names(self) -> list[str]: ...

    @property
    def rank(self) -> int: ...

    @property
    def scale(self) -> float: ...

    @property
    def eps(self) -> float: ...
