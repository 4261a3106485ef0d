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
bandwidth floor; everything else is element-wise. Since C = I + (PSD), its eigenvalues are ≥ 1, so its
Cholesky factorisation cannot fail for finite inputs and needs no jitter; M = λC⁻¹ (K×K, float64) is formed
once, so that z' = λC⁻¹t is one small product and q = rᵀs − tᵀM t, ∇ = s − A⁻¹Fᵀ(M t) with t = F s.

**Flat buffers, a bounded number of operations.** μ and A⁻¹ are each one flat [P] buffer in the compute
dtype and F one [K, P] buffer *in its stored dtype* (float16/bfloat16 factors are kept so, never upcast as a
whole), whatever the number of blocks (the per-block ``mean``/``inv_a``/``factor`` lists are views of them).
One evaluation copies the blocks into a flat [P] buffer with one ``torch._foreach_copy_``, then runs a fixed
sequence of about 15 operations on flat tensors (counted in ``tests/test_gaussian_flat.py``), so on an
accelerator it is a few kernel launches, not ~11 per tensor. A
float16/bfloat16 factor is multiplied in column chunks upcast into a float32 scratch of at most
max(P, 2²²) elements, so its products accumulate in float32; this adds 2 operations per chunk and at most K
chunks. The value stays a 0-dim tensor on the device (no host synchronisation per step).

**IEEE float32 products.** Training stacks often switch TF32 on globally; TF32-rounded factor products lose
up to ~4 digits of the gradient (DESIGN §7), for no speed gain since they are memory-bound. The products run
under :func:`ieee_fp32_matmul`, which sets the matmul precision to IEEE and restores the caller's setting
(whichever of ``torch.backends.cuda.matmul.fp32_precision``, ``allow_tf32`` or
``torch.set_float32_matmul_precision`` it was made with). Under ``torch.compile`` the guard is a no-op
(flags are not traceable); the factor products are then matrix–vector products.

**Memory.** A Gaussian holds F once (K·P elements in its stored dtype) plus μ, A⁻¹ (2P in the compute
dtype); mean and factor tensors given on its device in that dtype are re-pointed at their blocks of the flat
buffers (``Tensor.set_``, same values), so a prior and its binding share μ and F instead of holding them
twice; a :class:`Workspace` adds 2P (and the float32 scratch for a half-precision factor); the loss path
allocates 2P per step (w/r and s, which becomes the gradient). rᵀs is a cascade
(pairwise) sum in the compute dtype (relative error ~1e-7 at P = 23.5M, where a float32 ``dot`` gives
~1e-4 and a float64-cast sum is 9× slower), F·s in the compute dtype (float32 at least); the K-vector
algebra, log det and C are float64.

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
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from priorzoo.errors import PriorFormatError
from priorzoo.numerics import ieee_fp32_matmul, no_autocast

__all__ = ["LowRankGaussian", "Workspace", "ieee_fp32_matmul"]

_LOG_2PI = math.log(2.0 * math.pi)
_COND_WARN = 1e12
_CHUNK = 1 << 16
_LOWP_SCRATCH = 1 << 22


class Workspace:
    """Reusable flat buffers (2P floats, plus a float32 scratch for a half-precision factor) for
    :meth:`LowRankGaussian.value_and_grad`.

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
        # `work_flat` holds w, then r = w − μ in the first pass and the product zᵀF in the second;
        # `grad_flat` holds s = A⁻¹r, corrected in place into Σ⁻¹r
        self.work_flat = torch.empty_like(gauss.mean_flat)
        self.grad_flat = torch.empty_like(gauss.mean_flat)
        self.work = gauss._split(self.work_flat)
        self.grad = gauss._split(self.grad_flat)
        self.scratch = gauss._new_scratch()


class LowRankGaussian:
    r"""N(μ, λ(diag(v) + FᵀF) + εI) over a list of blocks, held as flat buffers; precomputes A⁻¹, log det A,
    chol(C) and M = λC⁻¹ once.

    Args:
        mean: per-block means (any shape, any device; copied into one flat buffer on ``device``).
        variance: per-block diagonal variances v ≥ 0, same shapes as ``mean``.
        cov_factor: per-block factors of shape ``[K, *block.shape]`` (or ``None`` for K = 0).
        scale: λ > 0, multiplies ``diag(v) + FᵀF``.
        eps: ε ≥ 0, added to the diagonal after scaling.
        names: block names, used in error messages.
        dtype: compute dtype (default: the mean's dtype, at least float32). A factor stored in float16 or
            bfloat16 stays in that dtype (its products accumulate in float32); any other factor is held in
            the compute dtype.
        device: where the buffers live (default: the first mean's device).
        reduce: for a prior sharded across processes (:mod:`priorzoo.binding.sharded`): the blocks are this
            process's slices, and ``reduce(x)`` returns the sum of ``x`` over all processes (an all-reduce).
            It is called once here on K·K + 3 float64 numbers (the capacitance, log det A, P and an error
            flag) and once per evaluation on K + 1 (rᵀs and F s), so the value and each process's slice of
            the gradient are exact (Woodbury: C = I + λ Σ_r F_r A_r⁻¹ F_rᵀ).

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
        device: torch.device | str | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
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
        self.device = torch.device(device) if device is not None else mean[0].device
        self.scale = float(scale)
        self.eps = float(eps)
        self.names = names
        self.shapes = [tuple(m.shape) for m in mean]
        self.sizes = [m.numel() for m in mean]
        for name, v, n in zip(names, variance, self.sizes):
            if v.numel() != n:
                raise PriorFormatError(f"`{name}`: variance has {v.numel()} elements but the mean has {n}")
        self.numel = sum(self.sizes)
        self.reduce = reduce
        self.mean_flat = self._gather(mean)
        a = self._gather(variance)
        a.mul_(self.scale).add_(self.eps)  # A = λv + ε, then A⁻¹ in place: one P-sized buffer
        error: PriorFormatError | None = None
        try:
            self._check_diagonal(a)
        except PriorFormatError as err:  # raised below, after the other processes learnt of it
            error = err
        logdet_a = a.log().sum(dtype=torch.float64)
        self.inv_a_flat = a.reciprocal_()
        if error is None and not bool(torch.isfinite(self.inv_a_flat).all()):
            bad = self._first_block(lambda blk: not bool(torch.isfinite(blk).all()), self.inv_a_flat)
            error = PriorFormatError(
                f"`{bad}`: 1/(λ·variance + eps) overflows {dtype}; raise eps or compute in float64"
            )
        self.mean = self._split(self.mean_flat)
        self._share_storage(mean, self.mean)
        self.inv_a = self._split(self.inv_a_flat)

        self.factor_flat: Tensor | None = None
        self.factor: list[Tensor] | None = None
        self.rank = 0
        self._chunk = self.numel
        if cov_factor is not None and len(cov_factor) > 0:
            self._init_factor(cov_factor)
        cap = self._capacitance_partial() if error is None else None
        if cap is None:
            cap = torch.zeros(self.rank, self.rank, dtype=torch.float64, device=self.device)
        self.logdet_a = logdet_a
        self.total_numel = self.numel
        if reduce is not None:  # one all-reduce: Σ_r λ F_r A_r⁻¹ F_rᵀ, Σ log det A_r, Σ P_r, errors
            extra = torch.tensor([self.numel, error is not None], dtype=torch.float64, device=self.device)
            packed = reduce(torch.cat([cap.reshape(-1), logdet_a.reshape(1), extra]))
            kk = self.rank * self.rank
            cap = packed[:kk].reshape(self.rank, self.rank)
            self.logdet_a = packed[kk]
            self.total_numel = round(float(packed[kk + 1]))
            if error is None and float(packed[kk + 2]) > 0:
                error = PriorFormatError(
                    "another process's slice of the prior is invalid (its error names the parameter); all "
                    "processes stop here"
                )
        if error is not None:
            raise error
        self.logdet_c = torch.zeros((), dtype=torch.float64, device=self.device)
        self.cap_inv_scaled: Tensor | None = None
        if self.factor_flat is not None:
            self._finish_capacitance(cap)

    # ------------------------------------------------------------------ construction helpers
    def _gather(self, blocks: Sequence[Tensor], rows: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """One flat buffer ([P] or [rows, P]) on the device, filled block by block (no full temporary)."""
        shape = (self.numel,) if rows is None else (rows, self.numel)
        out = torch.empty(shape, dtype=dtype or self.dtype, device=self.device)
        offset = 0
        for b, n in zip(blocks, self.sizes):
            src = b.detach().reshape(-1) if rows is None else b.detach().reshape(rows, n)
            out[..., offset : offset + n].copy_(src)
            offset += n
        return out

    def _split(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat [..., P] buffer, one per block (flattened)."""
        return list(flat.split(self.sizes, dim=-1))

    def _first_block(self, bad, flat: Tensor) -> str:
        for name, blk in zip(self.names, self._split(flat)):
            if blk.numel() and bad(blk):
                return name
        return self.names[0]

    def _check_diagonal(self, a: Tensor) -> None:
        amin = float(a.min()) if a.numel() else 1.0  # one host sync for all blocks
        if not amin > 0:
            name = self._first_block(lambda blk: not float(blk.min()) > 0, a)
            raise PriorFormatError(
                f"`{name}`: λ·variance + eps has minimum {amin:g}, so the covariance is singular; "
                "give the prior eps > 0 (PriorModel.with_scale(eps=...)) or a positive variance"
            )

    def _init_factor(self, cov_factor: Sequence[Tensor]) -> None:
        if len(cov_factor) != len(self.sizes):
            raise PriorFormatError(f"need one factor per block; got {len(cov_factor)} for {len(self.sizes)}")
        rank = cov_factor[0].shape[0] if cov_factor[0].dim() > 0 else 0
        stored = {f.dtype for f in cov_factor}
        for name, f, n in zip(self.names, cov_factor, self.sizes):
            if f.dim() == 0 or f.shape[0] != rank or f[0].numel() != n:
                raise PriorFormatError(
                    f"`{name}`: cov_factor has shape {tuple(f.shape)}; expected [K={rank}, {n} elements]"
                )
        if rank == 0:
            return
        lowp = len(stored) == 1 and next(iter(stored)) in (torch.float16, torch.bfloat16)
        self.factor_dtype = next(iter(stored)) if lowp and self.dtype == torch.float32 else self.dtype
        self.factor_flat = self._gather(cov_factor, rows=rank, dtype=self.factor_dtype)
        self.factor = self._split(self.factor_flat)
        self.rank = rank
        self._share_storage(cov_factor, self.factor)
        # columns per upcast chunk of a half-precision factor: K × chunk float32 ≤ max(P, 2²²) elements
        self._chunk = max(1, max(self.numel, _LOWP_SCRATCH) // rank) if self._lowp else self.numel

    @torch.no_grad()
    def _share_storage(self, given: Sequence[Tensor], views: Sequence[Tensor]) -> None:
        """Point each given tensor (μ or F blocks) that already lives on this device in the buffer's dtype at
        its block of the flat buffer (``Tensor.set_``: same values, same tensor objects), so that the prior's
        per-block tensors are freed and prior + binding hold μ and F once, as when the binding used to keep
        views of them."""
        for f, view in zip(given, views):
            if not isinstance(f, Tensor) or f.requires_grad or f.device != self.device or f.dtype != view.dtype:
                continue
            if f.numel() == 0 or f._base is not None:  # a view (e.g. a shard's slice) keeps its base alive anyway
                continue
            block = view.view(f.shape)
            f.set_(block.untyped_storage(), block.storage_offset(), block.shape, block.stride())

    def _capacitance_partial(self) -> Tensor | None:
        """λ F A⁻¹ Fᵀ (K×K, float64) over this Gaussian's blocks, or None without a factor."""
        if self.factor_flat is None:
            return None
        cap = torch.zeros(self.rank, self.rank, dtype=torch.float64, device=self.device)
        with no_autocast(self.device), ieee_fp32_matmul():
            # G Gᵀ with G = F A^{-1/2}, in the compute dtype over column chunks of at most 65,536 (bounded
            # rounding), accumulated across chunks in float64
            for start in range(0, self.numel, _CHUNK):
                stop = min(start + _CHUNK, self.numel)
                g = self.factor_flat[:, start:stop].to(self.dtype) * self.inv_a_flat[start:stop].sqrt()
                cap += (g @ g.T).double()
        return self.scale * (0.5 * (cap + cap.T))

    def _finish_capacitance(self, cap: Tensor) -> None:
        """chol(C), log det C and M = λC⁻¹ from λ F A⁻¹ Fᵀ (summed over all processes when sharded)."""
        rank = self.rank
        cap = torch.eye(rank, dtype=torch.float64, device=self.device) + cap
        chol, info = torch.linalg.cholesky_ex(cap)
        diag = chol.diagonal()
        cond = float((diag.max() / diag.min()) ** 2) if int(info) == 0 else math.inf
        if int(info) != 0 or not math.isfinite(cond):
            raise PriorFormatError(
                "the K×K capacitance matrix I + λ·F A⁻¹ Fᵀ is not finite/positive definite; "
                "the factor or the variance holds non-finite or extreme values"
            )
        if cond > _COND_WARN:
            warnings.warn(
                f"capacitance matrix condition number ≈ {cond:.1e}: the quadratic form loses "
                "precision in the directions of the factor; consider eps > 0 or float64",
                RuntimeWarning,
                stacklevel=3,
            )
        self.chol = chol
        self.logdet_c = 2.0 * diag.log().sum()
        self.cap_inv_scaled = self.scale * torch.cholesky_inverse(chol)  # M = λ C⁻¹, float64

    @property
    def _lowp(self) -> bool:
        return self.factor_flat is not None and self.factor_flat.dtype != self.dtype

    def _new_scratch(self) -> Tensor | None:
        if not self._lowp:
            return None
        return torch.empty(self.rank, min(self._chunk, self.numel), dtype=self.dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the Gaussian holds: F once in its stored dtype, μ and A⁻¹ (and K×K)."""
        total = self.mean_flat.nbytes + self.inv_a_flat.nbytes
        if self.factor_flat is not None:
            total += self.factor_flat.nbytes + self.chol.nbytes + self.cap_inv_scaled.nbytes
        return total

    # ------------------------------------------------------------------ densities
    @property
    def logdet(self) -> Tensor:
        """log det Σ (float64), by the matrix determinant lemma."""
        return self.logdet_a + self.logdet_c

    @property
    def log_normalizer(self) -> Tensor:
        """½(P·log 2π + log det Σ), so that log p(w) = −½q − log_normalizer."""
        return 0.5 * (self.total_numel * _LOG_2PI + self.logdet)

    def _check_blocks(self, blocks: Sequence[Tensor]) -> None:
        if len(blocks) != len(self.sizes):
            raise PriorFormatError(f"expected {len(self.sizes)} blocks, received {len(blocks)}")
        for name, b, n in zip(self.names, blocks, self.sizes):
            if b.numel() != n:
                raise PriorFormatError(f"`{name}`: received {b.numel()} elements, the prior has {n}")

    def half_quad(self, blocks: Sequence[Tensor]) -> Tensor:
        """½ (w−μ)ᵀΣ⁻¹(w−μ), differentiable in each block (gradient Σ⁻¹(w−μ) by Woodbury).

        A small autograd function over the blocks: one copy of them into a flat buffer, then a fixed
        sequence of in-place operations on two flat buffers (no other P-sized allocation: a fresh buffer
        costs its page faults on every step), the backward being the second pass over F
        (``torch.compile(fullgraph=True)`` traces it).
        """
        self._check_blocks(blocks)
        with no_autocast(self.device):
            return _FlatHalfQuad.apply(
                self.mean_flat,
                self.inv_a_flat,
                self.factor_flat,
                self.cap_inv_scaled,
                self._chunk,
                self.reduce,
                *blocks,
            )

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

        A fixed number of operations on flat buffers, whatever the number of blocks; the value is a 0-dim
        tensor on the device. With a ``workspace`` (from :meth:`new_workspace`) nothing P-sized is allocated
        and the gradients are views of ``workspace.grad`` (see :class:`Workspace`); without one they are
        views of one new flat tensor.
        """
        if workspace is not None and workspace.owner is not self:
            raise ValueError("this workspace was made by another LowRankGaussian: use its own new_workspace()")
        self._check_blocks(blocks)
        with torch.no_grad(), no_autocast(self.device), ieee_fp32_matmul():
            value, grad = self._value_and_grad_flat(blocks, workspace)
        return value, (workspace.grad if workspace is not None else self._split(grad))

    def _value_and_grad_flat(self, blocks: Sequence[Tensor], workspace: Workspace | None) -> tuple[Tensor, Tensor]:
        if workspace is None:
            work = torch.empty_like(self.mean_flat)
            grad = torch.empty_like(self.mean_flat)
            work_blocks, scratch = None, self._new_scratch()
        else:
            work, grad, work_blocks, scratch = (
                workspace.work_flat,
                workspace.grad_flat,
                workspace.work,
                workspace.scratch,
            )
        q, u = _first_pass(
            blocks,
            work,
            grad,
            self.mean_flat,
            self.inv_a_flat,
            self.factor_flat,
            self.cap_inv_scaled,
            self._chunk,
            self.reduce,
            scratch,
            work_blocks,
        )
        s = _second_pass(grad, u, work, self.inv_a_flat, self.factor_flat, self._chunk, scratch)
        return (0.5 * q).to(self.dtype), s

    def _factor_transpose_times(self, u: Tensor, out: Tensor, scratch: Tensor | None = None) -> Tensor:
        """Fᵀ u ([P]) written into ``out``; a half-precision F is upcast chunk by chunk."""
        return _factor_transpose_times(self.factor_flat, u, out, self._chunk, scratch)

    def grad_half_quad(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        """Σ⁻¹(w − μ) for w given as blocks (no autograd); returns flattened blocks."""
        return self.value_and_grad(blocks)[1]

    def sample(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """One draw w = μ + √a ⊙ ξ + √λ Fᵀ ζ with ξ ~ N(0, I_P), ζ ~ N(0, I_K); blocks in original shapes."""
        zeta = None
        if self.factor_flat is not None:
            zeta = torch.randn(self.rank, generator=generator, dtype=self.dtype, device=self.device)
        # ξ drawn block by block: the same random stream as a per-tensor draw (torch's CPU randn fills short
        # and unaligned tensors differently from one long one), so a seed gives the same samples as before
        xi = torch.cat(
            [torch.randn(n, generator=generator, dtype=self.dtype, device=self.device) for n in self.sizes]
            or [torch.empty(0, dtype=self.dtype, device=self.device)]
        )
        w = self.mean_flat + self.inv_a_flat.rsqrt() * xi
        if zeta is not None:
            with ieee_fp32_matmul():
                w = w + math.sqrt(self.scale) * self._factor_transpose_times(zeta, torch.empty_like(w))
        return [b.reshape(shape) for b, shape in zip(self._split(w), self.shapes)]

    def dense_covariance(self) -> Tensor:
        """Σ as a dense P×P matrix (float64). For tests and tiny priors only (P ≤ 20,000)."""
        if self.numel > 20_000:
            raise ValueError(f"dense_covariance is for small priors; this one has P = {self.numel}")
        cov = torch.diag(self.inv_a_flat.double().reciprocal())
        if self.factor_flat is not None:
            f = self.factor_flat.double()
            cov = cov + self.scale * f.T @ f
        return cov


def _first_pass(
    blocks: Sequence[Tensor],
    work: Tensor,
    s: Tensor,
    mean: Tensor,
    inv_a: Tensor,
    factor: Tensor | None,
    m: Tensor | None,
    chunk: int,
    reduce: Callable[[Tensor], Tensor] | None,
    scratch: Tensor | None = None,
    work_blocks: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The first pass over F: w → ``work`` (then r = w − μ and r ⊙ s, in place), s = A⁻¹r into ``s``,
    t = F s; returns (q, u) with q = rᵀs − tᵀu and u = M t (M = λC⁻¹), both float64, summed over the
    processes (one all-reduce of K + 1) when sharded; u is ``None`` without a factor."""
    src = [b.detach().reshape(-1) for b in blocks]
    if all(b.dtype == work.dtype and b.device == work.device for b in src):
        torch.cat(src, out=work)  # w, one kernel (one parallel region, not one per block)
    else:  # bf16/fp16 blocks: cast while copying, still one op
        torch._foreach_copy_(list(work_blocks or work.split([b.numel() for b in src])), src)
    r = work.sub_(mean)
    torch.mul(r, inv_a, out=s)
    q = r.mul_(s).sum().to(torch.float64)  # rᵀs: a cascade float32 sum (accurate, unlike a flat dot)
    t = None if factor is None else _factor_times(factor, s, chunk, scratch).to(torch.float64)
    if reduce is not None:
        packed = reduce(q.reshape(1) if t is None else torch.cat([q.reshape(1), t]))
        q, t = packed[0], (None if t is None else packed[1:])
    if t is None:
        return q, None
    u = m @ t
    return q - torch.dot(t, u), u


def _second_pass(
    s: Tensor,
    u: Tensor | None,
    work: Tensor,
    inv_a: Tensor,
    factor: Tensor | None,
    chunk: int,
    scratch: Tensor | None = None,
) -> Tensor:
    """The second pass over F: s ← Σ⁻¹r = s − A⁻¹Fᵀu in place (Fᵀu written into ``work``); returns s."""
    if u is not None:
        prod = _factor_transpose_times(factor, u.to(s.dtype), work, chunk, scratch)
        s.addcmul_(prod, inv_a, value=-1.0)
    return s


def _upcast(f: Tensor, start: int, stop: int, dtype: torch.dtype, scratch: Tensor | None) -> Tensor:
    if scratch is None:
        return f[:, start:stop].to(dtype)
    return scratch[:, : stop - start].copy_(f[:, start:stop])


def _factor_times(f: Tensor, s: Tensor, chunk: int, scratch: Tensor | None = None) -> Tensor:
    """F s ([K], in ``s``'s dtype); a factor in a lower precision is upcast ``chunk`` columns at a time."""
    if f.dtype == s.dtype:
        return torch.mv(f, s)
    numel = f.shape[1]
    t = torch.zeros(f.shape[0], dtype=s.dtype, device=s.device)
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        t = t + torch.mv(_upcast(f, start, stop, s.dtype, scratch), s[start:stop])
    return t


def _factor_transpose_times(f: Tensor, u: Tensor, out: Tensor, chunk: int, scratch: Tensor | None = None) -> Tensor:
    """Fᵀ u ([P]) into ``out``; a factor in a lower precision is upcast ``chunk`` columns at a time."""
    if f.dtype == u.dtype:
        return torch.mv(f.T, u, out=out)
    numel = f.shape[1]
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        torch.mv(_upcast(f, start, stop, u.dtype, scratch).T, u, out=out[start:stop])
    return out


class _FlatHalfQuad(torch.autograd.Function):
    """½ rᵀΣ⁻¹r of the blocks w with r = w − μ; backward Σ⁻¹r = s − A⁻¹Fᵀu with s = A⁻¹r, u = λC⁻¹F s.

    Forward copies the blocks into one flat buffer (w, then r in place), streams F once (t = F s) and keeps
    s and that buffer (2P floats) and u (K floats); backward streams F once more into the first buffer and
    corrects s in place into the gradient, returned as views per block. Both passes run under
    :func:`ieee_fp32_matmul`. Only tensors and ints cross the boundary, so dynamo traces it.
    """

    @staticmethod
    def forward(
        ctx,
        mean: Tensor,
        inv_a: Tensor,
        factor: Tensor | None,
        m: Tensor | None,
        chunk: int,
        reduce: Callable[[Tensor], Tensor] | None,
        *blocks: Tensor,
    ) -> Tensor:
        ctx.shapes = [b.shape for b in blocks]
        ctx.sizes = [b.numel() for b in blocks]
        with ieee_fp32_matmul():
            work, s = torch.empty_like(mean), torch.empty_like(mean)
            q, u = _first_pass(blocks, work, s, mean, inv_a, factor, m, chunk, reduce)
        if u is None:
            ctx.save_for_backward(s)
        else:
            ctx.save_for_backward(s, work, u, inv_a, factor)
        ctx.chunk = chunk
        return (0.5 * q).to(mean.dtype)  # the prior's compute dtype, whatever the blocks'

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        if len(saved) == 1:
            grad = saved[0].mul_(grad_out)
        else:
            s, work, u, inv_a, factor = saved
            with ieee_fp32_matmul():
                grad = _second_pass(s, u, work, inv_a, factor, ctx.chunk).mul_(grad_out)
        blocks = [g.view(shape) for g, shape in zip(grad.split(ctx.sizes), ctx.shapes)]
        return (None, None, None, None, None, None, *blocks)
