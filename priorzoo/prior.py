r"""``PriorModel``: a learned Gaussian prior over a backbone's weights that saves, loads and binds like a model.

The distribution (``docs/format.md``) over the concatenation w of the prior's parameters, in config order:

.. math:: w \sim \mathcal N(\mu,\; \lambda(\operatorname{diag}(v) + F^\top F) + \varepsilon I)

Fine-tuning minimises ``mean CE(w) + penalty(w) / N`` where ``penalty = ½ (w−μ)ᵀΣ⁻¹(w−μ)`` = −log p(w) up to
a constant and N is the number of training examples (Shwartz-Ziv et al., NeurIPS 2022, eq. 2).

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> mean = {n: p for n, p in model.named_parameters() if n.startswith("0.")}  # copied: a snapshot
    >>> prior = PriorModel.from_tensors(mean, variance=0.1, exclude=["1.*"])
    >>> loss = prior.penalty(model) / 1000  # add to the data loss
    >>> loss.item()
    0.0
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from priorzoo.binding.batchnorm import copy_into_model_
from priorzoo.binding.bound import BoundPrior, check_model, registered_binding
from priorzoo.binding.matching import MatchResult, Patterns, match_parameters
from priorzoo.binding.options import BindOptions
from priorzoo.format.checks import check_named_tensors, check_prior_tensors, check_tensor_inputs
from priorzoo.format.config import ParameterSpec, PriorConfig, PriorKind
from priorzoo.format.files import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from priorzoo.format.serialization import load_prior_folder, save_prior
from priorzoo.gaussian import LowRankGaussian

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

__all__ = ["CONFIG_NAME", "INDEX_NAME", "WEIGHTS_NAME", "BoundPrior", "PriorModel"]


class PriorModel:
    """A Gaussian prior N(μ, λ(diag(v) + FᵀF) + εI) over named parameters, in the priorzoo format.

    Build one with :meth:`from_tensors`, a learner (:mod:`priorzoo.learn`) or :meth:`from_pretrained`;
    share it with :meth:`save_pretrained` / :meth:`push_to_hub`; fine-tune with :meth:`penalty` (or a
    :class:`BoundPrior` from :meth:`bind`).

    Attributes:
        config: the validated :class:`~priorzoo.format.config.PriorConfig`.
        mean, variance: ``name -> tensor`` of each parameter's shape.
        cov_factor: ``name -> [K, *shape]`` tensor, or ``None`` when K = 0.
        buffers: ``name -> tensor`` of the source model's batch-norm running statistics (empty when the
            prior carries none); :meth:`init_model_` copies them into the model.

    Example:
        >>> import torch
        >>> prior = PriorModel.from_tensors(
        ...     mean={"w": torch.zeros(3)}, variance={"w": torch.ones(3)}, cov_factor={"w": torch.ones(2, 3)}
        ... )
        >>> prior.rank, prior.num_parameters, prior.kind.value
        (2, 3, 'swag')
    """

    def __init__(
        self,
        config: PriorConfig,
        mean: Mapping[str, Tensor],
        variance: Mapping[str, Tensor],
        cov_factor: Mapping[str, Tensor] | None = None,
        *,
        buffers: Mapping[str, Tensor] | None = None,
        validate: bool = True,
    ) -> None:
        self.config = config
        self.mean = dict(mean)
        self.variance = dict(variance)
        self.cov_factor = dict(cov_factor) if cov_factor is not None and config.rank > 0 else None
        self.buffers: dict[str, Tensor] = dict(buffers or {})
        self._bindings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        if validate:
            self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tensors(
        cls,
        mean: Mapping[str, Tensor],
        variance: Mapping[str, Tensor] | float,
        cov_factor: Mapping[str, Tensor] | None = None,
        *,
        scale: float | None = None,
        eps: float = 0.0,
        kind: PriorKind | str | None = None,
        backbone: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        learning: Mapping[str, Any] | None = None,
        exclude: str | Sequence[str] = (),
        recommended_scale: float | None = None,
        license: str | None = None,
        results: list[dict[str, Any]] | None = None,
        buffers: Mapping[str, Tensor] | None = None,
        copy: bool = True,
    ) -> PriorModel:
        """Build a prior from tensors (copied: a prior of a model's live weights does not follow training).

        Args:
            mean: ``name -> μ`` (the order is the prior's parameter order).
            variance: ``name -> v ≥ 0`` of the same shapes, or one float σ² (isotropic prior).
            cov_factor: ``name -> [K, *shape]`` rows of F, or ``None``.
            scale, eps: λ > 0 and ε ≥ 0 of ``Σ = λ(diag(v) + FᵀF) + εI`` (``scale=None``: λ not chosen, see
                :meth:`resolve_scale`; the density uses 1).
            kind: defaults to ``swag`` with a factor, ``isotropic`` for a float variance, else ``diagonal``.
            backbone, source, learning, exclude, recommended_scale, license, results: see
                :class:`~priorzoo.format.config.PriorConfig`.
            buffers: ``name -> tensor`` running statistics to carry (batch-norm ``running_mean``,
                ``running_var``, ``num_batches_tracked`` under the source model's buffer names).
            copy: copy the tensors (default); ``False`` uses them as given, for code that built them for it.

        Example:
            >>> import torch
            >>> p = PriorModel.from_tensors({"b": torch.zeros(2)}, variance=4.0)
            >>> p.kind.value, p.variance["b"].tolist()
            ('isotropic', [4.0, 4.0])
        """
        variance, rank, kind = check_tensor_inputs(mean, variance, cov_factor, kind)
        if kind is None:
            kind = PriorKind.SWAG if cov_factor is not None else PriorKind.DIAGONAL
        config = PriorConfig(
            kind=kind,
            rank=max(rank, 0),
            parameters=[ParameterSpec(n, tuple(m.shape)) for n, m in mean.items()],
            scale=scale,
            eps=eps,
            backbone=dict(backbone or {}),
            source=dict(source or {}),
            learning=dict(learning or {}),
            exclude=[exclude] if isinstance(exclude, str) else list(exclude),
            recommended_scale=recommended_scale,
            license=license,
            results=list(results or []),
            buffers=[ParameterSpec(n, tuple(b.shape)) for n, b in (buffers or {}).items()],
        )

        own = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        cf = {n: own(cov_factor[n]) for n in mean} if cov_factor is not None else None
        return cls(
            config,
            {n: own(m) for n, m in mean.items()},
            {n: own(variance[n]) for n in mean},
            cf,
            buffers={n: own(b) for n, b in (buffers or {}).items()},
        )

    def _validate(self) -> None:
        check_prior_tensors(self.config, self.mean, self.variance, self.cov_factor, self.buffers)

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> PriorKind:
        return self.config.kind  # type: ignore[return-value]

    @property
    def rank(self) -> int:
        """K, the number of low-rank factor rows."""
        return self.config.rank

    @property
    def scale(self) -> float:
        """λ, the covariance scale (1 when it was not chosen: ``config.scale is None``)."""
        return self.config.scale if self.config.scale is not None else 1.0

    @property
    def eps(self) -> float:
        return self.config.eps

    @property
    def names(self) -> list[str]:
        """Parameter names in prior order."""
        return self.config.names

    @property
    def num_parameters(self) -> int:
        """P, the number of scalar weights the prior covers."""
        return self.config.num_parameters

    def __repr__(self) -> str:
        bb = self.config.backbone.get("name")
        return (
            f"PriorModel(kind={self.kind.value!r}, rank={self.rank}, scale={self.scale:g}, eps={self.eps:g}, "
            f"parameters={len(self.names)}, numel={self.num_parameters}" + (f", backbone={bb!r}" if bb else "") + ")"
        )

    # ------------------------------------------------------------------ copies
    def with_scale(self, scale: float | None = None, eps: float | None = None) -> PriorModel:
        """A copy with another λ and/or ε, sharing the tensors (no copy, no re-validation).

        ``scale=None`` takes the prior's ``config.recommended_scale`` (the λ its learner measured or its
        authors recommend) when it has one, else keeps the current λ: ``prior.with_scale()`` is the
        out-of-the-box fine-tuning prior. :func:`priorzoo.finetune.tune_scale` searches λ on your task.

        Example:
            >>> import torch
            >>> p = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0, recommended_scale=100.0)
            >>> p.with_scale(10.0).scale, p.with_scale().scale
            (10.0, 100.0)
        """
        if scale is None:
            scale = self.config.recommended_scale if self.config.recommended_scale is not None else self.scale
        cfg = dataclasses.replace(self.config, scale=scale, eps=self.eps if eps is None else eps)
        return PriorModel(cfg, self.mean, self.variance, self.cov_factor, buffers=self.buffers, validate=False)

    def resolve_scale(self, scale: float | None = None) -> PriorModel:
        """The prior fine-tuning should use: λ = ``scale`` when given; otherwise this prior as it is if its
        λ was chosen (``config.scale`` is set: ``with_scale(...)``, ``scale=`` when it was built, or a ``scale``
        in its ``config.json``, 1 included) or it has no ``recommended_scale``; else the prior at its
        ``recommended_scale``. ``None`` means not chosen; no value of λ does.

        This is the default of ``PriorRegularizer``/``PriorCallback``/``PriorTrainer`` (``scale=None``): a
        freshly learned prior fine-tunes at the λ its learner recommends, not at λ = 1, whose precision is
        ~1e6 per weight when most SWAG variances sit at the ``min_var`` floor.

        Example:
            >>> import torch
            >>> p = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0, recommended_scale=1e4)
            >>> p.resolve_scale().scale, p.resolve_scale(5.0).scale, p.with_scale(1.0).resolve_scale().scale
            (10000.0, 5.0, 1.0)
            >>> chosen = PriorModel.from_tensors({"w": torch.zeros(2)}, 1.0, scale=1.0, recommended_scale=1e4)
            >>> chosen.resolve_scale().scale  # λ = 1 chosen is kept: only `None` means not chosen
            1.0
        """
        if scale is not None:
            return self.with_scale(scale)
        if self.config.scale is not None or self.config.recommended_scale is None:
            return self
        return self.with_scale(self.config.recommended_scale)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PriorModel:
        """Move/cast every tensor in place (like ``nn.Module.to``) and return ``self``."""

        def conv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        self.mean = {n: conv(t) for n, t in self.mean.items()}
        self.variance = {n: conv(t) for n, t in self.variance.items()}
        if self.cov_factor is not None:
            self.cov_factor = {n: conv(t) for n, t in self.cov_factor.items()}
        self.buffers = {
            n: t.to(device=device, dtype=dtype if t.dtype.is_floating_point else None) for n, t in self.buffers.items()
        }
        self._bindings = weakref.WeakKeyDictionary()
        return self

    # ------------------------------------------------------------------ maths
    def gaussian(
        self,
        names: Sequence[str] | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankGaussian:
        """The :class:`~priorzoo.gaussian.LowRankGaussian` over ``names`` (default all), i.e. the exact
        marginal of the prior on those parameters (a Gaussian's marginal keeps the blocks it names)."""
        names = list(self.names if names is None else names)
        dtype = dtype or torch.promote_types(self.mean[names[0]].dtype, torch.float32)

        return LowRankGaussian(  # copies the blocks straight into flat buffers on `device`
            [self.mean[n] for n in names],
            [self.variance[n] for n in names],
            [self.cov_factor[n] for n in names] if self.cov_factor is not None else None,
            scale=self.scale,
            eps=self.eps,
            names=names,
            dtype=dtype,
            device=device,
        )

    def match(
        self, model: torch.nn.Module, *, include: Patterns = None, exclude: Patterns = None, exclude_head: bool = True
    ) -> MatchResult:
        """Which prior parameters map onto which of ``model``'s parameters (see :mod:`priorzoo.binding.matching`).

        A PEFT model is matched through its wrappers (:func:`priorzoo.binding.peft.peft_view`): the result says
        which prior blocks are ``adapted`` (effective weight W₀ + ΔW, with their adapter tensors),
        ``frozen`` (held at their values) or ``missing`` (absent), and lists the trainable ``adapters``;
        a ``modules_to_save`` head stays the head.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(2, 2)
            >>> p = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0)
            >>> p.match(lin).no_prior
            ['bias']
        """
        shapes = {s.name: s.shape for s in self.config.parameters}
        return match_parameters(
            shapes,
            model,
            include=include,
            exclude=exclude,
            prior_exclude=self.config.exclude,
            exclude_head=exclude_head,
        )

    def bind(
        self,
        model: torch.nn.Module,
        options: BindOptions | None = None,
        *,
        include: Patterns = None,
        exclude: Patterns = None,
        exclude_head: bool = True,
        allow_partial: bool = False,
        dtype: torch.dtype | None = None,
    ) -> BoundPrior:
        """Match the prior onto ``model`` and precompute everything the penalty needs.

        Which parameters: ``options`` (a :class:`~priorzoo.BindOptions`, validated when it was built) or the
        keywords ``include``, ``exclude``, ``exclude_head``, ``allow_partial``, ``dtype`` (validated here, into
        one ``BindOptions``), not both.

        Frozen matched parameters (``requires_grad=False``) are held at their values and a PEFT model's
        adapted layers enter through their effective weights W₀ + ΔW: then the binding is a
        :class:`~priorzoo.binding.conditional.ConditionalBoundPrior` (same interface; its ``parameters`` are the
        tensors that receive the gradient, e.g. ``lora_A``/``lora_B``), which reads the frozen blocks once here
        so each step costs only the trained blocks (see :mod:`priorzoo.binding.conditional`).

        The prior's tensors are moved to the device of the model's parameters (a CUDA model gets a CUDA
        copy), and the penalty is computed in float32 (or ``dtype``) whatever the parameters' dtype.

        Raises:
            PriorMatchError: zero matches, shape mismatches, or missing parameters without
                ``allow_partial=True``.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(2, 2)
            >>> p = PriorModel.from_tensors({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, variance=1.0)
            >>> bound = p.bind(lin)
            >>> bound.penalty().backward()  # gradient Σ⁻¹(w − μ) lands in lin.weight.grad
        """
        keywords = BindOptions(
            include=include, exclude=exclude, exclude_head=exclude_head, allow_partial=allow_partial, dtype=dtype
        )
        if options is None:
            options = keywords
        elif not isinstance(options, BindOptions):
            raise TypeError(f"`options` must be a priorzoo.BindOptions or None; received {type(options).__name__}")
        elif keywords != BindOptions():
            raise TypeError("PriorModel.bind takes `options` or the keywords include/exclude/..., not both")
        check_model(model, where="PriorModel.bind")  # FSDP1 / DeepSpeed ZeRO-3: refused (priorzoo.binding.sharded)
        result = options.check_match(self, model)
        dtype = options.dtype
        params = dict(model.named_parameters())
        special = registered_binding([params[m] for m in result.matched.values() if m in params])
        if special is not None:  # FSDP2: ShardedBoundPrior over the local slices
            return special(self, model, result, dtype=dtype)
        if result.adapted or (result.frozen and len(result.frozen) < len(result.matched)):
            # frozen blocks held at their values, PEFT layers through their effective weights W₀ + ΔW
            from priorzoo.binding.conditional import ConditionalBoundPrior

            return ConditionalBoundPrior(self, model, result, dtype=dtype)  # type: ignore[return-value]
        return BoundPrior(self, model, result, dtype=dtype)

    def _cached_binding(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> BoundPrior:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        per_model = self._bindings.get(model)
        if per_model is None:
            per_model = {}
            self._bindings[model] = per_model
        from priorzoo.binding.peft import peft_state

        state = peft_state(model)  # adapters merged, switched or disabled since: re-bind
        bound, bound_state = per_model.get(key, (None, None))
        if bound is None or bound_state != state or not bound.is_current():
            bound = self.bind(model, **kwargs)
            per_model[key] = (bound, state)
        return bound

    def penalty(self, model: torch.nn.Module, **bind_kwargs: Any) -> Tensor:
        """½ (w−μ)ᵀΣ⁻¹(w−μ) over the model's matching parameters; differentiable. Add ``penalty / N``.

        The binding (matching + precomputation) is cached per model and reused on later calls, so each
        training step costs one forward and one backward pass over the factor.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(2, 1)
            >>> p = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0, exclude=["bias"])
            >>> with torch.no_grad():
            ...     _ = lin.weight.fill_(1.0)
            >>> p.penalty(lin).item()  # ½ · (1² + 1²) / 1
            1.0
        """
        return self._cached_binding(model, bind_kwargs).penalty()

    def log_prob(self, params: torch.nn.Module | Mapping[str, Tensor], **bind_kwargs: Any) -> Tensor:
        """Exact log N(w; μ, Σ), normaliser included (float64), of a model or a ``name -> tensor`` mapping.

        For a model, only the matched parameters count (the marginal with ``allow_partial=True``).

        Example:
            >>> import torch
            >>> p = PriorModel.from_tensors({"w": torch.zeros(1)}, variance=1.0)
            >>> round(float(p.log_prob({"w": torch.zeros(1)})), 6)  # −½ log 2π
            -0.918939
        """
        if isinstance(params, torch.nn.Module):
            return self._cached_binding(params, bind_kwargs).log_prob()
        check_named_tensors(params, self.names, self.mean, what="log_prob")
        device = params[self.names[0]].device
        return self.gaussian(device=device).log_prob([params[n] for n in self.names])

    def sample(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One draw from the prior, ``name -> tensor``.

        Example:
            >>> import torch
            >>> p = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0)
            >>> p.sample(torch.Generator().manual_seed(0))["w"].shape
            torch.Size([2])
        """
        draws = self.gaussian().sample(generator)
        return dict(zip(self.names, draws))

    @torch.no_grad()
    def init_model_(
        self, model: torch.nn.Module, *, buffers: bool = True, adapted_only: bool = False, **bind_kwargs: Any
    ) -> MatchResult:
        """Copy μ into the model's matching parameters and the prior's :attr:`buffers` (batch-norm running
        statistics) into the model's buffers, in place; returns the match used.

        Weights without their statistics are not the source solution: a batch-norm network given the SWA
        mean but the fresh model's running statistics predicts badly. A learned prior carries the
        statistics (recomputed for the SWA mean when the learner had data). When the prior has none
        (imported or isotropic priors written without them) and the model has batch norm, a warning says so
        and points to :func:`priorzoo.finetune.refresh_batchnorm_`, which re-estimates them from data.

        A value outside the model's dtype (float64 1e300 into float32) raises ``PriorMatchError``, copying nothing.

        Args:
            model: the model to initialise (prefixes such as ``module.``/``bert.`` are matched as by
                :meth:`match`).
            buffers: also copy the buffers (default). Buffers of the model's head, or missing in the model,
                are skipped (a warning names the missing ones).
            adapted_only: on a PEFT model, set only the adapted layers' base weights (see below).
            bind_kwargs: ``include``, ``exclude``, ``exclude_head``, ``allow_partial`` as for :meth:`bind`.

        On a PEFT model μ goes into the *base* weights W₀ (``….base_layer.weight``) of the whole adapted
        model, or only of its adapted layers with ``adapted_only=True``; the adapters keep their
        initialisation (LoRA's B = 0, so the effective weight starts at μ). A layer with merged adapters is
        refused (W₀ holds ΔW: unmerge it first).

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(2, 1)
            >>> p = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0, exclude=["bias"])
            >>> _ = p.init_model_(lin)
            >>> lin.weight.abs().sum().item()
            0.0
        """
        allow = {k: v for k, v in bind_kwargs.items() if k in ("include", "exclude", "exclude_head")}
        result = self.match(model, **allow)
        result.check(allow_partial=bool(bind_kwargs.get("allow_partial", False)))
        if adapted_only and not result.peft_methods:
            raise ValueError("`adapted_only=True` is for a PEFT model (it names adapted layers); this model has none")
        from priorzoo.binding.peft import check_unmerged

        check_unmerged(model)
        copy_into_model_(self, model, result, buffers=buffers, adapted_only=adapted_only)
        return result

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "2GB",
        factor_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        card: bool = True,
        repo_id: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write ``config.json``, the safetensors file(s) and a ``README.md`` card; atomically.

        Files are written under temporary names inside ``save_directory`` and renamed into place,
        ``config.json`` last (the commit point, :mod:`priorzoo.format.commit`; saves into one folder take a lock), so a
        failure leaves an earlier prior there intact. They carry one save id derived from their content: the
        same prior saved twice gives the same bytes, and readers refuse files of two saves. Above
        ``max_shard_size`` the tensors are split into ``prior-0000i-of-0000N.safetensors`` with a
        ``prior.safetensors.index.json``; stale shards are removed. A non-empty folder without a prior is refused.

        Args:
            save_directory: target folder (created if needed).
            max_shard_size: bytes, or a string like ``"2GB"``/``"500MB"``.
            factor_dtype: store the factor as ``float16``/``bfloat16`` to halve the file (mean and variance
                stay float32 unless ``dtype`` says otherwise).
            dtype: storage dtype of mean and variance (default float32).
            card: also render the model card ``README.md`` (see :mod:`priorzoo.format.cards`).
            repo_id: the Hub id the card's usage snippet and model-index name (default: a placeholder).
            overwrite: write into a non-empty folder without a prior too (nothing of it is removed).

        Example:
            >>> import tempfile, torch
            >>> p = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0)
            >>> folder = p.save_pretrained(tempfile.mkdtemp())
            >>> sorted(f.name for f in folder.iterdir())
            ['README.md', 'config.json', 'prior.safetensors']
        """
        return save_prior(
            self,
            save_directory,
            max_shard_size=max_shard_size,
            factor_dtype=factor_dtype,
            dtype=dtype,
            card=card,
            repo_id=repo_id,
            overwrite=overwrite,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        subfolder: str | None = None,
        device: torch.device | str | None = None,
        force_download: bool = False,
    ) -> PriorModel:
        """Load a prior from a local folder or a Hub repo id (``"org/name"``); never unpickles anything.

        A local folder is tried first; anything else is resolved through ``huggingface_hub``
        (``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``subfolder``, ``force_download`` as in
        transformers) at one resolved commit (see :func:`priorzoo.hub.fetch_prior`).
        Every tensor is read and validated once (finite; variance ≥ 0; shapes as in the config).

        Raises:
            PriorNotFoundError: no prior at that folder / repo / revision / subfolder (or offline and
                not cached).
            PriorFormatError: a corrupt, truncated or inconsistent prior (the message names the file or
                tensor).

        Example:
            >>> import tempfile, torch
            >>> prior = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0)
            >>> folder = prior.save_pretrained(tempfile.mkdtemp())
            >>> PriorModel.from_pretrained(folder).kind.value
            'isotropic'
        """
        from priorzoo.hub import fetch_prior

        def read(folder: Path) -> PriorModel:
            config, mean, variance, cov_factor, buffers = load_prior_folder(folder, device=device)
            return cls(config, mean, variance, cov_factor, buffers=buffers)

        hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        return fetch_prior(pretrained, read, subfolder=subfolder, force_download=force_download, **hub)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        max_shard_size: int | str = "2GB",
        factor_dtype: torch.dtype | str | None = None,
        create_pr: bool = False,
    ) -> CommitInfo:
        """Save to a temporary folder and upload it to ``repo_id`` as one commit (or a pull request).

        Returns huggingface_hub's ``CommitInfo`` (``.oid``, ``.commit_url``, ``.pr_url``). Re-pushing an
        unchanged prior makes no new commit (see :func:`priorzoo.hub.upload_prior`).

        Example:
            >>> prior.push_to_hub("me/resnet50-imagenet-swag", private=True).commit_url  # doctest: +SKIP
        """
        from priorzoo.hub import upload_prior

        with tempfile.TemporaryDirectory(prefix="priorzoo-push-") as tmp:
            folder = self.save_pretrained(
                Path(tmp) / "prior", max_shard_size=max_shard_size, factor_dtype=factor_dtype, repo_id=repo_id
            )
            return upload_prior(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message or f"Upload priorzoo {self.kind.value} prior",
                revision=revision,
                subfolder=subfolder,
                create_pr=create_pr,
            )
