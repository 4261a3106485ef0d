"""Finding priors on the Hub: ``list_models`` filtered to ``library_name: priorzoo``, and by backbone.

The Hub's list API returns each repo's card metadata (``cardData=True``) and tags, so a prior's backbone can
be matched without downloading anything: ``base_model`` (the card's field, and the Hub's ``base_model:…``
tags) and the architecture priorzoo records in the card's ``priorzoo`` mapping (``architecture``,
``backbone``). :func:`list_priors` keeps the priors for one backbone; ``priorzoo list --backbone`` shows
them with their base model and architecture columns.

Example:
    >>> from types import SimpleNamespace
    >>> info = SimpleNamespace(card_data={"base_model": "timm/resnet50.a1_in1k"}, tags=[])
    >>> matches_backbone(info, "resnet50"), matches_backbone(info, "resnet18")
    (True, False)
"""

from __future__ import annotations

from typing import Any

from priorzoo.hub import LIBRARY_NAME, hub_api, refuse_offline
from priorzoo.hub_limits import Progress, run_bounded

__all__ = ["backbone_of", "list_priors", "matches_backbone"]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def backbone_of(info: Any) -> dict[str, list[str]]:
    """The backbone a listed prior is for, from what the Hub list API exposes: ``base_model`` (card metadata,
    and the Hub's ``base_model:…`` tags) and the architecture recorded in the card's ``priorzoo`` metadata.

    Example:
        >>> from types import SimpleNamespace
        >>> card = {"base_model": "timm/resnet18.a1_in1k", "priorzoo": {"architecture": "resnet18"}}
        >>> backbone_of(SimpleNamespace(card_data=card, tags=["base_model:timm/resnet18.a1_in1k"]))
        {'base_model': ['timm/resnet18.a1_in1k'], 'architecture': ['resnet18']}
    """
    card = info.card_data
    card = card.to_dict() if hasattr(card, "to_dict") else dict(card or {})
    base = _as_list(card.get("base_model"))
    for tag in info.tags or []:
        if tag.startswith("base_model:") and tag.count(":") == 1 and tag[11:] not in base:
            base.append(tag[11:])
    meta = card.get(LIBRARY_NAME) if isinstance(card.get(LIBRARY_NAME), dict) else {}
    arch = _as_list(meta.get("architecture")) + [a for a in _as_list(meta.get("backbone")) if a not in base]
    return {"base_model": base, "architecture": list(dict.fromkeys(arch))}


def matches_backbone(info: Any, backbone: str) -> bool:
    """``backbone`` names this prior's base model or architecture: exactly (case-insensitive), or as the
    model name after the organisation (``resnet18.a1_in1k`` for ``timm/resnet18.a1_in1k``), or as that name
    without the pretrained tag (``resnet18``)."""
    want = backbone.strip().lower()
    found = backbone_of(info)
    for name in found["base_model"] + found["architecture"]:
        name = name.lower()
        short = name.rsplit("/", 1)[-1]
        if want in (name, short, short.split(".", 1)[0]):
            return True
    return False


def list_priors(
    *,
    search: str | None = None,
    author: str | None = None,
    backbone: str | None = None,
    token: str | bool | None = None,
    limit: int | None = None,
) -> list[Any]:
    """List the priors on the Hub: model repos whose card says ``library_name: priorzoo``.

    Args:
        search: substring of the repo id.
        author: user or organisation.
        backbone: only priors for this backbone: its Hub id (``timm/resnet18.a1_in1k``), the model name
            (``resnet18.a1_in1k``), the architecture (``resnet18``, ``BertModel``); matched against the card's
            ``base_model`` and the architecture priorzoo records (see :func:`backbone_of`).
        token: Hub token (private repos you can see are included).
        limit: at most this many results (after the ``backbone`` filter).

    Returns:
        ``huggingface_hub.ModelInfo`` objects (``.id``, ``.tags``, ``.card_data`` with ``base_model`` …).

    Raises:
        huggingface_hub.errors.OfflineModeIsEnabled: HF_HUB_OFFLINE is set.
        huggingface_hub.errors.HfHubHTTPError: the Hub could not answer.

    Example:
        >>> [m.id for m in list_priors(backbone="resnet50")]  # doctest: +SKIP
        ['priorzoo/resnet50-imagenet-swag']
    """
    refuse_offline("list the priors on the Hub")
    api = hub_api(token)

    def work(progress: Progress) -> list[Any]:
        progress.begin("listing the priors on the Hub")
        out = []
        for info in api.list_models(
            filter=LIBRARY_NAME, search=search, author=author, limit=None if backbone else limit, cardData=True
        ):
            progress.event()
            if info.library_name != LIBRARY_NAME and LIBRARY_NAME not in (info.tags or []):
                continue
            if backbone is not None and not matches_backbone(info, backbone):
                continue
            out.append(info)
            if limit is not None and len(out) >= limit:
                break
        return out

    return run_bounded(work, what="listing the priors on the Hub")
