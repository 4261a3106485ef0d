r"""The maths: a low-rank-plus-diagonal Gaussian over a parameter vector split into blocks.

A prior over P weights (the concatenation of a model's parameters, each flattened) is

.. math::

    w \sim \mathcal N(\mu, \Sigma), \qquad
    \Sigma = \lambda\,(\operatorname{diag}(v) + F^\top F) + \varepsilon I = A + U U^\top,

with :math:`A = \operatorname{diag}(\lambda v + \varepsilon)` (P×P diagonal), :math:`F` the K×P factor and
:math:`U = \sqrt\lambda\,F^\top`. For λ = 1, ε = 0, v = ½·diag-variance and F = Dᵀ/√(2(K−1)) this is the
SWAG Gaussian of Maddox et al. (2019), used as a prior by Shwartz-Ziv et al., "Pre-Train Your Loss"
(NeurIPS 2022), whose covariance scale λ multiplies the *whole* covariance (so the factor carries √λ).

Nothing P×P is ever formed. With the K×K *capacitance* matrix

.. math:: C = I_K + \lambda\, F A^{-1} F^\top = L L^\top \quad(\text{Cholesky, computed once per bind}),

- Woodbury: :math:`\Sigma^{-1} = A^{-1} - \lambda A^{-1} F^\top C^{-1} F A^{-1}`;
- determinant lemma: :math:`\log\det\Sigma = \sum_i \log a_i + \log\det C`.

For a residual r = w − μ, with s = A⁻¹r, t = √λ F s and z = C⁻¹t, the quadratic form is
:math:`q = r^\top\Sigma^{-1} r = r^\top s - t^\top z` and its gradient is
:math:`\nabla_w \tfrac12 q = \Sigma^{-1} r = s - \sqrt\lambda\,A^{-1}F^\top z`. One evaluation of value and
gradient therefore streams the factor exactly twice (F·s forward, Fᵀ·z backward), which is the memory
bandwidth floor; everything else is element-wise. A :class:`Workspace` (2P reusable floats) lets
:meth:`LowRankGaussian.value_and_grad` write r, s and the gradient in place, without the page faults of
fresh P-sized allocations (about 30% of the evaluation on a CPU). Since C = I + (PSD), its eigenvalues are ≥ 1, so its
Cholesky factorisation cannot fail for finite inputs and needs no jitter. Cross-block reductions (rᵀs,
F·s, log det A, C) accumulate in float64.

Example:
    >>> import torch
    >>> from priorzoo.gaussian import LowRankGaussian
    >>> g = LowRankGaussian([torch.zeros(4)], [torch.ones(4)], [torch.ones(1, 4)], scale=2.0)
    >>> round(float(g.half_quad([torch.ones(4)])), 4)  # ½ rᵀΣ⁻¹r with Σ = 2(I + 11ᵀ)
    0.2
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from priorzoo.errors import PriorFormatError

__all__ = ["LowRankGaussian", "Workspace"]

_LOG_2PI = math.log(2.0 * math.pi)
_COND_WARN = 1e12
_CHUNK = 1 << 16


def _no_autocast(device: torch.device) -> torch.autocast:
    """The penalty is always computed in its own dtype: an enclosing bf16/fp16 autocast region would
    round the factor products (the gradient by ~1e-3 relative in bf16)."""
    return torch.autocast(device_type=device.type, enabled=False)


class Workspace:
    """Two reusable flat buffers per block (2P floats) for :meth:`LowRankGaussian.value_and_grad`.

    Gradients computed into a workspace are *views of it*: they are overwritten by the next evaluation
    that uses the same workspace, so use them (e.g. add them into ``.grad``) before then, and never run two
    evaluations into one workspace at the same time.

    Example:
        >>> import torch
        >>> g = LowRankGaussian([torch.zeros(3)], [torch.ones(3)], [torch.ones(1, 3)])
        >>> ws = g.new_workspace()
        >>> value, grads = g.value_and_grad([torch.ones(3)], workspace=ws)
        >>> grads[0].data_ptr() == ws.grad[0].data_ptr()
        True
    """

    def __init__(self, gauss: LowRankGaussian) -> None:
        self.owner = gauss
        # `work` holds r = w − μ in the first pass and the product zᵀF in the second; `grad` holds s = A⁻¹r,
        # corrected in place into Σ⁻¹r
        self.work = [torch.empty_like(m) for m in gauss.mean]
        self.grad = [torch.empty_like(m) for m in gauss.mean]


class LowRankGaussian:
    r"""N(μ, λ(diag(v) + FᵀF) + εI) over a list of blocks; precomputes A⁻¹, log det A and chol(C) once.

    Args:
        mean: per-block means (any shape; flattened internally, views when contiguous).
        variance: per-block diagonal variances v ≥ 0, same shapes as ``mean``.
        cov_factor: per-block factors of shape ``[K, *block.shape]`` (or ``None`` for K = 0).
        scale: λ > 0, multiplies ``diag(v) + FᵀF``.
        eps: ε ≥ 0, added to the diagonal after scaling.
        names: block names, used in error messages.
        dtype: compute dtype (default: the mean's dtype, at least float32). Factors stored in another dtype
            (e.g. float16) are converted once here: the only extra K×P copy this class ever keeps.

    Raises:
        PriorFormatError: a block with λv + ε = 0 (a singular covariance), or one that underflows.

    Example:
        >>> import torch
        >>> g = LowRankGaussian([torch.zeros(2, 2)], [torch.ones(2, 2)])
        >>> round(float(g.log_prob([torch.zeros(2, 2)])), 4)  # −½·4·log 2π
        -3.6758
    """

    def __init__(
        self,
        mean: Sequence[Tensor],
        variance: Sequence[Tensor],
        cov_factor: Sequence[Tensor] | None = None,
        *,
        scale: float = 1.0,
        eps: float = 0.0,
        names: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not (scale > 0 and math.isfinite(scale)):
            raise PriorFormatError(f"`scale` (λ) must be a finite number > 0; received {scale!r}")
        if not (eps >= 0 and math.isfinite(eps)):
            raise PriorFormatError(f"`eps` must be a finite number ≥ 0; received {eps!r}")
        if len(mean) == 0 or len(mean) != len(variance):
            raise PriorFormatError(
                f"need one variance per mean block and at least one block; got {len(mean)} means, "
                f"{len(variance)} variances"
            )
        names = list(names) if names is not None else [f"block{i}" for i in range(len(mean))]
        if dtype is None:
            dtype = torch.promote_types(mean[0].dtype, torch.float32)
        self.dtype = dtype
        self.device = mean[0].device
        self.scale = float(scale)
        self.eps = float(eps)
        self.names = names
        self.shapes = [tuple(m.shape) for m in mean]
        self.mean = [m.detach().reshape(-1).to(dtype) for m in mean]
        self.numel = sum(m.numel() for m in self.mean)

        self.inv_a: list[Tensor] = []
        logdet_a = torch.zeros((), dtype=torch.float64, device=self.device)
        for name, v, m in zip(names, variance, self.mean):
            if v.numel() != m.numel():
                raise PriorFormatError(f"`{name}`: variance has {v.numel()} elements but the mean has {m.numel()}")
            a = v.detach().reshape(-1).to(dtype) * self.scale + self.eps
            amin = float(a.min()) if a.numel() else 1.0
            if not amin > 0:
                raise PriorFormatError(
                    f"`{name}`: λ·variance + eps has minimum {amin:g}, so the covariance is singular; "
                    "give the prior eps > 0 (PriorModel.with_scale(eps=...)) or a positive variance"
                )
            inv = a.reciprocal()
            if not torch.isfinite(inv).all():
                raise PriorFormatError(
                    f"`{name}`: 1/(λ·variance + eps) overflows {dtype} (min λ·v + eps = {amin:g}); "
                    "raise eps or compute in float64"
                )
            self.inv_a.append(inv)
            logdet_a += a.log().sum(dtype=torch.float64)
        self.logdet_a = logdet_a

        self.factor: list[Tensor] | None = None
        self.rank = 0
        logdet_c = torch.zeros((), dtype=torch.float64, device=self.device)
        if cov_factor is not None and len(cov_factor) > 0:
            if len(cov_factor) != len(self.mean):
                raise PriorFormatError(f"need one factor per block; got {len(cov_factor)} for {len(mean)}")
            rank = cov_factor[0].shape[0] if cov_factor[0].dim() > 0 else 0
            self.factor = []
            for name, f, m in zip(names, cov_factor, self.mean):
                if f.dim() == 0 or f.shape[0] != rank or f[0].numel() != m.numel():
                    raise PriorFormatError(
                        f"`{name}`: cov_factor has shape {tuple(f.shape)}; expected [K={rank}, {m.numel()} elements]"
                    )
                self.factor.append(f.detach().reshape(rank, -1).to(dtype))
            self.rank = rank
            if rank > 0:
                cap = torch.zeros(rank, rank, dtype=torch.float64, device=self.device)
                with _no_autocast(self.device):
                    for f, inv in zip(self.factor, self.inv_a):
                        # G Gᵀ with G = F A^{-1/2}, in the compute dtype over column chunks of at most
                        # 65,536 (bounded rounding), accumulated across chunks and blocks in float64
                        for start in range(0, f.shape[1], _CHUNK):
                            g = f[:, start : start + _CHUNK] * inv[start : start + _CHUNK].sqrt()
                            cap += (g @ g.T).double()
                cap = 0.5 * (cap + cap.T)
                cap = torch.eye(rank, dtype=torch.float64, device=self.device) + self.scale * cap
                chol, info = torch.linalg.cholesky_ex(cap)
                if int(info) != 0 or not torch.isfinite(chol).all():
                    raise PriorFormatError(
                        "the K×K capacitance matrix I + λ·F A⁻¹ Fᵀ is not finite/positive definite; "
                        "the factor or the variance holds non-finite or extreme values"
                    )
                diag = chol.diagonal()
                cond = float((diag.max() / diag.min()) ** 2)
                if cond > _COND_WARN:
                    warnings.warn(
                        f"capacitance matrix condition number ≈ {cond:.1e}: the quadratic form loses "
                        "precision in the directions of the factor; consider eps > 0 or float64",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                self.chol = chol
                logdet_c = 2.0 * diag.log().sum()
            else:
                self.factor = None
        self.logdet_c = logdet_c

    # ------------------------------------------------------------------ densities
    @property
    def logdet(self) -> Tensor:
        """log det Σ (float64), by the matrix determinant lemma."""
        return self.logdet_a + self.logdet_c

    @property
    def log_normalizer(self) -> Tensor:
        """½(P·log 2π + log det Σ), so that log p(w) = −½q − log_normalizer."""
        return 0.5 * (self.numel * _LOG_2PI + self.logdet)

    def half_quad(self, blocks: Sequence[Tensor]) -> Tensor:
        """½ (w−μ)ᵀΣ⁻¹(w−μ), differentiable in each block (gradient Σ⁻¹(w−μ) by Woodbury)."""
        if len(blocks) != len(self.mean):
            raise PriorFormatError(f"expected {len(self.mean)} blocks, received {len(blocks)}")
        for name, b, m in zip(self.names, blocks, self.mean):
            if b.numel() != m.numel():
                raise PriorFormatError(f"`{name}`: received {b.numel()} elements, the prior has {m.numel()}")
        return _HalfQuad.apply(self, *blocks)

    def log_prob(self, blocks: Sequence[Tensor]) -> Tensor:
        """Exact log N(w; μ, Σ), normaliser included (float64 scalar, differentiable)."""
        return -self.half_quad(blocks).double() - self.log_normalizer

    def new_workspace(self) -> Workspace:
        """Buffers (2P floats in the compute dtype) for :meth:`value_and_grad` to reuse across calls."""
        return Workspace(self)

    def value_and_grad(
        self, blocks: Sequence[Tensor], *, workspace: Workspace | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """(½ (w−μ)ᵀΣ⁻¹(w−μ), Σ⁻¹(w−μ) as flattened blocks) in two passes over the factor, no autograd.

        With a ``workspace`` (from :meth:`new_workspace`) nothing P-sized is allocated and the gradients are
        views of ``workspace.grad`` (see :class:`Workspace`); without one they are new tensors.
        """
        if workspace is not None and workspace.owner is not self:
            raise ValueError("this workspace was made by another LowRankGaussian: use its own new_workspace()")
        with torch.no_grad(), _no_autocast(self.device):
            q, s, z = _forward_pass(self, blocks, workspace)
            grads = s if z is None else self._woodbury_correct(s, z, workspace)
        return (0.5 * q).to(self.dtype), grads

    def grad_half_quad(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        """Σ⁻¹(w − μ) for w given as blocks (no autograd); returns flattened blocks."""
        return self.value_and_grad(blocks)[1]

    def sample(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """One draw w = μ + √a ⊙ ξ + √λ Fᵀ ζ with ξ ~ N(0, I_P), ζ ~ N(0, I_K); blocks in original shapes."""
        zeta = None
        if self.factor is not None:
            zeta = torch.randn(self.rank, generator=generator, dtype=self.dtype, device=self.device)
        out = []
        for i, (m, inv) in enumerate(zip(self.mean, self.inv_a)):
            xi = torch.randn(m.shape, generator=generator, dtype=self.dtype, device=self.device)
            w = m + inv.rsqrt() * xi
            if zeta is not None:
                w = w + math.sqrt(self.scale) * (zeta @ self.factor[i])
            out.append(w.reshape(self.shapes[i]))
        return out

    def dense_covariance(self) -> Tensor:
        """Σ as a dense P×P matrix (float64). For tests and tiny priors only (P ≤ 20,000)."""
        if self.numel > 20_000:
            raise ValueError(f"dense_covariance is for small priors; this one has P = {self.numel}")
        a = torch.cat([inv.double().reciprocal() for inv in self.inv_a])
        cov = torch.diag(a)
        if self.factor is not None:
            f = torch.cat([f.double() for f in self.factor], dim=1)
            cov = cov + self.scale * f.T @ f
        return cov

    # ------------------------------------------------------------------ internals
    def _solve(self, t: Tensor) -> Tensor:
        return torch.cholesky_solve(t.unsqueeze(-1), self.chol).squeeze(-1)

    def _woodbury_correct(self, s: list[Tensor], z: Tensor, workspace: Workspace | None = None) -> list[Tensor]:
        """s ← s − √λ A⁻¹ Fᵀ z, block by block, in place (the second pass over the factor)."""
        zc = (z * math.sqrt(self.scale)).to(self.dtype).unsqueeze(0)
        for i, (sb, inv, f) in enumerate(zip(s, self.inv_a, self.factor)):
            prod = torch.mm(zc, f, out=workspace.work[i].view(1, -1)) if workspace is not None else zc @ f
            sb.addcmul_(inv, prod.view(-1), value=-1.0)
        return s


def _forward_pass(
    gauss: LowRankGaussian, blocks: Sequence[Tensor], workspace: Workspace | None = None
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """First pass over the factor: q = rᵀs − tᵀz (float64), s = A⁻¹r per block, z = C⁻¹t (or None)."""
    rs = torch.zeros((), dtype=torch.float64, device=gauss.device)
    t = torch.zeros(gauss.rank, dtype=torch.float64, device=gauss.device) if gauss.factor else None
    s_blocks = []
    for i, (b, m, inv) in enumerate(zip(blocks, gauss.mean, gauss.inv_a)):
        w = b.detach().reshape(-1).to(gauss.dtype)
        if workspace is None:
            r = w - m
            s = r * inv
        else:
            r = torch.sub(w, m, out=workspace.work[i])
            s = torch.mul(r, inv, out=workspace.grad[i])
        rs += torch.dot(r, s).double()
        if t is not None:
            t += (gauss.factor[i] @ s).double()
        s_blocks.append(s)
    if t is None:
        return rs, s_blocks, None
    t = t * math.sqrt(gauss.scale)
    z = gauss._solve(t)
    return rs - torch.dot(t, z), s_blocks, z


class _HalfQuad(torch.autograd.Function):
    """Value ½ rᵀΣ⁻¹r; backward Σ⁻¹r. Keeps s = A⁻¹r (P floats) and z (K floats) between the two passes."""

    @staticmethod
    def forward(ctx, gauss: LowRankGaussian, *blocks: Tensor) -> Tensor:
        with _no_autocast(gauss.device):
            q, s_blocks, z = _forward_pass(gauss, blocks)
        ctx.gauss = gauss
        ctx.s_blocks = s_blocks
        ctx.z = z
        ctx.in_dtypes = [b.dtype for b in blocks]
        ctx.in_shapes = [b.shape for b in blocks]
        return (0.5 * q).to(gauss.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        gauss: LowRankGaussian = ctx.gauss
        s_blocks = ctx.s_blocks
        with _no_autocast(gauss.device):
            grads = s_blocks if ctx.z is None else gauss._woodbury_correct(s_blocks, ctx.z)
        g = float(grad_out)  # one host sync; skips a pass over P when the penalty enters with weight 1
        out = [
            (gb if g == 1.0 else gb.mul_(g)).reshape(shape).to(dtype) if ctx.needs_input_grad[i + 1] else None
            for i, (gb, shape, dtype) in enumerate(zip(grads, ctx.in_shapes, ctx.in_dtypes))
        ]
        ctx.s_blocks = None
        return (None, *out)
