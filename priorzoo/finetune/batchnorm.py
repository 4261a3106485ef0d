"""Batch-norm running statistics for the current weights: SWA means and posterior samples need them recomputed.

A weight vector that was never trained on (the SWA mean w̄, a sample of a SWAG or SGLD posterior) has no
matching batch-norm statistics; :func:`refresh_batchnorm_` re-estimates them with one pass over training
data (Izmailov et al., "Averaging Weights Leads to Wider Optima", UAI 2018).

Example:
    >>> import torch
    >>> from priorzoo.finetune.batchnorm import has_batchnorm
    >>> has_batchnorm(torch.nn.Linear(2, 2))
    False
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from priorzoo.finetune.loop import ForwardFn, default_forward, move_to_device

__all__ = ["has_batchnorm", "refresh_batchnorm_"]


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether the model holds batch-norm layers with running statistics.

    Example:
        >>> import torch
        >>> has_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
        True
    """
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def refresh_batchnorm_(
    model: torch.nn.Module,
    loader: Iterable[Any],
    *,
    forward: ForwardFn = default_forward,
    num_batches: int | None = None,
) -> bool:
    """Recompute the running mean/variance of every batch-norm layer for the current weights.

    The statistics are reset and re-estimated as the cumulative average over the batches of ``loader``
    (``momentum=None``), with the batch-norm layers in train mode and every other layer in eval mode (no
    dropout). Layers frozen with :func:`priorzoo.backbones.freeze_batchnorm_` keep their statistics (their
    weights do not change). Returns ``False`` (and does nothing) for a model without batch norm to refresh.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> refresh_batchnorm_(m, [(torch.randn(8, 2), torch.zeros(8).long())])
        True
    """
    from priorzoo.backbones import is_frozen_batchnorm

    bns = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and not is_frozen_batchnorm(m)
    ]
    if not bns:
        return False
    was_training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    device = next(model.parameters()).device
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            forward(model, move_to_device(batch, device))
            seen += 1
        if seen == 0:
            raise ValueError("the batch-norm loader yielded no batch")
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, t in was_training.items():
            m.train(t)
    return True
