"""A batch and the forward pass on it: the one convention every loop in priorzoo shares.

A batch is a mapping with ``labels`` (transformers style: the other entries go to ``model(**inputs)``) or a pair
``(inputs, labels)`` (torchvision / timm style). :func:`default_forward` turns one into ``(logits, labels)``;
:func:`move_to_device` moves its tensors, however nested.

Example:
    >>> import torch
    >>> logits, labels = default_forward(torch.nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4).long()))
    >>> tuple(logits.shape), tuple(labels.shape)
    ((4, 2), (4,))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "ForwardFn", "default_forward", "move_to_device"]

Batch = Any
ForwardFn = Callable[[torch.nn.Module, Batch], tuple[Tensor, Tensor]]
"""``forward(model, batch) -> (logits [B, C], labels [B])``."""


def move_to_device(batch: Batch, device: torch.device | str | None, *, non_blocking: bool = False) -> Batch:
    """The tensors of a batch (tensor / mapping / list / tuple, nested) moved to ``device`` (``None``: as is).

    Example:
        >>> import torch
        >>> move_to_device({"x": torch.zeros(1)}, "cpu")["x"].device.type
        'cpu'
    """
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device, non_blocking=non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking=non_blocking) for v in batch)
    return batch


def default_forward(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` of a batch: a mapping with ``labels`` (the rest go to ``model(**inputs)``, and
    ``outputs.logits`` or ``outputs[0]`` is taken) or a pair ``(inputs, labels)`` (``model(inputs)``).

    Example:
        >>> import torch
        >>> logits, labels = default_forward(torch.nn.Linear(3, 2), (torch.zeros(4, 3), torch.zeros(4).long()))
        >>> tuple(logits.shape)
        (4, 2)
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise KeyError(f"a mapping batch needs a `labels` entry; received keys {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        labels = batch["labels"]
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        out = model(batch[0])
        labels = batch[1]
    else:
        raise TypeError(
            "a batch must be a mapping with `labels` or a pair (inputs, labels); pass forward=... for "
            f"anything else; received {type(batch).__name__}"
        )
    if isinstance(out, Tensor):
        logits = out
    elif hasattr(out, "logits"):
        logits = out.logits
    elif isinstance(out, (tuple, list)):
        logits = out[0]
    elif isinstance(out, Mapping) and "logits" in out:
        logits = out["logits"]
    else:
        raise TypeError(f"cannot find logits in the model output of type {type(out).__name__}")
    return logits, labels
