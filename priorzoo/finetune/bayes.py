r"""Downstream Bayesian inference: SWAG over the fine-tuning run, Bayesian model averaging, SGLD.

**Bayesian model averaging (BMA).** With S posterior samples w_1 … w_S the predictive distribution is the
average of the per-sample *probabilities* (not of logits, not of weights):

.. math:: p(y \mid x, \mathcal D) \approx \frac1S \sum_{s=1}^S \operatorname{softmax}(f_{w_s}(x))_y .

For a network with batch normalisation, the running statistics stored in the model belong to the weights
they were estimated with, not to a sample; they are recomputed for every sample by a pass over training
data with the other layers in eval mode (Maddox et al. 2019, §4; as ``torch.optim.swa_utils.update_bn``).

**Downstream SWAG** (:class:`DownstreamSWAG`): after fine-tuning to a MAP solution, keep SGD going at a
constant learning rate and collect snapshots (the :class:`priorzoo.learn.SWAGCollector` of the source task,
reused here over *all* trainable parameters, head included); the SWAG Gaussian is the approximate
posterior N(w̄, ½Σ_diag + ½DDᵀ/(K−1)) and BMA samples from it (Maddox et al., "A Simple Baseline for
Bayesian Uncertainty in Deep Learning", NeurIPS 2019; used downstream by Shwartz-Ziv et al. 2022).

**SGLD** (:class:`SGLD`; Welling & Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics",
ICML 2011). The target is the tempered posterior p_T(w) ∝ exp(−U(w)/T) with
U(w) = N·mean CE(w) + penalty(w) = −Σᵢ log p(yᵢ|xᵢ,w) − log p(w) + const and temperature T (T = 1: the
Bayes posterior; T < 1: "cold", Wenzel et al. ICML 2020). The Langevin discretisation with step η,
w ← w − η∇U/T + √(2η)·ξ, ξ ~ N(0, I), written for the per-example loss ℓ = U/N = mean CE + penalty/N that
a training loop already differentiates, with α = ηN/T, is

.. math:: w \leftarrow w - \alpha\,\nabla\ell(w) + \sqrt{2\alpha T / N}\;\xi ,

so the optimiser takes the same learning rate α as SGD on ℓ and only adds Gaussian noise of standard
deviation √(2αT/N) per coordinate. Stationary (for small α) at p_T.

Example:
    >>> import torch
    >>> from priorzoo.finetune.bayes import average_predictive
    >>> p1 = torch.tensor([[0.9, 0.1]]); p2 = torch.tensor([[0.5, 0.5]])
    >>> average_predictive([p1, p2]).tolist()
    [[0.699999988079071, 0.30000001192092896]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from priorzoo.batches import ForwardFn, default_forward
from priorzoo.binding.batchnorm import has_batchnorm, refresh_batchnorm_
from priorzoo.binding.matching import Patterns
from priorzoo.finetune.loop import predict_proba
from priorzoo.finetune.metrics import classification_metrics
from priorzoo.prior import PriorModel
from priorzoo.validation import check_num_train_examples

__all__ = [
    "SGLD",
    "DownstreamSWAG",
    "PredictiveAverager",
    "average_predictive",
    "bma_predict",
    "has_batchnorm",
    "refresh_batchnorm_",
    "sample_into_",
]


def average_predictive(probs: Sequence[Tensor] | Tensor) -> Tensor:
    """(1/S) Σ_s p_s: the BMA of S predictive distributions, each ``[n, C]`` (or one ``[S, n, C]`` tensor).

    Example:
        >>> import torch
        >>> average_predictive(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])).tolist()
        [[0.5, 0.5]]
    """
    stacked = probs if isinstance(probs, Tensor) else torch.stack(list(probs)) if len(probs) else None
    if stacked is None or stacked.dim() != 3 or stacked.shape[0] == 0:
        raise ValueError("`probs` must be S ≥ 1 tensors of shape [n, C] (or one [S, n, C] tensor)")
    return stacked.mean(dim=0)


@torch.no_grad()
def sample_into_(model: torch.nn.Module, posterior: PriorModel, generator: torch.Generator | None = None) -> list[str]:
    """Draw w ~ posterior and copy it into the model's matching parameters (head included); returns their names.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> post = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1e-12)
        >>> sample_into_(lin, post, torch.Generator().manual_seed(0))
        ['weight']
    """
    match = posterior.match(model, exclude_head=False)
    match.check(allow_partial=True)
    draw = posterior.sample(generator)
    params = dict(model.named_parameters())
    for pname, mname in match.matched.items():
        params[mname].copy_(draw[pname])
    return list(match.matched.values())


class PredictiveAverager:
    r"""Running Bayesian model average of predictive probabilities over one or more evaluation loaders.

    Call :meth:`add` with the model holding each posterior sample; it refreshes batch-norm statistics on
    ``bn_loader`` first (for BN models), predicts every loader and adds the probabilities to the running
    sum. :meth:`probabilities` is (1/S) Σ_s p(y|x, w_s).

    Args:
        loaders: ``name -> loader`` (e.g. ``{"validation": ..., "test": ...}``), or one loader (named
            ``"eval"``). Loaders must yield the same examples in the same order on every pass.
        bn_loader: training data for the batch-norm refresh (required for a model with batch norm).
        bn_batches: use only the first ``bn_batches`` batches of it.
        forward: ``forward(model, batch) -> (logits, labels)``.

    Example:
        >>> import torch
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> avg = PredictiveAverager(data)
        >>> avg.add(torch.nn.Linear(3, 2)); avg.add(torch.nn.Linear(3, 2))
        >>> avg.num_samples, tuple(avg.probabilities().shape)
        (2, (4, 2))
    """

    def __init__(
        self,
        loaders: Mapping[str, Iterable[Any]] | Iterable[Any],
        *,
        bn_loader: Iterable[Any] | None = None,
        bn_batches: int | None = None,
        forward: ForwardFn = default_forward,
    ) -> None:
        self.loaders = dict(loaders) if isinstance(loaders, Mapping) else {"eval": loaders}
        if not self.loaders:
            raise ValueError("`loaders` is empty")
        self.bn_loader = bn_loader
        self.bn_batches = bn_batches
        self.forward = forward
        self.num_samples = 0
        self._sums: dict[str, Tensor] = {}
        self._labels: dict[str, Tensor] = {}

    def add(self, model: torch.nn.Module) -> None:
        """Add the predictions of ``model`` (one posterior sample) to the average."""
        if has_batchnorm(model):
            if self.bn_loader is None:
                raise ValueError(
                    "the model has batch-norm layers: pass bn_loader=<training data> so that their statistics "
                    "are recomputed for every posterior sample (stale statistics make BMA predictions wrong)"
                )
            refresh_batchnorm_(model, self.bn_loader, forward=self.forward, num_batches=self.bn_batches)
        for name, loader in self.loaders.items():
            probs, labels = predict_proba(model, loader, forward=self.forward)
            probs = probs.double()
            if name not in self._sums:
                self._sums[name], self._labels[name] = probs, labels
            else:
                if not torch.equal(self._labels[name], labels):
                    raise RuntimeError(
                        f"loader `{name}` yielded other labels than on the first pass: evaluation loaders must "
                        "not shuffle (BMA averages the predictions of each example)"
                    )
                self._sums[name] += probs
        self.num_samples += 1

    def _name(self, name: str | None) -> str:
        if self.num_samples == 0:
            raise RuntimeError("no sample added yet: call add(model) for each posterior sample")
        if name is None:
            if len(self.loaders) != 1:
                raise ValueError(f"name one of the loaders {sorted(self.loaders)}")
            return next(iter(self.loaders))
        if name not in self.loaders:
            raise KeyError(f"no loader `{name}`; loaders: {sorted(self.loaders)}")
        return name

    def probabilities(self, name: str | None = None) -> Tensor:
        """The BMA predictive probabilities ``[n, C]`` (float64) of a loader."""
        key = self._name(name)
        return self._sums[key] / self.num_samples

    def labels(self, name: str | None = None) -> Tensor:
        """The labels ``[n]`` of a loader."""
        return self._labels[self._name(name)]

    def metrics(self, name: str | None = None, *, num_bins: int = 15) -> dict[str, float]:
        """Accuracy, NLL and ECE of the BMA predictive (plus ``num_samples``)."""
        key = self._name(name)
        out: dict[str, float] = classification_metrics(self.probabilities(key), self.labels(key), num_bins=num_bins)
        out["num_samples"] = self.num_samples
        return out


def bma_predict(
    model: torch.nn.Module,
    posterior: PriorModel,
    loaders: Mapping[str, Iterable[Any]] | Iterable[Any],
    *,
    num_samples: int = 20,
    bn_loader: Iterable[Any] | None = None,
    bn_batches: int | None = None,
    forward: ForwardFn = default_forward,
    generator: torch.Generator | None = None,
    restore: bool = True,
) -> PredictiveAverager:
    """BMA over ``num_samples`` draws from ``posterior`` (e.g. :meth:`DownstreamSWAG.posterior`).

    Each draw is copied into ``model`` (see :func:`sample_into_`), batch-norm statistics are refreshed on
    ``bn_loader`` for BN models, and the predictive probabilities are averaged. With ``restore`` (default)
    the model's parameters and buffers are put back afterwards.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> lin = torch.nn.Linear(3, 2)
        >>> post = PriorModel.from_tensors({n: p.detach().clone() for n, p in lin.named_parameters()},
        ...                                variance=0.01)
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> avg = bma_predict(lin, post, data, num_samples=3, generator=torch.Generator().manual_seed(0))
        >>> avg.num_samples
        3
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` (S) must be an integer ≥ 1; received {num_samples!r}")
    averager = PredictiveAverager(loaders, bn_loader=bn_loader, bn_batches=bn_batches, forward=forward)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if restore else None
    try:
        for _ in range(num_samples):
            sample_into_(model, posterior, generator)
            averager.add(model)
    finally:
        if saved is not None:
            model.load_state_dict(saved)
    return averager


class DownstreamSWAG:
    """SWAG over the downstream fine-tuning run, with :class:`priorzoo.learn.SWAGCollector`.

    Call :meth:`collect` at each snapshot of a constant-learning-rate phase after fine-tuning (e.g. every
    ``steps_per_epoch / snapshots_per_epoch`` steps), then :meth:`posterior` for the Gaussian or
    :meth:`predict` for BMA.

    Args:
        model: the fine-tuned model (all trainable parameters, the task head included, unless
            ``include``/``exclude`` say otherwise).
        rank: K ≥ 2 deviations kept (Maddox et al. use 20); collect at least K + 1 snapshots.
        include, exclude, **collector_kwargs: passed to :class:`~priorzoo.learn.SWAGCollector`.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> swag = DownstreamSWAG(lin, rank=2)
        >>> for i in range(3):
        ...     with torch.no_grad():
        ...         _ = lin.weight.add_(0.01 * i)
        ...     swag.collect()
        >>> swag.posterior().rank
        2
    """

    def __init__(
        self,
        model: torch.nn.Module,
        rank: int = 20,
        *,
        include: Patterns = None,
        exclude: Patterns = None,
        **collector_kwargs: Any,
    ) -> None:
        from priorzoo.learn.swag import SWAGCollector

        self.model = model
        # downstream, the head is part of the posterior (the collector leaves it out by default: a source-task
        # prior never covers the head it replaces)
        collector_kwargs.setdefault("exclude_head", False)
        self.collector = SWAGCollector(model, rank=rank, include=include, exclude=exclude, **collector_kwargs)

    @property
    def num_collected(self) -> int:
        """Snapshots collected so far."""
        return self.collector.num_collected

    def collect(self) -> None:
        """Add the model's current weights as a snapshot."""
        self.collector.collect()

    def posterior(self, *, rank: int | None = None, scale: float = 1.0) -> PriorModel:
        """The downstream SWAG posterior N(w̄, ½Σ_diag + ½DDᵀ/(K−1)) (``scale`` multiplies the covariance)."""
        if self.collector.num_collected < 2:
            raise RuntimeError(
                f"downstream SWAG needs at least 2 snapshots (K + 1 = {self.collector.rank + 1} recommended); "
                f"{self.collector.num_collected} collected"
            )
        if rank is None and self.collector.num_deviations < 2:
            rank = 0  # one deviation has no K − 1 normaliser: a diagonal SWAG posterior
        return self.collector.to_prior(rank=rank, scale=scale, source={"objective": "downstream-swag"})

    def predict(
        self,
        loaders: Mapping[str, Iterable[Any]] | Iterable[Any],
        *,
        num_samples: int = 20,
        bn_loader: Iterable[Any] | None = None,
        bn_batches: int | None = None,
        forward: ForwardFn = default_forward,
        generator: torch.Generator | None = None,
    ) -> PredictiveAverager:
        """BMA with ``num_samples`` SWAG samples (see :func:`bma_predict`); the model is restored after."""
        return bma_predict(
            self.model,
            self.posterior(),
            loaders,
            num_samples=num_samples,
            bn_loader=bn_loader,
            bn_batches=bn_batches,
            forward=forward,
            generator=generator,
        )


class SGLD(torch.optim.Optimizer):
    r"""Stochastic gradient Langevin dynamics for the per-example loss ℓ = mean CE + penalty/N.

    Update (see the module docstring): ``w ← w − lr·∇ℓ(w) + √(2·lr·T/N)·ξ``, ξ ~ N(0, I), which samples
    the tempered posterior ∝ exp(−N·ℓ(w)/T) as lr → 0. Collect samples after a burn-in, spaced apart
    (e.g. once per epoch), and average their predictions (:class:`PredictiveAverager`).

    Args:
        params: parameters or parameter groups (each group may set its own ``lr``/``temperature``).
        lr: α > 0, the step on ∇ℓ (the same scale as an SGD learning rate on the mean loss).
        num_train_examples: N > 0.
        temperature: T > 0 (1: the posterior).
        generator: RNG for the noise (on the parameters' device). Under DDP, give every process a
            generator seeded identically: the gradients are all-reduced, so identical noise keeps the
            replicas identical.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = SGLD([w], lr=0.1, num_train_examples=100, generator=torch.Generator().manual_seed(0))
        >>> w.grad = torch.zeros(3)
        >>> opt.step()
        >>> opt.noise_std(opt.param_groups[0])  # √(2·0.1·1/100)
        0.044721359549995794
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        num_train_examples: int,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        for name, value in (("lr", lr), ("temperature", temperature)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"SGLD `{name}` must be a finite number > 0; received {value!r}")
        n = check_num_train_examples(num_train_examples)
        super().__init__(params, {"lr": float(lr), "temperature": float(temperature), "num_train_examples": n})
        self.generator = generator

    @staticmethod
    def noise_std(group: Mapping[str, Any]) -> float:
        """√(2·lr·T/N) of a parameter group."""
        return math.sqrt(2.0 * group["lr"] * group["temperature"] / group["num_train_examples"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One Langevin step on every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            std = self.noise_std(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SGLD does not support sparse gradients")
                noise = torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
                p.add_(p.grad, alpha=-group["lr"]).add_(noise, alpha=std)
        return loss
