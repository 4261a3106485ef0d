r"""Import Gaussian posteriors saved by other code as priorzoo priors.

Three sources, each read with ``torch.load(weights_only=True)`` (nothing arbitrary is unpickled) and each
returned as a :class:`~priorzoo.PriorModel` that saves in the priorzoo format:

* :func:`from_pretrain_your_loss` — the released priors of Shwartz-Ziv et al. 2022 ("Pre-Train Your
  Loss", github.com/hsouri/BayesianTransferLearning): four files ``<prefix>_model.pt`` (a torchvision
  ResNet-50 ``state_dict`` without ``fc``), ``<prefix>_mean.pt`` [P], ``<prefix>_variance.pt`` [P] and
  ``<prefix>_covmat.pt`` [K, P], flattened over ``backbone.parameters()`` in order.
* :func:`from_swa_gaussian` — a ``SWAG`` model's ``state_dict`` from Maddox et al.'s swa_gaussian
  (``<module>.<param>_mean``, ``_sq_mean``, ``_cov_mat_sqrt`` [K, numel], ``n_models``).
* :func:`from_laplace_torch` — a laplace-torch ``DiagLaplace``/``DiagLLLaplace`` (object or its saved
  ``state_dict()``): posterior precision ``H/(σ²T) + prior_precision``, mean at the MAP.

**Scale convention of the official release.** The official code (``priorBox/sghmc/utils.py::load_prior``
and ``losses.py``) builds ``LowRankMultivariateNormal(mean, (λ·C[:k])ᵀ, λ·v + ε)``, i.e.
``Σ_official = λ·diag(v) + λ²·CᵀC + εI`` with v = ``_variance.pt`` = clamp(E[w²] − w̄², 1e-6), C =
``_covmat.pt`` = D/√(K−1) and k = ``number_of_samples_prior`` (default 5, the *first* k rows). Scaling
the factor by λ instead of √λ is a defect (noted by Harvey et al., TMLR 2024): the low-rank part grows as
λ². priorzoo stores v and C[:k] unchanged (``convention="official"``) and its density is
``λ(diag(v) + CᵀC) + εI``. So λ = 1 gives exactly the official density, and for every λ the diagonal
part and ε mean the same as the official ``prior_scale``/``prior_eps`` (paper defaults 1e10 / 0.1); only
the low-rank part is scaled correctly (by λ, not λ²). ``convention="swag"`` instead halves v and divides
C by √2, the priorzoo/Maddox SWAG convention ½(Σ_diag + DDᵀ/(K−1)) that :class:`~priorzoo.learn.SWAGCollector`
writes, so that λ means the same for imported and priorzoo-learned priors.

Example:
    >>> from priorzoo.convert import from_pretrain_your_loss
    >>> prior = from_pretrain_your_loss("priors/resnet50_ssl_prior")  # doctest: +SKIP
    >>> prior.with_scale(1e10, eps=0.1).save_pretrained("resnet50-ssl-prior")  # doctest: +SKIP
"""

from __future__ import annotations

import enum
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from priorzoo.binding.matching import Patterns, compile_patterns, pattern_strings, select_parameters
from priorzoo.enums import Convention
from priorzoo.errors import PriorFormatError
from priorzoo.prior import PriorModel

__all__ = ["OFFICIAL_SUFFIXES", "from_laplace_torch", "from_pretrain_your_loss", "from_swa_gaussian"]

OFFICIAL_SUFFIXES = ("_model.pt", "_mean.pt", "_variance.pt", "_covmat.pt")
"""The four files of an official "Pre-Train Your Loss" prior, after its path prefix."""

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_OFFICIAL_DEFAULTS = {"prior_scale": 1e10, "prior_eps": 0.1, "number_of_samples_prior": 5, "scale_low_rank": True}


def _load(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {str(path)!r}")
    try:
        with torch.serialization.safe_globals(_laplace_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PriorFormatError(
            f"{path}: refused to load ({what}) — it is not a torch file of plain tensors/state dicts that "
            f"`torch.load(weights_only=True)` reads, and priorzoo never unpickles arbitrary code "
            f"({_torch_detail(err)}). Re-save plain tensors/state dicts with torch.save"
        ) from None
    except Exception as err:  # a file that is not a torch file at all fails anywhere in the unpickler
        raise PriorFormatError(
            f"{path}: not a readable torch file ({what}): {type(err).__name__}: {_torch_detail(err)}"
        ) from None


def _torch_detail(err: BaseException) -> str:
    """The part of a ``torch.load`` error that says what is wrong, without torch's advice to retry with
    ``weights_only=False`` (that would run the file's code: priorzoo never suggests it)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.rpartition("WeightsUnpickler error:")[2].split("Check the documentation")[0]
    elif "weights_only" in text:
        text = "the file needs objects beyond plain tensors"
    return " ".join(text.split()) or "no detail"


def _tensor(obj: Any, path: str, dims: int) -> Tensor:
    if not isinstance(obj, Tensor):
        raise PriorFormatError(f"{path}: expected a tensor, found {type(obj).__name__}")
    if obj.dim() != dims or not obj.dtype.is_floating_point:
        raise PriorFormatError(
            f"{path}: expected a {dims}-D floating tensor, found shape {tuple(obj.shape)} {obj.dtype}"
        )
    return obj


def _blocks(flat: Tensor, layout: Sequence[tuple[str, tuple[int, ...], int, bool]]) -> dict[str, Tensor]:
    """Cut the last dim of ``flat`` into the named blocks marked ``keep``."""
    out, off = {}, 0
    for name, shape, numel, keep in layout:
        if keep:
            block = flat[..., off : off + numel]
            out[name] = block.reshape(*flat.shape[:-1], *shape).clone()
        off += numel
    return out


# ---------------------------------------------------------------------------------------------- official
def from_pretrain_your_loss(
    prefix: str | os.PathLike,
    *,
    num_factors: int | None = 5,
    convention: str = "official",
    scale: float | None = None,
    eps: float = 0.0,
    backbone: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> PriorModel:
    r"""Read an official "Pre-Train Your Loss" prior (four ``.pt`` files at ``prefix``) as a PriorModel.

    The parameter layout (names, shapes, order) comes from ``<prefix>_model.pt``: the official loader
    flattens ``backbone.parameters()`` of a torchvision ResNet with ``fc = Identity`` (``raw_params=True``),
    so the vector covers the state-dict entries that are parameters, in order (BN running statistics are
    buffers and are skipped). A vector flattened over the whole ``state_dict()`` (``raw_params=False``)
    is also recognised; the prior is then the exact marginal on the parameter entries.

    Args:
        prefix: path prefix, e.g. ``priors/resnet50_ssl_prior`` for ``priors/resnet50_ssl_prior_mean.pt``.
        num_factors: rows of ``_covmat.pt`` to keep — the official ``number_of_samples_prior`` (default 5)
            takes the *first* rows; ``None`` keeps all, 0 makes a diagonal prior.
        convention: ``"official"`` (tensors as stored; λ = 1 is the official density, see the module
            docstring) or ``"swag"`` (½·v and C/√2, the priorzoo SWAG convention).
        scale, eps: λ and ε stored in the prior (the official defaults were λ = 1e10, ε = 0.1).
        backbone, source, license: provenance (default backbone: timm ``resnet50``, whose parameter names
            equal torchvision's, when the layout is a ResNet-50).

    Raises:
        FileNotFoundError: one of the four files is missing.
        PriorFormatError: a file is not a tensor of the expected shape, or the lengths disagree.

    Example:
        >>> prior = from_pretrain_your_loss("resnet50_ssl_prior", num_factors=5)  # doctest: +SKIP
        >>> prior.match(timm.create_model("resnet50", num_classes=10)).no_prior  # doctest: +SKIP
        ['fc.weight', 'fc.bias']
    """
    convention = Convention.check(convention).value
    prefix = str(prefix)
    paths = {s: prefix + s for s in OFFICIAL_SUFFIXES}
    missing = [p for p in paths.values() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"an official prior is four files {[Path(prefix).name + s for s in OFFICIAL_SUFFIXES]}; missing: {missing}"
        )
    state = _load(paths["_model.pt"], "official prior backbone weights")
    if isinstance(state, Mapping):
        for key in ("state_dict", "resnet"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PriorFormatError(f"{paths['_model.pt']}: expected a state_dict of tensors, found {type(state).__name__}")
    entries = [(k, tuple(v.shape), v.numel()) for k, v in state.items() if not k.startswith("fc.")]

    mean = _tensor(_load(paths["_mean.pt"], "prior mean"), paths["_mean.pt"], 1)
    variance = _tensor(_load(paths["_variance.pt"], "prior variance"), paths["_variance.pt"], 1)
    covmat = _tensor(_load(paths["_covmat.pt"], "prior low-rank factor"), paths["_covmat.pt"], 2)
    p = mean.numel()
    if variance.numel() != p or covmat.shape[1] != p:
        raise PriorFormatError(
            f"official prior {prefix!r}: lengths disagree — mean {p}, variance {variance.numel()}, covmat "
            f"{tuple(covmat.shape)} (expected [K, {p}])"
        )
    params_only = [(k, s, n, True) for k, s, n in entries if k.rsplit(".", 1)[-1] not in _BN_BUFFERS]
    full_state = [(k, s, n, k.rsplit(".", 1)[-1] not in _BN_BUFFERS) for k, s, n in entries]
    if sum(n for _, _, n, _ in params_only) == p:
        layout, layout_name = params_only, "parameters"
    elif sum(n for _, _, n, _ in full_state) == p:
        layout, layout_name = full_state, "state_dict"
    else:
        raise PriorFormatError(
            f"official prior {prefix!r}: the vectors have {p} entries, but {paths['_model.pt']} has "
            f"{sum(n for *_, n, _ in params_only)} parameter entries and {sum(n for *_, n, _ in full_state)} "
            "state-dict entries without `fc.*`; is `_model.pt` the backbone these vectors were learned on?"
        )
    k_all = int(covmat.shape[0])
    k = k_all if num_factors is None else num_factors
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= k_all:
        raise ValueError(
            f"`num_factors` must be None or an integer in [0, {k_all}] (rows of the covmat); received {num_factors!r}"
        )
    var_scale, factor_scale = (1.0, 1.0) if convention == "official" else (0.5, math.sqrt(0.5))
    mean_d = _blocks(mean.float(), layout)
    var_d = {n: t * var_scale for n, t in _blocks(variance.float(), layout).items()}
    factor_d = {n: t * factor_scale for n, t in _blocks(covmat[:k].float(), layout).items()} if k > 0 else None
    names = list(mean_d)
    if backbone is None:
        # ResNet-50 without fc: 159 parameter tensors, 23,508,032 weights, first `conv1.weight`
        is_r50 = len(names) == 159 and sum(t.numel() for t in mean_d.values()) == 23_508_032
        backbone = (
            {
                "library": "timm",
                "name": "resnet50",
                "architecture": "ResNet",
                "note": "official release: torchvision resnet50 without fc; timm resnet50 has the same parameter names",
            }
            if is_r50
            else {"library": "torch", "architecture": "torchvision ResNet (fc removed)"}
        )
    return PriorModel.from_tensors(
        mean_d,
        var_d,
        factor_d,
        scale=scale,
        eps=eps,
        kind="swag",
        backbone=backbone,
        source=source,
        learning={
            "method": "swag",
            "imported_from": "pretrain-your-loss",
            "reference": "Shwartz-Ziv et al. 2022, github.com/hsouri/BayesianTransferLearning",
            "files": [Path(v).name for v in paths.values()],
            "layout": layout_name,
            "num_factors": k,
            "covmat_rows": k_all,
            "convention": convention,
            "official_defaults": dict(_OFFICIAL_DEFAULTS),
            "scale_note": (
                "priorzoo Σ = λ(diag(v) + FᵀF) + εI; the official code used λ·diag(v) + λ²·FᵀF + ε "
                "(factor scaled by λ, not √λ); identical at λ = 1"
            ),
        },
        exclude=["fc.*"],
        license=license,
    )


# ---------------------------------------------------------------------------------------------- swa_gaussian
def from_swa_gaussian(
    checkpoint: str | os.PathLike | Mapping[str, Tensor],
    *,
    prefix: str = "base.",
    exclude: Patterns = None,
    swag_scale: float = 0.5,
    var_clamp: float = 1e-30,
    max_num_models: int | None = None,
    scale: float | None = None,
    eps: float = 0.0,
    backbone: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> PriorModel:
    r"""Convert a swa_gaussian ``SWAG(...).state_dict()`` (or a checkpoint ``{"state_dict": ...}``).

    swa_gaussian replaces every parameter ``<module>.<p>`` of the wrapped ``base`` model by buffers
    ``<module>.<p>_mean``, ``<module>.<p>_sq_mean`` and (with ``no_cov_mat=False``) ``<module>.<p>_cov_mat_sqrt``
    of shape [K, numel], whose rows are the deviations w_i − w̄_i (running mean after snapshot i), oldest
    first; ``n_models`` counts the snapshots. Its ``sample(scale, cov=True)`` draws from
    ``N(w̄, scale·(diag(clamp(sq_mean − mean², var_clamp)) + CᵀC/(max_num_models − 1)))`` and the SWAG
    paper uses scale = ½. This importer writes v = swag_scale·clamp(sq_mean − mean², var_clamp) and
    F = √swag_scale·C/√(K − 1) — with the default ½ exactly the priorzoo SWAG convention — where K is
    ``max_num_models`` if given, else the number of stored rows (equal once n_models ≥ max_num_models).

    Args:
        checkpoint: a path to a ``torch.save``\ d state dict / checkpoint, or the mapping itself.
        prefix: prefix of the wrapped model in the keys (``"base."`` in swa_gaussian), stripped from names.
        exclude: parameters to leave out of the prior (exact marginal), e.g. the head ``"fc.*"``.
        swag_scale, var_clamp, max_num_models: see above.
        scale, eps: λ (default: not chosen, see :meth:`~priorzoo.PriorModel.resolve_scale`) and ε of the prior.
        backbone, source, license: provenance for the config and card (``source``: the source task, e.g.
            ``{"dataset": "cifar10", "objective": "supervised"}``).

    Example:
        >>> prior = from_swa_gaussian("swag-300.pt", exclude="linear.*")  # doctest: +SKIP
    """
    state: Any = (
        _load(checkpoint, "swa_gaussian SWAG state dict") if not isinstance(checkpoint, Mapping) else checkpoint
    )
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise PriorFormatError(f"expected a SWAG state_dict (mapping), found {type(state).__name__}")
    if swag_scale <= 0 or not math.isfinite(swag_scale):
        raise ValueError(f"`swag_scale` must be a finite number > 0; received {swag_scale!r}")
    bases = [
        k[: -len("_sq_mean")] for k in state if k.endswith("_sq_mean") and k[: -len("_sq_mean")] + "_mean" in state
    ]
    if not bases:
        raise PriorFormatError(
            "no `<param>_mean`/`<param>_sq_mean` buffer pairs found: not a swa_gaussian SWAG state dict "
            f"(keys such as {list(state)[:4]})"
        )
    if "n_models" not in state:
        raise PriorFormatError("the SWAG state dict has no `n_models` buffer")
    n_models = int(torch.as_tensor(state["n_models"]).reshape(-1)[0])
    if n_models < 2:
        raise PriorFormatError(f"the SWAG model collected {n_models} snapshot(s); a variance needs at least 2")
    drop = compile_patterns(exclude)
    mean_d: dict[str, Tensor] = {}
    var_d: dict[str, Tensor] = {}
    factor_d: dict[str, Tensor] = {}
    rows: set[int] = set()
    for base in bases:
        name = base[len(prefix) :] if prefix and base.startswith(prefix) else base
        if drop is not None and drop(name):
            continue
        m = state[base + "_mean"].to(torch.float64)
        sq = state[base + "_sq_mean"].to(torch.float64)
        mean_d[name] = m.float()
        var_d[name] = (swag_scale * torch.clamp(sq - m * m, min=var_clamp)).float()
        cov = state.get(base + "_cov_mat_sqrt")
        if cov is not None:
            if cov.dim() != 2 or cov.shape[1] != m.numel():
                raise PriorFormatError(f"`{base}_cov_mat_sqrt` has shape {tuple(cov.shape)}; expected [K, {m.numel()}]")
            rows.add(int(cov.shape[0]))
            factor_d[name] = cov.reshape(cov.shape[0], *m.shape).to(torch.float64)
    if not mean_d:
        raise PriorFormatError(f"`exclude`={exclude!r} removed every parameter of the SWAG state dict")
    if factor_d and len(factor_d) != len(mean_d):
        raise PriorFormatError("some parameters have `_cov_mat_sqrt` buffers and some do not")
    if len(rows) > 1:
        raise PriorFormatError(f"`_cov_mat_sqrt` buffers disagree on the number of rows K: {sorted(rows)}")
    k = rows.pop() if rows else 0
    factor_out = None
    if k >= 2:
        denom = (max_num_models if max_num_models is not None else k) - 1
        if denom < 1:
            raise ValueError(f"`max_num_models` must be ≥ 2; received {max_num_models!r}")
        c = math.sqrt(swag_scale / denom)
        factor_out = {n: (f * c).float() for n, f in factor_d.items()}
    return PriorModel.from_tensors(
        mean_d,
        var_d,
        factor_out,
        scale=scale,
        eps=eps,
        kind="swag",
        backbone=dict(backbone or {"library": "torch"}),
        source=source,
        learning={
            "method": "swag",
            "imported_from": "swa_gaussian",
            "reference": "Maddox et al. 2019, github.com/wjmaddox/swa_gaussian",
            "snapshots": n_models,
            "rank": k if k >= 2 else 0,
            "swag_scale": swag_scale,
            "var_clamp": var_clamp,
        },
        exclude=pattern_strings(exclude),
        license=license,
    )


# ---------------------------------------------------------------------------------------------- laplace-torch
class _Likelihood(str, enum.Enum):
    """Stand-in for ``laplace.utils.enums.Likelihood`` so saved state dicts load with weights_only=True."""

    REGRESSION = "regression"
    CLASSIFICATION = "classification"
    REWARD_MODELING = "reward_modeling"


def _laplace_safe_globals() -> list[Any]:
    return [(_Likelihood, "laplace.utils.enums.Likelihood")]


_DIAG_CLASSES = ("DiagLaplace", "DiagLLLaplace")


def _last_layer_names(model: nn.Module) -> list[str]:
    last = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        raise ValueError("the model has no parameters")
    return [
        f"{last}.{n}" if last else n
        for n, p in model.get_submodule(last).named_parameters(recurse=False)
        if p.requires_grad
    ]


def from_laplace_torch(
    posterior: Any,
    model: nn.Module | None = None,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    scale: float | None = None,
    eps: float = 0.0,
    backbone: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> PriorModel:
    r"""Convert a laplace-torch diagonal Laplace posterior N(θ_MAP, P⁻¹) into a prior (kind ``laplace``).

    laplace-torch (Immer, Daxberger et al.) stores the MAP as a flat ``mean`` over the Laplace's
    parameters (``parameters_to_vector``: the model's ``requires_grad`` parameters in order for
    ``DiagLaplace``; the last layer's for ``DiagLLLaplace``) and the diagonal Hessian/GGN ``H``. Its
    posterior precision is ``P = H / (σ²·T) + prior_precision`` (``_H_factor = 1/σ²/T``; σ =
    ``sigma_noise``, T = ``temperature``; ``prior_precision`` a scalar, one value per parameter tensor, or
    one per weight). The prior's variance is 1/P.

    Args:
        posterior: a fitted ``DiagLaplace``/``DiagLLLaplace`` object, its ``state_dict()``, or a path to a
            ``torch.save(la.state_dict(), path)`` file.
        model: the network the Laplace was fitted on (gives the names and shapes of the flat vectors).
        include, exclude: pick the Laplace's parameters among ``model``'s (default: all trainable ones, or
            the last module with parameters for ``DiagLLLaplace``) — they must cover the vector exactly.
        scale, eps: λ (default: not chosen, see :meth:`~priorzoo.PriorModel.resolve_scale`) and ε of the prior.
        backbone, source, license: provenance for the config and card (``source``: the source task).

    Raises:
        PriorFormatError: not a diagonal Laplace (full/Kron/low-rank precisions are not diagonal), or the
            vector length does not match the selected parameters.

    Example:
        >>> la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")  # doctest: +SKIP
        >>> la.fit(train_loader)  # doctest: +SKIP
        >>> prior = from_laplace_torch(la, model, exclude="fc.*")  # doctest: +SKIP
    """
    if model is None:
        raise TypeError("from_laplace_torch() needs `model`, the network the Laplace was fitted on")
    if isinstance(posterior, (str, os.PathLike)):
        state = _load(posterior, "laplace-torch state dict")
    elif isinstance(posterior, Mapping):
        state = posterior
    elif hasattr(posterior, "state_dict") and callable(posterior.state_dict):
        state = posterior.state_dict()
    else:
        raise TypeError(
            "`posterior` must be a laplace-torch Laplace object, its state_dict() or a path; "
            f"received {type(posterior).__name__}"
        )
    if not isinstance(state, Mapping) or "mean" not in state or "H" not in state:
        raise PriorFormatError("not a laplace-torch state dict (it needs `mean`, `H`, `prior_precision`, `cls_name`)")
    cls_name = str(state.get("cls_name", ""))
    if cls_name not in _DIAG_CLASSES:
        raise PriorFormatError(
            f"laplace-torch posterior `{cls_name}` is not supported: only diagonal posteriors "
            f"({', '.join(_DIAG_CLASSES)}) map onto a priorzoo prior; fit with hessian_structure='diag'"
        )
    mean = torch.as_tensor(state["mean"]).detach().reshape(-1).to(torch.float64)
    h = torch.as_tensor(state["H"]).detach().reshape(-1).to(torch.float64)
    p = mean.numel()
    if h.numel() != p:
        raise PriorFormatError(f"laplace `H` has {h.numel()} entries but `mean` has {p}")
    if include is None and cls_name == "DiagLLLaplace":
        include = _last_layer_names(model)
    params = select_parameters(model, include=include, exclude=exclude)
    sizes = [q.numel() for q in params.values()]
    if sum(sizes) != p:
        raise PriorFormatError(
            f"the Laplace vector has {p} entries but the selected parameters of {type(model).__name__} have "
            f"{sum(sizes)} ({len(params)} tensors); pass include=/exclude= so they match the Laplace's parameters"
        )
    sigma = float(torch.as_tensor(state.get("sigma_noise", 1.0)).reshape(-1)[0])
    temperature = float(torch.as_tensor(state.get("temperature", 1.0)).reshape(-1)[0])
    pp = torch.as_tensor(state.get("prior_precision", 1.0)).detach().reshape(-1).to(torch.float64)
    if pp.numel() == 1:
        pp_diag = pp.expand(p)
    elif pp.numel() == p:
        pp_diag = pp
    elif pp.numel() == len(sizes):
        pp_diag = torch.cat([v.expand(n) for v, n in zip(pp, sizes)])
    else:
        raise PriorFormatError(
            f"`prior_precision` has {pp.numel()} entries; expected 1, one per parameter tensor ({len(sizes)}) or {p}"
        )
    precision = h / (sigma**2 * temperature) + pp_diag
    if not bool(torch.isfinite(precision).all()) or bool((precision <= 0).any()):
        raise PriorFormatError("the Laplace posterior precision is not finite and > 0 everywhere (was it fitted?)")
    layout = [(n, tuple(q.shape), q.numel(), True) for n, q in params.items()]
    mean_d = {n: t.float() for n, t in _blocks(mean, layout).items()}
    var_d = {n: t.float() for n, t in _blocks(1.0 / precision, layout).items()}
    likelihood = state.get("likelihood")
    return PriorModel.from_tensors(
        mean_d,
        var_d,
        kind="laplace",
        scale=scale,
        eps=eps,
        backbone=dict(backbone) if backbone is not None else _describe(model),
        source=source,
        learning={
            "method": "laplace",
            "imported_from": "laplace-torch",
            "class": cls_name,
            "likelihood": getattr(likelihood, "value", likelihood) if likelihood is not None else None,
            "sigma_noise": sigma,
            "temperature": temperature,
            "n_data": int(state["n_data"]) if state.get("n_data") is not None else None,
            "formula": "variance = 1 / (H / (sigma_noise^2 * temperature) + prior_precision)",
        },
        exclude=pattern_strings(exclude),
        license=license,
    )


def _describe(model: nn.Module) -> dict[str, Any]:
    from priorzoo.learn.provenance import describe_backbone

    return describe_backbone(model)
