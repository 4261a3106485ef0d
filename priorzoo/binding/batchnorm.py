r"""Batch-norm running statistics, in one place: reading them, carrying them in a prior, re-estimating them, and
keeping them fixed in a frozen part of a model.

Weights without their statistics are not a solution: a batch-norm network given the SWA mean (or a posterior
sample) but other running statistics predicts badly. So

- a learned prior carries the statistics of its source model (:func:`running_statistics`, ``docs/format.md``),
  and :meth:`priorzoo.PriorModel.init_model_` copies them in with its mean (:func:`copy_into_model_`,
  :func:`copy_buffers_`), range-checked against the model's dtypes first;
- a weight vector that was never trained on (the SWA mean w̄, a SWAG or SGLD sample) gets them re-estimated with
  one pass over training data (:func:`refresh_batchnorm_`; Izmailov et al., "Averaging Weights Leads to Wider
  Optima", UAI 2018);
- the batch-norm layers of a frozen part of a model keep their statistics while the rest trains
  (:func:`freeze_batchnorm_`).

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
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from priorzoo.batches import ForwardFn, default_forward, move_to_device
from priorzoo.binding.matching import MatchResult
from priorzoo.format.checks import check_fits
from priorzoo.format.record import PriorRecord

__all__ = [
    "copy_buffers_",
    "copy_into_model_",
    "freeze_batchnorm_",
    "has_batchnorm",
    "is_frozen_batchnorm",
    "norm_buffers",
    "refresh_batchnorm_",
    "running_statistics",
]


# ------------------------------------------------------------------------------ reading the statistics
def norm_buffers(model: torch.nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.nn.Module]:
    """``module name -> module`` of every normalisation layer that tracks running statistics (BatchNorm,
    SyncBatchNorm, InstanceNorm with ``track_running_stats``), except modules whose parameters are all in
    ``skip`` (the head)."""
    skip = set(skip)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            own = [f"{name}.{n}" for n, _ in m.named_parameters()]
            if own and all(o in skip for o in own):
                continue
            if m.running_mean is not None:
                out[name] = m
    return out


def running_statistics(model: torch.nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """CPU copies of the normalisation layers' running statistics, ``"<layer>.running_mean"`` etc. (float32
    for the statistics, int64 for ``num_batches_tracked``), in model order."""
    out: dict[str, torch.Tensor] = {}
    for name, m in norm_buffers(model, skip).items():
        pre = f"{name}." if name else ""
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(m, key, None)
            if isinstance(t, torch.Tensor):
                dtype = torch.int64 if not t.dtype.is_floating_point else torch.float32
                out[pre + key] = t.detach().to("cpu", dtype, copy=True)
    return out


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether the model holds batch-norm layers with running statistics.

    Example:
        >>> import torch
        >>> has_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
        True
    """
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


# ---------------------------------------------------------------- a prior's statistics (and its mean) into a model
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
    prior: PriorRecord, model: torch.nn.Module, result: MatchResult, *, buffers: bool, adapted_only: bool
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


# ------------------------------------------------------------------------------ re-estimating them
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
    dropout). Layers frozen with :func:`freeze_batchnorm_` keep their statistics (their
    weights do not change). Returns ``False`` (and does nothing) for a model without batch norm to refresh.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> refresh_batchnorm_(m, [(torch.randn(8, 2), torch.zeros(8).long())])
        True
    """
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
            forward(model, move_to_device(batch, device, non_blocking=True))
            seen += 1
        if seen == 0:
            raise ValueError("the batch-norm loader yielded no batch")
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, t in was_training.items():
            m.train(t)
    return True


# ------------------------------------------------------------------------------ frozen layers
_FROZEN_BN = "_priorzoo_frozen_batchnorm"
"""Attribute set on a batch-norm layer that :func:`freeze_batchnorm_` keeps in eval mode."""


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen batch-norm layer: run it in eval mode whatever ``model.train()`` set."""
    module.training = False


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer that :func:`freeze_batchnorm_` keeps in eval mode.

    Example:
        >>> import torch
        >>> is_frozen_batchnorm(torch.nn.BatchNorm1d(2))
        False
    """
    return bool(getattr(module, _FROZEN_BN, False))


def freeze_batchnorm_(model: nn.Module) -> list[str]:
    r"""Keep the batch-norm layers of the frozen part of ``model`` in eval mode during training; returns their names.

    A batch-norm layer in train mode normalises with the statistics of the current batch and moves its running
    statistics toward them, whether or not its weights train. In a frozen part of a pre-trained network that
    (i) feeds the trained layers features normalised by batch statistics they were never trained with (noisy
    at small batch sizes) and (ii) lets the running statistics drift, so that evaluation sees a network no
    step trained. Frozen therefore means: the layer's running statistics are used and never updated,

    .. math:: \mathrm{BN}(x) = \gamma (x - \hat\mu_{\text{run}}) / \sqrt{\hat\sigma^2_{\text{run}} + \epsilon} + \beta

    A layer is frozen when none of its parameters trains (``requires_grad=False``); a layer without affine
    parameters when none of its parent module's parameters trains. Such a layer gets a forward pre-hook that
    sets its ``training`` flag to False before every forward, so that ``model.train()`` — which the
    transformers ``Trainer``, DDP wrappers and user loops call — cannot switch it back; the hook travels with
    ``copy.deepcopy``. :func:`priorzoo.finetune.refresh_batchnorm_` leaves these layers' statistics alone.
    Calling it again is a no-op for layers already frozen.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> _ = [p.requires_grad_(False) for p in net[:2].parameters()]
        >>> freeze_batchnorm_(net)
        ['1']
        >>> _ = net.train(); _ = net(torch.randn(2, 3, 4, 4))
        >>> net[1].training, float(net[1].running_mean.abs().sum())
        (False, 0.0)
    """
    out = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or is_frozen_batchnorm(module):
            continue
        own = list(module.parameters(recurse=False))
        if not own:
            parent = modules.get(name.rpartition(".")[0]) if name else None
            own = list(parent.parameters()) if parent is not None else []
        if not own or any(p.requires_grad for p in own):
            continue
        module.register_forward_pre_hook(_keep_eval)
        setattr(module, _FROZEN_BN, True)
        module.training = False
        out.append(name)
    return out
