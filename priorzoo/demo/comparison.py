r"""The comparison of the demo: plain fine-tuning, L2-SP, the learned prior and the learned prior + BMA.

:func:`compare_methods` gives each method the same budget (grid size, epochs, batch size, seed) and selects
each one's knob on validation; see :class:`~priorzoo.demo.config.FinetuneSettings`. On request it also runs
the init-only control :data:`~priorzoo.demo.config.INIT_ONLY` (plain fine-tuning from the prior mean).

Example:
    >>> from priorzoo.demo.comparison import count_units
    >>> from priorzoo.demo.config import FinetuneSettings
    >>> count_units(FinetuneSettings(epochs=1, lr_grid=(0.1,), l2sp_variances=(1.0,), bma_epochs=2,
    ...                              bma_samples=1, batch_size=4), 8)
    11
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from priorzoo.demo._progress import CountingLoader
from priorzoo.demo.config import ALL_METHODS, INIT_ONLY, METHODS, FinetuneSettings
from priorzoo.demo.results import MethodResult
from priorzoo.finetune.runners import seeded_loader

__all__ = ["average_variance", "compare_methods", "count_units", "method_units"]


def _check_methods(methods: Sequence[str] | None) -> tuple[str, ...]:
    """``methods`` as a tuple in :data:`ALL_METHODS` order (``None``: :data:`METHODS`), else a ``ValueError``."""
    if methods is None:
        return METHODS
    if isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise ValueError(f"`methods` must be a non-empty subset of {list(ALL_METHODS)}; received {list(methods)!r}")
    if METHODS[3] in methods and METHODS[2] not in methods:
        raise ValueError(f"`methods`: {METHODS[3]!r} continues the {METHODS[2]!r} run; add {METHODS[2]!r}")
    return tuple(m for m in ALL_METHODS if m in methods)


def method_units(settings: FinetuneSettings, num_train: int, method: str) -> int:
    """Progress-bar units of one method of :func:`compare_methods` (its own bar): training batches of its grid
    runs, or for BMA its SWAG steps plus one per posterior sample.

    Example:
        >>> s = FinetuneSettings(lr_grid=(0.1,), l2sp_variances=(1.0,), epochs=2, bma_epochs=2, bma_samples=3,
        ...                      batch_size=10)
        >>> method_units(s, 20, "fine-tuning"), method_units(s, 20, "learned prior + BMA")
        (4, 7)
    """
    steps_per_epoch = math.ceil(num_train / settings.batch_size)
    if method == METHODS[3]:
        return settings.bma_epochs * steps_per_epoch + settings.bma_samples
    return settings.grid_size * settings.epochs * steps_per_epoch


def count_units(settings: FinetuneSettings, num_train: int, methods: Sequence[str] | None = None) -> int:
    """Progress-bar units :func:`compare_methods` will report for ``num_train`` training examples (all methods).

    Example:
        >>> count_units(FinetuneSettings(lr_grid=(0.1,), l2sp_variances=(1.0,), epochs=2, bma_epochs=2,
        ...                              bma_samples=3, batch_size=10), 20)
        19
    """
    return sum(method_units(settings, num_train, m) for m in _check_methods(methods))


def average_variance(prior: Any) -> float:
    """tr(Σ)/P at the prior's own scale: the mean marginal variance, λ·(Σᵢ vᵢ + ‖F‖²_F)/P + ε.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> average_variance(PriorModel.from_tensors({"w": torch.zeros(4)}, variance=0.5, scale=2.0))
        1.0
    """
    total = sum(float(v.double().sum()) for v in prior.variance.values())
    if prior.cov_factor is not None:
        total += sum(float(f.double().pow(2).sum()) for f in prior.cov_factor.values())
    return prior.scale * total / prior.num_parameters + prior.eps


def compare_methods(
    make_model: Callable[[], nn.Module],
    prior: Any,
    train: torch.utils.data.Dataset,
    val: torch.utils.data.Dataset,
    test: torch.utils.data.Dataset,
    settings: FinetuneSettings,
    *,
    include: Any = None,
    exclude: Any = None,
    forward: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] | None = None,
    progress: Any = None,
    methods: Sequence[str] | None = None,
    make_source_model: Callable[[], nn.Module] | None = None,
) -> list[MethodResult]:
    """Fine-tune with the methods of :data:`METHODS` under the same budget; test metrics per method.

    Plain fine-tuning tunes its learning rate over ``settings.lr_grid``; L2-SP its σ² over
    ``settings.l2sp_variances`` (an isotropic prior centred on the prior mean μ); the learned prior its λ
    over ``settings.scales`` (default: matched to the σ² grid by the average variance). Each run starts
    from ``make_model()`` (which must return the same starting weights every call, e.g. μ and a seeded
    head), trains ``settings.epochs`` epochs of SGD on ``mean CE + penalty/N`` and keeps its best epoch on
    ``val``; the run with the best validation ``select_metric`` is the method's model. BMA continues the
    selected learned-prior run at a constant learning rate for ``bma_epochs`` epochs, collects a SWAG
    snapshot after every step over every trainable parameter, and averages the predictive of ``bma_samples``
    posterior samples (batch-norm statistics refreshed on the training data for each sample).

    The pre-trained weights the baselines start from: with ``make_source_model`` (e.g. the source run's
    final checkpoint, as a user of plain fine-tuning would have it), ``fine-tuning`` and ``L2-SP`` (centred on
    those weights) start from ``make_source_model()``, and the opt-in :data:`INIT_ONLY` control, plain
    fine-tuning with the same learning-rate grid and budget but started from ``make_model()`` (μ and the
    prior's batch-norm statistics, :meth:`~priorzoo.PriorModel.init_model_`), separates what the prior term
    adds from what starting at μ adds. Without ``make_source_model`` every method starts from
    ``make_model()`` (then :data:`INIT_ONLY` would repeat ``fine-tuning`` exactly).

    Args:
        make_model: returns a fresh model initialised at μ with a new head.
        prior: the learned :class:`~priorzoo.PriorModel` (its ``exclude`` patterns keep the head out).
        train, val, test: map-style datasets yielding batches ``default_forward`` understands (a mapping
            with ``labels`` or a pair ``(inputs, labels)``), or use ``forward``.
        settings: the :class:`FinetuneSettings`.
        include, exclude: which model parameters the priors cover (default: the learned prior's names).
        forward: ``forward(model, batch) -> (logits, labels)``
            (default :func:`priorzoo.batches.default_forward`).
        progress: an object with ``phase(name, total)`` (a new bar per method, :func:`method_units`),
            ``stage(text)`` and ``update(n)`` (the demo's :class:`~priorzoo.demo._progress.Progress`), or ``None``.
        methods: which methods to run, any of :data:`ALL_METHODS` (default :data:`METHODS`, the four);
            ``learned prior + BMA`` needs ``learned prior``.
        make_source_model: returns a fresh model at the pre-trained (source) weights with the same new head,
            the start of ``fine-tuning`` and ``L2-SP`` (default: ``make_model``).

    Returns:
        One :class:`MethodResult` per method, in :data:`ALL_METHODS` order.

    Raises:
        ValueError: ``methods`` names an unknown method, is empty, or asks for BMA without the learned prior.

    Example:
        >>> import copy
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> mean = {n: p.detach().clone() for n, p in base.named_parameters() if n.startswith("0.")}
        >>> prior = PriorModel.from_tensors(mean, {n: torch.full_like(m, 1e-2) for n, m in mean.items()},
        ...                                 {n: 0.05 * torch.randn(2, *m.shape) for n, m in mean.items()},
        ...                                 exclude=["2.*"])
        >>> x = torch.randn(60, 4); y = (x[:, 0] > 0).long()
        >>> data = torch.utils.data.TensorDataset(x, y)
        >>> parts = torch.utils.data.random_split(data, [20, 20, 20], torch.Generator().manual_seed(0))
        >>> s = FinetuneSettings(epochs=2, lr_grid=(0.1,), l2sp_variances=(1e-2,), bma_epochs=2,
        ...                      bma_rank=2, bma_samples=2)
        >>> rows = compare_methods(lambda: copy.deepcopy(base), prior, *parts, s)
        >>> [r.method for r in rows]
        ['fine-tuning', 'L2-SP', 'learned prior', 'learned prior + BMA']
    """
    from priorzoo import BindOptions
    from priorzoo.batches import default_forward
    from priorzoo.finetune import DownstreamSWAG, PriorRegularizer, evaluate
    from priorzoo.finetune.runners import fit_fresh, fit_swag_posterior, grid_search, make_optimizer
    from priorzoo.learn import isotropic_prior

    s = settings
    chosen = _check_methods(methods)
    source_model = make_model if make_source_model is None else make_source_model
    base_forward = forward or default_forward

    def forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        logits, labels = base_forward(model, batch)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("non-finite logits: the run diverged (learning rate too high for this prior)")
        return logits, labels

    include = list(prior.names) if include is None and exclude is None else include
    bind = BindOptions(include=include, exclude=exclude)
    n_train = len(train)  # type: ignore[arg-type]
    steps_per_epoch = math.ceil(n_train / s.batch_size)
    val_loader = seeded_loader(val, s.eval_batch_size, shuffle=False, seed=s.seed)
    test_loader = seeded_loader(test, s.eval_batch_size, shuffle=False, seed=s.seed)
    avg_var = average_variance(prior.with_scale(1.0))
    scales = s.scales if s.scales is not None else tuple(v / avg_var for v in s.l2sp_variances)

    def train_loader() -> CountingLoader:
        return CountingLoader(seeded_loader(train, s.batch_size, shuffle=True, seed=s.seed), progress)

    def optimizer(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: make_optimizer(m, s.optimizer, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def tune(
        name: str,
        knob: str,
        values: Sequence[float],
        build: Callable[[float], tuple[float, Any]],
        start_model: Callable[[], nn.Module] = make_model,
    ):
        start = time.perf_counter()

        def run(v: float) -> tuple[nn.Module, Any]:
            lr, reg_prior = build(v)
            return fit_fresh(
                start_model,
                train_loader(),
                optimizer(lr),
                prior=reg_prior,
                num_train_examples=n_train,
                bind=bind,
                seed=s.seed,
                epochs=s.epochs,
                val_loader=val_loader,
                metric=s.select_metric,
                restore_best=True,
                forward=forward,
                max_grad_norm=s.max_grad_norm,
            )

        def stage(i: int, v: float) -> None:
            if progress is not None:
                progress.stage(f"{knob} {i + 1}/{len(values)}")

        if progress is not None:
            progress.phase(name, method_units(s, n_train, name))

        try:  # the selection metric first; ties (frequent for accuracy on a small split) go to the lower NLL
            search = grid_search(
                values,
                run,
                metric=s.select_metric,
                tie_break=lambda p: p.metrics.get("nll", math.nan),
                keep_model=True,
                on_start=stage,
                what=knob,
            )
        except FloatingPointError:
            raise FloatingPointError(
                f"every {name} run diverged ({knob} grid {list(values)}); lower the learning rate"
            ) from None
        curve = []
        for p in search.points:
            entry: dict[str, Any] = {
                "value": p.value,
                "val_accuracy": p.metrics.get("accuracy", math.nan),
                "val_nll": p.metrics.get("nll", math.nan),
                "val_ece": p.metrics.get("ece", math.nan),
                "best_epoch": None if p.best_step is None else math.ceil(p.best_step / steps_per_epoch),
            }
            if p.diverged:
                entry["diverged"] = p.error
            curve.append(entry)
        model, metrics = search.model, search.best.metrics
        assert model is not None
        test_metrics = evaluate(model, test_loader, forward=forward)
        row = MethodResult(
            method=name,
            accuracy=test_metrics["accuracy"],
            nll=test_metrics["nll"],
            ece=test_metrics["ece"],
            hyperparameter=knob,
            value=search.best.value,
            validation={k: metrics[k] for k in ("accuracy", "nll", "ece") if k in metrics},
            curve=curve,
            seconds=time.perf_counter() - start,
        )
        return row, model

    rows: dict[str, MethodResult] = {}
    if METHODS[0] in chosen:
        rows[METHODS[0]], _ = tune(METHODS[0], "lr", s.lr_grid, lambda lr: (lr, None), source_model)
    if INIT_ONLY in chosen:  # the init-only control: μ (+ its statistics), no prior term
        rows[INIT_ONLY], _ = tune(INIT_ONLY, "lr", s.lr_grid, lambda lr: (lr, None), make_model)
    if METHODS[1] in chosen:
        # N(w₀, σ²I) centred on the pre-trained weights: σ² = 1 at scale σ², so one prior serves the whole grid
        l2sp_base = isotropic_prior(source_model(), 1.0, include=include, exclude=exclude, exclude_head=False)
        rows[METHODS[1]], _ = tune(
            METHODS[1], "variance", s.l2sp_variances, lambda var: (s.lr, l2sp_base.with_scale(var)), source_model
        )
    if METHODS[2] not in chosen:
        return [rows[m] for m in chosen]
    lp_row, lp_model = tune(METHODS[2], "scale", scales, lambda lam: (s.lr, prior.with_scale(lam)))
    lp_row.extra["scale_grid"] = list(scales)
    lp_row.extra["average_variance_at_scale_1"] = avg_var
    rows[METHODS[2]] = lp_row
    if METHODS[3] not in chosen:
        return [rows[m] for m in chosen]

    # ---- BMA: SWAG over the downstream run at the selected λ, then the averaged predictive
    if progress is not None:
        progress.phase(METHODS[3], method_units(s, n_train, METHODS[3]))
    start = time.perf_counter()
    torch.manual_seed(s.seed + 1)
    swag = DownstreamSWAG(lp_model, rank=s.bma_rank, exclude_head=False)  # the head is part of the posterior
    reg = PriorRegularizer(prior.with_scale(lp_row.value), lp_model, num_train_examples=n_train, **bind.as_kwargs())

    class _SampleCounter:
        def __init__(self, loader: Any) -> None:
            self.loader = loader

        def __iter__(self) -> Iterator[Any]:
            yield from self.loader
            if progress is not None:
                progress.update()

    extra: dict[str, Any] = {"num_samples": s.bma_samples, "swag_epochs": s.bma_epochs, "lr": s.lr}
    try:
        fit_swag_posterior(
            lp_model,
            train_loader(),
            optimizer(s.lr)(lp_model),
            rank=s.bma_rank,
            epochs=s.bma_epochs,
            regularizer=reg,
            swag=swag,
            forward=forward,
            max_grad_norm=s.max_grad_norm,
        )
        averager = swag.predict(
            {"test": _SampleCounter(test_loader)},
            num_samples=s.bma_samples,
            bn_loader=seeded_loader(train, s.eval_batch_size, shuffle=False, seed=s.seed),
            forward=forward,
            generator=torch.Generator().manual_seed(s.seed),
        )
        m = averager.metrics("test")
    except FloatingPointError as err:  # the SWAG phase diverged: reported as such, never hidden
        m = {"accuracy": math.nan, "nll": math.nan, "ece": math.nan}
        extra["diverged"] = str(err)
    extra.update({"snapshots": swag.num_collected, "rank": min(swag.num_collected, s.bma_rank)})
    bma_row = MethodResult(
        method=METHODS[3],
        accuracy=m["accuracy"],
        nll=m["nll"],
        ece=m["ece"],
        hyperparameter="scale",
        value=lp_row.value,
        validation=dict(lp_row.validation),
        seconds=time.perf_counter() - start,
        extra=extra,
    )
    rows[METHODS[3]] = bma_row
    return [rows[m] for m in chosen]
