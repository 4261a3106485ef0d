"""The checks of a prior's tensors against its config: names, shapes, dtypes and values (``docs/format.md``).

Every tensor is read once (``aminmax``): finite everywhere, a variance ≥ 0, a batch-norm ``running_var``
≥ 0; float16, bfloat16, float32 or float64 only. :class:`~priorzoo.PriorModel` runs them on construction
(``validate=True``), so a loaded or hand-built prior is either valid or refused with the tensor named.

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> PriorModel.from_tensors({"w": torch.tensor([float("nan")])}, variance=1.0)
    Traceback (most recent call last):
    ...
    priorzoo.errors.PriorFormatError: `w.mean` holds non-finite values (NaN or ±inf; min nan, max nan)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from priorzoo.errors import PriorFormatError
from priorzoo.format.config import PriorConfig, PriorKind
from priorzoo.format.serialization import BUFFER_SUFFIX as _BUFFER_SUFFIX
from priorzoo.format.serialization import FLOAT_DTYPES

__all__ = ["check_fits", "check_named_tensors", "check_prior_tensors", "check_tensor_inputs", "check_values"]

_BUFFER_DTYPES = (*FLOAT_DTYPES.values(), torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_dtype(name: str, tensor: Any, *, buffer: bool = False) -> None:
    """A prior's tensors are float16, bfloat16, float32 or float64 (``docs/format.md``); a buffer may also be an
    integer tensor (``num_batches_tracked``); nothing else."""
    if tensor.dtype not in (_BUFFER_DTYPES if buffer else FLOAT_DTYPES.values()):
        valid = sorted(FLOAT_DTYPES) + (["int8", "int16", "int32", "int64", "uint8"] if buffer else [])
        raise PriorFormatError(
            f"`{name}` has dtype {str(tensor.dtype).removeprefix('torch.')}; a prior's "
            f"{'buffers' if buffer else 'tensors'} are one of {valid}"
        )


def check_values(name: str, tensor: Tensor, *, nonneg: bool) -> None:
    """One read of the tensor (aminmax) proves it finite (and ≥ 0 for a variance); NaN propagates.

    Example:
        >>> check_values("w.variance", torch.tensor([1.0, -2.0]), nonneg=True)
        Traceback (most recent call last):
        ...
        priorzoo.errors.PriorFormatError: `w.variance` must be ≥ 0 everywhere (it is a variance); its minimum is -2
    """
    if tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor.detach() if tensor.dtype.is_floating_point else tensor.float())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise PriorFormatError(f"`{name}` holds non-finite values (NaN or ±inf; min {lo}, max {hi})")
    if nonneg and lo < 0:
        raise PriorFormatError(f"`{name}` must be ≥ 0 everywhere (it is a variance); its minimum is {lo:g}")


def check_prior_tensors(
    cfg: PriorConfig,
    mean: Mapping[str, Tensor],
    variance: Mapping[str, Tensor],
    cov_factor: Mapping[str, Tensor] | None,
    buffers: Mapping[str, Tensor],
    *,
    values: bool = True,
) -> None:
    """Raise :class:`~priorzoo.errors.PriorFormatError` naming the first tensor that disagrees with ``cfg``
    (missing, shape, dtype, non-finite, negative variance) or a tensor the config does not list.

    ``values=False`` checks names, shapes and dtypes of the parameters' tensors only (anything with ``shape``
    and ``dtype``, e.g. the lazily read tensors of :func:`priorzoo.binding.sharded.open_prior`, whose values are checked
    as they are read); buffers are always checked whole."""
    for spec in cfg.parameters:
        for suffix, store in (("mean", mean), ("variance", variance)):
            t = store.get(spec.name)
            if t is None:
                raise PriorFormatError(f"missing tensor `{spec.name}.{suffix}` (the config lists `{spec.name}`)")
            if tuple(t.shape) != spec.shape:
                raise PriorFormatError(
                    f"`{spec.name}.{suffix}` has shape {tuple(t.shape)}; the config says {spec.shape}"
                )
            _check_dtype(f"{spec.name}.{suffix}", t)
            if values:
                check_values(f"{spec.name}.{suffix}", t, nonneg=suffix == "variance")
        if cfg.rank > 0:
            f = (cov_factor or {}).get(spec.name)
            if f is None:
                raise PriorFormatError(f"missing tensor `{spec.name}.cov_factor` (config rank K = {cfg.rank} > 0)")
            if tuple(f.shape) != (cfg.rank, *spec.shape):
                raise PriorFormatError(
                    f"`{spec.name}.cov_factor` has shape {tuple(f.shape)}; expected "
                    f"{(cfg.rank, *spec.shape)} (K = {cfg.rank} rows of the parameter's shape)"
                )
            _check_dtype(f"{spec.name}.cov_factor", f)
            if values:
                check_values(f"{spec.name}.cov_factor", f, nonneg=False)
    extra = sorted(set(mean) - set(cfg.names))
    if extra:
        raise PriorFormatError(f"tensors for parameters not listed in the config: {extra[:5]}")
    listed = {b.name: b.shape for b in cfg.buffers}
    if set(listed) != set(buffers):
        raise PriorFormatError(
            f"the config lists buffers {sorted(listed)[:5]} but the tensors hold {sorted(buffers)[:5]}"
        )
    for name, t in buffers.items():
        if not isinstance(t, Tensor) or tuple(t.shape) != listed[name]:
            raise PriorFormatError(
                f"`{name}.{_BUFFER_SUFFIX}` has shape {tuple(getattr(t, 'shape', ()))}; the config says {listed[name]}"
            )
        _check_dtype(f"{name}.{_BUFFER_SUFFIX}", t, buffer=True)
        check_values(f"{name}.{_BUFFER_SUFFIX}", t, nonneg=name.endswith("running_var"))


def check_tensor_inputs(
    mean: Any, variance: Any, cov_factor: Any, kind: PriorKind | str | None
) -> tuple[Mapping[str, Tensor], int, PriorKind | str | None]:
    """The arguments of :meth:`~priorzoo.PriorModel.from_tensors` checked: ``(variance as a mapping, the
    factor's rank K (-1 for a 0-d factor, 0 without one), kind)``; a float variance is an isotropic prior."""
    if not isinstance(mean, Mapping) or not mean:
        raise PriorFormatError(f"`mean` must be a non-empty mapping name -> tensor; received {type(mean).__name__}")
    for name, m in mean.items():
        if not isinstance(m, Tensor) or not m.dtype.is_floating_point:
            raise PriorFormatError(f"`mean[{name!r}]` must be a floating-point tensor; received {m!r:.80}")
    if isinstance(variance, (int, float)) and not isinstance(variance, bool):
        if not (variance > 0 and math.isfinite(variance)):
            raise PriorFormatError(f"isotropic `variance` must be a finite number > 0; received {variance!r}")
        kind = kind or PriorKind.ISOTROPIC
        variance = {n: torch.full_like(m, float(variance)) for n, m in mean.items()}
    elif not isinstance(variance, Mapping):
        raise PriorFormatError(f"`variance` must be a mapping name -> tensor or a float; received {variance!r:.80}")
    extra = [n for n in variance if n not in mean]
    missing = [n for n in mean if n not in variance]
    if missing or extra:
        raise PriorFormatError(f"`variance` must have the names of `mean`; missing {missing}, unexpected {extra}")
    rank = 0
    if cov_factor is not None:
        if not isinstance(cov_factor, Mapping) or set(cov_factor) != set(mean):
            raise PriorFormatError("`cov_factor` must be a mapping with exactly the names of `mean`")
        first = next(iter(cov_factor.values()))
        rank = int(first.shape[0]) if first.dim() > 0 else -1
    return variance, rank, kind


def check_named_tensors(params: Any, names: list[str], mean: Mapping[str, Tensor], *, what: str) -> None:
    """``params`` is a mapping ``name -> tensor`` holding each of ``names`` with its shape in ``mean``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{what} takes a torch.nn.Module or a mapping name -> tensor; received {type(params)}")
    missing = [n for n in names if n not in params]
    if missing:
        raise PriorFormatError(f"{what}: the mapping lacks prior parameter(s) {missing[:5]}")
    for n in names:
        if tuple(params[n].shape) != tuple(mean[n].shape):
            raise PriorFormatError(
                f"{what}: `{n}` has shape {tuple(params[n].shape)}; the prior has {tuple(mean[n].shape)}"
            )


def check_fits(name: str, value: Tensor, dtype: torch.dtype, *, target: str) -> None:
    """Refuse to copy ``value`` into a tensor of ``dtype`` when a finite value would not survive the cast (it
    would become ±inf, or wrap around for an integer target).

    Example:
        >>> big = torch.tensor([1e300], dtype=torch.float64)
        >>> check_fits("bn.running_var", big, torch.float32, target="`bn`")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        priorzoo.errors.PriorMatchError: `bn.running_var` holds values up to 1e+300 in absolute value, outside ...
    """
    if value.numel() == 0 or value.dtype == dtype or dtype == torch.bool:
        return
    if dtype.is_floating_point:
        info: Any = torch.finfo(dtype)
        if value.dtype.is_floating_point and value.dtype.itemsize < dtype.itemsize:
            return  # a wider float holds every value of a narrower one
    else:
        info = torch.iinfo(dtype)
    lo, hi = torch.aminmax(value.detach() if value.dtype.is_floating_point else value.detach().double())
    lo, hi = float(lo), float(hi)
    if lo >= info.min and hi <= info.max:
        return
    from priorzoo.errors import PriorMatchError

    top = max(abs(lo), abs(hi))
    raise PriorMatchError(
        f"`{name}` holds values up to {top:g} in absolute value, outside the finite range of "
        f"{str(dtype).removeprefix('torch.')} (±{info.max:g}) of {target}: refusing to copy it (the value would "
        f"become {'inf' if dtype.is_floating_point else 'wrapped around'})"
    )
