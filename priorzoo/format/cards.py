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

The body says what the prior is (with a link to the paper, arXiv 2205.10279), where its recommended λ comes
from (:func:`scale_provenance`: measured on a named task, or the rule of thumb, or not said), how it was
learned, every recorded result, and code that runs as written for its backbone's library (timm, transformers
with a PEFT variant, torchvision; a function for any other PyTorch model).

Results live in ``config.results``, one dict per number::

    {"dataset": "cifar10",             # the dataset's name, or its Hub id with "hub_dataset": True; required
     "hub_dataset": False,             # True: `dataset` is a Hub dataset id (model-index ``dataset.type``)
     "dataset_name": "CIFAR-10",       # pretty name (default: ``dataset``)
     "role": "prior",                  # "prior": fine-tuned with this prior (the default); "baseline": a
                                       # method without it; "source": the prior's own source-task number
     "task": "image-classification",   # Hub task id (default: from the backbone's modality)
     "split": "test", "dataset_config": None,
     "metric": "accuracy",             # metric id (model-index ``metrics[].type``); required
     "value": 0.91,                    # a number (non-numbers are shown in the body only)
     "method": "SGD + learned prior",  # what was run, shown in the table
     "num_train_examples": 100,        # downstream training-set size N
     "scale": 1e4,                     # λ used
     "metric_name": None,              # default: "<metric> (<method>, N=<n>, λ=<scale>)"
     "notes": "", "source_name": None, "source_url": None}

Example:
    >>> from priorzoo.format.config import PriorConfig, ParameterSpec
    >>> card = render_card(PriorConfig(kind="diagonal", rank=0, parameters=[ParameterSpec("w", (2,))]))
    >>> card.splitlines()[1]
    'library_name: priorzoo'
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from priorzoo.format.config import PriorConfig

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCardData

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

RESULT_ROLES = ("prior", "baseline", "source")
"""What a recorded result measures: ``prior`` (fine-tuning with this prior; the only role in the model-index),
``baseline`` (a method without it, for comparison) or ``source`` (the source task, e.g. the prior mean's
held-out accuracy: not a transfer result)."""

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

_IMAGE_MODEL_TYPES = frozenset(
    {"vit", "deit", "beit", "swin", "swinv2", "convnext", "convnextv2", "resnet", "regnet", "dinov2", "efficientnet"}
)
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
        explicit = _hub_id(backbone.get(key))
        if explicit:
            return explicit
    name = backbone.get("name")
    if pretrained is not True or not isinstance(name, str) or backbone.get("local"):  # a folder's name: no Hub id
        return None
    library = backbone.get("library")
    if library == "timm":
        return _hub_id(f"timm/{name}") if "." in name and "/" not in name else None
    if library == "transformers":
        return _hub_id(name)
    return None


def _source_datasets(source: Mapping[str, Any]) -> list[str]:
    """The Hub ids of the source data the user marked as Hub datasets (``hub_id``, or ``hub_dataset: true``)."""
    explicit = _hub_id(source.get("hub_id"))
    if explicit:
        return [explicit]
    if source.get("hub_dataset") is True and not source.get("local"):
        marked = _hub_id(source.get("dataset"))
        if marked:
            return [marked]
    return []


def _default_task(config: PriorConfig) -> str:
    return "text-classification" if _modality(config) == "text" else "image-classification"


def _modality(config: PriorConfig) -> str:
    """``"image"`` or ``"text"``: what the backbone reads (recorded, else guessed from the backbone)."""
    for where in (config.source, config.backbone):
        modality = where.get("modality")
        if modality in ("image", "text"):
            return str(modality)
    bb = config.backbone
    if bb.get("library") in ("timm", "torchvision") or config.source.get("objective") == "simclr":
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
    shown = _fmt_scale(value)
    measured = config.learning.get("recommended_scale_measured")
    if isinstance(measured, str) and measured.strip():
        return {"value": shown, "origin": "measured", "detail": " ".join(measured.split())}
    rule = config.learning.get("recommended_scale_rule")
    if isinstance(rule, str) and re.search(rf"= {re.escape(shown)}(\s|$)", rule):
        return {"value": shown, "origin": "rule", "detail": " ".join(rule.split())}
    return {"value": shown, "origin": "recorded", "detail": ""}


# ------------------------------------------------------------------------------------------- results
def _role(raw: Mapping[str, Any], i: int) -> str:
    role = raw.get("role")
    if role is None:  # results written before roles: the CLI's source-task row named itself so
        return "source" if raw.get("task_name") == "source task" else "prior"
    if role not in RESULT_ROLES:
        raise ValueError(f"`results[{i}].role` must be one of {', '.join(RESULT_ROLES)}; received {role!r}")
    return str(role)


def result_rows(config: PriorConfig) -> list[dict[str, Any]]:
    """``config.results`` normalised for the card: every key of the module docstring's schema present.

    Raises:
        TypeError: a result is not a dict.
        ValueError: a result's ``role`` is not one of :data:`RESULT_ROLES`.

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))], backbone={"library": "timm"},
        ...                   results=[{"dataset": "mnist", "metric": "accuracy", "value": 0.9, "method": "SGD"}])
        >>> row = result_rows(cfg)[0]
        >>> row["task"], row["dataset_name"], row["metric_name"], row["role"]
        ('image-classification', 'mnist', 'accuracy (SGD)', 'prior')
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
                "role": _role(r, i),
                "task": str(r.get("task") or r.get("task_type") or _default_task(config)),
                "task_name": r.get("task_name"),
                "dataset": dataset,
                "hub_dataset": _hub_id(dataset) if r.get("hub_dataset") is True else None,
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


def _eval_results(config: PriorConfig) -> list[EvalResult]:
    """The prior's own numeric downstream results on marked Hub datasets, as ``huggingface_hub.EvalResult``."""
    from huggingface_hub import EvalResult

    out = []
    for row in result_rows(config):
        value = _number(row["value"])
        if row["role"] != "prior" or value is None or row["hub_dataset"] is None:
            continue
        out.append(
            EvalResult(
                task_type=row["task"],
                task_name=str(row["task_name"]) if row["task_name"] else None,
                dataset_type=row["hub_dataset"],
                dataset_name=row["dataset_name"],
                dataset_config=str(row["dataset_config"]) if row["dataset_config"] else None,
                dataset_split=str(row["split"]) if row["split"] else None,
                metric_type=row["metric"],
                metric_value=value,
                metric_name=row["metric_name"],
                source_name=str(row["source_name"]) if row["source_url"] and row["source_name"] else None,
                source_url=str(row["source_url"]) if row["source_url"] else None,
            )
        )
    return out


def model_index(config: PriorConfig, *, name: str) -> list[dict[str, Any]]:
    """The card's ``model-index``: the prior's own numeric results on Hub datasets (``[]`` when none).

    Built by ``huggingface_hub.ModelCardData`` from ``EvalResult`` objects (grouped by task, dataset, config and
    split as huggingface_hub groups them). A result enters only with ``role: prior`` (fine-tuned with this
    prior), a numeric value and ``hub_dataset: true`` (its ``dataset`` is the Hub id the model-index's
    ``dataset.type`` must be); baselines, source-task numbers and results on local data are shown in the
    body only.

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))], results=[
        ...     {"dataset": "ylecun/mnist", "hub_dataset": True, "metric": "accuracy", "value": 0.9},
        ...     {"dataset": "ylecun/mnist", "hub_dataset": True, "metric": "accuracy", "value": 0.8,
        ...      "role": "baseline", "method": "fine-tuning"}])
        >>> model_index(cfg, name="org/prior")[0]["results"][0]["metrics"]
        [{'type': 'accuracy', 'value': 0.9, 'name': 'accuracy'}]
    """
    from huggingface_hub import ModelCardData

    evals = _eval_results(config)
    if not evals:
        return []
    return ModelCardData(model_name=name, eval_results=evals).to_dict()["model-index"]


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
    evals = _eval_results(config)
    return ModelCardData(
        library_name="priorzoo",
        # unknown: no `license: other`, which the Hub requires to name (license_name/link)
        license=str(config.license).lower() if config.license else None,
        tags=tags,
        base_model=_base_model(config.backbone),
        datasets=_source_datasets(config.source) or None,
        model_name=(repo_id or f"priorzoo-{config.kind.value}-prior") if evals else None,
        eval_results=evals or None,
    )


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
    return [(k, _fmt_scale(learning[k]) if _number(learning[k]) is not None else str(learning[k])) for k in keys]


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
    modality = _modality(config)
    rows = result_rows(config)
    image_size = _number(config.learning.get("image_size"))
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
        scale=_fmt_scale(config.scale),
        eps=_fmt_scale(config.eps),
        scale_provenance=provenance,
        usage_scale=provenance["value"] if provenance else _fmt_scale(config.scale),
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
