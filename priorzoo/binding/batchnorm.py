"""Copying a prior's mean and batch-norm running statistics into a model (:meth:`priorzoo.PriorModel.init_model_`).

Weights without their statistics are not the source solution: a batch-norm network given the SWA mean but
the fresh model's running statistics predicts badly, so a learned prior carries them (``docs/format.md``).

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> stats = {"running_mean": torch.ones(2), "running_var": torch.ones(2)}
    >>> p = PriorModel.from_tensors({"weight": torch.ones(2)}, variance=1.0, exclude=["bias"], buffers=stats)
    >>> _ = p.init_model_(bn)
    >>> bn.running_mean.tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from priorzoo.binding.matching import MatchResult
from priorzoo.format.checks import check_fits

if TYPE_CHECKING:
    from priorzoo.prior import PriorModel

__all__ = ["copy_buffers_", "copy_into_model_"]


def copy_buffers_(buffers: Mapping[str, Tensor], model: torch.nn.Module, result: MatchResult, *, kind: str) -> None:
    """Copy a prior's ``buffers`` (batch-norm running statistics, under the source model's names) into
    ``model``'s buffers, renamed by ``result``'s prefixes; warn for the ones the model lacks, and when the
    prior carries none but the model has batch norm (its own statistics do not belong to the prior mean).

    Raises:
        PriorMatchError: a value that would not survive the cast to the model buffer's dtype (a float64
            running variance of 1e300 into float32 would become inf); nothing is copied then."""
    model_buffers = dict(model.named_buffers())
    tracked = [n for n in model_buffers if n.endswith("running_mean")]
    if not buffers:
        if tracked:
            warnings.warn(
                f"this {kind} prior carries no batch-norm running statistics, and the model has "
                f"{len(tracked)} batch-norm layer(s): they keep the model's own statistics, which do not "
                "belong to the prior mean. Re-estimate them with "
                "`priorzoo.finetune.refresh_batchnorm_(model, train_loader)` before evaluating.",
                UserWarning,
                stacklevel=3,
            )
        return
    strip, add = result.prior_prefix, result.model_prefix
    missing = []
    pairs = []
    for name, t in buffers.items():
        target = add + name[len(strip) :] if name.startswith(strip) else name
        buf = model_buffers.get(target)
        if buf is None or tuple(buf.shape) != tuple(t.shape):
            missing.append(name)
            continue
        check_fits(f"{name}.buffer", t, buf.dtype, target=f"the model's buffer `{target}`")
        pairs.append((buf, t))
    for buf, t in pairs:  # all checked first: a refused buffer leaves the model unchanged
        buf.copy_(t.to(buf.dtype))
    if missing:
        warnings.warn(
            f"{len(missing)} buffer(s) of the prior have no buffer of that name and shape in the model and "
            f"were not copied: {', '.join(f'`{m}`' for m in missing[:5])}"
            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""),
            UserWarning,
            stacklevel=3,
        )


def copy_into_model_(
    prior: PriorModel, model: torch.nn.Module, result: MatchResult, *, buffers: bool, adapted_only: bool
) -> None:
    """Copy μ into ``model``'s matched parameters (only the adapted ones with ``adapted_only``) and, with
    ``buffers``, the prior's buffers (:func:`copy_buffers_`); every value is range-checked against the model's
    dtypes before anything is copied.

    Raises:
        PriorMatchError: a value that would become ±inf (or wrap around) in the model's dtype.
    """
    params = dict(model.named_parameters())
    todo = []
    for pname, mname in result.matched.items():
        if adapted_only and pname not in result.adapted:
            continue
        mean = prior.mean[pname]
        mean = mean if isinstance(mean, Tensor) else mean[...]  # a lazily read prior (open_prior)
        check_fits(f"{pname}.mean", mean, params[mname].dtype, target=f"the model's parameter `{mname}`")
        todo.append((params[mname], mean))
    if buffers and not adapted_only:  # checked whole before anything is copied
        copy_buffers_(prior.buffers, model, result, kind=prior.kind.value)
    for param, mean in todo:
        param.copy_(mean)
