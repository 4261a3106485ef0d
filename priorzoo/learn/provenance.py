"""What a learned prior records about where it came from: the parameters it covers (and the ones it leaves out,
the head among them) and the backbone they belong to, for ``config.json`` and the model card (a local folder by
its name only: :mod:`priorzoo.format.local_paths`).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    >>> params, head = select_prior_parameters(net, include=None, exclude="1.*", exclude_head=True, head=None,
    ...                                        what="example")
    >>> list(params), recorded_exclude(net, params, "1.*"), describe_backbone(net)["library"]
    (['0.weight', '0.bias'], ['1.*'], 'torch')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from priorzoo.binding.matching import (
    Patterns,
    compile_patterns,
    pattern_strings,
    resolve_head,
    select_parameters,
    warn_if_output_layer,
)
from priorzoo.format.local_paths import names_local_file, public_name

__all__ = ["describe_backbone", "recorded_exclude", "select_prior_parameters"]


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
