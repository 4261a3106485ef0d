"""Small helpers shared by the learners (and the fine-tuning loop): backbone provenance, optional imports,
argument checks, batches on a device, the ``exclude`` record of a learned prior, checkpoint trees.

Nothing here is public API; the learners re-export what users need.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from priorzoo._validation import check_float, check_positive_int  # noqa: F401 (the learners import them here)
from priorzoo.binding.matching import (
    Patterns,
    compile_patterns,
    pattern_strings,
    resolve_head,
    select_parameters,
    warn_if_output_layer,
)
from priorzoo.format.provenance import names_local_file, public_name

__all__: list[str] = []

_EXTRAS = {
    "timm": "timm",
    "transformers": "transformers",
    "datasets": "datasets",
    "accelerate": "transformers",
}


def require(module: str, extra: str | None = None, *, what: str = "") -> Any:
    """Import an optional dependency or raise an ImportError naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = extra or _EXTRAS.get(top, top)
        purpose = f" for {what}" if what else ""
        raise ImportError(
            f"`{top}` is needed{purpose} but could not be imported ({err}); "
            f'install it with `pip install "priorzoo[{extra}]"`'
        ) from err


def describe_backbone(model: torch.nn.Module) -> dict[str, Any]:
    """Provenance of a backbone for ``config.json``: library, name, architecture (best effort).

    timm models carry ``pretrained_cfg`` (``architecture``; its ``hf_hub_id`` is kept as ``default_weights``,
    not ``hub_id``, since timm sets it for a random init too); transformers models carry ``config``
    (``_name_or_path``, ``model_type``); anything else is described by its class.
    """
    inner = getattr(model, "module", model) if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    cfg = getattr(inner, "pretrained_cfg", None) or getattr(inner, "default_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        out: dict[str, Any] = {
            "library": "timm",
            "name": str(cfg["architecture"]),
            "architecture": type(inner).__name__,
        }
        if cfg.get("tag"):
            out["tag"] = str(cfg["tag"])
        if cfg.get("hf_hub_id"):
            # timm names its default weights even for a random init: recorded, never claimed as `hub_id`
            # (the card's base_model); say where the weights came from with backbone={"hub_id": …, "pretrained": True}
            out["default_weights"] = str(cfg["hf_hub_id"])
        return out
    hf_cfg = getattr(inner, "config", None)
    if hf_cfg is not None and hasattr(hf_cfg, "model_type"):
        out = {"library": "transformers", "architecture": type(inner).__name__, "model_type": str(hf_cfg.model_type)}
        name = getattr(hf_cfg, "_name_or_path", "") or getattr(hf_cfg, "name_or_path", "")
        if name:
            out["name"] = public_name(str(name))  # a local folder by its name, never its path
            if names_local_file(str(name)):
                out["local"] = True  # a folder's name is no Hub id
        return out
    return {"library": "torch", "architecture": type(inner).__name__}


def move_to_device(batch: Any, device: torch.device | str | None, *, non_blocking: bool = False) -> Any:
    """The tensors of a batch (tensor / mapping / list / tuple, nested) moved to ``device`` (``None``: as is)."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device, non_blocking=non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking=non_blocking) for v in batch)
    return batch


def recorded_exclude(model: torch.nn.Module, chosen: Iterable[str], exclude: Patterns) -> list[str]:
    """What a learned prior's ``config.exclude`` records: the user's string ``exclude`` patterns plus the
    name of every other trainable parameter left out (the head, or what ``include`` did not pick)."""
    patterns = pattern_strings(exclude)
    covered = compile_patterns(patterns) if patterns else None
    chosen = set(chosen)
    others = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and n not in chosen and not (covered is not None and covered(n))
    ]
    return patterns + others


def select_prior_parameters(
    model: torch.nn.Module,
    *,
    include: Patterns,
    exclude: Patterns,
    exclude_head: bool,
    head: Patterns,
    what: str,
) -> tuple[dict[str, torch.nn.Parameter], list[str]]:
    """The parameters a learned prior covers and the head it leaves out: ``(name -> parameter, head names)``.

    The head is ``head`` (patterns; ``[]`` for none) or, by default, the one rule of
    :func:`priorzoo.binding.matching.head_parameter_names`. With the default, a selection that still contains what
    looks like an output layer triggers a warning naming it (:func:`priorzoo.binding.matching.warn_if_output_layer`).
    """
    params = select_parameters(model, include=include, exclude=exclude)
    head_names = sorted(resolve_head(model, head)) if exclude_head else []
    if head_names:
        hs = set(head_names)
        params = {n: p for n, p in params.items() if n not in hs}
    if exclude_head and head is None and params:
        warn_if_output_layer(model, set(params), what)
    if not params:
        total = sum(1 for _ in model.named_parameters())
        raise ValueError(
            f"{what}: no parameter selected (include={include!r}, exclude={exclude!r}, head "
            f"{head_names or 'none'}; the model has {total} named parameters, only those with "
            "requires_grad=True are eligible)"
        )
    return params, head_names


def norm_buffers(model: torch.nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.nn.Module]:
    """``module name -> module`` of every normalisation layer that tracks running statistics (BatchNorm,
    SyncBatchNorm, InstanceNorm with ``track_running_stats``), except modules whose parameters are all in
    ``skip`` (the head)."""
    skip = set(skip)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            own = [f"{name}.{n}" for n, _ in m.named_parameters()]
            if own and all(o in skip for o in own):
                continue
            if m.running_mean is not None:
                out[name] = m
    return out


def running_statistics(model: torch.nn.Module, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """CPU copies of the normalisation layers' running statistics, ``"<layer>.running_mean"`` etc. (float32
    for the statistics, int64 for ``num_batches_tracked``), in model order."""
    out: dict[str, torch.Tensor] = {}
    for name, m in norm_buffers(model, skip).items():
        pre = f"{name}." if name else ""
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(m, key, None)
            if isinstance(t, torch.Tensor):
                dtype = torch.int64 if not t.dtype.is_floating_point else torch.float32
                out[pre + key] = t.detach().to("cpu", dtype, copy=True)
    return out


def variance_floor_fraction(variance: Mapping[str, torch.Tensor], floor: float) -> float:
    """Fraction of the stored variances at (or within 0.1 % above) ``floor`` (0 when ``floor`` is 0)."""
    if floor <= 0:
        return 0.0
    hits = sum(int((v <= floor * 1.001).sum()) for v in variance.values())
    return hits / max(sum(v.numel() for v in variance.values()), 1)


def recommend_scale(
    mean: Mapping[str, torch.Tensor],
    variance: Mapping[str, torch.Tensor],
    cov_factor: Mapping[str, torch.Tensor] | None = None,
    *,
    floor: float = 0.0,
) -> tuple[float, str]:
    r"""The documented default λ of a learned prior: ``(λ, description of the rule)``.

        A SWAG variance measures how far SGD wandered at the SWA learning rate, not how far a downstream task may
        move a weight; most variances sit at the ``min_var`` floor (88 % in a real ImageNet prior), so at λ = 1
        the precision is ~1e6 per weight: fine-tuning is pinned, or SGD diverges along the stiffest directions
        (a step of lr·1/(Nλv) per unit of displacement). The rule puts the prior standard deviation of the
        *typical* (median) weight at the root-mean-square size of the weights:

        .. math:: \lambda^\star = 10^{\operatorname{round}\log_{10}
            \left(\operatorname{mean}_i \mu_i^2 ig/ \operatorname{median}_i \Sigma^{(1)}_{ii}
    ight)}, \qquad
            \Sigma^{(1)}_{ii} = v_i + \sum_k F_{ki}^2,

        clipped to [1, 1e10] (the paper's search range). The median (not the mean) of the variances, because the
        few weights SGD moved a lot would otherwise hide the floor where most weights sit. It is a starting
        point, not a tuned value: :func:`priorzoo.finetune.tune_scale` searches λ on the downstream task.

        Example:
            >>> import torch
            >>> lam, rule = recommend_scale({"w": torch.full((10,), 0.1)}, {"w": torch.full((10,), 1e-6)})
            >>> lam
            10000.0
    """
    num = sum(float(m.double().pow(2).sum()) for m in mean.values())
    count = sum(m.numel() for m in mean.values())
    diag = []
    for n, v in variance.items():
        d = v.detach().reshape(-1).double()
        if cov_factor is not None:
            d = d + cov_factor[n].detach().double().reshape(cov_factor[n].shape[0], -1).pow(2).sum(0)
        diag.append(d)
    flat = torch.cat(diag) if diag else torch.zeros(0, dtype=torch.float64)
    if flat.numel() > 1_000_000:  # the median of an even stride is exact enough and O(1e6)
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    typical = float(flat.median()) if flat.numel() else 0.0
    frac = variance_floor_fraction(variance, floor)
    if num <= 0 or typical <= 0 or not count:
        lam = 1.0
    else:
        lam = float(10.0 ** min(max(round(math.log10(num / count / typical)), 0), 10))
    rule = (
        f"10^round(log10(mean mean^2 / median diag Sigma(lambda=1))) = {lam:g} "
        f"({frac:.0%} of the variances at the floor)"
    )
    return lam, rule


# ---------------------------------------------------------------------------------------------- checkpoints
def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, meta: Mapping[str, Any]
) -> Path:
    """Write ``tensors`` plus a JSON document (under header key ``priorzoo``) to ``path`` atomically.

    The file is written next to its destination and moved in with ``os.replace``: an interrupted save
    leaves the previous checkpoint intact.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata={"format": "pt", "priorzoo": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_safetensors_with_meta(path: str | os.PathLike, *, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`atomic_save_safetensors`: ``(tensors, json document)``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors {what} ({err})") from None
    if "priorzoo" not in header:
        raise ValueError(f"{path}: a safetensors file, but not a priorzoo {what} (no `priorzoo` header entry)")
    try:
        meta = json.loads(header["priorzoo"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt `priorzoo` header entry ({err})") from None
    return tensors, meta


def flatten_tree(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}``, storing it in ``tensors``.

    Used to write optimizer and RNG state into safetensors + JSON (never pickle).
    """
    if isinstance(tree, torch.Tensor):
        key = prefix.rstrip(".")
        tensors[key] = tree
        return {"__tensor__": key}
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out[str(k)] = flatten_tree(v, f"{prefix}{k}.", tensors)
        if any(not isinstance(k, str) for k in tree):
            out["__int_keys__"] = True
        return out
    if isinstance(tree, (list, tuple)):
        return {
            "__list__": [flatten_tree(v, f"{prefix}{i}.", tensors) for i, v in enumerate(tree)],
            "__tuple__": isinstance(tree, tuple),
        }
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store a {type(tree).__name__} at `{prefix.rstrip('.')}` in a checkpoint")


def unflatten_tree(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_tree`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__list__" in tree:
            items = [unflatten_tree(v, tensors) for v in tree["__list__"]]
            return tuple(items) if tree.get("__tuple__") else items
        int_keys = tree.get("__int_keys__", False)
        return {(int(k) if int_keys else k): unflatten_tree(v, tensors) for k, v in tree.items() if k != "__int_keys__"}
    return tree
