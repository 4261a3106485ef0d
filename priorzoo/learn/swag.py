r"""SWAG: a Gaussian over a backbone's weights from the SGD trajectory (Maddox et al., NeurIPS 2019).

After (pre-)training, keep SGD running at a constant or cyclic learning rate and take snapshots
w_1 … w_T of the chosen parameters. SWAG fits

.. math::

    \bar w = \frac1T \sum_t w_t, \qquad
    \Sigma_{\rm diag} = \operatorname{diag}\Big(\frac1T\sum_t w_t^2 - \bar w^2\Big), \qquad
    \Sigma_{\rm low} = \frac{D D^\top}{K-1},

    w \sim \mathcal N\big(\bar w,\ \tfrac12 (\Sigma_{\rm diag} + \Sigma_{\rm low})\big),

where D = [d_{T-K+1} … d_T] (P×K) holds the last K deviations d_i = w_i − w̄_i and w̄_i is the running
mean *after* including snapshot i (as in Maddox et al.'s reference code). Shwartz-Ziv et al. (NeurIPS
2022, "Pre-Train Your Loss") use this Gaussian, rescaled by λ, as the prior of a downstream task.

:class:`SWAGCollector` keeps exactly what that needs, O((K+2)·P) memory, and nothing more:

* the running mean w̄ and the sum of squared deviations M₂ = Σ_t (w_t − w̄_{t−1})(w_t − w̄_t), updated
  in one streaming pass per snapshot (Welford's algorithm), so that E[w²] − w̄² = M₂ / T;
* a ring buffer of the last K deviations.

Numerics (why Welford and not E[w²]): SWAG variances are tiny next to the weights themselves (a weight of
0.05 moving by 1e-4 has var/w² ≈ 4e-6). Computing E[w²] − w̄² from two float32 running means cancels
catastrophically — float32 keeps ~7 digits, so the difference is mostly rounding noise and can even be
negative. Welford never forms that difference: each update adds δ·(w − w̄_new) = δ²(T−1)/T ≥ 0 to M₂, a
sum of non-negative terms, each computed from a deviation w − w̄ that is exact up to the rounding of the
mean. Its relative error is O(u·|w|/σ + T·u) (u = 6e-8 in float32, σ the weight's SWAG standard
deviation) — 1e-4 for a weight of 0.05 moving by 1e-4 — against O(T·u·w²/σ²), i.e. ≳ 100 %, for the
two-moment formula. Accumulating in float32 is therefore accurate and half the memory traffic of float64;
pass ``moment_dtype=torch.float64`` for bit-paranoid runs. Weights in bf16/fp16 are always accumulated in
at least float32.

``to_prior()`` writes the priorzoo convention (``docs/format.md``): variance = ½·clamp(M₂/T, min_var) and
cov_factor F = Dᵀ/√(2(K−1)) — the stored factor rows are d_i/√(2(K−1)) — so that with λ = 1 the prior is
exactly the SWAG Gaussian above: diag(v) + FᵀF = ½(Σ_diag + DDᵀ/(K−1)).

Example:
    >>> import torch
    >>> from priorzoo.learn import SWAGCollector
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
    >>> collector = SWAGCollector(model, rank=3, exclude="2.*")  # the head `2.*` gets no prior
    >>> for step in range(40):
    ...     x = torch.randn(16, 4)
    ...     loss = (model(x) - x[:, :2]).pow(2).mean()
    ...     opt.zero_grad(); loss.backward(); opt.step()
    ...     if step % 10 == 9:
    ...         collector.collect()
    >>> prior = collector.to_prior()
    >>> prior.rank, prior.names
    (3, ['0.weight', '0.bias'])
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from priorzoo.binding.batchnorm import norm_buffers, refresh_batchnorm_, running_statistics
from priorzoo.binding.matching import Patterns
from priorzoo.learn.provenance import describe_backbone, recorded_exclude, select_prior_parameters
from priorzoo.learn.recommended_scale import recommend_scale
from priorzoo.learn.schedules import ConstantLRSchedule, CyclicCosineSchedule, _Schedule  # noqa: F401 (re-exported)
from priorzoo.learn.swag_state import (
    STATE_FORMAT,
    STATE_VERSION,
    check_state_values,
    dtype_name,
    read_state_file,
    write_state_file,
)
from priorzoo.validation import check_float, check_positive_int

if TYPE_CHECKING:
    from priorzoo.prior import PriorModel

__all__ = ["ConstantLRSchedule", "CyclicCosineSchedule", "SWAGCollector"]

_DEFAULT_CHUNK = 1 << 18  # elements per fused update (1 MiB float32): big enough to amortise op overhead


class SWAGCollector:
    r"""Streaming SWAG statistics over a model's parameters; call :meth:`collect` at each snapshot.

    Args:
        model: the network being trained (any ``torch.nn.Module``: timm, transformers, plain PyTorch).
        rank: K ≥ 2, how many of the latest deviations the low-rank factor keeps (Maddox et al. use 20).
        include, exclude: which parameters get a prior — glob patterns on the full name (``fnmatch``), a
            list of them, or a callable ``name -> bool`` (see :func:`priorzoo.binding.matching.select_parameters`).
            Only parameters with ``requires_grad`` are considered.
        exclude_head: also leave out the model's task head, which is replaced downstream and gets no
            learned prior: ``head`` when given, else the one rule of
            :func:`priorzoo.binding.matching.head_parameter_names` (timm's ``pretrained_cfg["classifier"]``, what a
            transformers task model holds outside ``base_model_prefix``, and a plain/torchvision model's final
            ``nn.Linear`` named ``fc``/``classifier``/``head``/…). When the selection still holds what looks
            like an output layer, a warning names it.
        head: glob pattern(s) or a predicate naming the head's parameters explicitly (``[]``: the model has
            none; no warning).
        buffers: carry the batch-norm running statistics (default): the collector averages each layer's
            ``running_mean``/``running_var`` over the snapshots, and :meth:`to_prior` with ``bn_data``
            recomputes them for the SWA mean instead (as ``torch.optim.swa_utils.update_bn`` does).
        min_var: floor of the diagonal variance before the ½ (the official "Pre-Train Your Loss" code
            clamps at 1e-6; a weight that never moved would otherwise get an infinite precision).
        moment_dtype: dtype of the running mean and M₂ (default float32, or the parameters' dtype when
            wider). See the module docstring for why float32 Welford is accurate.
        factor_dtype: dtype of the K stored deviations (float16/bfloat16 halve the O(K·P) memory).
        device: where the statistics live (default: the parameters' device); ``"cpu"`` keeps a GPU free.
        check_finite: refuse a snapshot containing NaN/±inf (one extra read of the weights).
        chunk_size: weights per in-place update step (default 2¹⁸): the three passes of the update run over
            one cache-resident chunk at a time, so the snapshot streams through memory once.

    Raises:
        ValueError: ``rank`` not an integer ≥ 2, no parameter selected, bad ``min_var``.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 1)
        >>> c = SWAGCollector(lin, rank=2)
        >>> for i in range(3):
        ...     with torch.no_grad():
        ...         _ = lin.weight.add_(0.1 * i)
        ...     c.collect()
        >>> c.num_collected, c.num_deviations
        (3, 2)
    """

    #: what ``SWAGCollector(model)`` builds for an FSDP2 model (DTensor parameters): set by
    #: :mod:`priorzoo.learn.sharded_swag` (imported with :mod:`priorzoo.learn`)
    sharded_class: ClassVar[type[SWAGCollector] | None] = None

    def __new__(cls, model: torch.nn.Module, *args: Any, **kwargs: Any) -> SWAGCollector:
        # an FSDP2 model gets the sharded collector: each process keeps the statistics of its own shards
        if cls is SWAGCollector and isinstance(model, torch.nn.Module):
            from priorzoo.binding.sharded import is_sharded

            if is_sharded(list(model.parameters())):
                if SWAGCollector.sharded_class is None:  # pragma: no cover - priorzoo.learn registers it
                    raise RuntimeError("SWAGCollector on an FSDP2 model needs priorzoo.learn.sharded_swag imported")
                return super().__new__(SWAGCollector.sharded_class)
        return super().__new__(cls)

    def __init__(
        self,
        model: torch.nn.Module,
        rank: int = 20,
        *,
        include: Patterns = None,
        exclude: Patterns = None,
        exclude_head: bool = True,
        head: Patterns = None,
        buffers: bool = True,
        min_var: float = 1e-6,
        moment_dtype: torch.dtype | None = None,
        factor_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        check_finite: bool = True,
        chunk_size: int = _DEFAULT_CHUNK,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module; received {type(model).__name__}")
        self.rank = check_positive_int(
            rank, "rank", minimum=2, hint="K deviations give the factor Dᵀ/√(2(K−1)); SWAG papers use K = 20"
        )
        self.min_var = check_float(min_var, "min_var", minimum=0.0)
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.check_finite = bool(check_finite)
        self.model = model
        self.include = include
        self.exclude = exclude
        params, self.head_names = select_prior_parameters(
            model, include=include, exclude=exclude, exclude_head=exclude_head, head=head, what="SWAGCollector"
        )
        self.buffer_layers: list[str] = list(norm_buffers(model, skip=self.head_names)) if buffers else []
        self._buffer_sum: dict[str, Tensor] = {}  # Σ over snapshots of each running_mean / running_var
        self._buffer_last: dict[str, Tensor] = {}  # the latest num_batches_tracked
        self._buffer_n = 0
        self.names: list[str] = list(params)
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(p.shape) for n, p in params.items()}
        # the blocks the statistics hold: the parameters themselves, or each process's shards (sharded)
        self.block_shapes: dict[str, tuple[int, ...]] = {n: tuple(self._local(p).shape) for n, p in params.items()}
        self._offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for n, shape in self.block_shapes.items():
            numel = math.prod(shape)
            self._offsets[n] = (off, off + numel)
            off += numel
        self.num_parameters = off
        first = next(iter(params.values()))
        for n, p in params.items():
            if not p.dtype.is_floating_point:
                raise ValueError(f"parameter `{n}` has dtype {p.dtype}; SWAG needs floating-point parameters")
        self.device = torch.device(device) if device is not None else first.device
        widest = max((p.dtype for p in params.values()), key=lambda d: torch.finfo(d).bits)
        self.moment_dtype = moment_dtype or torch.promote_types(widest, torch.float32)
        if not self.moment_dtype.is_floating_point or torch.finfo(self.moment_dtype).bits < 32:
            raise ValueError(f"`moment_dtype` must be float32 or float64; received {self.moment_dtype}")
        if not factor_dtype.is_floating_point:
            raise ValueError(f"`factor_dtype` must be a floating dtype; received {factor_dtype}")
        self.factor_dtype = factor_dtype
        self._mean = torch.zeros(off, dtype=self.moment_dtype, device=self.device)
        self._m2 = torch.zeros(off, dtype=self.moment_dtype, device=self.device)
        self._ring = torch.zeros(self.rank, off, dtype=factor_dtype, device=self.device)
        self._n = 0
        self._tmp: Tensor | None = None  # scratch chunk, only when the ring's dtype differs

    # ------------------------------------------------------------------ introspection
    @property
    def num_collected(self) -> int:
        """T, the number of snapshots collected so far."""
        return self._n

    @property
    def num_deviations(self) -> int:
        """How many deviations the ring buffer holds now: min(T, K)."""
        return min(self._n, self.rank)

    def __repr__(self) -> str:
        return (
            f"SWAGCollector(rank={self.rank}, parameters={len(self.names)}, numel={self.num_parameters}, "
            f"collected={self._n}, moment_dtype={dtype_name(self.moment_dtype)}, device={self.device})"
        )

    @staticmethod
    def _local(p: Tensor) -> Tensor:
        """The part of parameter ``p`` this collector accumulates (all of it; a subclass: its local shard)."""
        return p

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: flat[a:b].view(self.block_shapes[n]) for n, (a, b) in self._offsets.items()}

    def mean(self) -> dict[str, Tensor]:
        """The running mean w̄ (copies, moment dtype), ``name -> tensor``.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(1, 1, bias=False)
            >>> c = SWAGCollector(lin, rank=2); c.collect()
            >>> torch.equal(c.mean()["weight"], lin.weight.detach())
            True
        """
        self._require(1, "mean()")
        return {n: t.clone() for n, t in self._unflatten(self._mean).items()}

    def raw_variance(self) -> dict[str, Tensor]:
        """E[w²] − w̄² = M₂/T per parameter (no clamp, no ½), ``name -> tensor``.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(1, 1, bias=False)
            >>> c = SWAGCollector(lin, rank=2)
            >>> for v in (1.0, 3.0):
            ...     with torch.no_grad():
            ...         _ = lin.weight.fill_(v)
            ...     c.collect()
            >>> c.raw_variance()["weight"].item()  # population variance of {1, 3}
            1.0
        """
        self._require(1, "raw_variance()")
        return {n: t / self._n for n, t in self._unflatten(self._m2).items()}

    def _chronological_slots(self) -> list[int]:
        m = self.num_deviations
        if self._n <= self.rank:
            return list(range(m))
        start = self._n % self.rank
        return [(start + i) % self.rank for i in range(self.rank)]

    def deviations(self) -> Tensor:
        """The stored deviations d_i = w_i − w̄_i, oldest first, as a ``[min(T, K), P]`` tensor (a copy).

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(1, 1, bias=False)
            >>> c = SWAGCollector(lin, rank=2)
            >>> for v in (1.0, 3.0, 5.0):
            ...     with torch.no_grad():
            ...         _ = lin.weight.fill_(v)
            ...     c.collect()
            >>> c.deviations().flatten().tolist()  # 3 − 2 and 5 − 3; the first (1 − 1 = 0) left the ring
            [1.0, 2.0]
        """
        slots = self._chronological_slots()
        return self._ring[torch.tensor(slots, dtype=torch.long, device=self.device)].clone()

    def _require(self, n: int, what: str) -> None:
        if self._n < n:
            raise RuntimeError(
                f"SWAGCollector.{what} needs at least {n} collected snapshot(s); {self._n} collected so far. "
                "Call collector.collect() after the optimizer step at each snapshot"
                + (" (one snapshot has no spread: a variance needs two)" if n == 2 else "")
            )

    # ------------------------------------------------------------------ collecting
    def _current(self, model: torch.nn.Module | None) -> list[tuple[str, Tensor]]:
        model = self.model if model is None else model
        named = dict(model.named_parameters())
        out = []
        for n in self.names:
            p = named.get(n)
            if p is None:
                raise RuntimeError(
                    f"parameter `{n}` is no longer in the model; the collector was built for {len(self.names)} "
                    "parameters and they must stay the same for the whole run (build a new SWAGCollector "
                    "for another model)"
                )
            if tuple(p.shape) != self.shapes[n]:
                raise RuntimeError(
                    f"parameter `{n}` has shape {tuple(p.shape)}, but the collector was built for shape "
                    f"{self.shapes[n]}; parameters must keep their shapes between snapshots (was the head "
                    "resized, or the wrong model passed?)"
                )
            out.append((n, self._local(p.detach())))
        return out

    def _check_snapshot(self, current: Sequence[tuple[str, Tensor]]) -> None:
        """Raise FloatingPointError before anything is updated if a weight is NaN/±inf."""
        for n, w in current:
            self._check_finite(n, w)

    @staticmethod
    def _check_finite(name: str, w: Tensor) -> None:
        # a sum is one read-only pass; it is finite iff no element is NaN/inf (unless the weights are so
        # huge the sum overflows — the exact check below then decides)
        s = w.sum(dtype=torch.float32) if w.dtype != torch.float64 else w.sum()
        if torch.isfinite(s):
            return
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            raise FloatingPointError(
                f"parameter `{name}` holds {bad} non-finite value(s) (NaN or ±inf) out of {w.numel()}; this "
                "snapshot was not collected and the SWAG statistics are unchanged. Training diverged: lower "
                "the learning rate (SWAG needs a stable SGD trajectory)"
            )

    @torch.no_grad()
    def collect(self, model: torch.nn.Module | None = None) -> None:
        """Add the current weights as snapshot T+1: one streaming pass over the selected parameters.

        For each weight (Welford, with n = T+1 and δ = w − w̄ the deviation from the old mean):
        ``w̄ ← w̄ + δ/n;  d = w − w̄;  M₂ ← M₂ + δ·d = M₂ + n/(n−1)·d²;  ring[(n−1) mod K] ← d``.
        The deviation d is taken against the mean *after* including w (Maddox et al.). In cache-sized
        chunks this is three fused passes (``lerp_``, ``sub``, ``addcmul_``) over data already in cache.

        Args:
            model: take the weights from this model instead of the one given at construction (same
                parameter names and shapes), e.g. an unwrapped copy.

        Raises:
            FloatingPointError: a selected parameter holds NaN/±inf (nothing is updated).
            RuntimeError: a parameter disappeared or changed shape since construction.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(2, 2)
            >>> c = SWAGCollector(lin, rank=4)
            >>> c.collect(); c.num_collected
            1
        """
        current = self._current(model)
        if self.check_finite:
            self._check_snapshot(current)
        n = self._n + 1
        inv_n = 1.0 / n
        gain = n / (n - 1) if n > 1 else 0.0
        slot = self._ring[(n - 1) % self.rank]
        chunk = self.chunk_size
        direct = self.factor_dtype == self.moment_dtype
        if self._tmp is None and not direct:
            self._tmp = torch.empty(min(chunk, self.num_parameters), dtype=self.moment_dtype, device=self.device)
        for name, w in current:
            a, b = self._offsets[name]
            flat = w.reshape(-1)
            for s in range(0, b - a, chunk):
                e = min(s + chunk, b - a)
                wc = flat[s:e]
                if wc.dtype != self.moment_dtype or wc.device != self.device:
                    wc = wc.to(device=self.device, dtype=self.moment_dtype)
                mean = self._mean[a + s : a + e]
                mean.lerp_(wc, inv_n)  # w̄ ← w̄ + (w − w̄)/n
                if direct:
                    dev = torch.sub(wc, mean, out=slot[a + s : a + e])  # d = w − w̄ (new mean), into the ring
                else:
                    dev = torch.sub(wc, mean, out=self._tmp[: e - s])  # type: ignore[index]
                    slot[a + s : a + e].copy_(dev)
                if n > 1:
                    # Welford: M₂ += δ·d with δ = w − w̄_old = d·n/(n−1), i.e. M₂ += n/(n−1)·d² (≥ 0)
                    self._m2[a + s : a + e].addcmul_(dev, dev, value=gain)
        self._n = n
        self._collect_buffers(self.model if model is None else model)

    # ------------------------------------------------------------------ the prior
    def to_prior(
        self,
        *,
        rank: int | None = None,
        min_var: float | None = None,
        scale: float | None = None,
        eps: float = 0.0,
        backbone: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        learning: Mapping[str, Any] | None = None,
        exclude: str | Sequence[str] | None = None,
        recommended_scale: float | None = None,
        license: str | None = None,
        bn_data: Any = None,
        bn_forward: Callable[[torch.nn.Module, Any], Any] | None = None,
        bn_batches: int | None = None,
    ) -> PriorModel:
        r"""The SWAG Gaussian as a :class:`~priorzoo.PriorModel` (DESIGN §2 convention).

        ``variance = ½·clamp(M₂/T, min_var)`` and ``cov_factor`` rows ``d_i / √(2(K'−1))`` for the K' =
        min(T, K) stored deviations, oldest first (or the last ``rank`` of them), so that at λ = 1
        ``diag(v) + FᵀF = ½(Σ_diag + DDᵀ/(K'−1))``, the SWAG covariance of Maddox et al.

        Args:
            rank: keep only the last ``rank`` deviations (0: a diagonal SWAG prior, kind ``swag`` with
                K = 0; 1 is invalid: one deviation has no K−1 normaliser). Default: all stored.
            min_var: override the collector's variance floor.
            scale, eps: λ and ε of the prior (``Σ = λ(diag(v) + FᵀF) + εI``); the paper tunes λ downstream.
                Default: λ not chosen, so fine-tuning uses the ``recommended_scale``
                (:meth:`~priorzoo.PriorModel.resolve_scale`).
            backbone: provenance (default: detected from the model: timm / transformers / torch).
            source: the source task, e.g. ``{"dataset": "cifar10", "objective": "simclr"}``.
            learning: extra notes on how it was learned (merged over the collector's own record).
            exclude: patterns recorded as the prior's excluded parameters (default: the collector's string
                ``exclude`` patterns, else the names of the trainable parameters it skipped, i.e. the head).
            recommended_scale: the λ to fine-tune with (``config.recommended_scale``, used by
                ``with_scale()`` and the fine-tuning defaults); default: the documented rule of
                :func:`priorzoo.learn.recommend_scale` on this prior. Pass a measured value when you have one.
            license: for the card.
            bn_data, bn_forward, bn_batches: with ``bn_data`` (an iterable of source batches), the
                batch-norm running statistics carried by the prior are recomputed for the SWA mean w̄
                (``priorzoo.finetune.refresh_batchnorm_``: ``bn_forward(model, batch)`` runs the model,
                default :func:`priorzoo.batches.default_forward`; at most ``bn_batches`` batches), as
                SWA/SWAG practice does (``torch.optim.swa_utils.update_bn``). Without it the prior carries
                the running statistics averaged over the snapshots. The model's own weights and statistics
                are left as they were.

        Raises:
            RuntimeError: fewer than 2 snapshots collected.
            ValueError: ``rank`` not in {0, 2, …, K'}.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(2, 1)
            >>> c = SWAGCollector(lin, rank=5)
            >>> for v in range(3):
            ...     with torch.no_grad():
            ...         _ = lin.weight.fill_(float(v))
            ...     c.collect()
            >>> p = c.to_prior(rank=2)  # without rank=: the same, and a warning (2 deviations < K = 5)
            >>> p.rank, p.kind.value  # the first snapshot's deviation (0) is not a factor row
            (2, 'swag')
        """
        from priorzoo.prior import PriorModel

        self._require(2, "to_prior()")
        rank, floor, record = self._prior_plan(rank, min_var)
        mean_flat, var_flat, f_flat = self._prior_flats(rank, floor)
        cov_factor = None
        if f_flat is not None:
            cov_factor = {n: f_flat[:, a:b].reshape(rank, *self.shapes[n]).cpu() for n, (a, b) in self._offsets.items()}
        mean = {n: t.cpu() for n, t in self._unflatten(mean_flat).items()}
        variance = {n: t.cpu() for n, t in self._unflatten(var_flat).items()}
        buffers: dict[str, Tensor] = {}
        if self.buffer_layers:
            if bn_data is not None:
                buffers = self._statistics_of_mean(bn_data, bn_forward, bn_batches)
                record["buffers"] = "batch-norm statistics recomputed for the SWA mean (update_bn)"
            else:
                buffers = self.running_statistics()
                record["buffers"] = f"batch-norm running statistics averaged over {self._buffer_n} snapshots"
        record.update(dict(learning or {}))
        if exclude is None:
            exclude = self._default_exclude()
        if recommended_scale is None:
            recommended_scale, rule = recommend_scale(mean, variance, cov_factor, floor=0.5 * floor)
            record["recommended_scale_rule"] = rule
        return PriorModel.from_tensors(
            mean,
            variance,
            cov_factor,
            scale=scale,
            eps=eps,
            kind="swag",
            backbone=dict(backbone) if backbone is not None else describe_backbone(self.model),
            source=source,
            learning=record,
            exclude=[exclude] if isinstance(exclude, str) else list(exclude),
            recommended_scale=recommended_scale,
            license=license,
            buffers=buffers,
            copy=False,  # built here for the prior
        )

    def _prior_plan(self, rank: int | None, min_var: float | None) -> tuple[int, float, dict[str, Any]]:
        """The factor rank and variance floor :meth:`to_prior` uses (checked), and its ``learning`` record."""
        # while T ≤ K the ring still holds d_1 = w_1 − w̄_1 = 0 (a one-snapshot mean): a dead row, never stored
        available = self.num_deviations - (1 if self._n <= self.rank else 0)
        if rank is None:
            rank = available if available >= 2 else 0
            if rank < self.rank:
                import warnings

                warnings.warn(
                    f"SWAGCollector: {self._n} snapshots give {available} non-zero deviation(s), fewer than the "
                    f"requested rank K = {self.rank}; the prior has rank {rank}"
                    + (" (diagonal only)" if rank == 0 else "")
                    + f". Collect at least K + 1 = {self.rank + 1} snapshots for the full rank",
                    UserWarning,
                    stacklevel=3,
                )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or rank == 1 or rank > available:
            raise ValueError(
                f"`rank` must be 0 (diagonal only) or an integer in [2, {available}] (the non-zero deviations "
                f"stored now: min(snapshots {self._n}, K {self.rank}), less the first snapshot's zero "
                f"deviation while it is stored); received {rank!r}"
            )
        floor = self.min_var if min_var is None else check_float(min_var, "min_var", minimum=0.0)
        record: dict[str, Any] = {
            "method": "swag",
            "snapshots": self._n,
            "max_rank": self.rank,
            "rank": rank,
            "min_var": floor,
            "moments": f"welford-{dtype_name(self.moment_dtype)}",
            "reference": "Maddox et al. 2019, A Simple Baseline for Bayesian Uncertainty in Deep Learning",
        }
        return rank, floor, record

    def _prior_flats(self, rank: int, floor: float) -> tuple[Tensor, Tensor, Tensor | None]:
        """Flat float32 mean, variance ½·clamp(M₂/T, floor) and factor rows d_i/√(2(K'−1)) (None at rank 0),
        all element-wise in the collector's blocks (so a process's shards give its slices bit for bit)."""
        var_flat = (self._m2 / self._n).clamp_(min=floor).mul_(0.5).to(torch.float32)
        mean_flat = self._mean.to(torch.float32, copy=True)
        f_flat = None
        if rank > 0:
            slots = self._chronological_slots()[-rank:]
            idx = torch.tensor(slots, dtype=torch.long, device=self.device)
            f_flat = self._ring.index_select(0, idx).to(torch.float32)
            f_flat.div_(math.sqrt(2.0 * (rank - 1)))
        return mean_flat, var_flat, f_flat

    def save_prior(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "2GB",
        card: bool = True,
        **to_prior_kwargs: Any,
    ) -> Path:
        """Write the prior :meth:`to_prior` gives as a prior folder (``PriorModel.save_pretrained``).

        On an FSDP2 model this is collective and writes the same folder from every process's shards
        (:class:`priorzoo.learn.sharded_swag.ShardedSWAGCollector`), so one script serves both.

        Example:
            >>> import tempfile, torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 1)
            >>> c = SWAGCollector(lin, rank=2)
            >>> for v in range(3):
            ...     with torch.no_grad():
            ...         _ = lin.weight.fill_(float(v))
            ...     c.collect()
            >>> PriorModel.from_pretrained(c.save_prior(tempfile.mkdtemp())).rank
            2
        """
        prior = self.to_prior(**to_prior_kwargs)
        return prior.save_pretrained(save_directory, max_shard_size=max_shard_size, card=card)

    def _default_exclude(self) -> list[str]:
        """The user's string ``exclude`` patterns plus the names of every other trainable parameter left
        out (the head, or whatever ``include`` did not pick)."""
        return recorded_exclude(self.model, self.names, self.exclude)

    # ------------------------------------------------------------------ batch-norm running statistics
    def _collect_buffers(self, model: torch.nn.Module) -> None:
        if not self.buffer_layers:
            return
        stats = running_statistics(model, skip=self.head_names)
        for name, t in stats.items():
            if t.dtype.is_floating_point:
                acc = self._buffer_sum.get(name)
                self._buffer_sum[name] = t.double() if acc is None else acc.add_(t)
            else:
                self._buffer_last[name] = t
        self._buffer_n += 1

    def running_statistics(self) -> dict[str, Tensor]:
        """The batch-norm running statistics averaged over the snapshots (``num_batches_tracked``: the
        latest), ``"<layer>.running_mean"`` etc.; empty without batch norm or with ``buffers=False``.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
            >>> from priorzoo.learn import SWAGCollector
            >>> c = SWAGCollector(net, rank=2); c.collect()
            >>> sorted(c.running_statistics())
            ['1.num_batches_tracked', '1.running_mean', '1.running_var']
        """
        if not self._buffer_n:
            return {}
        out = {n: (t / self._buffer_n).float() for n, t in self._buffer_sum.items()}
        out.update({n: t.clone() for n, t in self._buffer_last.items()})
        order = list(running_statistics(self.model, skip=self.head_names))
        return {n: out[n] for n in order if n in out}

    @torch.no_grad()
    def _statistics_of_mean(
        self, data: Any, forward: Callable[[torch.nn.Module, Any], Any] | None, num_batches: int | None
    ) -> dict[str, Tensor]:
        """Recompute the running statistics for the SWA mean: copy w̄ into the model, re-estimate them on
        ``data`` (:func:`priorzoo.finetune.refresh_batchnorm_`), read them, then put the weights and
        statistics back."""
        named = dict(self.model.named_parameters())
        saved = {n: named[n].detach().clone() for n in self.names}
        buffers = dict(self.model.named_buffers())
        saved_buffers = {n: b.detach().clone() for n, b in buffers.items()}
        try:
            for n, t in self._unflatten(self._mean).items():
                named[n].copy_(t.to(named[n].dtype))
            kwargs: dict[str, Any] = {"num_batches": num_batches}
            if forward is not None:
                kwargs["forward"] = forward
            refresh_batchnorm_(self.model, data, **kwargs)
            return running_statistics(self.model, skip=self.head_names)
        finally:
            for n, t in saved.items():
                named[n].copy_(t)
            for n, t in saved_buffers.items():
                buffers[n].copy_(t)

    # ------------------------------------------------------------------ resume state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: metadata (JSON-able) plus tensors ``mean``, ``m2``, ``deviations``.

        Deviations are stored oldest first (``[min(T, K), P]``), so the state is independent of where the
        ring buffer happened to wrap.

        Example:
            >>> import torch
            >>> from priorzoo.learn import SWAGCollector
            >>> c = SWAGCollector(torch.nn.Linear(2, 2), rank=3); c.collect()
            >>> sorted(k for k, v in c.state_dict().items() if isinstance(v, torch.Tensor))
            ['deviations', 'm2', 'mean']
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "rank": self.rank,
            "num_collected": self._n,
            "min_var": self.min_var,
            "moment_dtype": dtype_name(self.moment_dtype),
            "factor_dtype": dtype_name(self.factor_dtype),
            "parameters": [{"name": n, "shape": list(self.shapes[n])} for n in self.names],
            "mean": self._mean.clone(),
            "m2": self._m2.clone(),
            "deviations": self.deviations(),
            "buffer_snapshots": self._buffer_n,
            **{f"buffer_sum.{n}": t.clone() for n, t in self._buffer_sum.items()},
            **{f"buffer_last.{n}": t.clone() for n, t in self._buffer_last.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the collector must select the same parameters with the same K.

        Raises:
            ValueError: another format, rank, parameter list or shapes, inconsistent tensors, or the state of
                one process of a sharded (FSDP2) collector.

        Example:
            >>> import torch
            >>> from priorzoo.learn import SWAGCollector
            >>> lin = torch.nn.Linear(2, 2)
            >>> a = SWAGCollector(lin, rank=3); a.collect()
            >>> b = SWAGCollector(lin, rank=3); b.load_state_dict(a.state_dict())
            >>> b.num_collected
            1
        """
        self._check_state(state)
        self._apply_state(state)

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError if ``state`` cannot be loaded into this collector; changes nothing."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a SWAGCollector state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        if int(state.get("version", 0)) > STATE_VERSION:
            raise ValueError(
                f"SWAGCollector state version {state.get('version')} is newer than this priorzoo reads "
                f"({STATE_VERSION}); upgrade priorzoo"
            )
        self._check_sharding(state)
        if state["rank"] != self.rank:
            raise ValueError(
                f"the saved state has rank K = {state['rank']} but this collector has rank {self.rank}; build "
                f"the collector with rank={state['rank']} to resume"
            )
        saved = [(p["name"], tuple(p["shape"])) for p in state["parameters"]]
        mine = [(n, self.shapes[n]) for n in self.names]
        if saved != mine:
            diff = [f"`{s[0]}` {s[1]}" for s in saved if s not in mine][:3] + [
                f"`{m[0]}` {m[1]} (here)" for m in mine if m not in saved
            ][:3]
            raise ValueError(
                f"the saved state covers {len(saved)} parameters and this collector {len(mine)}; they differ "
                f"in: {', '.join(diff) or 'order'}. Use the same model and include/exclude patterns"
            )
        check_state_values(state, rank=self.rank, num_parameters=self.num_parameters, buffers=self._buffer_shapes())

    def _buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every batch-norm statistic this collector averages (its local block when sharded)."""
        if not self.buffer_layers:
            return {}
        return {n: tuple(t.shape) for n, t in running_statistics(self.model, skip=self.head_names).items()}

    def _check_sharding(self, state: Mapping[str, Any]) -> None:
        """An unsharded collector refuses the state of one process of a sharded run (key ``shard``)."""
        shard = state.get("shard")
        if shard is not None:
            raise ValueError(
                f"the saved state is process {shard.get('process')}'s shard of a {shard.get('world_size')}-process "
                "sharded (FSDP2) SWAGCollector, but this collector is unsharded; resume it on "
                f"{shard.get('world_size')} processes with the same fully_shard layout"
            )

    @torch.no_grad()
    def _apply_state(self, state: Mapping[str, Any]) -> None:
        """Copy a checked state in (see :meth:`_check_state`)."""
        n = int(state["num_collected"])
        devs = state["deviations"]
        m = min(n, self.rank)
        self._mean.copy_(state["mean"])
        self._m2.copy_(state["m2"])
        self._ring.zero_()
        # snapshot j (1-based) lives in slot (j − 1) mod K, exactly as an uninterrupted run would have it
        for i in range(m):
            j = n - m + 1 + i
            self._ring[(j - 1) % self.rank].copy_(devs[i])
        self._n = n
        # batch-norm statistics (absent from states written before priorzoo carried them: start afresh)
        self._buffer_n = int(state.get("buffer_snapshots", 0))
        self._buffer_sum = {k[len("buffer_sum.") :]: v.clone() for k, v in state.items() if k.startswith("buffer_sum.")}
        self._buffer_last = {
            k[len("buffer_last.") :]: v.clone() for k, v in state.items() if k.startswith("buffer_last.")
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to one safetensors file (tensors + a JSON header entry), atomically; no pickle.

        Example:
            >>> import tempfile, os, torch
            >>> from priorzoo.learn import SWAGCollector
            >>> c = SWAGCollector(torch.nn.Linear(2, 2), rank=3); c.collect()
            >>> path = c.save(os.path.join(tempfile.mkdtemp(), "swag.safetensors"))
            >>> c2 = SWAGCollector(torch.nn.Linear(2, 2), rank=3); c2.load(path); c2.num_collected
            1
        """
        return write_state_file(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save` (see :meth:`load_state_dict` for the checks).

        Example:
            >>> collector.load("checkpoints/swag.safetensors")  # doctest: +SKIP
        """
        if Path(path).is_dir() and any(Path(path).glob("rank-*-of-*.safetensors")):
            files = sorted(f.name for f in Path(path).glob("rank-*-of-*.safetensors"))
            raise ValueError(
                f"{path} is the state of a sharded (FSDP2) SWAGCollector, one file per process ({', '.join(files)}), "
                "but this collector is unsharded; resume it on as many processes, with the same fully_shard layout"
            )
        self.load_state_dict(read_state_file(path))
