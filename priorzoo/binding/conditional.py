r"""A prior bound to a model in which some covered weights are frozen, or are PEFT adapters' effective weights.

**The frozen rule** (the same for PEFT and plain models). A prior block whose tensor does not train
(``requires_grad=False``, or a PEFT model's base weights outside its adapted layers) is *held at its value*:
the penalty is the joint quadratic form ½ rᵀΣ⁻¹r of every matched block at the model's values (what a plain
model with frozen layers always got), which is, up to a constant, the *conditional* prior
p(w_t | w_f) of the trained blocks given the frozen ones. Freezing a weight is conditioning on its value,
not forgetting that the prior correlates it with the rest (the marginal, which ignores w_f, is what one gets
by excluding the frozen blocks with ``exclude=[...]``).

**The maths.** Split the blocks into trained t and frozen f; with A = diag(λv + ε), U = √λ Fᵀ (so
Σ = A + UUᵀ, :mod:`priorzoo.gaussian`), r_f = w_f − μ_f, the capacitance of the frozen blocks
C_f = I + U_fᵀA_f⁻¹U_f = L_f L_fᵀ and u_f = U_fᵀA_f⁻¹r_f (K numbers), the Schur complement gives

.. math::

    \tfrac12 r^\top \Sigma^{-1} r
      = \tfrac12 (w_t - \mu_c)^\top \Sigma_c^{-1} (w_t - \mu_c)
      + \underbrace{\tfrac12\,(r_f^\top A_f^{-1} r_f - u_f^\top C_f^{-1} u_f)}_{\tfrac12 r_f^\top\Sigma_{ff}^{-1} r_f},

    \mu_c = \mu_t + U_t C_f^{-1} u_f, \qquad
    \Sigma_c = A_t + U_t C_f^{-1} U_t^\top = \lambda\bigl(\operatorname{diag}(v_t) + F_c^\top F_c\bigr) + \varepsilon I,
    \quad F_c = L_f^{-1} F_t,

and log det Σ = log det Σ_c + log det Σ_ff with log det Σ_ff = Σ log a_f + log det C_f. The conditional
prior N(μ_c, Σ_c) is again low rank plus diagonal, over the trained blocks only. So the frozen blocks are
read **once per bind** (one pass over their factor columns: their F_b A_b⁻¹ r_b and F_b A_b⁻¹ F_bᵀ), and each
step streams only the trained blocks' K×P_t factor: per-step cost scales with the adapted weights, not the
whole prior. The price is one K×P_t copy of the trained blocks' factor (F_c), made at bind. If a frozen
tensor changes in place (``load_state_dict``, ``init_model_``), the binding is stale and is redone.

**PEFT.** An adapted layer's block is its effective weight W = W₀ + ΔW (:mod:`priorzoo.binding.peft`): it trains
through its adapters even though W₀ is frozen. The residual keeps W₀ − μ: priorzoo does **not**
re-centre the prior on W₀. The prior is a density over W; when μ is not W₀ (an SWA mean, a prior learned on
other weights) the penalty at ΔW = 0 is not zero and pulls W₀ + ΔW toward μ (and, through the frozen
blocks' W₀ − μ, toward the conditional mean μ_c). To start at the prior mean instead, set the base weights
from it with :meth:`~priorzoo.PriorModel.init_model_` before training; an isotropic prior centred on the
current weights (L2-SP on ΔW, :func:`~priorzoo.learn.isotropic_prior`) is the re-centred baseline.

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> prior = PriorModel.from_tensors({n: torch.zeros_like(p) for n, p in net.named_parameters()}, variance=1.0)
    >>> _ = net[0].requires_grad_(False)  # held at its value
    >>> bound = prior.bind(net)
    >>> type(bound).__name__, len(bound.parameters)
    ('ConditionalBoundPrior', 2)
    >>> joint = prior.gaussian().half_quad([p for p in net.parameters()])
    >>> torch.allclose(bound.penalty(), joint)
    True
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from priorzoo.binding.bound import BindablePrior
from priorzoo.binding.matching import MatchResult
from priorzoo.errors import PriorFormatError
from priorzoo.gaussian import LowRankGaussian, Workspace
from priorzoo.numerics import ieee_fp32_matmul, no_autocast

__all__ = ["ConditionalBoundPrior"]

_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK = 1 << 16


@dataclass
class _Block:
    """One matched prior block: a plain parameter, or an adapted layer's effective weight."""

    prior_name: str
    param: torch.nn.Parameter | None = None
    layer: object | None = None  # priorzoo.binding.peft.AdaptedLayer

    @property
    def trainable(self) -> bool:
        return self.layer.trainable if self.layer is not None else self.param.requires_grad

    @property
    def tensors(self) -> list[torch.nn.Parameter]:
        """Every tensor the block's value depends on."""
        if self.layer is None:
            return [self.param]
        return [self.layer.weight, *self.layer.tensors.values()]

    def leaves(self) -> list[torch.nn.Parameter]:
        if self.layer is None:
            return [self.param] if self.param.requires_grad else []
        return self.layer.leaves()

    def value(self, dtype: torch.dtype) -> Tensor:
        if self.layer is None:
            return self.param
        return self.layer.effective_weight(dtype)


class ConditionalBoundPrior:
    r"""A prior bound to a model with frozen and/or PEFT-adapted blocks (see the module docstring).

    It has the interface of :class:`~priorzoo.BoundPrior`, which :class:`~priorzoo.finetune.PriorRegularizer`,
    ``PriorCallback`` and ``PriorTrainer`` use: :attr:`parameters` are the tensors that *receive* the prior's
    gradient (the trainable adapter tensors such as ``lora_A``/``lora_B``, and trainable plain parameters;
    never frozen ones), :meth:`value_and_grad` returns one gradient per parameter, and :meth:`penalty` /
    :meth:`log_prob` are the joint ½rᵀΣ⁻¹r / log N(w; μ, Σ) over every matched block, frozen ones at their
    values. For a LoRA layer with W = W₀ + s·BA and G = Σ⁻¹(W − μ) restricted to it, the gradients are
    ∂/∂B = s·G·Aᵀ and ∂/∂A = s·Bᵀ·G, obtained by autograd through PEFT's ``get_delta_weight``.

    Built by :meth:`~priorzoo.PriorModel.bind`; not usually constructed by hand.

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from priorzoo import PriorModel
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        >>> prior = PriorModel.from_tensors({"0.weight": torch.zeros(3, 3)}, variance=1.0)
        >>> peft_net = get_peft_model(net, LoraConfig(r=1, target_modules=["0"], modules_to_save=["1"]))
        >>> bound = prior.bind(peft_net)
        >>> [n.split(".")[-3] for n in bound.parameter_names]
        ['lora_A', 'lora_B']
        >>> bound.penalty().backward()  # the chain-rule gradient lands in lora_A/lora_B .grad
    """

    def __init__(
        self,
        prior: BindablePrior,
        model: torch.nn.Module,
        match: MatchResult,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        from priorzoo.binding.peft import peft_view

        self.prior = prior
        self.match = match
        self.prior_names = list(match.matched)
        view = peft_view(model)
        params = dict(model.named_parameters())
        adapted_by_weight = {layer.weight_name: layer for layer in view.adapted.values()} if view else {}
        self.blocks: list[_Block] = []
        for pname, mname in match.matched.items():
            layer = adapted_by_weight.get(mname)
            self.blocks.append(_Block(pname, layer=layer) if layer is not None else _Block(pname, param=params[mname]))
        self.active = [b for b in self.blocks if b.trainable]
        self.frozen = [b for b in self.blocks if not b.trainable]
        if not self.active:
            raise ValueError("ConditionalBoundPrior needs at least one trained block; bind a BoundPrior instead")
        devices = {t.device for b in self.blocks for t in b.tensors}
        if len(devices) > 1:
            raise ValueError(
                f"the matched parameters live on several devices {sorted(map(str, devices))}; "
                "bind the prior to a model on one device (model parallelism is not supported)"
            )
        self.device = next(iter(devices))
        self.dtype = dtype or torch.promote_types(prior.mean[self.prior_names[0]].dtype, torch.float32)

        seen: dict[int, torch.nn.Parameter] = {}
        names = {id(p): n for n, p in model.named_parameters()}
        for b in self.active:
            for leaf in b.leaves():
                seen.setdefault(id(leaf), leaf)
        self.parameters: list[torch.nn.Parameter] = list(seen.values())
        self.parameter_names: list[str] = [names.get(id(p), "?") for p in self.parameters]
        self._index = {id(p): i for i, p in enumerate(self.parameters)}
        self._signature = self._current_signature()
        self._model = weakref.ref(model)
        self._joint_bound = None
        with torch.no_grad(), no_autocast(self.device), ieee_fp32_matmul():
            self._bind_frozen_and_condition()

    # ------------------------------------------------------------------ binding
    def _current_signature(self) -> tuple:
        sig = []
        for b in self.blocks:
            trainable = b.trainable
            for t in b.tensors:
                sig.append((id(t), t.device, t.dtype, t.requires_grad))
                if not trainable:  # a frozen block's value enters the constants computed at bind
                    sig.append((t._version, t.data_ptr()))
            if b.layer is not None:
                module = b.layer.module
                sig.append((b.layer.adapters, tuple(module.active_adapters), module.merged, module.disable_adapters))
        return tuple(sig)

    def is_current(self) -> bool:
        """False once a covered tensor was replaced, moved, (un)frozen, or a frozen one changed (then re-bind)."""
        return self._current_signature() == self._signature

    def _prior_tensors(self, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
        p = self.prior
        f = p.cov_factor[name] if p.cov_factor is not None else None
        mean = p.mean[name].to(self.device).reshape(-1)
        var = p.variance[name].to(self.device).reshape(-1)
        return mean, var, (f.to(self.device).reshape(f.shape[0], -1) if f is not None else None)

    def _bind_frozen_and_condition(self) -> None:
        lam, eps = float(self.prior.scale), float(self.prior.eps)
        k = self.prior.rank if self.prior.cov_factor is not None else 0
        f64 = torch.float64
        rs = torch.zeros((), dtype=f64, device=self.device)
        logdet_a = torch.zeros((), dtype=f64, device=self.device)
        u = torch.zeros(k, dtype=f64, device=self.device)
        gram = torch.zeros(k, k, dtype=f64, device=self.device)
        numel_f = 0
        for b in self.frozen:
            mean, var, factor = self._prior_tensors(b.prior_name)
            w = b.value(self.dtype).detach().reshape(-1)
            numel_f += w.numel()
            for start in range(0, w.numel(), _CHUNK):
                sl = slice(start, start + _CHUNK)
                a = var[sl].to(f64) * lam + eps
                if not float(a.min()) > 0:
                    raise PriorFormatError(
                        f"`{b.prior_name}`: λ·variance + eps has minimum {float(a.min()):g}, so the covariance is "
                        "singular; give the prior eps > 0 (PriorModel.with_scale(eps=...)) or a positive variance"
                    )
                r = w[sl].to(f64) - mean[sl].to(f64)
                s = r / a
                rs += torch.dot(r, s)
                logdet_a += a.log().sum()
                if k:
                    fc = factor[:, sl].to(f64)
                    u += fc @ s
                    gram += (fc / a) @ fc.T
        self.frozen_names = [b.prior_name for b in self.frozen]
        z = None
        chol = None
        logdet_c = torch.zeros((), dtype=f64, device=self.device)
        if k and self.frozen:
            u *= math.sqrt(lam)
            cap = torch.eye(k, dtype=f64, device=self.device) + lam * 0.5 * (gram + gram.T)
            chol = torch.linalg.cholesky(cap)
            z = torch.cholesky_solve(u.unsqueeze(-1), chol).squeeze(-1)
            const = 0.5 * (rs - torch.dot(u, z))
            logdet_c = 2.0 * chol.diagonal().log().sum()
        else:
            const = 0.5 * rs
        self._const = const
        self._logdet_frozen = logdet_a + logdet_c
        self._numel_frozen = numel_f

        means, variances, factors = [], [], []
        for b in self.active:
            mean, var, factor = self._prior_tensors(b.prior_name)
            if z is not None:
                # μ_c = μ_t + √λ F_tᵀ C_f⁻¹ u_f and F_c = L_f⁻¹ F_t, in float64 over column chunks
                mc = torch.empty(mean.numel(), dtype=self.dtype, device=self.device)
                fc_out = torch.empty(k, mean.numel(), dtype=self.dtype, device=self.device)
                for start in range(0, mean.numel(), _CHUNK):
                    sl = slice(start, start + _CHUNK)
                    fc = factor[:, sl].to(f64)
                    mc[sl] = mean[sl].to(f64) + math.sqrt(lam) * (z @ fc)
                    fc_out[:, sl] = torch.linalg.solve_triangular(chol, fc, upper=False)
                means.append(mc)
                factors.append(fc_out)
            else:
                means.append(mean)
                factors.append(factor)
            variances.append(var)
        self.gaussian = LowRankGaussian(
            means,
            variances,
            factors if k else None,
            scale=lam,
            eps=eps,
            names=[b.prior_name for b in self.active],
            dtype=self.dtype,
        )

    @property
    def frozen_half_quad(self) -> Tensor:
        """½ r_fᵀΣ_ff⁻¹r_f of the frozen blocks (float64, fixed at bind): :meth:`penalty` minus this is the
        conditional quadratic form ½(w_t − μ_c)ᵀΣ_c⁻¹(w_t − μ_c) of the trained blocks."""
        return self._const

    # ------------------------------------------------------------------ values
    def _values(self) -> list[Tensor]:
        with no_autocast(self.device):
            return [b.value(self.dtype) for b in self.active]

    def _joint(self):
        """A :class:`~priorzoo.BoundPrior` over every matched block (built on first use; for ``tensors=``)."""
        if self._joint_bound is None:
            from priorzoo.binding.bound import BoundPrior

            model = self._model()
            if model is None:
                raise RuntimeError("the model this prior was bound to no longer exists")
            self._joint_bound = BoundPrior(self.prior, model, self.match, dtype=self.dtype)
        return self._joint_bound

    def penalty(self, tensors: Sequence[Tensor] | None = None) -> Tensor:
        """½ (w−μ)ᵀΣ⁻¹(w−μ) over every matched block (frozen ones at their values), differentiable in
        :attr:`parameters` (through the adapters' ``get_delta_weight`` for adapted layers).

        ``tensors`` (one per :attr:`prior_names` entry, as for :meth:`BoundPrior.penalty`) evaluates the joint
        density at those tensors instead (every block, frozen ones included, taken from them)."""
        if tensors is not None:
            return self._joint().penalty(tensors)
        value = self.gaussian.half_quad(self._values())
        return (value.double() + self._const).to(self.gaussian.dtype)

    __call__ = penalty

    def log_prob(self, tensors: Sequence[Tensor] | None = None) -> Tensor:
        """Exact joint log N(w; μ, Σ) (float64) of every matched block, frozen ones at their values."""
        if tensors is not None:
            return self._joint().log_prob(tensors)
        log_cond = self.gaussian.log_prob(self._values())
        return log_cond - self._const - 0.5 * (self._numel_frozen * _LOG_2PI + self._logdet_frozen)

    def new_workspace(self) -> Workspace:
        """Reusable buffers for :meth:`value_and_grad` (2·P_trained floats)."""
        return self.gaussian.new_workspace()

    def value_and_grad(
        self, tensors: Sequence[Tensor] | None = None, *, workspace: Workspace | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """(penalty, its gradient for each of :attr:`parameters`), the latter by the chain rule through the
        effective weights: G = Σ_c⁻¹(w_t − μ_c) per trained block (two passes over its factor), then
        ``torch.autograd.grad`` of the effective weights with G as output gradient (for LoRA, s·G·Aᵀ and
        s·Bᵀ·G). The gradients of plain parameters may be views of ``workspace``. With ``tensors`` (one per
        :attr:`prior_names` entry): the joint value and Σ⁻¹(w − μ) per tensor, as :meth:`BoundPrior.value_and_grad`."""
        if tensors is not None:
            return self._joint().value_and_grad(tensors)
        with torch.enable_grad():
            values = self._values()
        value, grads = self.gaussian.value_and_grad([v.detach() for v in values], workspace=workspace)
        out: list[Tensor | None] = [None] * len(self.parameters)
        outputs, out_grads, leaves = [], [], []
        for b, v, g in zip(self.active, values, grads):
            if b.layer is None:
                out[self._index[id(b.param)]] = g.view(b.param.shape)
            else:
                outputs.append(v)
                out_grads.append(g.view(v.shape).to(v.dtype))
                leaves.extend(leaf for leaf in b.leaves() if all(leaf is not x for x in leaves))
        if outputs:
            with torch.enable_grad(), no_autocast(self.device):
                got = torch.autograd.grad(outputs, leaves, out_grads, allow_unused=True)
            for leaf, g in zip(leaves, got):
                if g is None:
                    continue
                i = self._index[id(leaf)]
                out[i] = g if out[i] is None else out[i] + g
        final = [torch.zeros_like(p) if g is None else g for p, g in zip(self.parameters, out)]
        return (value.double() + self._const).to(self.gaussian.dtype), final

    def precision_times_residual(self) -> list[Tensor]:
        """The penalty's gradient for each of :attr:`parameters`, without autograd on the model."""
        return self.value_and_grad()[1]

    def effective_weights(self) -> dict[str, Tensor]:
        """``prior name -> `` the value the prior sees for every matched block (W₀ + ΔW for adapted layers)."""
        with torch.no_grad():
            return {b.prior_name: b.value(self.dtype).detach() for b in self.blocks}
