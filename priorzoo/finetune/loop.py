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
import numbers
import operator
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from priorzoo.finetune._prefetch import PrecomputedPenalty, Prefetched
from priorzoo.finetune.metrics import classification_metrics, probabilities
from priorzoo.gaussian import Workspace
from priorzoo.learn._common import check_positive_int
from priorzoo.learn._common import move_to_device as _move_batch
from priorzoo.matching import Patterns
from priorzoo.prior import BoundPrior, PriorModel

__all__ = [
    "FitResult",
    "PriorRegularizer",
    "check_num_train_examples",
    "check_prior_weight",
    "check_scale",
    "default_forward",
    "evaluate",
    "fit",
    "l2sp_prior",
    "move_to_device",
    "predict_proba",
    "train_step",
]

Batch = Any
ForwardFn = Callable[[torch.nn.Module, Batch], tuple[Tensor, Tensor]]
"""``forward(model, batch) -> (logits [B, C], labels [B])``."""


# ---------------------------------------------------------------------- validation
def check_num_train_examples(value: Any) -> int:
    """N must be a positive integer (the number of training examples); returns it as ``int``.

    Integers of any kind (``int``, NumPy integers) and integral floats (``5e4``) are accepted.

    Example:
        >>> check_num_train_examples(50000)
        50000
    """
    n = None
    if not isinstance(value, bool):
        try:
            n = operator.index(value)
        except TypeError:
            if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
                n = int(value)
    if n is None:
        raise ValueError(
            f"`num_train_examples` (N) must be a positive integer, the number of training examples; received {value!r}"
        )
    if n <= 0:
        raise ValueError(
            f"`num_train_examples` (N) must be > 0: the loss adds penalty / N, N = number of training "
            f"examples; received {value!r}"
        )
    return n


def _positive_real(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def check_prior_weight(value: Any) -> float:
    """ρ must be a finite number > 0 (1 = the Bayesian posterior); returns it as ``float``.

    Example:
        >>> check_prior_weight(1)
        1.0
    """
    checked = _positive_real(value)
    if checked is None:
        raise ValueError(
            f"`prior_weight` must be a finite number > 0 (1.0 = the posterior; to train without a prior, "
            f"do not add the term); received {value!r}"
        )
    return checked


def check_scale(value: Any) -> float:
    """λ must be a finite number > 0 (it multiplies the prior covariance); returns it as ``float``.

    Example:
        >>> check_scale(1e4)
        10000.0
    """
    checked = _positive_real(value)
    if checked is None:
        raise ValueError(
            f"the prior scale λ must be a finite number > 0 (it multiplies the covariance: large λ = weak "
            f"prior); received {value!r}"
        )
    return checked


def _check_prior_device(prior: PriorModel) -> None:
    for store_name, store in (("mean", prior.mean), ("variance", prior.variance), ("cov_factor", prior.cov_factor)):
        for name, t in (store or {}).items():
            if t.device.type == "meta":
                raise ValueError(
                    f"the prior's tensor `{name}.{store_name}` is on the meta device (no data): load the prior "
                    "with PriorModel.from_pretrained(...) or move it with prior.to('cpu') first"
                )


# ---------------------------------------------------------------------- the prior term
class PriorRegularizer:
    r"""The prior term ρ·½(w−μ)ᵀΣ⁻¹(w−μ)/N of the objective, bound to one model (see the module docstring).

    Binding (matching the prior's parameter names onto ``model``, moving its tensors to the model's device,
    the K×K Cholesky factorisation) happens once here; if the model's parameters are later replaced or
    moved, the prior is re-bound transparently. The prior's tensors may live on any device and in any
    floating dtype: they are copied to the parameters' device and the penalty is computed in float32 (or
    ``dtype``) whatever the parameters' dtype (bf16/fp16 parameters get their gradient cast back).

    Args:
        prior: the :class:`~priorzoo.PriorModel` (its head is excluded by matching; see
            :meth:`~priorzoo.PriorModel.match`).
        model: the model being fine-tuned (also a DDP/``torch.compile`` wrapper: names are matched through
            the ``module.``/``_orig_mod.`` prefixes).
        num_train_examples: N > 0, the number of training examples (the whole training set, not a batch,
            not per process).
        prior_weight: ρ > 0, multiplies the prior term (1 = posterior; a "temperature" on the prior only).
        scale: if given, λ > 0 replaces the prior's own scale (``prior.with_scale(scale)``).
        include, exclude, exclude_head, allow_partial, dtype: forwarded to :meth:`~priorzoo.PriorModel.bind`.
        overlap: let :meth:`prefetch` compute the term in a background thread, overlapped with the model's
            forward and backward (CPU; see :mod:`priorzoo.finetune._prefetch`). False makes
            :meth:`prefetch` a no-op: every use computes the term on the spot.

    Raises:
        ValueError: N ≤ 0 or not an integer, ρ ≤ 0, λ ≤ 0, a prior or model on the meta device.
        priorzoo.PriorMatchError: the prior does not match the model (other architecture, shapes).

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> prior = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0)
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(1.0)
        >>> reg = PriorRegularizer(prior, lin, num_train_examples=4)
        >>> reg().item()  # ½·(1 + 1)/1 / 4
        0.25
        >>> reg.gradient()[0].tolist()  # Σ⁻¹(w − μ)/N
        [[0.25, 0.25]]
    """

    def __init__(
        self,
        prior: PriorModel,
        model: torch.nn.Module,
        *,
        num_train_examples: int,
        prior_weight: float = 1.0,
        scale: float | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
        exclude_head: bool = True,
        allow_partial: bool = False,
        dtype: torch.dtype | None = None,
        overlap: bool = True,
    ) -> None:
        if not isinstance(prior, PriorModel):
            raise TypeError(f"`prior` must be a priorzoo.PriorModel; received {type(prior).__name__}")
        if not isinstance(overlap, bool):
            raise TypeError(f"`overlap` must be True or False; received {overlap!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module; received {type(model).__name__}")
        self.num_train_examples = check_num_train_examples(num_train_examples)
        self.prior_weight = check_prior_weight(prior_weight)
        if scale is not None:
            prior = prior.with_scale(check_scale(scale))
        _check_prior_device(prior)
        self.prior = prior
        self.model = model
        self._bind_kwargs: dict[str, Any] = {
            "include": include,
            "exclude": exclude,
            "exclude_head": exclude_head,
            "allow_partial": allow_partial,
            "dtype": dtype,
        }
        self._bound = self._bind()
        self.overlap = overlap
        self._pending: Prefetched | None = None
        self._warned_stale = False
        self._workspace: Workspace | None = None

    def _bind(self) -> BoundPrior:
        meta = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise ValueError(
                f"the model's parameters are on the meta device (e.g. `{meta[0]}`): materialise the model "
                "(load its weights) before binding a prior to it"
            )
        return self.prior.bind(self.model, **self._bind_kwargs)

    # ------------------------------------------------------------------ state
    @property
    def bound(self) -> BoundPrior:
        """The :class:`~priorzoo.BoundPrior` (re-bound if the model's parameters were replaced or moved)."""
        if not self._bound.is_current():
            self._bound = self._bind()
        return self._bound

    @property
    def coefficient(self) -> float:
        """ρ / N, the factor in front of the penalty."""
        return self.prior_weight / self.num_train_examples

    @property
    def scale(self) -> float:
        """λ, the prior's covariance scale."""
        return self.prior.scale

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The model parameters the prior covers, in prior order."""
        return self.bound.parameters

    @property
    def match(self):  # -> MatchResult
        """The :class:`~priorzoo.MatchResult` of the binding."""
        return self.bound.match

    def __repr__(self) -> str:
        return (
            f"PriorRegularizer(N={self.num_train_examples}, prior_weight={self.prior_weight:g}, "
            f"scale={self.scale:g}, matched={len(self.bound.prior_names)} parameters)"
        )

    # ------------------------------------------------------------------ overlap
    def prefetch(self) -> bool:
        """Start computing the prior term for the current weights in a background thread (CPU only).

        Call it when the weights are final for this step (before the forward pass); the next
        ``reg()``, :meth:`penalty`, :meth:`gradient` or :meth:`add_to_grad_` then waits for that result
        instead of computing it, so the two passes over the factor (memory-bound) overlap with the
        model's forward and backward (compute-bound). The result is the same computation on the same
        weights; it is used only if no covered parameter changed in between (else it is recomputed, with
        a warning) and only once. :class:`~priorzoo.finetune.PriorCallback`, :class:`~priorzoo.finetune.
        PriorTrainer` and :func:`fit` call it for you. Returns False, doing nothing, when the parameters
        are not on the CPU (an accelerator already runs the factor products asynchronously) or
        ``overlap=False``.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 1, bias=False)
            >>> reg = PriorRegularizer(PriorModel.from_tensors({"weight": torch.ones(1, 2)}, variance=1.0),
            ...                        lin, num_train_examples=10)
            >>> reg.prefetch()  # then the forward pass, while the prior term is computed
            True
            >>> loss = lin(torch.ones(1, 2)).sum() + reg()  # reg() uses the prefetched term
            >>> loss.backward()
        """
        bound = self.bound
        if not self.overlap or bound.device.type != "cpu":
            return False
        if self._pending is None or not self._pending.is_valid_for(bound):
            self._discard_prefetch()  # a stale one (weights changed since it started): never two at once
            # always into the reusable workspace: a term that goes into the loss copies its gradients out in
            # the caller's thread (P-sized allocations in the background thread slowed the step down more)
            self._pending = Prefetched.start(bound, self._workspace_for(bound))
        return True

    def _discard_prefetch(self) -> None:
        """Wait for a pending prefetch and drop it (e.g. at the end of training)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def _workspace_for(self, bound: BoundPrior) -> Workspace:
        if self._workspace is None or self._workspace.owner is not bound.gaussian:
            self._workspace = bound.new_workspace()
        return self._workspace

    def _take_prefetched(self) -> Prefetched | None:
        """The pending prefetch if still valid for the current weights (else None); consumed either way."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.is_valid_for(self.bound):
            return pending
        pending.wait()  # let it finish reading the old weights; its result is discarded
        if not self._warned_stale:
            self._warned_stale = True
            warnings.warn(
                "PriorRegularizer: the weights changed between prefetch() and the use of the prior term, so "
                "the prefetched term was discarded and recomputed (correct, but not overlapped). Call "
                "prefetch() after the optimiser step, when the weights are final for the next step.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None

    def _value_and_grad(self, *, own: bool) -> tuple[Tensor, list[Tensor]]:
        """(penalty, Σ⁻¹(w−μ) per parameter): prefetched if valid, else computed now. With ``own`` the
        gradients are tensors of the caller's own; without, they may be views of the workspace, valid until
        the next computation."""
        pending = self._take_prefetched()
        if pending is None:
            return self.bound.value_and_grad(workspace=None if own else self._workspace_for(self.bound))
        value, grads = pending.result()  # waits, re-raises the thread's error
        if own and pending.workspace is not None:
            grads = [g.clone() for g in grads]
        return value, grads

    # ------------------------------------------------------------------ values
    def penalty(self) -> Tensor:
        """½(w−μ)ᵀΣ⁻¹(w−μ), differentiable, computed with autocast disabled (the prefetched one if any)."""
        if self._pending is None:
            return self.bound.penalty()
        value, grads = self._value_and_grad(own=True)
        return PrecomputedPenalty.apply(value, grads, *self.bound.parameters)

    def __call__(self) -> Tensor:
        """ρ·penalty/N, differentiable: add it to the mean data loss."""
        return self.penalty() * self.coefficient

    term = __call__

    def log_prob(self) -> Tensor:
        """Exact log p(w) of the matched parameters under the (scaled) prior, float64."""
        return self.bound.log_prob()

    @torch.no_grad()
    def gradient(self) -> list[Tensor]:
        """ρ·Σ⁻¹(w−μ)/N for each matched parameter (shaped like it, in the compute dtype), no autograd."""
        c = self.coefficient
        return [gi.mul_(c) for gi in self._value_and_grad(own=True)[1]]

    def add_to_grad_(self) -> float:
        """Add ρ·Σ⁻¹(w−μ)/N into ``.grad`` of each trainable matched parameter; return ρ·penalty/N.

        Value and gradient come from the same two passes over the factor (:meth:`BoundPrior.value_and_grad`,
        or the result :meth:`prefetch` computed in the background), without autograd, so no ``.grad`` hooks
        fire: safe with DDP after the gradient all-reduce.
        Parameters with ``requires_grad=False`` get nothing (their block of Σ⁻¹(w−μ) is still computed
        with them held fixed, which is the exact conditional gradient for the trainable ones).

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 1, bias=False)
            >>> with torch.no_grad():
            ...     _ = lin.weight.fill_(2.0)
            >>> reg = PriorRegularizer(PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0),
            ...                        lin, num_train_examples=2)
            >>> reg.add_to_grad_()  # ½·8/2
            2.0
            >>> lin.weight.grad.tolist()
            [[1.0, 1.0]]
        """
        value, grads = self._value_and_grad(own=False)  # used right here: the workspace may hold them
        c = self.coefficient
        with torch.no_grad():
            for p, g in zip(self.bound.parameters, grads):
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = (g * c).to(p.dtype)  # a new tensor, never a view of the workspace
                elif p.grad.dtype == g.dtype:
                    p.grad.add_(g, alpha=c)
                else:
                    p.grad.add_((g * c).to(p.grad.dtype))
        return float(value) * c


# ---------------------------------------------------------------------- the L2-SP baseline
def l2sp_prior(
    model: torch.nn.Module,
    variance: float,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    exclude_head: bool = True,
) -> PriorModel:
    r"""The L2-SP baseline: an isotropic prior N(w₀, σ²I) centred on the model's current weights w₀.

    Its penalty is ‖w − w₀‖²/(2σ²) (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer
    Learning with Convolutional Networks", ICML 2018), the baseline the replications of Shwartz-Ziv et al.
    found competitive with learned priors. The model's task head (see
    :func:`priorzoo.matching.head_parameter_names`) is left out unless ``exclude_head=False``.

    Args:
        model: the backbone (with its new head) at its pre-trained weights.
        variance: σ² > 0.
        include, exclude: glob patterns / a predicate on the model's parameter names.
        exclude_head: leave the task head out (default).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> l2sp_prior(m, 0.01).kind.value
        'isotropic'
    """
    if (
        isinstance(variance, bool)
        or not isinstance(variance, (int, float))
        or not (math.isfinite(variance) and variance > 0)
    ):
        raise ValueError(f"the L2-SP variance σ² must be a finite number > 0; received {variance!r}")
    from priorzoo.learn.baselines import isotropic_prior

    return isotropic_prior(model, float(variance), include=include, exclude=exclude, exclude_head=exclude_head)


# ---------------------------------------------------------------------- a plain loop
def move_to_device(batch: Batch, device: torch.device | str | None) -> Batch:
    """Recursively move the tensors of a batch (mapping / sequence / tensor) to ``device``.

    Example:
        >>> import torch
        >>> move_to_device({"x": torch.zeros(1)}, "cpu")["x"].device.type
        'cpu'
    """
    return _move_batch(batch, device, non_blocking=True)


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
    batch = move_to_device(batch, device)
    if regularizer is not None:
        regularizer.prefetch()  # computed while the forward runs (CPU); the weights are final until step()
    ctx = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with ctx:
        logits, labels = forward(model, batch)
        data_loss = loss_fn(logits.float(), labels)
    loss = data_loss
    prior_term = None
    if regularizer is not None:
        prior_term = regularizer()
        loss = data_loss + prior_term
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
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
        >>> probs.sum(dim=1).tolist()
        [1.0, 1.0]
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    probs, labels = [], []
    try:
        for batch in loader:
            logits, y = forward(model, move_to_device(batch, device))
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


_HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "ece": False}


def _higher_is_better(metric: str) -> bool:
    """Whether a larger value of the selection ``metric`` is better; refuses an unknown metric."""
    if metric not in _HIGHER_IS_BETTER:
        raise ValueError(f"`metric` must be one of {sorted(_HIGHER_IS_BETTER)}; received {metric!r}")
    return _HIGHER_IS_BETTER[metric]


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
    """

    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    stopped_early: bool = False
    seconds: float = 0.0


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
    higher = _higher_is_better(metric)
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
    return result
