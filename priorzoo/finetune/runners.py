r"""Running methods: the one layer of loaders, optimisers, grid search and posterior runners every caller shares.

The demo's comparison (:func:`priorzoo.demo.compare_methods`), ``priorzoo finetune``,
:func:`~priorzoo.finetune.scale.tune_scale`, the zoo recipes and the benchmarks all train through these
helpers and :func:`~priorzoo.finetune.loop.fit`, so a fix lands once:

- :func:`make_optimizer`: SGD with momentum (the paper's) or AdamW over the trainable parameters;
- :func:`seeded_loader`: a ``DataLoader`` whose order replays from a seed;
- :func:`fit_fresh`: seed, build a fresh model, bind the prior, fit — one run of a search;
- :func:`grid_search`: one run per grid value, each scored on validation, the best kept
  (λ for :func:`~priorzoo.finetune.scale.tune_scale`, lr / σ² / λ for the comparison);
- :func:`fit_swag_posterior`: SWAG over a constant-learning-rate phase of the downstream run
  (Maddox et al., NeurIPS 2019), the posterior of BMA;
- :func:`run_sgld`: SGLD (Welling & Teh, ICML 2011) with a burn-in, averaging the predictive of the samples.

Example:
    >>> import torch
    >>> from priorzoo.finetune.runners import make_optimizer, seeded_loader
    >>> [len(b[0]) for b in seeded_loader(torch.utils.data.TensorDataset(torch.zeros(5, 2)), 2, shuffle=False)]
    [2, 2, 1]
    >>> type(make_optimizer(torch.nn.Linear(2, 2), "adamw", lr=1e-3)).__name__
    'AdamW'
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from priorzoo.binding.options import BindOptions
from priorzoo.enums import Metric, OptimizerKind
from priorzoo.finetune.bayes import SGLD, DownstreamSWAG, PredictiveAverager
from priorzoo.finetune.loop import FitResult, fit
from priorzoo.finetune.regularizer import PriorRegularizer
from priorzoo.prior import PriorModel
from priorzoo.validation import check_num_train_examples, check_positive_int

__all__ = [
    "GridPoint",
    "GridSearchResult",
    "SGLDRun",
    "fit_fresh",
    "fit_swag_posterior",
    "grid_search",
    "make_optimizer",
    "ranking_key",
    "run_sgld",
    "seeded_loader",
]


def seeded_loader(
    dataset: Any, batch_size: int, *, shuffle: bool, seed: int = 0, **kwargs: Any
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` whose shuffling draws from its own generator seeded with ``seed``.

    Every call with the same seed replays the same order, whatever the global RNG has done in between;
    ``kwargs`` go to the ``DataLoader`` (``collate_fn``, ``num_workers``, ...).

    Example:
        >>> a = [b.tolist() for b in seeded_loader(list(range(6)), 3, shuffle=True, seed=1)]
        >>> a == [b.tolist() for b in seeded_loader(list(range(6)), 3, shuffle=True, seed=1)]
        True
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, **kwargs)


def make_optimizer(
    model: torch.nn.Module,
    kind: str | OptimizerKind = OptimizerKind.SGD,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimiser over ``model``'s trainable parameters: ``sgd`` (with ``momentum``, as in the paper) or
    ``adamw``; ``weight_decay`` is a decay toward 0, on top of any prior.

    Raises:
        ValueError: an unknown ``kind``.

    Example:
        >>> import torch
        >>> opt = make_optimizer(torch.nn.Linear(2, 2), "sgd", lr=0.1)
        >>> opt.defaults["momentum"], opt.defaults["lr"]
        (0.9, 0.1)
    """
    kind = OptimizerKind.check(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind is OptimizerKind.ADAMW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def fit_fresh(
    make_model: Callable[[], torch.nn.Module],
    train_loader: Iterable[Any],
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    *,
    prior: PriorModel | None = None,
    num_train_examples: int | None = None,
    prior_weight: float = 1.0,
    bind: BindOptions | None = None,
    seed: int = 0,
    scale: float | str | None = None,
    learned_options: Mapping[str, Any] | None = None,
    **fit_kwargs: Any,
) -> tuple[torch.nn.Module, FitResult]:
    """One run of a search: seed torch's global RNG, build ``make_model()``, bind ``prior`` (if any) as a
    :class:`~priorzoo.finetune.PriorRegularizer`, and :func:`~priorzoo.finetune.fit` it.

    Args:
        make_model: returns the same starting weights every call (e.g. μ and a seeded head).
        train_loader: the training batches.
        make_optimizer: ``model -> optimizer`` (e.g. ``lambda m: make_optimizer(m, lr=0.01)``).
        prior: the prior at the λ of this run; ``None`` trains without a prior term.
        num_train_examples: N (required with a prior).
        prior_weight: ρ.
        bind: which parameters the prior covers (:class:`~priorzoo.BindOptions`).
        seed: seeds the global RNG before the model is built.
        scale: λ for the prior (default: the prior's own), or ``"learned"`` (data-emphasized ELBO, no
            validation data needed; see :mod:`priorzoo.finetune.learned_scale`); ``learned_options``:
            its ``groups``/``sigma_init``/``sigma_lr``/``seed``. The learned λ_g and σ are in the result's
            ``learned_scale``.
        fit_kwargs: passed to :func:`~priorzoo.finetune.fit` (``epochs``, ``val_loader``, ``metric``, ...).

    Returns:
        ``(model, fit result)``.

    Example:
        >>> import torch
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> model, res = fit_fresh(lambda: torch.nn.Linear(3, 2), data, lambda m: make_optimizer(m, lr=0.1), epochs=2)
        >>> res.steps
        2
    """
    torch.manual_seed(seed)
    model = make_model()
    regularizer = None
    if prior is not None:
        if num_train_examples is None:
            raise ValueError("`num_train_examples` (N) is required when a prior is given: the loss adds penalty / N")
        regularizer = PriorRegularizer(
            prior,
            model,
            num_train_examples=num_train_examples,
            prior_weight=prior_weight,
            scale=scale,
            **(bind or BindOptions()).as_kwargs(),
            **dict(learned_options or {}),
        )
    result = fit(model, train_loader, make_optimizer(model), regularizer=regularizer, **fit_kwargs)
    return model, result


# ---------------------------------------------------------------------- grid search
@dataclass
class GridPoint:
    """One value of a grid search: the validation metrics of its run.

    Attributes:
        value: the grid value (λ, σ², a learning rate, ...).
        metrics: validation ``accuracy``/``nll``/``ece`` of the run's best evaluation.
        best_step: the step of that evaluation; ``steps``: steps run; ``stopped_early``; ``seconds``.
        diverged: the run's loss or predictions became non-finite (``error`` says how); never selected.
    """

    value: float
    metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    diverged: bool = False
    error: str | None = None


@dataclass
class GridSearchResult:
    """What :func:`grid_search` found.

    Attributes:
        points: one :class:`GridPoint` per value, in grid order.
        best: the selected point.
        model: the selected run's model when ``keep_model=True``, else ``None``.
    """

    points: list[GridPoint]
    best: GridPoint
    model: torch.nn.Module | None = None


def ranking_key(metrics: Mapping[str, float], metric: str | Metric, tie: float) -> tuple[float, float]:
    """The one rule that orders the runs of a search (λ, learning rate, σ²), smallest key first: the validation
    ``metric`` signed so that smaller is better, then ``tie`` (the grid value: ties go to the smaller value, for λ
    the stronger prior); a missing or non-finite metric ranks last.

    Example:
        >>> ranking_key({"nll": 0.5}, "nll", 10.0) < ranking_key({"nll": 0.5}, "nll", 100.0)
        True
        >>> ranking_key({"accuracy": 0.9}, "accuracy", 1.0) < ranking_key({"accuracy": 0.8}, "accuracy", 1.0)
        True
    """
    m = Metric.check(metric)
    score = float(metrics.get(str(m), math.nan))
    key = (-score if m.higher_is_better else score, float(tie))
    return key if all(math.isfinite(k) for k in key) else (math.inf, math.inf)


def grid_search(
    values: Sequence[float],
    run: Callable[[float], tuple[torch.nn.Module, FitResult]],
    *,
    metric: str | Metric = Metric.NLL,
    tie_break: Callable[[GridPoint], float] | None = None,
    keep_model: bool = False,
    on_start: Callable[[int, float], None] | None = None,
    on_point: Callable[[GridPoint], None] | None = None,
    what: str = "value",
) -> GridSearchResult:
    """Run ``run(value)`` for every value and select the best validation ``metric``.

    A run that raises ``FloatingPointError`` (it diverged) is recorded as such and never selected. The
    selection key is :func:`ranking_key` (the metric, signed so that smaller is better; then ``tie_break(point)``,
    default the value itself, so ties go to the smaller value); among equal keys the first point wins. With
    ``keep_model`` the selected run's model is returned (the others are dropped as the search goes: at most two
    models live at once).

    Args:
        values: the grid.
        run: ``value -> (model, FitResult)``, e.g. a :func:`fit_fresh` call with a validation loader.
        metric: ``nll`` (default), ``accuracy`` or ``ece``.
        tie_break: second key (smaller is better).
        keep_model: return the selected model.
        on_start: called as ``on_start(index, value)`` before each run (progress).
        on_point: called with each finished :class:`GridPoint` (logging).
        what: the grid's name for the error when every run diverged.

    Raises:
        ValueError: an empty grid or an unknown metric.
        FloatingPointError: every run diverged.

    Example:
        >>> import torch
        >>> from priorzoo.finetune.loop import FitResult
        >>> def run(v):  # a stand-in for a training run whose validation NLL is (v - 2)²
        ...     return torch.nn.Linear(1, 1), FitResult(steps=1, best_step=1, best_metrics={"nll": (v - 2) ** 2})
        >>> grid_search([1.0, 2.0, 4.0], run).best.value
        2.0
    """
    Metric.check(metric)
    values = list(values)
    if not values:
        raise ValueError(f"the {what} grid is empty")
    tie = tie_break or (lambda p: p.value)
    points: list[GridPoint] = []
    best: tuple[tuple[float, float], GridPoint, torch.nn.Module | None] | None = None
    for i, value in enumerate(values):
        if on_start is not None:
            on_start(i, value)
        start = time.perf_counter()
        try:
            model, res = run(value)
        except FloatingPointError as err:  # the run diverged: the point fails, the search goes on
            point = GridPoint(value, seconds=time.perf_counter() - start, diverged=True, error=str(err))
            points.append(point)
            if on_point is not None:
                on_point(point)
            continue
        point = GridPoint(
            value=value,
            metrics=dict(res.best_metrics or {}),
            best_step=res.best_step,
            steps=res.steps,
            stopped_early=res.stopped_early,
            seconds=time.perf_counter() - start,
        )
        points.append(point)
        if on_point is not None:
            on_point(point)
        key = ranking_key(point.metrics, metric, tie(point))
        if best is None or key < best[0]:
            best = (key, point, model if keep_model else None)
        del model
    if best is None:
        raise FloatingPointError(f"every {what} run diverged ({what} grid {values})")
    return GridSearchResult(points=points, best=best[1], model=best[2])


# ---------------------------------------------------------------------- posteriors
def fit_swag_posterior(
    model: torch.nn.Module,
    train_loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    rank: int,
    epochs: int,
    collect_every: int = 1,
    regularizer: PriorRegularizer | None = None,
    swag: DownstreamSWAG | None = None,
    **fit_kwargs: Any,
) -> tuple[DownstreamSWAG, FitResult]:
    r"""SWAG over a constant-learning-rate phase of the downstream run: train ``epochs`` more epochs with
    ``optimizer`` (and the prior term of ``regularizer``) and take a snapshot every ``collect_every`` steps.

    The result is the SWAG Gaussian N(w̄, ½·diag(E[w²] − w̄²) + ½·DDᵀ/(K−1)) of Maddox et al. (NeurIPS 2019)
    over the downstream weights, the head included (:class:`~priorzoo.finetune.DownstreamSWAG`); BMA then
    averages the predictive of its samples (``swag.predict(...)`` or :func:`~priorzoo.finetune.bma_predict`).

    Args:
        model: the fine-tuned model (it keeps training in place).
        train_loader, optimizer: the SWAG phase's data and optimiser (constant learning rate).
        rank: K ≥ 2 of the posterior.
        epochs: epochs of the phase.
        collect_every: optimiser steps between snapshots.
        regularizer: the prior term (``None``: the likelihood alone).
        swag: collect into this :class:`~priorzoo.finetune.DownstreamSWAG` (e.g. one built with other
            ``include``/``exclude``, or kept to inspect a phase that diverged); default
            ``DownstreamSWAG(model, rank=rank)``.
        fit_kwargs: passed to :func:`~priorzoo.finetune.fit` (``forward``, ``max_grad_norm``, ...).

    Returns:
        ``(swag, fit result)``.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 3
        >>> swag, res = fit_swag_posterior(lin, data, make_optimizer(lin, lr=0.1), rank=2, epochs=1)
        >>> swag.num_collected, swag.posterior().rank
        (3, 2)
    """
    check_positive_int(collect_every, "collect_every")
    if swag is None:
        swag = DownstreamSWAG(model, rank=rank)

    def collect(step: int) -> None:
        if step % collect_every == 0:
            swag.collect()  # type: ignore[union-attr]

    result = fit(
        model,
        train_loader,
        optimizer,
        regularizer=regularizer,
        epochs=epochs,
        restore_best=False,
        on_step=collect,
        **fit_kwargs,
    )
    return swag, result


@dataclass
class SGLDRun:
    """What :func:`run_sgld` did.

    Attributes:
        averager: the averaged predictive over ``eval_loaders`` (``None`` without evaluation data).
        fit: the :class:`~priorzoo.finetune.loop.FitResult` of the chain.
        burn_in_epochs: epochs before the first sample; ``sample_every``: steps between samples.
    """

    averager: PredictiveAverager | None
    fit: FitResult
    burn_in_epochs: int
    sample_every: int

    @property
    def num_samples(self) -> int:
        """Samples averaged."""
        return self.averager.num_samples if self.averager is not None else 0


def run_sgld(
    model: torch.nn.Module,
    train_loader: Any,
    *,
    lr: float,
    num_train_examples: int,
    epochs: int,
    num_samples: int,
    eval_loaders: Mapping[str, Iterable[Any]] | None = None,
    burn_in_epochs: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    regularizer: PriorRegularizer | None = None,
    **fit_kwargs: Any,
) -> SGLDRun:
    r"""Langevin dynamics on ``mean CE + ρ·penalty/N`` (:class:`~priorzoo.finetune.SGLD`), then the average
    predictive of ``num_samples`` samples spread evenly over the epochs after ``burn_in_epochs``
    (default half), batch-norm statistics refreshed on ``train_loader`` for each sample.

    Args:
        model: the model, trained in place (its trainable parameters form the chain).
        train_loader: the training batches (sized: ``len`` gives the steps per epoch).
        lr: the step size ε of SGLD.
        num_train_examples: N (the SGLD noise is calibrated to the full-data posterior).
        epochs: epochs of the chain, burn-in included.
        num_samples: S, the samples averaged (fewer if the chain is too short).
        eval_loaders: ``{name: loader}`` whose predictive is averaged.
        burn_in_epochs: epochs before sampling starts (default ``epochs // 2``).
        temperature: T of the posterior.
        generator: for the Langevin noise.
        regularizer: the prior term.
        fit_kwargs: passed to :func:`~priorzoo.finetune.fit`.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 2
        >>> out = run_sgld(torch.nn.Linear(3, 2), data, lr=1e-3, num_train_examples=8, epochs=2, num_samples=2,
        ...                eval_loaders={"test": data})
        >>> out.num_samples, out.burn_in_epochs
        (2, 1)
    """
    n = check_num_train_examples(num_train_examples)
    check_positive_int(epochs, "epochs")
    check_positive_int(num_samples, "num_samples")
    burn = epochs // 2 if burn_in_epochs is None else burn_in_epochs
    if not 0 <= burn < epochs:
        raise ValueError(f"`burn_in_epochs` must be in [0, epochs={epochs}); received {burn_in_epochs!r}")
    sgld = SGLD(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        num_train_examples=n,
        temperature=temperature,
        generator=generator,
    )
    steps_per_epoch = len(train_loader)
    every = max(1, (epochs - burn) * steps_per_epoch // num_samples)
    averager = PredictiveAverager(eval_loaders, bn_loader=train_loader) if eval_loaders else None

    def sample(step: int) -> None:
        k = step - burn * steps_per_epoch
        if averager is not None and k > 0 and k % every == 0 and averager.num_samples < num_samples:
            averager.add(model)

    result = fit(model, train_loader, sgld, regularizer=regularizer, epochs=epochs, on_step=sample, **fit_kwargs)
    return SGLDRun(averager=averager, fit=result, burn_in_epochs=burn, sample_every=every)
