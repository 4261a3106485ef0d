r"""The documented default λ of a learned prior (``config.json``'s ``recommended_scale``): one rule, computed from
the whole prior (:func:`recommend_scale`) or from statistics a sharded learner reduced over its processes
(:func:`scale_rule`).

A SWAG variance measures how far SGD wandered at the SWA learning rate, not how far a downstream task may move a
weight; most variances sit at the ``min_var`` floor (88 % in a real ImageNet prior), so at λ = 1 the precision
is ~1e6 per weight: fine-tuning is pinned, or SGD diverges along the stiffest directions (a step of lr·1/(Nλv) per
unit of displacement). The rule puts the prior standard deviation of the *typical* (median) weight at the
root-mean-square size of the weights:

.. math:: \lambda^\star = 10^{\operatorname{round}\log_{10}
    \left(\operatorname{mean}_i \mu_i^2 \big/ \operatorname{median}_i \Sigma^{(1)}_{ii}\right)}, \qquad
    \Sigma^{(1)}_{ii} = v_i + \sum_k F_{ki}^2,

clipped to [1, 1e10] (the paper's search range). The median (not the mean) of the variances, because the few
weights SGD moved a lot would otherwise hide the floor where most weights sit; over more than 10⁶ weights it is
the median of an even stride (:func:`median_stride`), exact enough. It is a starting point, not a tuned value:
:func:`priorzoo.finetune.tune_scale` searches λ on the downstream task.

Example:
    >>> import torch
    >>> lam, rule = recommend_scale({"w": torch.full((10,), 0.1)}, {"w": torch.full((10,), 1e-6)})
    >>> lam
    10000.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["MEDIAN_SAMPLE", "median_stride", "recommend_scale", "scale_rule", "variance_floor_fraction"]

MEDIAN_SAMPLE = 1_000_000
"""The median of Σ⁽¹⁾ᵢᵢ is taken over an even stride of at most about this many weights."""


def median_stride(total: int) -> int:
    """Every how many weights (in the flat, unsharded order) the median of Σ⁽¹⁾ᵢᵢ takes one.

    Example:
        >>> median_stride(10), median_stride(3_000_000)
        (1, 4)
    """
    return total // MEDIAN_SAMPLE + 1 if total > MEDIAN_SAMPLE else 1


def scale_rule(sum_sq_mean: float, count: int, typical: float, floor_fraction: float) -> tuple[float, str]:
    """λ* from the statistics of a prior: Σᵢ μᵢ² over its ``count`` weights, the median (``typical``) of Σ⁽¹⁾ᵢᵢ,
    and the fraction of variances at the floor (for the description). ``(λ*, description of the rule)``;
    λ* = 1 when a statistic is zero.

    Example:
        >>> scale_rule(0.1, 10, 1e-6, 0.5)[0]
        10000.0
    """
    if sum_sq_mean <= 0 or typical <= 0 or not count:
        lam = 1.0
    else:
        lam = float(10.0 ** min(max(round(math.log10(sum_sq_mean / count / typical)), 0), 10))
    rule = (
        f"10^round(log10(mean mean^2 / median diag Sigma(lambda=1))) = {lam:g} "
        f"({floor_fraction:.0%} of the variances at the floor)"
    )
    return lam, rule


def variance_floor_fraction(variance: Mapping[str, torch.Tensor], floor: float) -> float:
    """Fraction of the stored variances at (or within 0.1 % above) ``floor`` (0 when ``floor`` is 0).

    Example:
        >>> import torch
        >>> variance_floor_fraction({"w": torch.tensor([1e-6, 1e-6, 1.0, 2.0])}, 1e-6)
        0.5
    """
    if floor <= 0:
        return 0.0
    hits = sum(int((v <= floor * 1.001).sum()) for v in variance.values())
    return hits / max(sum(v.numel() for v in variance.values()), 1)


def recommend_scale(
    mean: Mapping[str, torch.Tensor],
    variance: Mapping[str, torch.Tensor],
    cov_factor: Mapping[str, torch.Tensor] | None = None,
    *,
    floor: float = 0.0,
) -> tuple[float, str]:
    """The documented default λ of a learned prior (see the module docstring): ``(λ*, description of the rule)``.

    Example:
        >>> import torch
        >>> lam, rule = recommend_scale({"w": torch.full((10,), 0.1)}, {"w": torch.full((10,), 1e-6)})
        >>> lam
        10000.0
    """
    num = sum(float(m.double().pow(2).sum()) for m in mean.values())
    count = sum(m.numel() for m in mean.values())
    diag = []
    for n, v in variance.items():
        d = v.detach().reshape(-1).double()
        if cov_factor is not None:
            d = d + cov_factor[n].detach().double().reshape(cov_factor[n].shape[0], -1).pow(2).sum(0)
        diag.append(d)
    flat = torch.cat(diag) if diag else torch.zeros(0, dtype=torch.float64)
    flat = flat[:: median_stride(flat.numel())]
    typical = float(flat.median()) if flat.numel() else 0.0
    return scale_rule(num, count, typical, variance_floor_fraction(variance, floor))
