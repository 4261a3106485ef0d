"""Adding a computed gradient into ``.grad`` (plain tensors and FSDP2 DTensor shards): shared by the fixed-scale
prior term (:mod:`priorzoo.finetune.regularizer`) and the learned one (:mod:`priorzoo.finetune.learned_scale`).

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> add_into_grads_([p], [torch.ones(2)], 0.5)
    >>> p.grad.tolist()
    [0.5, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["add_into_grads_", "local"]


@torch.no_grad()
def add_into_grads_(parameters: Sequence[Tensor], grads: Sequence[Tensor], alpha: float) -> None:
    """``p.grad += alpha · g`` for each trainable parameter, with one foreach add over those that have a
    gradient (mixed dtypes are cast by the add) and one foreach multiply creating the missing ones (new
    tensors, never views of ``grads``). DTensor parameters (FSDP2) get their local shard updated."""
    have_grad, have_g, fresh, fresh_g = [], [], [], []
    for p, g in zip(parameters, grads):
        if not p.requires_grad:
            continue
        if p.grad is None:
            fresh.append(p)
            fresh_g.append(g)
        else:
            have_grad.append(local(p.grad))
            have_g.append(g)
    if have_grad:
        torch._foreach_add_(have_grad, have_g, alpha=alpha)
    if fresh:
        for p, g in zip(fresh, torch._foreach_mul(fresh_g, alpha)):
            g = g if g.dtype == p.dtype else g.to(p.dtype)
            if type(p).__name__ == "DTensor":  # FSDP2: the local shard becomes a DTensor gradient
                from torch.distributed.tensor import DTensor

                g = DTensor.from_local(
                    g, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
            p.grad = g


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (its in-place updates change the DTensor), else the tensor itself."""
    return t.to_local() if type(t).__name__ == "DTensor" else t
