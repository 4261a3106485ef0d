"""Model cards for priors: a Jinja template from ``model_cards/`` rendered with the prior's config.

The card (``README.md`` of a prior folder or Hub repo) has YAML front matter that the Hub indexes —
``library_name: priorzoo``, ``license``, ``tags`` (``priorzoo``, ``bayesian-prior``, the kind, …),
``base_model`` (the backbone's Hub id, when the prior was learned from published weights), ``datasets``
(the source data, when it is a Hub dataset) and a ``model-index`` with the recorded transfer results — and
a body that tells a user what the prior is, how it was learned, which λ to use, how it transferred, and how
to fine-tune with it from timm or transformers. Cards parse with ``huggingface_hub.ModelCard`` and their
``model-index`` round-trips through ``huggingface_hub``'s ``EvalResult``.

Transfer results live in ``config.results``, one dict per number::

    {"task": "image-classification",   # Hub task id (default: from the backbone's library)
     "dataset": "mnist",               # dataset id (model-index ``dataset.type``); required
     "dataset_name": "MNIST",          # pretty name (default: ``dataset``)
     "split": "test", "dataset_config": None,
     "metric": "accuracy",             # metric id (model-index ``metrics[].type``); required
     "value": 0.91,                    # a number; required (non-numbers stay out of the model-index)
     "method": "SGD + learned prior",  # what was run (fine-tuning method), shown in the table
     "num_train_examples": 100,        # downstream training-set size N
     "scale": 1e4,                     # λ used
     "metric_name": None,              # default: "<metric> (<method>, N=<n>, λ=<scale>)"
     "notes": "", "source_name": None, "source_url": None}

Results with the same task, dataset, config and split form one model-index entry (as
``huggingface_hub.repocard_data.eval_results_to_model_index`` groups them); each becomes one metric there.

Example:
    >>> from priorzoo.format.config import PriorConfig, ParameterSpec
    >>> card = render_card(PriorConfig(kind="diagonal", rank=0, parameters=[ParameterSpec("w", (2,))]))
    >>> card.splitlines()[1]
    'library_name: priorzoo'
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from priorzoo.format.config import PriorConfig

__all__ = ["DEFAULT_TEMPLATE", "card_metadata", "model_index", "render_card", "result_rows"]

DEFAULT_TEMPLATE = "prior_card.md.j2"
"""File name of the default card template in ``model_cards/``."""

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

_IMAGE_MODEL_TYPES = frozenset(
    {"vit", "deit", "beit", "swin", "swinv2", "convnext", "convnextv2", "resnet", "regnet", "dinov2", "efficientnet"}
)

_BIBTEX = """@inproceedings{shwartzziv2022pretrain,
  title     = {Pre-Train Your Loss: Easy {B}ayesian Transfer Learning with Informative Priors},
  author    = {Shwartz-Ziv, Ravid and Goldblum, Micah and Souri, Hossein and Kapoor, Sanyam and
               Zhu, Chen and LeCun, Yann and Wilson, Andrew Gordon},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022}
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


def _hub_id(value: Any) -> str | None:
    """``value`` when it is a valid Hub repo id (not written as a local path: ``./``, ``/``, ``~``), else ``None``.

    The file system is not consulted, so a card renders the same bytes wherever it is rendered.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value or value.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _base_model(backbone: Mapping[str, Any]) -> str | None:
    """The Hub id of the weights the prior was learned from, when it can be told for sure.

    A backbone without loaded pre-trained weights (``pretrained: false``: a random init, whatever
    ``hub_id`` timm's ``pretrained_cfg`` names) has none; otherwise an explicit ``hub_id`` (or
    ``base_model``) wins. A timm name with a pretrained tag (``resnet50.a1_in1k``) maps to ``timm/<name>``; a bare
    timm name (``resnet50``) is ambiguous (which weights?) and is left out. A transformers name that is a
    Hub id (not a local folder) is used as it is.
    """
    if backbone.get("pretrained") is False:
        return None
    for key in ("hub_id", "base_model"):
        explicit = _hub_id(backbone.get(key))
        if explicit:
            return explicit
    name = backbone.get("name")
    if not isinstance(name, str):
        return None
    library = backbone.get("library")
    if library == "timm":
        return _hub_id(f"timm/{name}") if "." in name and "/" not in name else None
    if library == "transformers":
        return _hub_id(name)
    return None


def _default_task(config: PriorConfig) -> str:
    return "text-classification" if _modality(config) == "text" else "image-classification"


def _modality(config: PriorConfig) -> str:
    """``"image"`` or ``"text"``: what the backbone reads (recorded, else guessed from the backbone)."""
    for where in (config.source, config.backbone):
        modality = where.get("modality")
        if modality in ("image", "text"):
            return str(modality)
    bb = config.backbone
    if bb.get("library") == "timm" or config.source.get("objective") == "simclr":
        return "image"
    arch = str(bb.get("architecture") or "")
    if "ImageClassification" in arch or str(bb.get("model_type") or "") in _IMAGE_MODEL_TYPES:
        return "image"
    if bb.get("library") == "transformers" or config.source.get("objective") == "mlm":
        return "text"
    return "image"


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _fmt_scale(value: Any) -> str:
    number = _number(value)
    return f"{number:g}" if number is not None else str(value)


# ------------------------------------------------------------------------------------------- results
def result_rows(config: PriorConfig) -> list[dict[str, Any]]:
    """``config.results`` normalised for the card: every key of the module docstring's schema present.

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))], backbone={"library": "timm"},
        ...                   results=[{"dataset": "mnist", "metric": "accuracy", "value": 0.9, "method": "SGD"}])
        >>> row = result_rows(cfg)[0]
        >>> row["task"], row["dataset_name"], row["metric_name"]
        ('image-classification', 'mnist', 'accuracy (SGD)')
    """
    rows = []
    for i, raw in enumerate(config.results):
        if not isinstance(raw, Mapping):
            raise TypeError(f"`results[{i}]` must be an object (dict); received {raw!r:.80}")
        r = dict(raw)
        dataset = str(r.get("dataset") or r.get("dataset_type") or "unknown")
        metric = str(r.get("metric") or r.get("metric_type") or "accuracy")
        n = r.get("num_train_examples", r.get("n_train"))
        details = [str(r["method"])] if r.get("method") else []
        details += [f"N={n}"] if n is not None else []
        details += [f"λ={_fmt_scale(r['scale'])}"] if r.get("scale") is not None else []
        rows.append(
            {
                "task": str(r.get("task") or r.get("task_type") or _default_task(config)),
                "task_name": r.get("task_name"),
                "dataset": dataset,
                "dataset_name": str(r.get("dataset_name") or dataset),
                "dataset_config": r.get("dataset_config"),
                "split": r.get("split") or r.get("dataset_split"),
                "metric": metric,
                "metric_name": str(r.get("metric_name") or (f"{metric} ({', '.join(details)})" if details else metric)),
                "value": r.get("value"),
                "method": str(r.get("method") or ""),
                "num_train_examples": n,
                "scale": r.get("scale"),
                "scale_desc": _fmt_scale(r["scale"]) if r.get("scale") is not None else "",
                "notes": str(r.get("notes") or ""),
                "source_name": r.get("source_name"),
                "source_url": r.get("source_url"),
            }
        )
    return rows


def model_index(config: PriorConfig, *, name: str) -> list[dict[str, Any]]:
    """The ``model-index`` of the card: numeric results grouped by (task, dataset, config, split).

    The structure is exactly what ``huggingface_hub.repocard_data.eval_results_to_model_index`` writes, so
    ``ModelCardData`` parses it into ``EvalResult`` objects and writes it back unchanged. Empty (``[]``)
    when no result has a numeric value.

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))],
        ...                   results=[{"task": "image-classification", "dataset": "mnist", "metric": "accuracy",
        ...                             "value": 0.9}])
        >>> model_index(cfg, name="org/prior")[0]["results"][0]["metrics"]
        [{'type': 'accuracy', 'value': 0.9, 'name': 'accuracy'}]
    """
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in result_rows(config):
        value = _number(row["value"])
        if value is None:
            continue
        key = (row["task"], row["dataset"], row["dataset_config"], row["split"])
        if key not in groups:
            task = {"type": row["task"]}
            if row["task_name"]:
                task["name"] = str(row["task_name"])
            dataset = {"name": row["dataset_name"], "type": row["dataset"]}
            if row["dataset_config"]:
                dataset["config"] = str(row["dataset_config"])
            if row["split"]:
                dataset["split"] = str(row["split"])
            entry: dict[str, Any] = {"task": task, "dataset": dataset, "metrics": []}
            if row["source_url"]:
                entry["source"] = {"url": str(row["source_url"])}
                if row["source_name"]:
                    entry["source"]["name"] = str(row["source_name"])
            groups[key] = entry
        groups[key]["metrics"].append({"type": row["metric"], "value": value, "name": row["metric_name"]})
    if not groups:
        return []
    return [{"name": name, "results": list(groups.values())}]


# ------------------------------------------------------------------------------------------- metadata
def card_metadata(config: PriorConfig, *, repo_id: str | None = None) -> dict[str, Any]:
    """The card's YAML front matter as a dict (what the Hub indexes and ``ModelCard.data`` holds).

    Keys: ``library_name`` (``priorzoo``), ``license`` (``config.license`` lower-cased; left out when not
    recorded), ``tags``, and when known ``base_model``, ``datasets`` and ``model-index`` (named
    ``repo_id``, else ``priorzoo-<kind>-prior``).

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))])
        >>> card_metadata(cfg)["tags"]
        ['priorzoo', 'bayesian-prior', 'swag', 'transfer-learning']
    """
    tags = ["priorzoo", "bayesian-prior", config.kind.value, "transfer-learning"]
    library = config.backbone.get("library")
    if library in ("timm", "transformers"):
        tags.append(str(library))
    meta: dict[str, Any] = {
        "library_name": "priorzoo",
        "tags": tags,
    }
    if config.license:  # unknown: no `license: other`, which the Hub requires to name (license_name/link)
        meta["license"] = str(config.license).lower()
    base = _base_model(config.backbone)
    if base:
        meta["base_model"] = base
    dataset = _hub_id(config.source.get("hub_id"))
    if dataset is None and not config.source.get("local"):  # a local folder's name is no Hub dataset
        dataset = _hub_id(config.source.get("dataset"))
    if dataset:
        meta["datasets"] = [dataset]
    index = model_index(config, name=repo_id or f"priorzoo-{config.kind.value}-prior")
    if index:
        meta["model-index"] = index
    return meta


# ------------------------------------------------------------------------------------------- rendering
def _learning_items(learning: Mapping[str, Any]) -> list[tuple[str, str]]:
    keys = [k for k in _LEARNING_ORDER if k in learning]
    keys += sorted(k for k in learning if k not in _LEARNING_ORDER)
    return [(k, _fmt_scale(learning[k]) if _number(learning[k]) is not None else str(learning[k])) for k in keys]


def _model_ref(config: PriorConfig) -> str:
    """The name to create the backbone with in the usage snippet."""
    bb = config.backbone
    if bb.get("library") == "timm":
        name = str(bb.get("name") or bb.get("architecture") or "MODEL_NAME")
        return name.removeprefix("timm/")
    return _base_model(bb) or _hub_id(bb.get("name")) or "MODEL_ID_OR_FOLDER"


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
        repo_id: the Hub repo the prior is published at (used in the usage snippets and as the
            model-index name); default ``config.learning["repo_id"]``, else a placeholder.
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
    meta = card_metadata(config, repo_id=repo_id or config.learning.get("repo_id"))
    bb = config.backbone
    library = str(bb.get("library") or "torch")
    bb_name = bb.get("name") or bb.get("architecture")
    backbone_desc = " ".join(str(x) for x in (library if bb.get("library") else None, bb_name) if x)
    recommended = config.recommended_scale
    usage_scale = recommended if recommended is not None else config.scale
    return env.from_string(source_text).render(
        front_matter=yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(),
        title=f"priorzoo {config.kind.value} prior for {backbone_desc or 'an unnamed backbone'}",
        description=description.strip() if description else None,
        repo_id=repo,
        kind=config.kind.value,
        kind_desc=_KIND_DESCRIPTIONS.get(config.kind.value, config.kind.value),
        rank=config.rank,
        num_tensors=len(config.parameters),
        num_parameters=config.num_parameters,
        scale=_fmt_scale(config.scale),
        eps=_fmt_scale(config.eps),
        recommended_scale=_fmt_scale(recommended) if recommended is not None else None,
        usage_scale=_fmt_scale(usage_scale),
        exclude_desc=", ".join(f"`{e}`" for e in config.exclude) or "none",
        format_version=config.format_version,
        priorzoo_version=config.priorzoo_version,
        library=library,
        backbone_desc=backbone_desc or "an unnamed backbone",
        backbone_items=sorted((str(k), str(v)) for k, v in bb.items()),
        base_model=meta.get("base_model"),
        pretrained=bb.get("pretrained") is not False,
        model_ref=_model_ref(config),
        modality=_modality(config),
        auto_class=(
            "AutoModelForImageClassification" if _modality(config) == "image" else "AutoModelForSequenceClassification"
        ),
        source_items=sorted((str(k), str(v)) for k, v in config.source.items()),
        source_dataset=config.source.get("dataset") or config.source.get("hub_id") or "not recorded",
        objective=config.source.get("objective") or "not recorded",
        learning_items=_learning_items(config.learning),
        results=result_rows(config),
        license=meta.get("license", "not recorded"),
        bibtex=_BIBTEX,
    )
