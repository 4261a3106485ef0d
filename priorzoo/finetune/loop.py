r"""Fine-tuning with a prior in a plain PyTorch (or timm) loop.

The objective (Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022, eq. 2) for N training examples is
the negative log posterior per example,

.. math::

    L(w) = \frac1B\sum_{i \in \text{batch}} \mathrm{CE}(f_w(x_i), y_i)
         + \frac{\rho}{N}\cdot\underbrace{\tfrac12 (w-\mu)^\top \Sigma^{-1} (w-\mu)}_{\text{penalty}},
    \qquad \Sigma = \lambda\,(\operatorname{diag}(v) + F^\top F) + \varepsilon I,

an unbiased estimate of :math:`-\frac1N[\sum_{i=1}^N \log p(y_i \mid x_i, w) + \rho \log p(w)]` up to a
constant, with prior weight ρ (1 for the Bayesian posterior) and covariance scale λ (the paper searches it
over many orders of magnitude; see :func:`priorzoo.finetune.scale.tune_scale`). Its gradient adds
ρ·Σ⁻¹(w − μ)/N to the data gradient: a pull toward the prior mean μ whose strength falls as 1/λ.

In any loop, one line does it::

    loss = criterion(model(x), y) + prior.penalty(model) / N

(:meth:`priorzoo.PriorModel.penalty` caches the binding per model). :class:`PriorRegularizer` is the
same term as an object: it validates N, ρ and λ once, binds the prior (matching + the K×K Cholesky
factorisation, done once) and can add the analytic gradient straight into ``.grad``. The penalty is
computed with autocast disabled (by :class:`~priorzoo.gaussian.LowRankGaussian` itself: a bf16 autocast
region would otherwise run the factor products in bf16).
Each call costs one pass over the K×P factor forward and one backward: the memory-bandwidth floor. On a
CPU, :meth:`PriorRegularizer.prefetch` (called by :func:`train_step`, ``PriorCallback`` and
``PriorTrainer``) runs both passes in a background thread while the model's forward and backward run, which
hides most of that cost (``benchmarks/bench_trainer_overhead.py``).

:func:`fit` / :func:`train_step` / :func:`predict_proba` are small helpers the CLI and
:func:`~priorzoo.finetune.scale.tune_scale` use; a batch is a mapping with ``labels`` (transformers
style, passed to ``model(**inputs)``) or a tuple ``(inputs, labels)`` (torchvision/timm style).

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> from priorzoo.finetune import PriorRegularizer
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    >>> prior = PriorModel.from_tensors(  # a prior over the backbone `0.*`; the head `1.*` gets none
    ...     {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("0.")},
    ...     variance=0.1,
    ...     exclude=["1.*"],
    ... )
    >>> reg = PriorRegularizer(prior, model, num_train_examples=1000)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> loss = torch.nn.functional.cross_entropy(model(x), y) + reg()
    >>> loss.backward()
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from priorzoo.batches import Batch, ForwardFn, default_forward, move_to_device
from priorzoo.enums import Metric
from priorzoo.finetune.metrics import classification_metrics, probabilities
from priorzoo.finetune.regularizer import PriorRegularizer
from priorzoo.validation import check_positive_int

__all__ = [
    "FitResult",
    "PriorRegularizer",
    "evaluate",
    "fit",
    "predict_proba",
    "train_step",
]


# ---------------------------------------------------------------------- a plain loop
def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    regularizer: PriorRegularizer | None = None,
    forward: ForwardFn = default_forward,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    max_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One optimiser step on ``mean loss_fn(batch) + ρ·penalty/N``; returns the loss parts.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward under autocast; the prior term is always
    computed in full precision. ``max_grad_norm`` clips the *total* gradient (data + prior).
    With a ``scale="learned"`` regulariser the forward and backward run at the sample w̄ + σε and the
    KL(q‖p)/D gradient at w̄ is added after the backward (:mod:`priorzoo.finetune.learned_scale`); the returned
    ``prior_term`` is KL/D. An exception inside the step (an interrupt, a failing forward) waits for the prior
    term's background work and leaves the weights at w̄, not at the sample, before it propagates.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> out = train_step(m, (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), opt)
        >>> sorted(out)
        ['data_loss', 'loss', 'prior_term']
    """
    model.train()
    device = _device_of(model)
    batch = move_to_device(batch, device, non_blocking=True)
    try:
        if regularizer is not None:
            regularizer.prefetch()  # computed while the forward runs (CPU); the weights are final until step()
        ctx = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        learned = regularizer is not None and regularizer.learned is not None
        if learned:  # the data term at the sample w̄ + σε; the KL's gradient at w̄ after the backward
            regularizer.perturb_()
        with ctx:
            logits, labels = forward(model, batch)
            data_loss = loss_fn(logits.float(), labels)
        loss = data_loss
        prior_term = None
        if regularizer is not None and not learned:
            prior_term = regularizer()
            loss = data_loss + prior_term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if learned:
            prior_term = regularizer.add_to_grad_()
            loss = data_loss + prior_term.to(data_loss.dtype)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    except BaseException:
        # an interrupt or a failing forward/backward: wait for the prior term's background thread (left running,
        # it aborts the interpreter at exit) and put a learned scale's w̄ back in place of the sample w̄ + σε
        if regularizer is not None:
            regularizer._discard_prefetch()
        raise
    return {
        "loss": float(loss.detach()),
        "data_loss": float(data_loss.detach()),
        "prior_term": float(prior_term.detach()) if prior_term is not None else 0.0,
    }


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module, loader: Iterable[Batch], *, forward: ForwardFn = default_forward
) -> tuple[Tensor, Tensor]:
    """Softmax probabilities and labels over a loader, in eval mode, on CPU: ``([n, C], [n])``.

    Example:
        >>> import torch
        >>> probs, labels = predict_proba(torch.nn.Linear(3, 2), [(torch.zeros(2, 3), torch.tensor([0, 1]))])
        >>> [round(x, 6) for x in probs.sum(dim=1).tolist()]
        [1.0, 1.0]
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    probs, labels = [], []
    try:
        for batch in loader:
            logits, y = forward(model, move_to_device(batch, device, non_blocking=True))
            probs.append(probabilities(logits).cpu())
            labels.append(y.detach().cpu())
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError("the loader yielded no batch")
    return torch.cat(probs), torch.cat(labels)


def evaluate(
    model: torch.nn.Module, loader: Iterable[Batch], *, forward: ForwardFn = default_forward, num_bins: int = 15
) -> dict[str, float]:
    """Accuracy, NLL and ECE of ``model`` over a loader (see :mod:`priorzoo.finetune.metrics`).

    Example:
        >>> import torch
        >>> evaluate(torch.nn.Linear(3, 2), [(torch.zeros(2, 3), torch.tensor([0, 1]))])["num_examples"]
        2
    """
    probs, labels = predict_proba(model, loader, forward=forward)
    if not torch.isfinite(probs).all():
        raise FloatingPointError(
            "the model's predictions are not finite (its weights diverged): lower the learning rate or raise "
            "the prior scale λ (a very strong prior, small λ, makes the penalty's gradient stiff for SGD)"
        )
    return classification_metrics(probs, labels, num_bins=num_bins)


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes:
        steps: optimiser steps taken.
        history: one dict per evaluation: ``step``, ``train_loss`` (mean since the last evaluation),
            ``prior_term`` (likewise), and the validation metrics when a validation loader was given.
        best_step, best_metrics: the evaluation with the best validation ``metric`` (``None`` without one).
        stopped_early: training stopped because ``patience`` evaluations brought no improvement.
        seconds: wall-clock time.
        learned_scale: with a ``scale="learned"`` regulariser, its final state (``scales`` λ_g, ``sigma``,
            ``kappa``, ``groups``); ``None`` otherwise.
    """

    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    learned_scale: dict[str, Any] | None = None


def fit(
    model: torch.nn.Module,
    train_loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    regularizer: PriorRegularizer | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    val_loader: Iterable[Batch] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    metric: str = "nll",
    restore_best: bool = True,
    forward: ForwardFn = default_forward,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    scheduler: Any = None,
    max_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train for ``epochs`` (or ``max_steps``) with optional early stopping on a validation metric.

    Evaluates every ``eval_every`` steps (default: at the end of each epoch) when ``val_loader`` is given;
    stops after ``patience`` evaluations without improvement of ``metric`` (``nll``, ``accuracy`` or
    ``ece``) and, with ``restore_best``, loads the best weights back (a CPU copy of the state dict is kept).
    ``on_step(step)`` runs after every optimiser step (e.g. a SWAG collector's ``collect``).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 3
        >>> res = fit(m, data, torch.optim.SGD(m.parameters(), lr=0.1), epochs=2, val_loader=data)
        >>> res.steps, len(res.history)
        (6, 2)
    """
    higher = Metric.check(metric).higher_is_better
    check_positive_int(epochs, "epochs")
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every), ("patience", patience)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}` must be an integer ≥ 1 or None; received {value!r}")
    result = FitResult()
    start = time.perf_counter()
    best_value: float | None = None
    best_state: dict[str, Tensor] | None = None
    bad_evals = 0
    loss_sum = prior_sum = 0.0
    since = 0

    def do_eval() -> bool:
        """Record an evaluation; True when training should stop (patience exhausted)."""
        nonlocal best_value, best_state, bad_evals, loss_sum, prior_sum, since
        entry: dict[str, float] = {
            "step": result.steps,
            "train_loss": loss_sum / max(since, 1),
            "prior_term": prior_sum / max(since, 1),
        }
        loss_sum = prior_sum = 0.0
        since = 0
        if val_loader is None:
            result.history.append(entry)
            return False
        metrics = evaluate(model, val_loader, forward=forward)
        entry.update({f"val_{k}": v for k, v in metrics.items()})
        result.history.append(entry)
        value = metrics[metric]
        improved = best_value is None or (value > best_value if higher else value < best_value)
        if improved:
            best_value = value
            result.best_step, result.best_metrics = result.steps, metrics
            bad_evals = 0
            if restore_best:
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            bad_evals += 1
        return patience is not None and bad_evals >= patience

    stop = False
    for _ in range(epochs):
        for batch in train_loader:
            out = train_step(
                model,
                batch,
                optimizer,
                regularizer=regularizer,
                forward=forward,
                loss_fn=loss_fn,
                max_grad_norm=max_grad_norm,
                autocast_dtype=autocast_dtype,
            )
            if not math.isfinite(out["loss"]):
                raise FloatingPointError(
                    f"the training loss became {out['loss']} at step {result.steps + 1} (data {out['data_loss']}, "
                    f"prior {out['prior_term']}): lower the learning rate or raise the prior scale λ"
                )
            result.steps += 1
            loss_sum += out["loss"]
            prior_sum += out["prior_term"]
            since += 1
            if scheduler is not None:
                scheduler.step()
            if on_step is not None:
                on_step(result.steps)
            if eval_every is not None and result.steps % eval_every == 0 and do_eval():
                result.stopped_early = stop = True
            if stop or (max_steps is not None and result.steps >= max_steps):
                stop = True
                break
        if eval_every is None and since > 0 and do_eval():
            result.stopped_early = stop = True
        if stop:
            break
    if since > 0:  # steps after the last evaluation
        do_eval()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    if regularizer is not None and regularizer.learned is not None:
        result.learned_scale = regularizer.learned.state()
    return result
