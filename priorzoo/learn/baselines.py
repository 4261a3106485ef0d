r"""Baseline priors a user would otherwise write by hand: isotropic (L2-SP) and diagonal Fisher (EWC-style).

Both centre the prior on the current (pre-trained) weights w⁰ and return a :class:`~priorzoo.PriorModel`
that saves, loads and fine-tunes like a learned SWAG prior — so the comparisons that matter (Harvey et al.
2024; Špendl & Pirc 2023) are one argument away.

**Isotropic / L2-SP** (Li, Grandvalet & Davoine, ICML 2018): p(w) = N(w⁰, λσ²I). The fine-tuning loss
``mean CE + penalty/N`` then adds ‖w − w⁰‖²/(2Nλσ²): the L2-SP regulariser (α/2)‖w − w⁰‖² with
α = 1/(Nλσ²). Only the product λσ² matters; the default σ² = 1 makes λ the prior variance.

**Diagonal Fisher** (a diagonal Laplace approximation, the precision EWC uses; Kirkpatrick et al. 2017):

.. math::

    p(w) = \mathcal N\big(w^0,\ \operatorname{diag}(N \hat F + \delta)^{-1}\big), \qquad
    \hat F_i = \frac1N \sum_{n=1}^N \big(\partial_{w_i} \ell_n(w^0)\big)^2,

with ℓ_n = −log p(y_n | x_n, w) the per-example negative log-likelihood on the source data, N the number
of source examples and δ (``prior_precision``) the precision of the isotropic prior behind the source
training (weight decay), which keeps never-activated weights finite. N·F̂ is the empirical-Fisher stand-in
for the Hessian of the summed NLL, Σ_n ∇ℓ_n∇ℓ_nᵀ restricted to its diagonal (Martens 2020; Kunstner et
al. 2019 discuss where it deviates from the true Fisher).

Example:
    >>> import torch
    >>> from priorzoo.learn import fisher_prior
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(3, 2)
    >>> data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    >>> loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
    >>> prior = fisher_prior(model, data, loss, prior_precision=1.0)
    >>> prior.kind.value, bool((prior.variance["weight"] <= 1.0).all())
    ('diagonal', True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from priorzoo.batches import move_to_device
from priorzoo.binding.batchnorm import running_statistics
from priorzoo.binding.matching import Patterns
from priorzoo.learn.provenance import describe_backbone, recorded_exclude, select_prior_parameters
from priorzoo.validation import check_float

if TYPE_CHECKING:
    from priorzoo.prior import PriorModel

__all__ = ["empirical_fisher", "fisher_prior", "isotropic_prior"]


def _select(
    model: nn.Module, include: Patterns, exclude: Patterns, exclude_head: bool, head: Patterns, what: str
) -> tuple[dict[str, nn.Parameter], list[str]]:
    return select_prior_parameters(
        model, include=include, exclude=exclude, exclude_head=exclude_head, head=head, what=what
    )


def isotropic_prior(
    model: nn.Module,
    variance: float = 1.0,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    exclude_head: bool = True,
    head: Patterns = None,
    scale: float | None = None,
    backbone: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> PriorModel:
    r"""The L2-SP prior N(w⁰, λσ²I) centred on the model's current weights w⁰ (kind ``isotropic``).

    Its fine-tuning penalty is ‖w − w⁰‖²/(2Nλσ²) (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer
    Learning with Convolutional Networks", ICML 2018), the baseline the replications of Shwartz-Ziv et al. found
    competitive with learned priors. On a PEFT model (LoRA) the prior covers the adapted layers, centred on their
    effective weights W₀ + ΔW (:func:`priorzoo.binding.peft.effective_weights`): L2-SP on ΔW.

    Args:
        model: the pre-trained backbone (its head is left out unless ``exclude_head=False``).
        variance: σ² > 0; only λσ² matters downstream (L2-SP's α = 1/(Nλσ²)).
        include, exclude: glob patterns / callable choosing the parameters.
        exclude_head: drop the task head (``head``, else :func:`priorzoo.binding.matching.head_parameter_names`;
            a warning names an output layer the selection would still include).
        head: the head's parameters explicitly (glob pattern(s) or a predicate; ``[]``: none).
        scale: λ (default: not chosen, see :meth:`~priorzoo.PriorModel.resolve_scale`).
        backbone, source, license: provenance for ``config.json`` and the card (backbone detected by
            default).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 5))
        >>> p = isotropic_prior(net, variance=0.5, exclude="1.*")
        >>> p.names, p.variance["0.weight"].unique().item(), p.config.exclude
        (['0.weight', '0.bias'], 0.5, ['1.*'])
    """
    check_float(variance, "variance", minimum=0.0, strict=True)
    from priorzoo.binding.peft import effective_weights, is_peft_model
    from priorzoo.prior import PriorModel

    if is_peft_model(model):
        mean = effective_weights(model, include=include, exclude=exclude, exclude_head=exclude_head, head=head)
        recorded: list[str] = []
        buffers = None
    else:
        params, head_names = _select(model, include, exclude, exclude_head, head, "isotropic_prior")
        mean = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in params.items()}
        recorded, buffers = recorded_exclude(model, params, exclude), running_statistics(model, skip=head_names)
    return PriorModel.from_tensors(
        mean,
        float(variance),
        copy=False,  # both branches built fresh copies
        kind="isotropic",
        scale=scale,
        backbone=dict(backbone) if backbone is not None else describe_backbone(model),
        source=source,
        learning={"method": "isotropic", "variance": float(variance), "reference": "L2-SP, Li et al. 2018"},
        exclude=recorded,
        license=license,
        buffers=buffers,
    )


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return int(v.shape[0])
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = _batch_size(v) if isinstance(v, (Tensor, Mapping, list, tuple)) else 0
            if n:
                return n
    return 0


def _example(batch: Any, i: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[i : i + 1] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _example(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_example(v, i) for v in batch)
    return batch


def empirical_fisher(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    exclude_head: bool = True,
    head: Patterns = None,
    per_example: bool = True,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, Tensor], int]:
    r"""Diagonal empirical Fisher F̂_i = (1/N) Σ_n (∂ℓ_n/∂w_i)² at the current weights; returns ``(F̂, N)``.

    The model is put in eval mode (no dropout; batch norm uses its running statistics) and restored.
    ``loss_fn(model, batch)`` must return the *mean* negative log-likelihood of the batch (cross-entropy).

    Args:
        per_example: exact per-example gradients (one backward per example). With ``False`` each batch of
            size B contributes B·ḡ_B², one backward per batch: an unbiased estimate of the same quantity
            only where the mean gradient is ≈ 0 (at a minimum), since E[B·ḡ_B²] = F̂ + (B − 1)·(E g)².
        max_batches: stop after this many batches (N counts the examples seen).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.zero_()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.tensor([[1.0], [1.0]])
        >>> mse = lambda m, b: 0.5 * (m(b[0]) - b[1]).pow(2).mean()
        >>> fisher, n = empirical_fisher(lin, [(x, y)], mse)
        >>> fisher["weight"].tolist(), n  # per-example gradients (-1, 0) and (0, -2): mean squares (0.5, 2)
        ([[0.5, 2.0]], 2)
    """
    params, _ = _select(model, include, exclude, exclude_head, head, "empirical_fisher")
    names, tensors = list(params), list(params.values())
    dev = torch.device(device) if device is not None else tensors[0].device
    acc = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
    was_training = model.training
    model.eval()
    n_total = 0
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            batch = move_to_device(batch, dev)
            size = _batch_size(batch)
            if size == 0:
                raise ValueError(f"cannot tell the batch size of batch {b} ({type(batch).__name__})")
            pieces = [(_example(batch, i), 1.0) for i in range(size)] if per_example else [(batch, float(size))]
            for piece, weight in pieces:
                loss = loss_fn(model, piece)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.detach().to(torch.float64).square(), alpha=weight)
            n_total += size
    finally:
        model.train(was_training)
    if n_total == 0:
        raise ValueError("the loader yielded no examples; the empirical Fisher needs data")
    return {n: (a / n_total).to(torch.float32) for n, a in zip(names, acc)}, n_total


def fisher_prior(
    model: nn.Module,
    loader: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    *,
    fisher: Mapping[str, Tensor] | None = None,
    num_examples: int | None = None,
    prior_precision: float = 1.0,
    include: Patterns = None,
    exclude: Patterns = None,
    exclude_head: bool = True,
    head: Patterns = None,
    per_example: bool = True,
    max_batches: int | None = None,
    scale: float | None = None,
    backbone: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> PriorModel:
    r"""Diagonal prior N(w⁰, diag(1/(N·F̂ + δ))) from the empirical Fisher at the current weights.

    Either pass ``loader`` + ``loss_fn`` (the Fisher is computed with :func:`empirical_fisher`) or a
    precomputed ``fisher`` (``name -> F̂``, the *mean* squared gradient) with its ``num_examples`` N.

    Args:
        prior_precision: δ > 0, the precision added to N·F̂ (the source training's weight decay × N, or
            any floor); weights the data never moved get variance 1/δ.
        per_example, max_batches: see :func:`empirical_fisher`.
        scale: λ of the prior (default: not chosen, see :meth:`~priorzoo.PriorModel.resolve_scale`).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> p = fisher_prior(lin, fisher={"weight": torch.tensor([[0.5, 2.0]])}, num_examples=2, prior_precision=1.0)
        >>> p.variance["weight"].tolist()  # 1 / (2·0.5 + 1), 1 / (2·2 + 1)
        [[0.5, 0.20000000298023224]]
    """
    delta = check_float(prior_precision, "prior_precision", minimum=0.0, strict=True)
    from priorzoo.prior import PriorModel

    params, head_names = _select(model, include, exclude, exclude_head, head, "fisher_prior")
    if fisher is None:
        if loader is None or loss_fn is None:
            raise ValueError("fisher_prior needs `loader` and `loss_fn`, or a precomputed `fisher` with `num_examples`")
        fisher, n = empirical_fisher(
            model,
            loader,
            loss_fn,
            include=list(params),
            exclude_head=False,
            head=[],
            per_example=per_example,
            max_batches=max_batches,
        )
    else:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(
                f"`num_examples` must be a positive integer with a precomputed `fisher`; received {num_examples!r}"
            )
        n = num_examples
        missing = [k for k in params if k not in fisher]
        if missing:
            raise ValueError(f"`fisher` lacks selected parameter(s) {missing[:5]}")
        for k in params:
            if tuple(fisher[k].shape) != tuple(params[k].shape):
                raise ValueError(
                    f"`fisher[{k!r}]` has shape {tuple(fisher[k].shape)}; the parameter has {tuple(params[k].shape)}"
                )
            if not bool(torch.isfinite(fisher[k]).all()) or bool((fisher[k] < 0).any()):
                raise ValueError(f"`fisher[{k!r}]` must be finite and ≥ 0 (a mean of squared gradients)")
    mean = {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in params.items()}
    variance = {k: 1.0 / (n * fisher[k].detach().to("cpu", torch.float64) + delta) for k in params}
    return PriorModel.from_tensors(
        mean,
        {k: v.to(torch.float32) for k, v in variance.items()},
        copy=False,  # already copied above
        kind="diagonal",
        scale=scale,
        backbone=dict(backbone) if backbone is not None else describe_backbone(model),
        source=source,
        learning={
            "method": "empirical-fisher",
            "num_examples": n,
            "prior_precision": delta,
            "per_example": per_example if loader is not None else None,
            "formula": "variance = 1 / (N * mean_n g_n^2 + prior_precision)",
        },
        exclude=recorded_exclude(model, params, exclude),
        license=license,
        buffers=running_statistics(model, skip=head_names),
    )
