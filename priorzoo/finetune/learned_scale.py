r"""Learn the prior's scales λ_g from the training data: the data-emphasized ELBO, per group of weights.

Harvey, Petrov & Hughes, "Learning the regularization strength for deep fine-tuning via a data-emphasized
variational objective" (arXiv 2410.19675) and "Learning Hyperparameters via a Data-Emphasized Variational
Objective" (arXiv 2502.01861, AISTATS 2026) learn the strength of the prior on the training set alone, in one
run, instead of on a validation grid. This module implements their objective from the papers' equations
(not from their research code) for every prior priorzoo binds (isotropic / L2-SP, diagonal, SWAG low rank,
imported), plain, frozen/PEFT (:mod:`priorzoo.binding.conditional`) and FSDP2-sharded (:mod:`priorzoo.binding.sharded`).

**Variational family.** Over the D trained weights, q(w) = N(w̄, σ²I): the trained weights are the mean w̄,
and one scalar σ = softplus(ρ) is learned with them. Each optimiser step draws one reparameterised sample
w = w̄ + σ·ε, ε ~ N(0, I) fresh every step; predictions are made at w̄ (or averaged over q, BMA:
:meth:`LearnedScale.posterior` + :func:`~priorzoo.finetune.bma_predict`).

**Prior, per group g** (default groups: the prior-covered ``backbone`` and the ``head``, every trained tensor
the prior does not cover; per layer or per block as options, see :func:`~priorzoo.finetune.scale_groups.group_of`):
p_g = N(μ_g, λ_g S_g), with S_g the prior's shape at λ = 1 (I for L2-SP, diag(v) for a diagonal prior,
diag(v) + FᵀF for SWAG) and a zero-mean isotropic p_head = N(0, λ_head I) for the new head. Several prior groups
are independent: each is the prior's *marginal* over its blocks.

**The format's ε.** A prior file defines Σ = λ₀(diag(v) + FᵀF) + εI (λ₀ its scale). Its shape is taken as
S = Σ/λ₀ = diag(v) + FᵀF + (ε/λ₀)I, so that λ_g = λ₀ gives back exactly the file's distribution, Σ = λ_g S
holds exactly for every λ_g (the ε term scales with λ_g), and a frozen block's conditional mean does not
depend on λ_g. With ε = 0 (every learner's default) S is diag(v) + FᵀF.

**Objective per step** (the data-emphasized ELBO: the KL weighted by 1/κ with κ = D/N; the plain ELBO, κ = 1,
underfits badly and is not the method):

.. math::

    \mathcal L(\bar w, \sigma, \lambda) = \frac1B \sum_{i\in\text{batch}} -\log p(y_i\mid x_i, \bar w + \sigma\epsilon)
        + \frac1D \sum_g \mathrm{KL}\bigl(q_g \,\|\, \mathcal N(\mu_g, \lambda_g S_g)\bigr),

    2\,\mathrm{KL}_g = \frac{\sigma^2 \operatorname{tr}(S_g^{-1}) + r_g^\top S_g^{-1} r_g}{\lambda_g}
        - D_g + D_g\log\lambda_g + \log\det S_g - D_g \log\sigma^2 .

Setting ∂/∂λ_g = 0 gives the closed form, re-solved at every step from the current w̄ and σ:

.. math::

    \lambda_g^\star = \frac{r_g^\top S_g^{-1} r_g + \sigma^2 \operatorname{tr}(S_g^{-1})}{D_g},
    \qquad r_g = \bar w_g - \mu_g,

(the mean squared distance to the prior mean in S_g's metric, plus the posterior's own spread), and, by the
envelope theorem, the gradients at λ⋆ are those at fixed λ:
∇_w̄ = ∇ NLL + Σ_g S_g⁻¹(w̄_g − μ_g)/(λ_g D) (the fixed-λ prior gradient, with weight 1/D instead of 1/N) and
∂/∂σ = Σ_i ε_i ∂NLL/∂w_i + (σ Σ_g tr(S_g⁻¹)/λ_g − D/σ)/D. tr(S_g⁻¹) is computed once per binding by
Woodbury: with A = diag(v + ε/λ₀), C = I + F A⁻¹ Fᵀ, tr S⁻¹ = Σ 1/a − tr(C⁻¹ · F A⁻² Fᵀ), one pass over the
K×P factor in column chunks (K²·P flops, K×K memory; summed over processes when sharded).

**σ's own optimiser.** ρ (σ = softplus(ρ)) has its own Adam with learning rate ``sigma_lr``, stepped once per
optimiser step: Adam on ρ changes σ by about ``sigma_lr`` *relatively* per step when σ ≪ 1, whatever the
weights' learning rate. A prototype on a real ImageNet backbone found that σ in the weights' optimiser at the
weights' learning rate did not move in a 60-step run (it needed ~10× that rate, or an initialisation near
its scale). Defaults: ``sigma_init`` 1e-3, ``sigma_lr`` 0.05 (σ can change by ~e³ in 60 steps).

**PEFT.** The prior lives on the effective weights W = W₀ + ΔW (:mod:`priorzoo.binding.conditional`): the KL is
evaluated for N(W̄, σ²I) over the covered blocks' effective weights (D_g their number), so the learned λ_g
equal those of the merged model at the same weights and σ; the reparameterised sample perturbs the tensors
the optimiser trains (``lora_A``/``lora_B``), which is exact for plain models and a surrogate under PEFT.

**Cost, overlapped.** Per step: one draw of D normal numbers, one copy of w̄ (restored exactly from it), one
dot product ε·∇NLL, and the prior's value and gradient at w̄ (the same two passes over the factor as a fixed λ).
On a CPU (``overlap=True``, plain bindings), the prior term at w̄ (from the saved copy, so the in-place sample
cannot race with it) and the next step's ε are computed in a background thread while the model's forward
and backward run, as :meth:`~priorzoo.finetune.PriorRegularizer.prefetch` does for a fixed λ; the random stream
is the same either way.

**Distributed.** Under DDP every process draws the same ε (one generator seeded identically), so the
replicated weights stay equal and the learned scales are those of one process. Under FSDP2 each process
perturbs its own shard (the same global draw, sliced), and the group sums (quadratic forms, ‖w_head‖², the
σ gradient) are all-reduced over the mesh.

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    >>> prior = PriorModel.from_tensors({n: p.detach().clone() for n, p in net.named_parameters()
    ...                                  if n.startswith("0.")}, variance=1.0, exclude=["1.*"])
    >>> learned = LearnedScale(prior, net, num_train_examples=8)
    >>> sorted(learned.scales)
    ['backbone', 'head']
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> learned.perturb_()  # w = w̄ + σε for this step's forward and backward
    >>> torch.nn.functional.cross_entropy(net(x), y).backward()
    >>> kl = learned.add_to_grad_()  # restores w̄, re-solves λ_g, adds ∇KL/D, steps σ
    >>> learned.scales["backbone"] < 1e-5  # w̄ = μ: only σ² tr(S⁻¹)/D remains
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from priorzoo.binding.bound import BoundPrior
from priorzoo.binding.options import BindOptions
from priorzoo.binding.sharded import is_sharded, local_slices
from priorzoo.finetune._grads import add_into_grads_
from priorzoo.finetune._grads import local as _local
from priorzoo.finetune._prefetch import Background
from priorzoo.finetune.scale_groups import GROUPINGS, check_groups, group_of
from priorzoo.gaussian import LowRankGaussian
from priorzoo.numerics import ieee_fp32_matmul, no_autocast
from priorzoo.prior import PriorModel
from priorzoo.validation import check_float, check_num_train_examples

__all__ = [
    "GROUPINGS",
    "LEARNED",
    "LearnedScale",
    "check_groups",
    "check_state",
    "group_of",
    "is_learned",
    "trace_inverse",
]

LEARNED = "learned"
"""The value of ``scale=`` that asks for the learned scales."""

_CHUNK = 1 << 16


def is_learned(scale: Any) -> bool:
    """Whether ``scale`` asks for learned scales (the string ``"learned"``).

    Example:
        >>> is_learned("learned"), is_learned(10.0), is_learned(None)
        (True, False, False)
    """
    return isinstance(scale, str) and scale == LEARNED


@torch.no_grad()
def trace_inverse(gauss: LowRankGaussian) -> Tensor:
    r"""tr Σ⁻¹ of a :class:`~priorzoo.gaussian.LowRankGaussian` Σ = A + λFᵀF (float64), by Woodbury.

    Σ⁻¹ = A⁻¹ − A⁻¹Fᵀ M F A⁻¹ with M = λC⁻¹, so tr Σ⁻¹ = Σ_i 1/a_i − tr(M · F A⁻² Fᵀ): one pass over the factor
    in column chunks (the K×K Gram F A⁻² Fᵀ accumulated in float64), summed over the processes of a sharded
    Gaussian with its all-reduce.

    Example:
        >>> import torch
        >>> g = LowRankGaussian([torch.zeros(3)], [torch.ones(3)], [torch.ones(1, 3)])
        >>> round(float(trace_inverse(g)), 6)  # (I + 11ᵀ)⁻¹ = I − 11ᵀ/4: trace 3 − 3/4
        2.25
    """
    inv_a = gauss.inv_a_flat
    total = inv_a.sum(dtype=torch.float64).reshape(1)
    k = gauss.rank
    gram = torch.zeros(k, k, dtype=torch.float64, device=inv_a.device)
    if gauss.factor_flat is not None:
        with no_autocast(inv_a.device), ieee_fp32_matmul():
            for start in range(0, gauss.numel, _CHUNK):
                stop = min(start + _CHUNK, gauss.numel)
                g = gauss.factor_flat[:, start:stop].to(torch.float64) * inv_a[start:stop].to(torch.float64)
                gram += g @ g.T
    if gauss.reduce is not None:
        packed = gauss.reduce(torch.cat([total, gram.reshape(-1)]))
        total, gram = packed[:1], packed[1:].reshape(k, k)
    out = total[0]
    if gauss.factor_flat is not None:
        out = out - (gauss.cap_inv_scaled * gram).sum()
    return out


@dataclass
class _Group:
    """One group: its binding (``None`` for the head), the tensors receiving its gradient, D_g, tr S_g⁻¹,
    log det S_g."""

    name: str
    bound: Any
    params: list[torch.nn.Parameter]
    numel: int
    trace: Tensor
    logdet: Tensor
    workspace: Any = None


def _identity(x: Tensor) -> Tensor:
    return x


def _mesh_sum(parameters: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    """Sum over the processes of the parameters' FSDP2 mesh (identity for replicated/plain parameters)."""
    if not is_sharded(parameters):
        return _identity
    from priorzoo.binding.sharded import _all_reduce_sum

    first = next(p for p in parameters if type(p).__name__ == "DTensor")
    return _all_reduce_sum(first.device_mesh.get_group())


class LearnedScale:
    r"""The state of the data-emphasized ELBO for one model: σ, the groups, their closed-form λ_g.

    See the module docstring for the objective. One step, in any loop::

        learned.perturb_()                      # w = w̄ + σε (in place), before the forward
        loss = criterion(model(x), y); loss.backward()
        learned.add_to_grad_()                  # restore w̄, λ_g ← closed form, .grad += ∇KL/D, step σ
        optimizer.step()

    :class:`~priorzoo.finetune.PriorRegularizer` (``scale="learned"``), ``PriorCallback``, ``PriorTrainer`` and
    :func:`~priorzoo.finetune.fit` do this for you.

    Args:
        prior: the prior whose shape S is used (``prior.scale`` is λ₀, see the module docstring on ε).
        model: the model being fine-tuned.
        num_train_examples: N (for κ = D/N in :attr:`kappa`; the objective weights the KL by 1/D).
        groups: ``"default"``, ``"layer"``, ``"block"`` or a callable ``prior parameter name -> group``.
        sigma_init: σ at the start (> 0).
        sigma_lr: learning rate of σ's own Adam on ρ = softplus⁻¹(σ) (> 0; relative change of σ per step).
        seed: seeds the noise ε (the same on every process).
        bind: which parameters the prior covers (:class:`~priorzoo.BindOptions`).
        overlap: on a CPU, compute the prior term at w̄ and the next ε in a background thread during the
            forward and backward (same results; plain, unsharded bindings only).

    Raises:
        ValueError: σ or its learning rate not a finite number > 0, N ≤ 0, an unknown ``groups``.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> lin = torch.nn.Linear(2, 2)
        >>> prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0, exclude=["bias"])
        >>> LearnedScale(prior, lin, num_train_examples=10).num_trained
        6
    """

    def __init__(
        self,
        prior: PriorModel,
        model: torch.nn.Module,
        *,
        num_train_examples: int,
        groups: str | Callable[[str], str] = "default",
        sigma_init: float = 1e-3,
        sigma_lr: float = 0.05,
        seed: int = 0,
        bind: BindOptions | None = None,
        overlap: bool = True,
    ) -> None:
        if not isinstance(prior, PriorModel):
            raise TypeError(f"`prior` must be a priorzoo.PriorModel; received {type(prior).__name__}")
        self.num_train_examples = check_num_train_examples(num_train_examples)
        self.groups_spec = check_groups(groups)
        sigma_init = check_float(sigma_init, "sigma_init", strict=True)
        self.sigma_lr = check_float(sigma_lr, "sigma_lr", strict=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer; received {seed!r}")
        self.model = model
        self.bind_options = bind or BindOptions()
        self.prior = prior
        self.base_scale = float(prior.scale)
        # the shape S = Σ/λ₀ = diag(v) + FᵀF + (ε/λ₀) I
        self._shape_prior = prior.with_scale(1.0, eps=float(prior.eps) / self.base_scale)
        self.groups: list[_Group] = []
        self._bind_groups()
        self.num_trained = sum(g.numel for g in self.groups)
        params = self._noise_params
        self.device = _local(params[0]).device if params else torch.device("cpu")
        # σ = softplus(ρ), ρ float64 on the parameters' device, with its own Adam
        rho0 = sigma_init + math.log(-math.expm1(-sigma_init))  # softplus⁻¹(σ₀) = log(e^σ₀ − 1), stably
        self.rho = torch.nn.Parameter(torch.tensor(rho0, dtype=torch.float64, device=self.device))
        self.sigma_optimizer = torch.optim.Adam([self.rho], lr=self.sigma_lr)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._reduce = _mesh_sum(params)
        self._noise: list[Tensor] | None = None
        self._saved: list[Tensor] | None = None
        self._next_noise: list[Tensor] | None = None
        self._pending: Background | None = None
        self._bufs: dict[str, list[Tensor]] = {}
        self._step = 0
        self._state_before_next: Tensor | None = None  # the generator's state before it drew _next_noise
        self.overlap = (
            bool(overlap)
            and self.device.type == "cpu"
            and all(type(g.bound) is BoundPrior for g in self.groups if g.bound is not None)
        )
        self._scales: dict[str, Tensor] | None = None
        self.last_kl: Tensor | None = None

    # ------------------------------------------------------------------ groups
    def _bind_groups(self) -> None:
        opts = self.bind_options
        match = opts.check_match(self._shape_prior, self.model)
        by_group: dict[str, set[str]] = {}
        for pname in match.matched:  # grouped by the prior's names: the same whatever wraps the model (DDP, ...)
            by_group.setdefault(group_of(pname, self.groups_spec), set()).add(pname)
        covered: set[int] = set()
        for name, members in by_group.items():
            group = dataclasses.replace(opts, include=_member_of(members), allow_partial=True)
            try:
                bound = self._shape_prior.bind(self.model, group if len(by_group) > 1 else opts)
            except ValueError as err:  # a group of frozen blocks only: nothing of it is trained
                if "at least one trained block" in str(err):
                    continue
                raise
            if not any(p.requires_grad for p in bound.parameters):
                continue
            gauss = bound.gaussian
            self.groups.append(
                _Group(
                    name,
                    bound,
                    list(bound.parameters),
                    int(gauss.total_numel),
                    trace_inverse(gauss),
                    gauss.logdet.to(torch.float64),
                )
            )
            covered.update(id(p) for p in bound.parameters)
        if not self.groups:
            raise ValueError("the prior covers no trained parameter of the model: nothing to learn a scale for")
        head = [p for p in self.model.parameters() if p.requires_grad and id(p) not in covered]
        head = list({id(p): p for p in head}.values())
        if head:
            numel = sum(p.numel() for p in head)  # global numel (a DTensor's is its global shape's)
            zero = torch.zeros((), dtype=torch.float64, device=_local(head[0]).device)
            self.groups.append(_Group("head", None, head, numel, zero + numel, zero))

    @property
    def _noise_params(self) -> list[torch.nn.Parameter]:
        """The trained tensors q covers (each once): the groups' trainable tensors."""
        seen: dict[int, torch.nn.Parameter] = {}
        for g in self.groups:
            for p in g.params:
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    # ------------------------------------------------------------------ σ and κ
    @property
    def sigma(self) -> float:
        """σ = softplus(ρ), the posterior standard deviation of every trained weight."""
        return float(torch.nn.functional.softplus(self.rho.detach()))

    @property
    def kappa(self) -> float:
        """κ = D/N: the data-emphasized ELBO is the ELBO with the KL weighted by 1/κ."""
        return self.num_trained / self.num_train_examples

    @property
    def group_names(self) -> list[str]:
        """The groups, in order (the prior's, then ``head`` when some trained tensor is outside the prior)."""
        return [g.name for g in self.groups]

    @property
    def scales(self) -> dict[str, float]:
        """The current closed-form λ_g per group (solved now if no step has run yet)."""
        if self._scales is None:
            with torch.no_grad():
                self._solve(self._sigma_tensor(), add_grad=False)
        return {name: float(v) for name, v in self._scales.items()}

    def _sigma_tensor(self) -> Tensor:
        return torch.nn.functional.softplus(self.rho.detach())

    # ------------------------------------------------------------------ the step
    def _buffers(
        self, key: str, params: Sequence[torch.nn.Parameter], dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        """Persistent buffers shaped like the local tensors, in ``dtype`` (default theirs), allocated once: a fresh
        P-sized allocation pays its page faults every step."""
        bufs = self._bufs.get(key)
        locals_ = [_local(p) for p in params]
        if bufs is None or [b.shape for b in bufs] != [t.shape for t in locals_]:
            bufs = [torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device) for t in locals_]
            self._bufs[key] = bufs
        return bufs

    def _draw_noise(self, params: Sequence[torch.nn.Parameter], key: str) -> list[Tensor]:
        """ε ~ N(0, I) into the buffers ``key``, one tensor per trained tensor (its local shard under FSDP2: the
        global draw, sliced), drawn in float32 whatever the parameters' dtype."""
        noise = self._buffers(key, params, torch.float32)
        for p, buf in zip(params, noise):
            if type(p).__name__ == "DTensor":  # the same global draw on every process, sliced to this shard
                full = torch.empty(p.shape, device=self.device, dtype=torch.float32)
                buf.copy_(full.normal_(generator=self._generator)[local_slices(p)])
            else:
                buf.normal_(generator=self._generator)
        return noise

    def _prefetch_noise(self, params: Sequence[torch.nn.Parameter], key: str) -> None:
        """Draw the next step's ε ahead of time (background thread), remembering the generator's state before the
        draw: :meth:`state_dict` saves that state, so that a restored object draws the same ε itself."""
        self._state_before_next = self._generator.get_state()
        self._next_noise = self._draw_noise(params, key)

    @torch.no_grad()
    def perturb_(self) -> None:
        """w ← w̄ + σε in place, ε ~ N(0, I) fresh (a no-op if already perturbed); call before the forward."""
        if self._noise is not None:
            return
        params = self._noise_params
        locals_ = [_local(p) for p in params]
        if self._pending is not None:  # the background thread of the previous step drew this ε
            self._pending.wait()
        key = f"noise{self._step % 2}"  # two noise buffers: the background thread fills the next step's
        noise, self._next_noise = self._next_noise, None
        if noise is None or len(noise) != len(params):
            noise = self._draw_noise(params, key)
        self._saved = self._buffers("saved", params)
        torch._foreach_copy_(self._saved, [t.detach() for t in locals_])
        self._step += 1
        if self.overlap:  # the prior term at w̄ (the saved copy) and the next ε, while forward/backward run
            saved = {id(p): t for p, t in zip(params, self._saved)}
            tensors = [[saved[id(p)] for p in g.params] for g in self.groups]
            self._pending = Background(self, tensors, params, f"noise{self._step % 2}")
        torch._foreach_add_(locals_, noise, alpha=self.sigma)
        self._noise = noise

    @property
    def perturbed(self) -> bool:
        """Whether the weights currently hold the sample w̄ + σε."""
        return self._noise is not None

    @torch.no_grad()
    def restore_(self) -> Tensor:
        """w ← w̄ (exactly: the saved copy) and return Σ ε·∂NLL/∂w from the current ``.grad`` (float64; 0 if
        not perturbed). Call after the backward, before any prior gradient is added."""
        if self._noise is None:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        params = self._noise_params
        parts = [  # per tensor in float32 (a float64 cast of every gradient costs more than the step's other work)
            torch.dot(e.reshape(-1), _local(p.grad).reshape(-1).float()).double()
            for p, e in zip(params, self._noise)
            if p.grad is not None
        ]
        dot = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=self.device)
        dot = self._reduce(dot.reshape(1))[0]
        torch._foreach_copy_([_local(p) for p in params], self._saved)
        self._noise = self._saved = None
        return dot

    @torch.no_grad()
    def discard_step_(self) -> None:
        """Abandon the current step (an exception between :meth:`perturb_` and :meth:`add_to_grad_`): wait for its
        background work, put w̄ back exactly and keep σ; a no-op between steps.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 2)
            >>> w = lin.weight.detach().clone()
            >>> prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0, exclude=["bias"])
            >>> learned = LearnedScale(prior, lin, num_train_examples=4)
            >>> learned.perturb_()
            >>> learned.discard_step_()
            >>> learned.perturbed, torch.equal(lin.weight, w)
            (False, True)
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()  # it reads the saved copy and draws the next ε: let it finish before anything else
        if self._noise is not None:
            torch._foreach_copy_([_local(p) for p in self._noise_params], self._saved)
            self._noise = self._saved = None

    def _solve(self, sigma: Tensor, *, add_grad: bool) -> tuple[Tensor, Tensor]:
        """λ_g ← closed form at the current w̄ and σ; with ``add_grad`` add S_g⁻¹(w̄_g − μ_g)/(λ_g D) into
        ``.grad``. Returns (KL/D, ∂(KL/D)/∂σ), float64."""
        d = float(self.num_trained)
        sig2 = sigma.double() ** 2
        kl = torch.zeros((), dtype=torch.float64, device=self.device)
        trace_over_lambda = torch.zeros((), dtype=torch.float64, device=self.device)
        scales: dict[str, Tensor] = {}
        pending, self._pending = self._pending, None
        precomputed = pending.result() if pending is not None else None
        for i, g in enumerate(self.groups):
            if precomputed is not None and precomputed[i] is not None:
                value, grads = precomputed[i]
                quad = 2.0 * (value.double() - _frozen_term(g.bound))
            elif g.bound is not None:
                value, grads = g.bound.value_and_grad(workspace=self._workspace(g))
                quad = 2.0 * (value.double() - _frozen_term(g.bound))
            else:
                locs = [_local(p).detach() for p in g.params]
                quad = self._reduce(
                    torch.stack([torch.dot(t.reshape(-1).float(), t.reshape(-1).float()).double() for t in locs])
                    .sum()
                    .reshape(1)
                )[0]
                grads = locs
            lam = (quad + sig2 * g.trace) / g.numel
            scales[g.name] = lam
            trace_over_lambda = trace_over_lambda + g.trace / lam
            kl = kl + 0.5 * (g.numel * torch.log(lam) + g.logdet - g.numel * torch.log(sig2))
            if add_grad:
                coef = (1.0 / (lam * d)).to(grads[0].dtype)
                scaled = torch._foreach_mul([gr.reshape(p_.shape) for gr, p_ in zip(grads, _shapes(g))], coef)
                add_into_grads_(g.params, scaled, 1.0)
        self._scales = scales
        dkl_dsigma = (sigma.double() * trace_over_lambda - d / sigma.double()) / d
        return kl / d, dkl_dsigma

    def _workspace(self, g: _Group) -> Any:
        if g.workspace is None or g.workspace.owner is not g.bound.gaussian:
            g.workspace = g.bound.new_workspace()
        return g.workspace

    def add_to_grad_(self) -> Tensor:
        """Restore w̄ (if perturbed), re-solve λ_g, add ∇_w̄ KL/D into ``.grad`` and step σ; return KL/D.

        Call once per optimiser step, after the backward of the data loss (and after DDP's all-reduce), before
        ``optimizer.step()``.
        """
        nll_dsigma = self.restore_()
        sigma_t = self._sigma_tensor()
        with torch.no_grad():
            kl, kl_dsigma = self._solve(sigma_t, add_grad=True)
        grad = (nll_dsigma + kl_dsigma) * torch.sigmoid(self.rho.detach())  # dσ/dρ = sigmoid(ρ)
        self.rho.grad = grad.reshape(()).to(self.rho.dtype)
        self.sigma_optimizer.step()
        self.sigma_optimizer.zero_grad(set_to_none=True)
        self.last_kl = kl.detach()
        return self.last_kl

    # ------------------------------------------------------------------ prediction
    def posterior(self) -> PriorModel:
        """q = N(w̄, σ²I) over the trained tensors (model names), for :func:`~priorzoo.finetune.bma_predict`.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 1)
            >>> prior = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0, exclude=["bias"])
            >>> LearnedScale(prior, lin, num_train_examples=4).posterior().names
            ['weight', 'bias']
        """
        if self.perturbed:
            raise RuntimeError("the weights hold a sample w̄ + σε: call add_to_grad_() or restore_() first")
        names = {id(p): n for n, p in self.model.named_parameters()}
        mean = {names[id(p)]: p.detach().clone() for p in self._noise_params if id(p) in names}
        if any(type(p).__name__ == "DTensor" for p in self._noise_params):
            raise NotImplementedError("posterior() of an FSDP2-sharded model: gather the model first")
        return PriorModel.from_tensors(mean, variance=self.sigma**2, copy=False, source={"objective": "de-elbo"})

    def state(self) -> dict[str, Any]:
        """The learned quantities, JSON-ready: ``scales`` (λ_g), ``sigma``, ``kappa``, ``groups`` (D_g)."""
        return {
            "scales": self.scales,
            "sigma": self.sigma,
            "kappa": self.kappa,
            "groups": {g.name: g.numel for g in self.groups},
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on besides the model's weights, for a checkpoint.

        ``rho`` (ρ, σ = softplus(ρ)), ``sigma_optimizer`` (its Adam's ``state_dict``), ``generator`` (the noise
        generator's state before the next ε is drawn), ``step`` (steps taken), ``scales`` (the last solved λ_g,
        or ``None``), ``last_kl`` (KL/D of the last step, or ``None``) and ``groups`` (name → D_g, checked on
        load). A restored object continues exactly as this one would (same σ updates, same ε stream), with or
        without ``overlap``.

        Raises:
            RuntimeError: the weights hold a sample w̄ + σε (between :meth:`perturb_` and :meth:`add_to_grad_`).

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 2)
            >>> prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0, exclude=["bias"])
            >>> a = LearnedScale(prior, lin, num_train_examples=4, sigma_init=0.1)
            >>> b = LearnedScale(prior, lin, num_train_examples=4, sigma_init=0.5)
            >>> b.load_state_dict(a.state_dict())
            >>> b.sigma == a.sigma
            True
        """
        if self.perturbed:
            raise RuntimeError("the weights hold a sample w̄ + σε: call add_to_grad_() or restore_() first")
        generator = self._state_before_next if self._next_noise is not None else self._generator.get_state()
        return {
            "rho": self.rho.detach().clone(),
            "sigma_optimizer": self.sigma_optimizer.state_dict(),
            "generator": generator.clone(),
            "step": self._step,
            "scales": None if self._scales is None else {k: float(v) for k, v in self._scales.items()},
            "last_kl": None if self.last_kl is None else float(self.last_kl),
            "groups": {g.name: g.numel for g in self.groups},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (validated first: nothing changes if it is refused). σ's learning rate stays
        this object's ``sigma_lr``; a pre-drawn ε is discarded and drawn again from the restored generator.

        Raises:
            ValueError: a missing entry, groups (names or sizes) other than this model's, a ρ or Adam state that
                is not a finite scalar, a step < 0, a λ_g not finite and > 0, a generator state this device's
                generator refuses.
            RuntimeError: the weights hold a sample w̄ + σε.
        """
        if self.perturbed:
            raise RuntimeError("the weights hold a sample w̄ + σε: call add_to_grad_() or restore_() first")
        checked = check_state(state, self.group_names, {g.name: g.numel for g in self.groups})
        backup = self._generator.get_state()
        try:
            self._generator.set_state(checked["generator"])
        except (RuntimeError, TypeError) as err:
            self._generator.set_state(backup)
            raise ValueError(f"`generator`: not a state of this {self.device.type} generator ({err})") from None
        with torch.no_grad():
            self.rho.copy_(checked["rho"])
        self.sigma_optimizer.load_state_dict(checked["sigma_optimizer"])
        for group in self.sigma_optimizer.param_groups:
            group["lr"] = self.sigma_lr
        self._next_noise = self._state_before_next = None
        self._step = checked["step"]
        scales = checked["scales"]
        self._scales = (
            None
            if scales is None
            else {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in scales.items()}
        )
        kl = checked["last_kl"]
        self.last_kl = None if kl is None else torch.tensor(kl, dtype=torch.float64, device=self.device)


_STATE_KEYS = ("generator", "groups", "last_kl", "rho", "scales", "sigma_optimizer", "step")


def _finite_scalar(value: Any, what: str) -> Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 0 or (not t.dtype.is_floating_point and t.dtype != torch.int64):
        raise ValueError(f"`{what}` must be a scalar number; received shape {tuple(t.shape)}, dtype {t.dtype}")
    if not bool(torch.isfinite(t)):
        raise ValueError(f"`{what}` must be finite; received {float(t)}")
    return t


def check_state(state: Mapping[str, Any], names: Sequence[str], groups: Mapping[str, int]) -> dict[str, Any]:
    """Validate a :meth:`LearnedScale.state_dict` for a model whose groups are ``groups`` (name → D_g, in order);
    return it with ρ as a float64 scalar tensor. See :meth:`LearnedScale.load_state_dict` for what is refused.

    Example:
        >>> check_state({}, ["backbone"], {"backbone": 4})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: learned-scale state: missing entries ['generator', 'groups', ..., 'step']
    """
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"learned-scale state: missing entries {missing}")
    received = dict(state["groups"])
    if list(received) != list(names) or received != dict(groups):
        raise ValueError(
            f"`groups`: the state was saved for groups {received}; this model's groups are {dict(groups)} "
            "(name -> number of trained weights)"
        )
    rho = _finite_scalar(state["rho"], "rho").to(torch.float64)
    opt = state["sigma_optimizer"]
    if not isinstance(opt, Mapping) or "state" not in opt or "param_groups" not in opt:
        raise ValueError("`sigma_optimizer` must be an Adam state_dict (with `state` and `param_groups`)")
    for index, entries in dict(opt["state"]).items():
        if index != 0:
            raise ValueError(f"`sigma_optimizer`: state for parameter {index!r}; σ's Adam has one parameter, 0")
        for key, value in dict(entries).items():
            _finite_scalar(value, f"sigma_optimizer.{key}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be an integer >= 0; received {step!r}")
    generator = state["generator"]
    if not isinstance(generator, Tensor) or generator.dtype != torch.uint8 or generator.dim() != 1:
        raise ValueError("`generator` must be a 1-d uint8 tensor (torch.Generator.get_state())")
    scales = state["scales"]
    if scales is not None:
        scales = {k: float(v) for k, v in dict(scales).items()}
        if list(scales) != list(names):
            raise ValueError(f"`scales`: received groups {list(scales)}; expected {list(names)}")
        bad = {k: v for k, v in scales.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"`scales`: every λ_g must be finite and > 0; received {bad}")
    kl = state["last_kl"]
    if kl is not None:
        kl = float(_finite_scalar(kl, "last_kl"))
    return {**state, "rho": rho, "step": step, "scales": scales, "last_kl": kl, "generator": generator.cpu()}


def _member_of(members: set[str]) -> Callable[[str], bool]:
    frozen = frozenset(members)
    return lambda name: name in frozen


def _shapes(g: _Group) -> list[Tensor]:
    """The tensors whose shapes the group's gradients take (local shards under FSDP2)."""
    return [_local(p) for p in g.params]


def _frozen_term(bound: Any) -> Tensor | float:
    """½ r_fᵀΣ_ff⁻¹r_f of a conditional binding's frozen blocks (0 for a plain one): its value minus this is the
    conditional quadratic form of the trained blocks."""
    value = getattr(bound, "frozen_half_quad", None)
    return value.double() if isinstance(value, Tensor) else 0.0
