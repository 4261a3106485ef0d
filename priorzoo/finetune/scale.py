r"""Choose the prior's covariance scale λ on a validation split.

The prior of the downstream task is N(μ, λ·Σ_learned): small λ pins the weights to the source solution,
large λ lets the data decide (λ → ∞ is plain fine-tuning). Shwartz-Ziv et al. (NeurIPS 2022) search λ over
1 … 1e10; the independent replications (Harvey, Petrov & Hughes, TMLR 2024; Špendl & Pirc, ReScience 2023)
found the gain of learned priors to depend strongly on it. :func:`tune_scale` runs one short, early-stopped
fine-tuning per λ of a log grid, from the same starting weights, data order and seed, scores each on the
validation split (NLL by default) and returns the whole curve with the best λ, so the choice can be
reported and stored with the fine-tuned result (:meth:`ScaleSearchResult.to_dict`).

Example:
    >>> from priorzoo.finetune.scale import log_grid
    >>> log_grid(1.0, 1e4, per_decade=1)
    [1.0, 10.0, 100.0, 1000.0, 10000.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from priorzoo.batches import ForwardFn, default_forward
from priorzoo.binding.matching import Patterns
from priorzoo.binding.options import BindOptions
from priorzoo.enums import Metric, OptimizerKind
from priorzoo.finetune.runners import GridPoint, fit_fresh, grid_search, ranking_key
from priorzoo.finetune.runners import make_optimizer as _make_optimizer
from priorzoo.prior import PriorModel
from priorzoo.validation import check_num_train_examples, check_positive_int, check_scale

__all__ = ["ScalePoint", "ScaleSearchResult", "log_grid", "split_train_validation", "tune_scale"]


def log_grid(start: float = 1.0, stop: float = 1e10, *, per_decade: int = 1) -> list[float]:
    """λ values from ``start`` to ``stop`` (both included), ``per_decade`` per factor of 10.

    Example:
        >>> log_grid(1e-2, 1.0, per_decade=2)
        [0.01, 0.0316228, 0.1, 0.316228, 1.0]
    """
    start, stop = check_scale(start), check_scale(stop)
    if stop < start:
        raise ValueError(f"`stop` ({stop:g}) must be ≥ `start` ({start:g})")
    check_positive_int(per_decade, "per_decade")
    lo, hi = math.log10(start), math.log10(stop)
    n = max(1, round((hi - lo) * per_decade))
    return [float(f"{10 ** (lo + (hi - lo) * i / n):.6g}") for i in range(n + 1)] if hi > lo else [start]


def split_train_validation(
    dataset: Any, validation_fraction: float = 0.1, *, seed: int = 0
) -> tuple[torch.utils.data.Subset, torch.utils.data.Subset]:
    """Random ``(train, validation)`` split of any sized dataset (``torch.utils.data.random_split``).

    At least one example goes to each side.

    Example:
        >>> train, val = split_train_validation(list(range(10)), 0.2)
        >>> len(train), len(val)
        (8, 2)
    """
    if not (isinstance(validation_fraction, float) and 0 < validation_fraction < 1):
        raise ValueError(f"`validation_fraction` must be a float in (0, 1); received {validation_fraction!r}")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"cannot split {n} example(s) into a training and a validation part")
    n_val = min(n - 1, max(1, round(n * validation_fraction)))
    gen = torch.Generator().manual_seed(seed)
    train, val = torch.utils.data.random_split(dataset, [n - n_val, n_val], generator=gen)
    return train, val


@dataclass
class ScalePoint:
    """One λ of the search: the best validation metrics of its early-stopped run.

    Attributes:
        scale: λ.
        metrics: validation ``accuracy``/``nll``/``ece`` at the best evaluation.
        best_step: the step of that evaluation; ``steps``: steps run; ``stopped_early``; ``seconds``.
        diverged: the run's loss or predictions became non-finite; the point is never chosen.
    """

    scale: float
    metrics: dict[str, float]
    best_step: int | None
    steps: int
    stopped_early: bool
    seconds: float
    diverged: bool = False


@dataclass
class ScaleSearchResult:
    """The λ curve and the chosen λ.

    Attributes:
        best_scale: the λ with the best validation ``metric`` (ties: the smaller λ, the stronger prior).
        metric: the selection metric (``nll``, ``accuracy`` or ``ece``).
        curve: one :class:`ScalePoint` per λ, in grid order.
        settings: how the search ran (steps, patience, N, ...).

    Example:
        >>> r = ScaleSearchResult(best_scale=10.0, metric="nll", curve=[])
        >>> r.to_dict()["best_scale"]
        10.0
    """

    best_scale: float
    metric: str
    curve: list[ScalePoint] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored next to the fine-tuned model by ``priorzoo finetune --tune-scale``)."""
        return {
            "best_scale": self.best_scale,
            "metric": self.metric,
            "curve": [asdict(p) for p in self.curve],
            "settings": dict(self.settings),
        }

    def ranked(self) -> list[ScalePoint]:
        """The points that ran to the end with the selection metric, best first (:func:`~priorzoo.finetune.runners.
        ranking_key`: the rule that chose :attr:`best_scale`).

        Example:
            >>> pts = [ScalePoint(s, {"nll": v}, 1, 1, False, 0.0) for s, v in [(1.0, 0.7), (10.0, 0.5), (1e2, 0.5)]]
            >>> [p.scale for p in ScaleSearchResult(best_scale=10.0, metric="nll", curve=pts).ranked()]
            [10.0, 100.0, 1.0]
        """
        points = [p for p in self.curve if not p.diverged and self.metric in p.metrics]
        return sorted(points, key=lambda p: ranking_key(p.metrics, self.metric, p.scale))

    def table(self) -> str:
        """A plain-text table of the curve (λ, validation metrics, steps), best row marked with ``*``."""
        lines = [f"{'':1} {'scale':>10} {'val_nll':>9} {'val_acc':>8} {'val_ece':>8} {'steps':>6}"]
        for p in self.curve:
            mark = "*" if p.scale == self.best_scale else " "
            m = p.metrics
            if p.diverged:
                lines.append(f"{mark} {p.scale:>10.3g} {'diverged':>9}")
                continue
            lines.append(
                f"{mark} {p.scale:>10.3g} {m.get('nll', float('nan')):>9.4f} {m.get('accuracy', float('nan')):>8.4f} "
                f"{m.get('ece', float('nan')):>8.4f} {p.steps:>6d}"
            )
        return "\n".join(lines)


def tune_scale(
    prior: PriorModel,
    make_model: Callable[[], torch.nn.Module],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    *,
    num_train_examples: int,
    grid: Sequence[float] | None = None,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
    lr: float = 1e-2,
    epochs: int = 1,
    max_steps: int | None = None,
    eval_every: int | None = None,
    patience: int | None = 2,
    metric: str = "nll",
    prior_weight: float = 1.0,
    forward: ForwardFn = default_forward,
    seed: int = 0,
    include: Patterns = None,
    exclude: Patterns = None,
    allow_partial: bool = False,
    autocast_dtype: torch.dtype | None = None,
    verbose: bool = False,
) -> ScaleSearchResult:
    r"""Search λ on a log grid with short early-stopped fine-tuning runs; return the curve and the best λ.

    For every λ: seed torch's global RNG with ``seed``, build a fresh model with ``make_model()`` (it must return
    the same starting weights each call, e.g. a deep copy of a template, or a model initialised from the
    prior mean), minimise ``mean CE + ρ·penalty_λ/N`` with :func:`~priorzoo.finetune.loop.fit` for at most
    ``epochs`` / ``max_steps``, evaluating on ``val_loader`` every ``eval_every`` steps (default: each
    epoch) and stopping after ``patience`` evaluations without improvement; the point's score is its best
    evaluation. The models are discarded; refit with the chosen λ (``prior.with_scale(result.best_scale)``).

    Args:
        prior: the learned prior (its own λ is ignored: every grid value replaces it).
        make_model: returns a fresh model to fine-tune.
        train_loader, val_loader: the training part and the held-out validation part (see
            :func:`split_train_validation`); the validation data must not be in ``train_loader``. A
            ``DataLoader(shuffle=True)`` without its own ``generator`` draws its order from the global RNG, so
            every λ sees the same batches; one with a private generator would not.
        num_train_examples: N of the training part.
        grid: λ values (default ``log_grid(1, 1e10)``, the paper's range, one per decade).
        make_optimizer: ``model -> optimizer`` (default SGD with ``lr`` and momentum 0.9).
        metric: ``nll`` (default), ``accuracy`` or ``ece``.
        prior_weight, include, exclude, allow_partial: as in :class:`~priorzoo.finetune.PriorRegularizer`.
        forward, autocast_dtype: as in :func:`~priorzoo.finetune.loop.fit`.
        verbose: print one line per λ.

    Raises:
        ValueError: an empty grid, a λ ≤ 0, N ≤ 0, an unknown metric.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> template = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> prior = PriorModel.from_tensors({n: p.detach().clone() for n, p in template.named_parameters()
        ...                                  if n.startswith("0.")}, variance=0.1, exclude=["1.*"])
        >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
        >>> train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
        >>> val = [(x[48:], y[48:])]
        >>> import copy
        >>> res = tune_scale(prior, lambda: copy.deepcopy(template), train, val, num_train_examples=48,
        ...                  grid=[1.0, 100.0], epochs=3)
        >>> [p.scale for p in res.curve], res.best_scale in (1.0, 100.0)
        ([1.0, 100.0], True)
    """
    Metric.check(metric)
    n = check_num_train_examples(num_train_examples)
    grid = list(log_grid(1.0, 1e10) if grid is None else grid)
    if not grid:
        raise ValueError("the λ grid is empty")
    grid = [check_scale(s) for s in grid]
    if len(set(grid)) != len(grid):
        raise ValueError(f"the λ grid has duplicates: {grid}")
    bind = BindOptions(include=include, exclude=exclude, allow_partial=allow_partial)
    build_optimizer = make_optimizer or (lambda m: _make_optimizer(m, OptimizerKind.SGD, lr=lr))

    def run(scale: float) -> tuple[torch.nn.Module, Any]:
        return fit_fresh(
            make_model,
            train_loader,
            build_optimizer,
            prior=prior.with_scale(scale),
            num_train_examples=n,
            prior_weight=prior_weight,
            bind=bind,
            seed=seed,
            epochs=epochs,
            max_steps=max_steps,
            val_loader=val_loader,
            eval_every=eval_every,
            patience=patience,
            metric=metric,
            restore_best=False,
            forward=forward,
            autocast_dtype=autocast_dtype,
        )

    def report(p: GridPoint) -> None:
        if not verbose:
            return
        if p.diverged:
            print(f"λ = {p.value:<10.3g} diverged ({p.error})", flush=True)
            return
        m = p.metrics
        print(
            f"λ = {p.value:<10.3g} val nll {m.get('nll', math.nan):.4f}  acc {m.get('accuracy', math.nan):.4f}  "
            f"({p.steps} steps, best at {p.best_step})",
            flush=True,
        )

    try:
        search = grid_search(grid, run, metric=metric, on_point=report, what="λ")
    except FloatingPointError:
        raise FloatingPointError(
            f"every λ in the grid {grid} diverged: lower the learning rate or search larger λ (weaker priors)"
        ) from None
    curve = [
        ScalePoint(p.value, p.metrics, p.best_step, p.steps, p.stopped_early, p.seconds, diverged=p.diverged)
        for p in search.points
    ]
    best = search.best
    settings = {
        "num_train_examples": n,
        "epochs": epochs,
        "max_steps": max_steps,
        "eval_every": eval_every,
        "patience": patience,
        "prior_weight": prior_weight,
        "seed": seed,
        "grid": grid,
    }
    return ScaleSearchResult(best_scale=best.value, metric=str(metric), curve=curve, settings=settings)
