"""Model cards for priors: metadata through huggingface_hub's ``ModelCardData``, a body from ``model_cards/``.

The card (``README.md`` of a prior folder or Hub repo) has YAML front matter that the Hub indexes, built
with ``huggingface_hub.ModelCardData`` and ``EvalResult`` (:func:`card_data`):

- ``library_name: priorzoo``, ``license`` (when recorded), ``tags`` (``priorzoo``, ``bayesian-prior``, the
  kind, ``transfer-learning``, the backbone's library);
- ``base_model`` only when pre-trained weights were loaded from the Hub (``backbone.pretrained`` true, or an
  explicit ``backbone.hub_id``): a random-init backbone (``pretrained: false``) or one whose weights are not
  recorded claims none;
- ``datasets`` only for a source dataset the user marked as a Hub dataset (``source.hub_id``, or
  ``source.hub_dataset: true`` when ``source.dataset`` is itself the Hub id): a local name is no Hub page;
- ``model-index`` only for the prior's *own* downstream results (``role: prior``, the default) on a marked Hub
  dataset: baselines (``role: baseline``) and source-task numbers (``role: source``) stay in the body.
- ``priorzoo``: the backbone as recorded (``library``, ``architecture``, and ``name`` unless it is a local
  folder's), which the Hub's list API returns with the card, so ``priorzoo list --backbone`` finds a prior by
  architecture even when it claims no ``base_model`` (see :mod:`priorzoo.hub_list`).

The body says what the prior is (with a link to the paper, arXiv 2205.10279), where its recommended λ comes
from (:func:`scale_provenance`: measured on a named task, or the rule of thumb, or not said), how it was
learned, every recorded result, and code that runs as written for its backbone's library (timm, transformers
with a PEFT variant, torchvision; a function for any other PyTorch model).

Results live in ``config.results`` (schema: :mod:`priorzoo.format.card_results`).

Example:
    >>> from priorzoo.format.config import PriorConfig, ParameterSpec
    >>> card = render_card(PriorConfig(kind="diagonal", rank=0, parameters=[ParameterSpec("w", (2,))]))
    >>> card.splitlines()[1]
    'library_name: priorzoo'
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from priorzoo.format.card_results import (
    RESULT_ROLES,
    backbone_modality,
    eval_results,
    finite_number,
    format_number,
    hub_repo_id,
    model_index,
    result_rows,
)
from priorzoo.format.config import PriorConfig

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

__all__ = [
    "DEFAULT_TEMPLATE",
    "PAPER_URL",
    "RESULT_ROLES",
    "card_data",
    "card_metadata",
    "install_lines",
    "model_index",
    "render_card",
    "result_rows",
    "scale_provenance",
]

DEFAULT_TEMPLATE = "prior_card.md.j2"
"""File name of the default card template in ``model_cards/``."""

PAPER_URL = "https://arxiv.org/abs/2205.10279"
"""The method's paper ("Pre-Train Your Loss", Shwartz-Ziv et al., NeurIPS 2022); the Hub tags a card that links
an arXiv paper with ``arxiv:<id>`` and lists the model on the paper's page."""

_KIND_DESCRIPTIONS = {
    "swag": "a SWAG Gaussian (Maddox et al. 2019): the SGD trajectory's mean, a diagonal variance and a "
    "rank-K factor of the last K deviations",
    "diagonal": "a diagonal Gaussian (one variance per weight, e.g. from an empirical Fisher, EWC-style)",
    "isotropic": "an isotropic Gaussian centred on the source weights (one variance for every weight: L2-SP)",
    "laplace": "a diagonal Laplace approximation of the source posterior (imported from laplace-torch)",
}

# keys of `config.learning` shown first, in this order, in the "How it was learned" table
_LEARNING_ORDER = (
    "method",
    "objective",
    "snapshots",
    "rank",
    "max_rank",
    "epochs",
    "warmup_epochs",
    "schedule",
    "lr",
    "swa_lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "collect_every",
    "cycle_steps",
    "min_var",
    "moments",
    "image_size",
    "max_length",
    "seed",
    "reference",
)
# `config.learning` keys about λ: shown in "Choosing λ", not in the learning table
_SCALE_KEYS = ("recommended_scale_rule", "recommended_scale_measured")
# `config.backbone` keys that only mean something when pre-trained weights were loaded (timm names its default
# weights and their tag even for a random init)
_WEIGHT_KEYS = ("default_weights", "tag", "hub_id", "base_model", "weights")

_PIP_EXTRAS = {"timm": "timm", "transformers": "transformers,peft", "torchvision": "torchvision"}

_BIBTEX = """@inproceedings{shwartzziv2022pretrain,
  title     = {Pre-Train Your Loss: Easy {B}ayesian Transfer Learning with Informative Priors},
  author    = {Shwartz-Ziv, Ravid and Goldblum, Micah and Souri, Hossein and Kapoor, Sanyam and
               Zhu, Chen and LeCun, Yann and Wilson, Andrew Gordon},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022},
  eprint    = {2205.10279},
  archivePrefix = {arXiv}
}"""


# ------------------------------------------------------------------------------------------- helpers
def _template_text(template: str) -> str:
    """Template text: installed wheels carry ``model_cards/`` as ``priorzoo.model_cards`` (see
    pyproject.toml); an editable install or a source checkout reads the top-level ``model_cards/``."""
    try:
        return resources.files("priorzoo.model_cards").joinpath(template).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        path = Path(__file__).resolve().parents[2] / "model_cards" / template
        if not path.is_file():
            raise FileNotFoundError(f"model card template {template!r} not found (looked in {path.parent})") from None
        return path.read_text(encoding="utf-8")


def _pretrained(backbone: Mapping[str, Any]) -> bool | None:
    """Whether pre-trained weights were loaded: ``True``/``False`` as recorded, ``None`` when not recorded."""
    value = backbone.get("pretrained")
    return value if isinstance(value, bool) else None


def _base_model(backbone: Mapping[str, Any]) -> str | None:
    """The Hub id of the weights the prior was learned from, only when the config says they were loaded.

    An explicit ``hub_id`` (or ``base_model``) is the user's statement of it, unless ``pretrained: false``
    contradicts it (a random init, whatever ``hub_id`` timm's ``pretrained_cfg`` names). Otherwise only
    ``pretrained: true`` turns a name into a claim: a timm name with a pretrained tag (``resnet50.a1_in1k``)
    maps to ``timm/<name>``, a transformers name that is a Hub id is used as it is (not a local folder's name,
    recorded with ``local: true``). A bare name without
    ``pretrained: true`` says nothing about the weights (a transformers config's ``_name_or_path`` is the
    same for ``from_pretrained`` and ``from_config``), so it claims nothing.
    """
    pretrained = _pretrained(backbone)
    if pretrained is False:
        return None
    for key in ("hub_id", "base_model"):
        explicit = hub_repo_id(backbone.get(key))
        if explicit:
            return explicit
    name = backbone.get("name")
    if pretrained is not True or not isinstance(name, str) or backbone.get("local"):  # a folder's name: no Hub id
        return None
    library = backbone.get("library")
    if library == "timm":
        return hub_repo_id(f"timm/{name}") if "." in name and "/" not in name else None
    if library == "transformers":
        return hub_repo_id(name)
    return None


def _source_datasets(source: Mapping[str, Any]) -> list[str]:
    """The Hub ids of the source data the user marked as Hub datasets (``hub_id``, or ``hub_dataset: true``)."""
    explicit = hub_repo_id(source.get("hub_id"))
    if explicit:
        return [explicit]
    if source.get("hub_dataset") is True and not source.get("local"):
        marked = hub_repo_id(source.get("dataset"))
        if marked:
            return [marked]
    return []


# ------------------------------------------------------------------------------------------- λ
def scale_provenance(config: PriorConfig) -> dict[str, str] | None:
    """Where the prior's ``recommended_scale`` comes from, for the card; ``None`` when none is recorded.

    Returns ``{"value", "origin", "detail"}`` with ``origin`` one of

    - ``measured``: :meth:`~priorzoo.format.config.PriorConfig.record_measured_scale` recorded the task it was
      measured on (``learning["recommended_scale_measured"]``, the ``detail``);
    - ``rule``: the learner's rule of thumb (``learning["recommended_scale_rule"]``, the ``detail``), which
      gives this very value — a starting point, not a measurement;
    - ``recorded``: a value without a record of how it was chosen.

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=0, parameters=[ParameterSpec("w", (2,))], recommended_scale=1e4,
        ...                   learning={"recommended_scale_rule": "10^round(log10(...)) = 10000 (70% at the floor)"})
        >>> scale_provenance(cfg)["origin"]
        'rule'
        >>> cfg.record_measured_scale(3e4, measured_on="validation NLL of my task")
        >>> scale_provenance(cfg)["origin"], scale_provenance(cfg)["value"]
        ('measured', '30000')
    """
    value = config.recommended_scale
    if value is None:
        return None
    shown = format_number(value)
    measured = config.learning.get("recommended_scale_measured")
    if isinstance(measured, str) and measured.strip():
        return {"value": shown, "origin": "measured", "detail": " ".join(measured.split())}
    rule = config.learning.get("recommended_scale_rule")
    if isinstance(rule, str) and re.search(rf"= {re.escape(shown)}(\s|$)", rule):
        return {"value": shown, "origin": "rule", "detail": " ".join(rule.split())}
    return {"value": shown, "origin": "recorded", "detail": ""}


# ------------------------------------------------------------------------------------------- metadata
def card_data(config: PriorConfig, *, repo_id: str | None = None) -> ModelCardData:
    """The card's metadata as ``huggingface_hub.ModelCardData`` (see the module docstring for each key).

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))],
        ...                   backbone={"library": "timm", "name": "resnet18", "pretrained": False},
        ...                   source={"dataset": "my-data"})
        >>> data = card_data(cfg)
        >>> data.library_name, data.base_model, data.datasets
        ('priorzoo', None, None)
    """
    from huggingface_hub import ModelCardData

    tags = ["priorzoo", "bayesian-prior", config.kind.value, "transfer-learning"]
    library = config.backbone.get("library")
    if library in ("timm", "transformers", "torchvision"):
        tags.append(str(library))
    evals = eval_results(config)
    return ModelCardData(
        library_name="priorzoo",
        # unknown: no `license: other`, which the Hub requires to name (license_name/link)
        license=str(config.license).lower() if config.license else None,
        tags=tags,
        base_model=_base_model(config.backbone),
        datasets=_source_datasets(config.source) or None,
        model_name=(repo_id or f"priorzoo-{config.kind.value}-prior") if evals else None,
        eval_results=evals or None,
        priorzoo=_backbone_record(config.backbone) or None,
    )


def _backbone_record(backbone: Mapping[str, Any]) -> dict[str, str]:
    """The card's ``priorzoo`` mapping: what the backbone is (library, architecture, name), for the Hub's list
    API; a local folder's name is left out (it names nothing a reader can fetch), and so is a timm pretrained
    tag of weights that were not loaded."""
    keys = ("library", "architecture") if backbone.get("local") else ("library", "architecture", "name")
    out = {k: str(backbone[k]) for k in keys if isinstance(backbone.get(k), str) and backbone[k]}
    if "name" in out and backbone.get("library") == "timm" and _pretrained(backbone) is not True:
        out["name"] = out["name"].split(".", 1)[0]  # a pretrained tag names weights that were not loaded
    return out


def card_metadata(config: PriorConfig, *, repo_id: str | None = None) -> dict[str, Any]:
    """The card's YAML front matter as a dict: :func:`card_data` as ``ModelCardData.to_dict()`` writes it.

    Keys: ``library_name`` (``priorzoo``), ``license`` (lower-cased; left out when not recorded), ``tags``, and
    when known ``base_model``, ``datasets`` and ``model-index`` (named ``repo_id``, else
    ``priorzoo-<kind>-prior``).

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))])
        >>> card_metadata(cfg)["tags"]
        ['priorzoo', 'bayesian-prior', 'swag', 'transfer-learning']
    """
    return card_data(config, repo_id=repo_id).to_dict()


# ------------------------------------------------------------------------------------------- rendering
def install_lines(library: str | None = None) -> list[str]:
    """Shell lines that install priorzoo (with the extra for ``library``), true for this release.

    priorzoo is not published on PyPI (``pip install priorzoo`` finds nothing): the lines install it from its
    source repository — the ``Source``/``Repository``/``Homepage`` URL of the installed distribution's metadata
    when it has one, else a checkout of the repository.

    Example:
        >>> install_lines("timm")[-1].startswith("pip install")
        True
    """
    import importlib.metadata as md

    extra = _PIP_EXTRAS.get(str(library), "")
    suffix = f"[{extra}]" if extra else ""
    url = None
    try:
        for entry in md.metadata("priorzoo").get_all("Project-URL") or []:
            label, _, link = entry.partition(",")
            if label.strip().lower() in ("source", "repository", "homepage") and link.strip().startswith("https://"):
                url = link.strip()
                break
    except md.PackageNotFoundError:
        pass
    if url:
        return [
            "# priorzoo is not on PyPI: install it from its git repository",
            f"pip install {shlex.quote(f'priorzoo{suffix} @ git+{url}')}",
        ]
    return [
        "# priorzoo is not on PyPI (`pip install priorzoo` finds nothing): install it from a checkout of its",
        "# source repository, e.g. `git clone <priorzoo repository URL> priorzoo`, then",
        f"pip install {shlex.quote(f'./priorzoo{suffix}')}",
    ]


def _learning_items(learning: Mapping[str, Any]) -> list[tuple[str, str]]:
    keys = [k for k in _LEARNING_ORDER if k in learning]
    keys += sorted(k for k in learning if k not in _LEARNING_ORDER and k not in _SCALE_KEYS)
    return [
        (k, format_number(learning[k]) if finite_number(learning[k]) is not None else str(learning[k])) for k in keys
    ]


def _backbone_items(backbone: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The backbone table rows; weight names only when pre-trained weights were loaded."""
    pretrained = _pretrained(backbone) is True
    skip = {"library", "name", "pretrained"} | (set() if pretrained else set(_WEIGHT_KEYS))
    return sorted((str(k), str(v)) for k, v in backbone.items() if k not in skip)


def _model_ref(config: PriorConfig, base_model: str | None) -> str:
    """The name to create the backbone with in the usage snippets."""
    bb = config.backbone
    if bb.get("library") in ("timm", "torchvision"):
        name = str(bb.get("name") or bb.get("architecture") or "MODEL_NAME").removeprefix("timm/")
        if bb.get("library") == "timm" and base_model is None and "/" not in name and ":" not in name:
            name = name.split(".", 1)[0]  # the architecture only: a pretrained tag names weights not loaded
        return name
    return base_model or str(bb.get("name") or "MODEL_ID_OR_FOLDER")


def _load_weights(config: PriorConfig, base_model: str | None) -> bool:
    """Whether the snippets create the backbone with pre-trained weights: the ones the prior was learned from,
    when the snippet can name them (a timm Hub id; torchvision's default weights; a transformers id or folder)."""
    library = config.backbone.get("library")
    if library == "timm":
        return base_model is not None
    return _pretrained(config.backbone) is True and (library in ("torchvision", "transformers") or bool(base_model))


def _weights_desc(config: PriorConfig, base_model: str | None) -> str:
    pretrained = _pretrained(config.backbone)
    if pretrained is False:
        return "none: a random initialisation (`pretrained: false`)"
    if base_model:
        return f"pre-trained, [{base_model}](https://huggingface.co/{base_model})"
    if pretrained:
        source = config.backbone.get("checkpoint") or config.backbone.get("weights")
        return "pre-trained, from weights that are not a Hub model" + (f" (`{source}`)" if source else "")
    return "not recorded"


def _init_comment(config: PriorConfig) -> str:
    """The snippet's comment on a backbone created without pre-trained weights (no ``base_model``)."""
    pretrained = _pretrained(config.backbone)
    if pretrained is False:
        return "no pre-trained weights: the prior was learned from a random initialisation; its mean μ supplies them"
    if pretrained:
        return "the prior was learned from weights that are not a Hub model; its mean μ supplies the ones it covers"
    return "the prior records no pre-trained weights; its mean μ supplies the ones it covers"


def render_card(
    config: PriorConfig,
    *,
    repo_id: str | None = None,
    description: str | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> str:
    """Render the model card (README.md text) for a prior with this config.

    Args:
        config: the prior's config (everything on the card comes from it).
        repo_id: the Hub repo (or folder) the prior is published at: the snippets load it from there, and it
            names the model-index; default ``config.learning["repo_id"]``, else a placeholder.
        description: a paragraph about this prior shown under the title (e.g. a zoo entry's description).
        template: file name of a template in ``model_cards/``.

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> text = render_card(PriorConfig(kind="isotropic", rank=0, parameters=[ParameterSpec("w", (3,))]))
        >>> "library_name: priorzoo" in text
        True
    """
    import jinja2

    source_text = _template_text(template)
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False, trim_blocks=True
    )
    # strings from a config reach the card's code snippets: quote them as literals, never paste them raw
    env.filters["py_str"] = lambda value: json.dumps(str(value), ensure_ascii=False)  # a valid Python literal
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    env.filters["one_line"] = lambda value: " ".join(str(value).split())  # stays inside a `#` comment
    repo = repo_id or config.learning.get("repo_id") or "path/to/this-prior"
    data = card_data(config, repo_id=repo_id or config.learning.get("repo_id"))
    bb = config.backbone
    library = str(bb.get("library") or "torch")
    base_model = data.base_model if isinstance(data.base_model, str) else None
    model_ref = _model_ref(config, base_model)
    # a timm name's pretrained tag names weights: shown only when they were loaded
    bb_name = model_ref if library == "timm" else bb.get("name") or bb.get("architecture")
    backbone_desc = " ".join(str(x) for x in (library if bb.get("library") else None, bb_name) if x)
    provenance = scale_provenance(config)
    lam = config.scale if config.scale is not None else 1.0  # not chosen: the density uses 1
    modality = backbone_modality(config)
    rows = result_rows(config)
    image_size = finite_number(config.learning.get("image_size"))
    return env.from_string(source_text).render(
        front_matter=data.to_yaml().strip(),
        title=f"priorzoo {config.kind.value} prior for {backbone_desc or 'an unnamed backbone'}",
        description=description.strip() if description else None,
        paper_url=PAPER_URL,
        install_lines=install_lines(library),
        repo_id=repo,
        kind=config.kind.value,
        kind_desc=_KIND_DESCRIPTIONS.get(config.kind.value, config.kind.value),
        rank=config.rank,
        num_tensors=len(config.parameters),
        num_parameters=config.num_parameters,
        scale=format_number(lam),
        eps=format_number(config.eps),
        scale_provenance=provenance,
        usage_scale=provenance["value"] if provenance else format_number(lam),
        exclude_desc=", ".join(f"`{e}`" for e in config.exclude) or "none",
        format_version=config.format_version,
        priorzoo_version=config.priorzoo_version,
        library=library,
        backbone_desc=backbone_desc or "an unnamed backbone",
        backbone_items=_backbone_items(bb),
        weights_desc=_weights_desc(config, base_model),
        init_comment=_init_comment(config),
        backbone_local=bool(bb.get("local")),
        # a prior over some layers only (recorded as `covered_layers`): the snippets let the rest train without it
        partial=", allow_partial=True" if bb.get("covered_layers") else "",
        covered_desc=", ".join(str(x) for x in bb.get("covered_layers") or []),
        base_model=base_model,
        pretrained=_load_weights(config, base_model),
        model_ref=model_ref,
        modality=modality,
        image_size=int(image_size) if image_size else None,
        auto_class=("AutoModelForImageClassification" if modality == "image" else "AutoModelForSequenceClassification"),
        source_items=sorted(
            (str(k), str(v))
            for k, v in config.source.items()
            if k not in ("dataset", "objective", "hub_dataset", "hub_id")
        ),
        source_dataset=config.source.get("dataset") or config.source.get("hub_id") or "not recorded",
        source_hub_datasets=data.datasets or [],
        objective=config.source.get("objective") or "not recorded",
        learning_items=_learning_items(config.learning),
        transfer_results=[r for r in rows if r["role"] != "source"],
        source_results=[r for r in rows if r["role"] == "source"],
        indexed=bool(data.eval_results),
        license=data.license or "not recorded",
        bibtex=_BIBTEX,
    )
