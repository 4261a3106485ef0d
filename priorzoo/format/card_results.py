"""The results a prior's model card shows, and the ones its ``model-index`` may hold.

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
     "notes": "", "source_name": None, "source_url": None,
     "learned_scale": {...}}           # a λ learned by the run: λ_g, σ, κ, D per group (kept, not shown; see
                                       # priorzoo.finetune.learned_scale_card)

Only the prior's own numeric results on Hub datasets enter the ``model-index`` (:func:`model_index`): its
``dataset.type`` must be a Hub dataset id, and the Hub's evaluation widget shows every entry as this model's
result, so baselines and source-task numbers stay in the card's body.

Example:
    >>> from priorzoo.format.config import PriorConfig, ParameterSpec
    >>> cfg = PriorConfig(kind="swag", rank=0, parameters=[ParameterSpec("w", (2,))],
    ...                   results=[{"dataset": "my-data", "metric": "accuracy", "value": 0.9}])
    >>> result_rows(cfg)[0]["role"], model_index(cfg, name="org/prior")  # local data: not indexed
    ('prior', [])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from priorzoo.format.config import PriorConfig

if TYPE_CHECKING:
    from huggingface_hub import EvalResult

__all__ = [
    "RESULT_ROLES",
    "backbone_modality",
    "eval_results",
    "finite_number",
    "format_number",
    "hub_repo_id",
    "model_index",
    "result_rows",
]

RESULT_ROLES = ("prior", "baseline", "source")
"""What a recorded result measures: ``prior`` (fine-tuning with this prior; the only role in the model-index),
``baseline`` (a method without it, for comparison) or ``source`` (the source task, e.g. the prior mean's
held-out accuracy: not a transfer result)."""

_IMAGE_MODEL_TYPES = frozenset(
    {"vit", "deit", "beit", "swin", "swinv2", "convnext", "convnextv2", "resnet", "regnet", "dinov2", "efficientnet"}
)


def hub_repo_id(value: Any) -> str | None:
    """``value`` when it is a valid Hub repo id (not written as a local path: ``./``, ``/``, ``~``), else ``None``.

    The file system is not consulted, so a card renders the same bytes wherever it is rendered.

    Example:
        >>> hub_repo_id("uoft-cs/cifar10"), hub_repo_id("./my-data"), hub_repo_id("a b")
        ('uoft-cs/cifar10', None, None)
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value or value.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _default_task(config: PriorConfig) -> str:
    return "text-classification" if backbone_modality(config) == "text" else "image-classification"


def backbone_modality(config: PriorConfig) -> str:
    """``"image"`` or ``"text"``: what the backbone reads (recorded, else guessed from the backbone).

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> spec = [ParameterSpec("w", (2,))]
        >>> backbone_modality(PriorConfig(kind="swag", rank=0, parameters=spec, backbone={"library": "transformers"}))
        'text'
    """
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


def finite_number(value: Any) -> float | int | None:
    """``value`` when it is a finite int or float (not a bool), else ``None``.

    Example:
        >>> finite_number(0.5), finite_number(float("nan")), finite_number("n/a")
        (0.5, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def format_number(value: Any) -> str:
    """A number as the card shows it (``%g``); anything else as its ``str``.

    Example:
        >>> format_number(1e5), format_number(44502.4), format_number("n/a")
        ('100000', '44502.4', 'n/a')
    """
    number = finite_number(value)
    return f"{number:g}" if number is not None else str(value)


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
        details += [f"λ={format_number(r['scale'])}"] if r.get("scale") is not None else []
        rows.append(
            {
                "role": _role(r, i),
                "task": str(r.get("task") or r.get("task_type") or _default_task(config)),
                "task_name": r.get("task_name"),
                "dataset": dataset,
                "hub_dataset": hub_repo_id(dataset) if r.get("hub_dataset") is True else None,
                "dataset_name": str(r.get("dataset_name") or dataset),
                "dataset_config": r.get("dataset_config"),
                "split": r.get("split") or r.get("dataset_split"),
                "metric": metric,
                "metric_name": str(r.get("metric_name") or (f"{metric} ({', '.join(details)})" if details else metric)),
                "value": r.get("value"),
                "method": str(r.get("method") or ""),
                "num_train_examples": n,
                "scale": r.get("scale"),
                "scale_desc": format_number(r["scale"]) if r.get("scale") is not None else "",
                "notes": str(r.get("notes") or ""),
                "source_name": r.get("source_name"),
                "source_url": r.get("source_url"),
            }
        )
    return rows


def eval_results(config: PriorConfig) -> list[EvalResult]:
    """The prior's own numeric downstream results on marked Hub datasets, as ``huggingface_hub.EvalResult``.

    Example:
        >>> from priorzoo.format.config import PriorConfig, ParameterSpec
        >>> cfg = PriorConfig(kind="swag", rank=0, parameters=[ParameterSpec("w", (2,))], results=[
        ...     {"dataset": "ylecun/mnist", "hub_dataset": True, "metric": "accuracy", "value": 0.9}])
        >>> [(e.dataset_type, e.metric_value) for e in eval_results(cfg)]
        [('ylecun/mnist', 0.9)]
    """
    from huggingface_hub import EvalResult

    out = []
    for row in result_rows(config):
        value = finite_number(row["value"])
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

    evals = eval_results(config)
    if not evals:
        return []
    return ModelCardData(model_name=name, eval_results=evals).to_dict()["model-index"]
