"""Model cards for priors: a Jinja template from ``model_cards/`` rendered with the prior's config.

The card's YAML front matter carries ``library_name: priorzoo``, ``tags`` (``priorzoo``,
``bayesian-prior``, the kind), ``base_model`` and ``datasets`` when known, ``license``, and a
``model-index`` with the recorded transfer results. It parses with ``huggingface_hub.ModelCard``.

Example:
    >>> from priorzoo.config import PriorConfig, ParameterSpec
    >>> card = render_card(PriorConfig(kind="diagonal", rank=0, parameters=[ParameterSpec("w", (2,))]))
    >>> card.splitlines()[1]
    'library_name: priorzoo'
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from priorzoo.config import PriorConfig

__all__ = ["card_metadata", "render_card"]

DEFAULT_TEMPLATE = "prior_card.md.j2"


def _template_text(template: str) -> str:
    """Template text: installed wheels carry ``model_cards/`` as ``priorzoo.model_cards`` (see
    pyproject.toml); an editable install or a source checkout reads the top-level ``model_cards/``."""
    try:
        return resources.files("priorzoo.model_cards").joinpath(template).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        path = Path(__file__).resolve().parents[1] / "model_cards" / template
        if not path.is_file():
            raise FileNotFoundError(f"model card template {template!r} not found (looked in {path.parent})") from None
        return path.read_text(encoding="utf-8")


def card_metadata(config: PriorConfig, *, repo_id: str | None = None) -> dict[str, Any]:
    """The card's YAML front matter as a dict.

    Example:
        >>> from priorzoo.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))])
        >>> card_metadata(cfg)["tags"]
        ['priorzoo', 'bayesian-prior', 'swag']
    """
    meta: dict[str, Any] = {
        "library_name": "priorzoo",
        "tags": ["priorzoo", "bayesian-prior", config.kind.value],
        "license": config.license or "other",
    }
    bb = config.backbone
    if bb.get("hub_id") or (bb.get("name") and "/" in str(bb.get("name"))):
        meta["base_model"] = bb.get("hub_id") or bb["name"]
    elif bb.get("library") == "timm" and bb.get("name"):
        meta["base_model"] = f"timm/{bb['name']}"
    if config.source.get("dataset"):
        meta["datasets"] = [str(config.source["dataset"])]
    if config.results:
        entries = []
        for r in config.results:
            entries.append(
                {
                    "task": {"type": str(r.get("task", "image-classification"))},
                    "dataset": {"name": str(r.get("dataset", "unknown")), "type": str(r.get("dataset", "unknown"))},
                    "metrics": [{"type": str(r.get("metric", "accuracy")), "value": r.get("value")}],
                }
            )
        meta["model-index"] = [{"name": repo_id or "priorzoo-prior", "results": entries}]
    return meta


def render_card(config: PriorConfig, *, repo_id: str | None = None, template: str = DEFAULT_TEMPLATE) -> str:
    """Render the model card (README.md text) for a prior with this config.

    Example:
        >>> from priorzoo.config import PriorConfig, ParameterSpec
        >>> text = render_card(PriorConfig(kind="isotropic", rank=0, parameters=[ParameterSpec("w", (3,))]))
        >>> "library_name: priorzoo" in text
        True
    """
    import jinja2

    source = _template_text(template)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    bb = config.backbone
    backbone_desc = (
        " ".join(str(x) for x in (bb.get("library"), bb.get("name") or bb.get("architecture")) if x)
        or "an unnamed backbone"
    )
    repo = repo_id or config.learning.get("repo_id") or "path/to/this-prior"
    return env.from_string(source).render(
        front_matter=yaml.safe_dump(card_metadata(config, repo_id=repo_id), sort_keys=False).strip(),
        title=f"priorzoo {config.kind.value} prior for {backbone_desc}",
        backbone_desc=backbone_desc,
        kind=config.kind.value,
        rank=config.rank,
        num_tensors=len(config.parameters),
        num_parameters=config.num_parameters,
        scale=config.scale,
        eps=config.eps,
        recommended_scale=config.recommended_scale,
        exclude_desc=", ".join(f"`{e}`" for e in config.exclude) or "none",
        format_version=config.format_version,
        source=config.source,
        learning_items=sorted(config.learning.items()),
        results=config.results,
        repo_id=repo,
    )
