r"""``PriorRegularizer``: the prior term ρ·½(w−μ)ᵀΣ⁻¹(w−μ)/N of the fine-tuning objective, bound to one model.

The objective (Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022, eq. 2) for N training examples is

.. math::

    L(w) = \frac1B\sum_{i \in \text{batch}} \mathrm{CE}(f_w(x_i), y_i)
         + \frac{\rho}{N}\cdot\tfrac12 (w-\mu)^\top \Sigma^{-1} (w-\mu),
    \qquad \Sigma = \lambda\,(\operatorname{diag}(v) + F^\top F) + \varepsilon I,

whose prior part adds ρ·Σ⁻¹(w − μ)/N to the data gradient. The regulariser validates N, ρ, λ and the bind options
once, into a :class:`~priorzoo.finetune.PriorTerm` (or takes one: :meth:`PriorRegularizer.from_term`), binds the prior
(:class:`~priorzoo.BoundPrior`) and gives the term as a differentiable loss (``reg()``) or adds its analytic
gradient straight into ``.grad`` (:meth:`PriorRegularizer.add_to_grad_`). The plain-loop helpers
(:func:`~priorzoo.finetune.loop.fit`, :func:`~priorzoo.finetune.loop.train_step`) live in
:mod:`priorzoo.finetune.loop`.

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> lin = torch.nn.Linear(3, 2)
    >>> prior = PriorModel.from_tensors({n: torch.zeros_like(p) for n, p in lin.named_parameters()}, variance=1.0)
    >>> reg = PriorRegularizer(prior, lin, num_train_examples=100)
    >>> loss = torch.nn.functional.cross_entropy(lin(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])) + reg()
    >>> loss.backward()
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from priorzoo.binding.bound import BoundPrior
from priorzoo.binding.matching import Patterns
from priorzoo.binding.options import BindOptions
from priorzoo.binding.sharded import ShardedBoundPrior
from priorzoo.finetune._grads import add_into_grads_
from priorzoo.finetune._prefetch import PrecomputedPenalty, Prefetched
from priorzoo.finetune.learned_scale import LearnedScale
from priorzoo.finetune.term import PriorTerm
from priorzoo.gaussian import Workspace
from priorzoo.prior import PriorModel

__all__ = ["PriorRegularizer"]


# ---------------------------------------------------------------------- validation
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

    Which weights the penalty sees: the parameters the optimiser updates. Under autocast and under FSDP2's
    ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` those are the float32 master weights (FSDP2's
    sharded parameters stay float32; only its transient unsharded copies are bf16), so the penalty is
    computed on them. A model cast to bf16 as a whole has no float32 copy: its bf16 weights are read into
    the float32 workspace (one copy per step, no allocation) and the gradient is cast back to bf16.

    Args:
        prior: the :class:`~priorzoo.PriorModel` (its head is excluded by matching; see
            :meth:`~priorzoo.PriorModel.match`).
        model: the model being fine-tuned (also a DDP/``torch.compile`` wrapper: names are matched through
            the ``module.``/``_orig_mod.`` prefixes).
        num_train_examples: N > 0, the number of training examples (the whole training set, not a batch,
            not per process).
        prior_weight: ρ > 0, multiplies the prior term (1 = posterior; a "temperature" on the prior only).
        scale: if given, λ > 0 replaces the prior's own scale; default: :meth:`PriorModel.resolve_scale`
            (a learned prior whose λ was not chosen uses its ``recommended_scale``). ``"learned"``: learn
            one λ_g per group from the training data with the data-emphasized ELBO
            (:mod:`priorzoo.finetune.learned_scale`; Harvey, Petrov & Hughes, arXiv 2410.19675, 2502.01861):
            each step then runs at a sample w̄ + σε (:meth:`perturb_` before the forward) and
            :meth:`add_to_grad_` adds the KL's gradient (the prior term is weighted by 1/D, D = number of
            trained weights, instead of 1/N); :attr:`scales` reports λ_g and :attr:`sigma` σ.
        groups, sigma_init, sigma_lr, seed: with ``scale="learned"``: the groups (``"default"`` = {backbone,
            head}, ``"layer"``, ``"block"``, or a callable), σ's initial value and its own learning rate, the
            noise seed (see :class:`~priorzoo.finetune.learned_scale.LearnedScale`).
        include, exclude, exclude_head, allow_partial, dtype: forwarded to :meth:`~priorzoo.PriorModel.bind`.
        overlap: let :meth:`prefetch` compute the term in a background thread, overlapped with the model's
            forward and backward (CPU; see :mod:`priorzoo.finetune._prefetch`). False makes
            :meth:`prefetch` a no-op: every use computes the term on the spot.

    Raises:
        ValueError: N ≤ 0 or not an integer, ρ ≤ 0, λ ≤ 0 (or not ``"learned"``), a prior or model on the
            meta device; ρ ≠ 1 with ``scale="learned"`` (the method fixes the KL's weight at 1/D).
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
        scale: float | str | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
        exclude_head: bool = True,
        allow_partial: bool = False,
        dtype: torch.dtype | None = None,
        overlap: bool = True,
        groups: Any = "default",
        sigma_init: float = 1e-3,
        sigma_lr: float = 0.05,
        seed: int = 0,
    ) -> None:
        term = PriorTerm(
            num_train_examples=num_train_examples,
            prior_weight=prior_weight,
            scale=scale,
            bind=BindOptions(
                include=include, exclude=exclude, exclude_head=exclude_head, allow_partial=allow_partial, dtype=dtype
            ),
            overlap=overlap,
            groups=groups,
            sigma_init=sigma_init,
            sigma_lr=sigma_lr,
            seed=seed,
        )
        if term.num_train_examples is None:
            raise ValueError("`num_train_examples` (N, the number of training examples) is required")
        self._setup(prior, model, term)

    @classmethod
    def from_term(cls, prior: PriorModel, model: torch.nn.Module, term: PriorTerm) -> PriorRegularizer:
        """The regulariser of an already validated :class:`~priorzoo.finetune.PriorTerm` (what ``PriorCallback`` and
        ``PriorTrainer`` build once from their keywords); its N must be known.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> from priorzoo.finetune import PriorTerm
            >>> prior = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0)
            >>> PriorRegularizer.from_term(prior, torch.nn.Linear(2, 1, bias=False), PriorTerm(4)).coefficient
            0.25
        """
        if not isinstance(term, PriorTerm):
            raise TypeError(f"`term` must be a priorzoo.finetune.PriorTerm; received {type(term).__name__}")
        if term.num_train_examples is None:
            raise ValueError("the term's `num_train_examples` (N) is not known yet: give it before binding")
        out = cls.__new__(cls)
        out._setup(prior, model, term)
        return out

    def _setup(self, prior: PriorModel, model: torch.nn.Module, term: PriorTerm) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module; received {type(model).__name__}")
        prior = term.resolve(prior)
        _check_prior_device(prior)
        self.term = term
        self.num_train_examples: int = term.num_train_examples  # type: ignore[assignment]
        self.prior_weight = term.prior_weight
        self.prior = prior
        self.model = model
        self._bind_options = term.bind
        self.learned: LearnedScale | None = None
        if term.learned:
            self._check_model()
            self.learned = LearnedScale(
                prior,
                model,
                num_train_examples=self.num_train_examples,
                bind=self._bind_options,
                overlap=term.overlap,
                **term.learned_options(),
            )
            self._bound = self.learned.groups[0].bound
        else:
            self._bound = self._bind()
        self.overlap = term.overlap
        self._pending: Prefetched | None = None
        self._warned_stale = False
        self._workspace: Workspace | None = None

    def _check_model(self) -> None:
        meta = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise ValueError(
                f"the model's parameters are on the meta device (e.g. `{meta[0]}`): materialise the model "
                "(load its weights) before binding a prior to it"
            )

    def _bind(self) -> BoundPrior:
        self._check_model()
        return self.prior.bind(self.model, self._bind_options)

    # ------------------------------------------------------------------ state
    @property
    def bound(self) -> BoundPrior:
        """The :class:`~priorzoo.BoundPrior` (re-bound if the model's parameters were replaced or moved; with
        ``scale="learned"``, the first group's binding, at λ = 1)."""
        if self.learned is None and not self._bound.is_current():
            self._bound = self._bind()
        return self._bound

    @property
    def coefficient(self) -> float:
        """ρ / N, the factor in front of the penalty (1/D with ``scale="learned"``)."""
        if self.learned is not None:
            return 1.0 / self.learned.num_trained
        return self.prior_weight / self.num_train_examples

    @property
    def scale(self) -> float:
        """λ, the prior's covariance scale (with ``scale="learned"``: the first group's learned λ_g)."""
        if self.learned is not None:
            return next(iter(self.learned.scales.values()))
        return self.prior.scale

    @property
    def scales(self) -> dict[str, float]:
        """λ per group: the learned λ_g (``scale="learned"``), else ``{"backbone": λ}``.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 1, bias=False)
            >>> prior = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0)
            >>> PriorRegularizer(prior, lin, num_train_examples=4, scale=3.0).scales
            {'backbone': 3.0}
        """
        if self.learned is not None:
            return self.learned.scales
        return {"backbone": self.prior.scale}

    @property
    def sigma(self) -> float | None:
        """σ of q(w) = N(w̄, σ²I) with ``scale="learned"``, else ``None``."""
        return self.learned.sigma if self.learned is not None else None

    def perturb_(self) -> None:
        """With ``scale="learned"``: put the sample w̄ + σε into the weights for this step's forward and
        backward (:meth:`add_to_grad_` restores w̄). A no-op otherwise."""
        if self.learned is not None:
            self.learned.perturb_()

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The model parameters the prior covers, in prior order (with ``scale="learned"``: every tensor q
        covers, the head included)."""
        if self.learned is not None:
            return self.learned._noise_params
        return self.bound.parameters

    @property
    def match(self):  # -> MatchResult
        """The :class:`~priorzoo.MatchResult` of the binding."""
        return self.bound.match

    def __repr__(self) -> str:
        if self.learned is not None:
            return (
                f"PriorRegularizer(N={self.num_train_examples}, scale='learned', groups={self.learned.group_names}, "
                f"sigma={self.learned.sigma:.3g})"
            )
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
        if self.learned is not None:
            return False  # the learned term is computed at w̄ after the backward (the weights hold w̄ + σε)
        bound = self.bound
        if not self.overlap or bound.device.type != "cpu" or isinstance(bound, ShardedBoundPrior):
            return False  # (a sharded term is collective: never from a background thread)
        if self._pending is None or not self._pending.is_valid_for(bound):
            self._discard_prefetch()  # a stale one (weights changed since it started): never two at once
            # always into the reusable workspace: a term that goes into the loss copies its gradients out in
            # the caller's thread (P-sized allocations in the background thread slowed the step down more)
            self._pending = Prefetched.start(bound, self._workspace_for(bound))
        return True

    def _discard_prefetch(self) -> None:
        """Wait for a pending prefetch and drop it (e.g. at the end of training, or after an exception in a step:
        a learned scale's sample w̄ + σε is then taken out of the weights, :meth:`LearnedScale.discard_step_`)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()
        if self.learned is not None:
            self.learned.discard_step_()

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
    def _refuse_learned(self, what: str) -> None:
        if self.learned is not None:
            raise RuntimeError(
                f"PriorRegularizer.{what} is not available with scale='learned': the data term runs at the sample "
                "w̄ + σε, the KL at w̄; call perturb_() before the forward and add_to_grad_() after the backward "
                "(train_step/fit, PriorCallback and PriorTrainer do it for you)"
            )

    def penalty(self) -> Tensor:
        """½(w−μ)ᵀΣ⁻¹(w−μ), differentiable, computed with autocast disabled (the prefetched one if any)."""
        self._refuse_learned("penalty()")
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
        self._refuse_learned("log_prob()")
        return self.bound.log_prob()

    @torch.no_grad()
    def gradient(self) -> list[Tensor]:
        """ρ·Σ⁻¹(w−μ)/N for each matched parameter (shaped like it, in the compute dtype), no autograd."""
        self._refuse_learned("gradient()")
        grads = self._value_and_grad(own=True)[1]
        torch._foreach_mul_(grads, self.coefficient)
        return grads

    def add_to_grad_(self) -> Tensor:
        """Add ρ·Σ⁻¹(w−μ)/N into ``.grad`` of each trainable matched parameter; return ρ·penalty/N.

        Value and gradient come from the same two passes over the factor (:meth:`BoundPrior.value_and_grad`,
        or the result :meth:`prefetch` computed in the background), without autograd, so no ``.grad`` hooks
        fire: safe with DDP after the gradient all-reduce. The gradients enter with one
        ``torch._foreach_add_`` (a fixed number of operations whatever the number of parameters) and the
        returned value is a 0-dim tensor on the prior's device: nothing waits for the device until it is
        logged (``float(...)``).
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
            >>> float(reg.add_to_grad_())  # ½·8/2
            2.0
            >>> lin.weight.grad.tolist()
            [[1.0, 1.0]]

        With ``scale="learned"``: restore w̄ (if :meth:`perturb_` put a sample in), re-solve every λ_g, add
        Σ_g S_g⁻¹(w̄_g − μ_g)/(λ_g D) into ``.grad``, step σ, and return KL(q‖p)/D.
        """
        if self.learned is not None:
            return self.learned.add_to_grad_()
        value, grads = self._value_and_grad(own=False)  # used right here: the workspace may hold them
        add_into_grads_(self.bound.parameters, grads, self.coefficient)
        return value * self.coefficient
