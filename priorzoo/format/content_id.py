"""The id of what fine-tuning reads from a prior: its distribution, exclude patterns and buffers, not its card.

A fine-tuning run records :func:`content_id` of the prior it used (``priorzoo finetune`` writes it to
``metrics.json`` as ``prior.content_id``), so that a result can later be recorded on the card of *that* prior
and refused for any other (:mod:`priorzoo.finetune.learned_scale_card`).

The id is a sha256 over

- the density's definition: ``kind``, ``rank``, the stored scale λ₀ (``None`` when not chosen), ``eps`` and
  the ordered parameter names and shapes, with the mean, variance and low-rank factor of every parameter
  as float32 bytes (a factor stored as float16/bfloat16 hashes as the float32 values it loads as);
- what else shapes a run: the ``exclude`` patterns (which weights the prior leaves to the data) and the
  buffers (batch-norm statistics a run starts from), as stored.

Provenance (``backbone``, ``source``, ``learning``), ``recommended_scale``, ``results``, ``license``, the
library version and the ``save_id`` are left out: recording a result on the card (which changes the save id)
keeps the id, so results of several runs of one prior can be recorded one after the other. It costs one pass
over the tensors (about a second per GB on one core).

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> a = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0)
    >>> b = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0, recommended_scale=10.0)
    >>> c = PriorModel.from_tensors({"w": torch.ones(2)}, variance=1.0)
    >>> content_id(a) == content_id(b), content_id(a) == content_id(c), len(content_id(a))
    (True, False, 32)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

from priorzoo.format.record import PriorRecord
from priorzoo.format.tensorfile import ST_NAMES

__all__ = ["content_id"]

_TAG = b"priorzoo-content-id-1\0"


def _update(h: Any, key: str, tensor: Tensor, dtype: torch.dtype | None) -> None:
    t = tensor.detach().to("cpu", dtype=dtype).contiguous()
    h.update(f"\0{key} {ST_NAMES[t.dtype]} {list(t.shape)}\0".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def content_id(prior: PriorRecord) -> str:
    """The id of ``prior``'s content that fine-tuning reads (see the module docstring); 32 hex digits.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> p = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0)
        >>> content_id(p) == content_id(p.with_scale(2.0))  # λ₀ is part of the density
        False
    """
    config = prior.config
    head = {
        "kind": config.kind.value if hasattr(config.kind, "value") else str(config.kind),
        "rank": config.rank,
        "scale": config.scale,
        "eps": config.eps,
        "parameters": [[p.name, list(p.shape)] for p in config.parameters],
        "exclude": list(config.exclude),
        "buffers": [[b.name, list(b.shape)] for b in config.buffers],
    }
    h = hashlib.sha256(_TAG)
    h.update(json.dumps(head, sort_keys=True).encode())
    for name in prior.names:
        _update(h, f"{name}.mean", prior.mean[name], torch.float32)
        _update(h, f"{name}.variance", prior.variance[name], torch.float32)
        if prior.cov_factor is not None:
            _update(h, f"{name}.cov_factor", prior.cov_factor[name], torch.float32)
    for name in sorted(prior.buffers):
        _update(h, f"{name}.buffer", prior.buffers[name], None)
    return h.hexdigest()[:32]
