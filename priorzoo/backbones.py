"""Build the backbone a prior is learned on or fine-tuned with: timm, transformers, torchvision or any module.

:func:`load_backbone` creates the model with a new head of ``num_classes`` outputs and reports, in a
:class:`Backbone`, whether pre-trained weights were *actually* loaded — what a prior's provenance
(``config.backbone``, the card's ``base_model``) may claim:

- **timm**: a model name (``resnet18``, ``resnet50.a1_in1k``), an ``hf-hub:org/name`` id, or a local folder
  holding timm's ``config.json`` + ``model.safetensors``; ``checkpoint=FILE`` loads a state dict like timm's
  ``checkpoint_path`` (head tensors of another shape are skipped, as for a new head).
- **transformers**: a Hub id or a local folder; the head class follows the objective (sequence or image
  classification, masked LM, the bare ``AutoModel``).
- **torchvision**: ``torchvision.models.get_model(name)`` with ``checkpoint=FILE`` (a state dict, ``.pth``
  read with ``weights_only=True`` or ``.safetensors``): parameter names then match priors learned on
  torchvision models.
- any ``nn.Module`` from Python: pass it to :func:`describe` / :func:`freeze_` directly.

One head rule for all of them: :func:`priorzoo.binding.matching.head_parameter_names` (re-exported here).
:func:`freeze_` implements ``--freeze PATTERN`` and ``--trainable-layers N``; the batch-norm layers of the frozen
part stay in eval mode while the rest trains (:func:`freeze_batchnorm_`).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> freeze_(net, freeze="0.*")
    ['0.weight', '0.bias']
    >>> [n for n, p in net.named_parameters() if p.requires_grad]
    ['2.weight', '2.bias']
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from priorzoo.binding.batchnorm import freeze_batchnorm_, is_frozen_batchnorm
from priorzoo.binding.matching import Patterns, compile_patterns, head_parameter_names
from priorzoo.format.local_paths import file_record, names_local_file, public_name

__all__ = [
    "LIBRARIES",
    "Backbone",
    "backbone_suggestions",
    "freeze_",
    "freeze_batchnorm_",
    "head_parameter_names",
    "init_head_",
    "is_frozen_batchnorm",
    "load_backbone",
    "load_checkpoint_",
]

LIBRARIES = ("auto", "timm", "transformers", "torchvision")
"""The ``library`` choices of :func:`load_backbone` (``--library`` of the CLI)."""


@dataclass
class Backbone:
    """What :func:`load_backbone` built.

    Attributes:
        model: the network with its new head (``num_classes`` outputs; 0: a feature extractor for timm).
        tokenizer: the transformers tokenizer for text, else ``None``.
        library: ``timm``, ``transformers`` or ``torchvision``.
        name: the name or path the model was built from.
        pretrained: whether pre-trained weights were loaded (from the Hub/cache, a folder or a checkpoint).
        weights: where they came from (a Hub id, a folder, a file), ``None`` for a random init.
        skipped: checkpoint tensors not loaded (the old head of another shape).
        checkpoint: the ``checkpoint=`` file's :func:`priorzoo.format.local_paths.file_record` (its name and
            sha256, never its path), when one was loaded.
    """

    model: nn.Module
    tokenizer: Any
    library: str
    name: str
    pretrained: bool
    weights: str | None = None
    skipped: list[str] = field(default_factory=list)
    checkpoint: dict[str, str] | None = None

    def describe(self) -> dict[str, Any]:
        """Provenance for a prior's ``config.backbone``: ``library``, ``name``, ``architecture``, ``pretrained``
        and, only when pre-trained weights were loaded from the Hub, ``hub_id`` (what the card's
        ``base_model`` is made of). Nothing local is recorded by its path: a local folder by its name, a
        checkpoint file by its name and sha256 (``checkpoint``, ``checkpoint_sha256``).

        Example:
            >>> import torch
            >>> Backbone(torch.nn.Linear(2, 2), None, "torchvision", "resnet18", pretrained=False).describe()
            {'library': 'torchvision', 'name': 'resnet18', 'architecture': 'Linear', 'pretrained': False}
        """
        out: dict[str, Any] = {
            "library": self.library,
            "name": public_name(self.name),
            "architecture": type(self.model).__name__,
            "pretrained": self.pretrained,
        }
        if names_local_file(self.name):
            out["local"] = True  # a folder's name is no Hub id
        cfg = getattr(self.model, "config", None)
        if self.library == "transformers" and cfg is not None and hasattr(cfg, "model_type"):
            out["model_type"] = str(cfg.model_type)
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint["file"]
            out["checkpoint_sha256"] = self.checkpoint["sha256"]
        elif self.pretrained and self.weights and _looks_like_hub_id(self.weights):
            out["hub_id"] = self.weights
        elif self.pretrained and self.weights:
            out["weights"] = public_name(self.weights)
        return out


def _looks_like_hub_id(value: str) -> bool:
    return "/" in value and not value.startswith((".", "/", "~")) and not Path(value).exists()


def _pick_library(name: str, library: str) -> str:
    if library not in LIBRARIES:
        raise ValueError(f"`library` must be one of {', '.join(LIBRARIES)}; received {library!r}")
    if library != "auto":
        return library
    if name.startswith("hf-hub:"):
        return "timm"
    path = Path(name)
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            if "architecture" in data and "model_type" not in data:
                return "timm"
        return "transformers"
    try:
        import timm

        if timm.is_model(name):
            return "timm"
    except ImportError:
        pass
    return "transformers"


def load_checkpoint_(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a state dict file into ``model`` (in place), skipping tensors of the model's head whose shape
    differs (the old classifier); returns the skipped names.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    (tensors only, never arbitrary pickled objects). A ``{"state_dict": …}`` / ``{"model": …}`` wrapper and
    a ``module.`` prefix are unwrapped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or names/shapes that do not fit the model outside its head.

    Example:
        >>> import tempfile, os, torch
        >>> from safetensors.torch import save_file
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_file({"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, path)
        >>> lin = torch.nn.Linear(2, 2)
        >>> load_checkpoint_(lin, path), lin.weight.sum().item()
        ([], 4.0)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`--checkpoint` {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, a pickle with objects other than tensors, …
        raise ValueError(f"`--checkpoint` {str(path)!r} is not a readable state dict ({err})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`--checkpoint` {str(path)!r} does not hold a state dict (name -> tensor)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    head = head_parameter_names(model)
    skipped = [k for k, v in state.items() if k in head and k in own and tuple(own[k].shape) != tuple(v.shape)]
    for k in skipped:
        del state[k]
    wrong = [
        f"`{k}` {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"`--checkpoint` {str(path)!r} has tensors of other shapes than the model: {', '.join(wrong[:3])}"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head and k not in skipped]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"`--checkpoint` {str(path)!r} does not fit the model: missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]} (is it for another architecture?)"
        )
    return skipped


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _offline_hint(pretrained: bool) -> str:
    """The fix for a download that failed offline (``HF_HUB_OFFLINE``) with pre-trained weights asked for."""
    if not (pretrained and _offline()):
        return ""
    return (
        "; HF_HUB_OFFLINE is set, so nothing can be downloaded: pass --no-pretrained (random init), "
        "--checkpoint FILE (a state dict) or a local model folder"
    )


def backbone_suggestions(name: str, *, library: str = "auto", limit: int = 3) -> list[str]:
    """Known backbone names close to ``name``: timm's and torchvision's ``list_models()`` and the folders of the
    current directory, each tagged with where it comes from (for "did you mean" messages).

    Example:
        >>> backbone_suggestions("resnet181", library="torchvision")[0]
        'resnet18 (torchvision)'
    """
    import difflib

    from priorzoo.extras import require

    known: dict[str, str] = {}
    if library in ("auto", "torchvision"):
        try:
            tv = require("torchvision", "torchvision", what="backbone names")
            known.update({n: f"{n} (torchvision: --library torchvision)" for n in tv.models.list_models()})
        except ImportError:
            pass
    if library in ("auto", "timm"):
        try:
            timm = require("timm", what="backbone names")
            known.update({n: f"{n} (timm)" for n in timm.list_models()})
        except ImportError:
            pass
    if library in ("auto", "transformers", "timm"):
        known.update({p.name: f"{p.name} (local folder)" for p in Path(".").iterdir() if p.is_dir()})
    hits = difflib.get_close_matches(Path(name).name, list(known), n=limit, cutoff=0.75)
    if library == "torchvision":
        return [f"{h} (torchvision)" for h in hits]
    return [known[h] for h in hits]


def _did_you_mean(name: str, library: str) -> str:
    hits = backbone_suggestions(name, library=library)
    return f"; did you mean {', '.join(hits)}?" if hits else ""


def load_backbone(
    name: str,
    *,
    library: str = "auto",
    pretrained: bool = True,
    checkpoint: str | os.PathLike | None = None,
    objective: str = "supervised",
    num_classes: int = 0,
    modality: str = "image",
    load_tokenizer: bool = True,
) -> Backbone:
    """Create a backbone with a new head (see the module docstring for what each library accepts).

    Args:
        name: timm name / ``hf-hub:`` id / folder, transformers id / folder, or a torchvision model name.
        library: one of :data:`LIBRARIES` (``auto``: a timm folder or name → timm, else transformers;
            torchvision must be asked for).
        pretrained: load pre-trained weights (timm/transformers from the Hub or cache; torchvision's
            ``DEFAULT`` weights). ``False`` with ``checkpoint``: the checkpoint's weights.
        checkpoint: a state-dict file loaded after creation (then ``Backbone.pretrained`` is True).
        objective: ``supervised``, ``simclr`` or ``mlm`` (chooses the transformers head class).
        num_classes: outputs of the new head (0: a timm feature extractor).
        modality: ``image`` or ``text`` (transformers head class; text loads the tokenizer).
        load_tokenizer: load the tokenizer for text.

    Raises:
        ValueError: an unknown model, weights that cannot be loaded (offline), a checkpoint that does not fit.
        ImportError: the library is not installed (the message names the pip extra).

    Example:
        >>> b = load_backbone("resnet18", library="torchvision", pretrained=False, num_classes=3)
        >>> b.library, b.pretrained, b.model.fc.out_features
        ('torchvision', False, 3)
    """
    from priorzoo.extras import require

    lib = _pick_library(str(name), library)
    weights: str | None = None
    if lib == "timm":
        timm = require("timm", what=f"the timm backbone {name!r}")
        path = Path(name)
        kwargs: dict[str, Any] = {"num_classes": num_classes}
        try:
            if path.is_dir():
                cfg = json.loads((path / "config.json").read_text())
                files = [f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
                if pretrained and checkpoint is None and not files:
                    raise ValueError(f"the timm folder {name!r} holds no model.safetensors")
                arch = cfg.get("architecture")
                if pretrained and checkpoint is None:
                    kwargs["pretrained_cfg_overlay"] = {"file": str(path / files[0])}
                model = timm.create_model(arch, pretrained=pretrained and checkpoint is None, **kwargs)
                weights = str(path) if pretrained and checkpoint is None else None
            else:
                model = timm.create_model(str(name), pretrained=pretrained and checkpoint is None, **kwargs)
                if pretrained and checkpoint is None:
                    cfg = getattr(model, "pretrained_cfg", {}) or {}
                    weights = cfg.get("hf_hub_id") or str(name)
        except (RuntimeError, OSError) as err:
            hint = _did_you_mean(str(name), "timm") if "Unknown model" in str(err) else _offline_hint(pretrained)
            raise ValueError(f"cannot create timm model {name!r} (pretrained={pretrained}): {err}{hint}") from None
        tokenizer = None
    elif lib == "torchvision":
        tv = require("torchvision", "torchvision", what=f"the torchvision backbone {name!r}")
        try:
            builder_weights = "DEFAULT" if pretrained and checkpoint is None else None
            model = tv.models.get_model(
                str(name),
                weights=builder_weights,
                **({"num_classes": num_classes} if num_classes and builder_weights is None else {}),
            )
        except (ValueError, KeyError) as err:
            hint = _did_you_mean(str(name), "torchvision")
            raise ValueError(f"cannot create torchvision model {name!r}: {err}{hint}") from None
        except (OSError, RuntimeError) as err:
            raise ValueError(
                f"cannot download torchvision's pre-trained weights for {name!r} ({err}); offline, pass "
                "--no-pretrained --checkpoint FILE with a state dict"
            ) from None
        if builder_weights is not None:
            weights = f"torchvision:{name}:DEFAULT"
            if num_classes:
                _replace_torchvision_head(model, num_classes)
        tokenizer = None
    else:
        model, tokenizer = _transformers(
            name, pretrained and checkpoint is None, objective, num_classes, modality, load_tokenizer
        )
        if pretrained and checkpoint is None:
            weights = str(name)
    skipped: list[str] = []
    record = None
    if checkpoint is not None:
        skipped = load_checkpoint_(model, checkpoint)
        weights = str(checkpoint)
        record = file_record(checkpoint)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        library=lib,
        name=str(name),
        pretrained=weights is not None,
        weights=weights,
        skipped=skipped,
        checkpoint=record,
    )


def _replace_torchvision_head(model: nn.Module, num_classes: int) -> None:
    head = sorted(head_parameter_names(model))
    if not head:
        raise ValueError(f"cannot find the classifier of {type(model).__name__} to give it {num_classes} outputs")
    layer = head[0].rsplit(".", 1)[0]
    old = model.get_submodule(layer)
    parent, _, attr = layer.rpartition(".")
    new = nn.Linear(old.in_features, num_classes)
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _transformers(
    name: str, pretrained: bool, objective: str, num_classes: int, modality: str, load_tokenizer: bool
) -> tuple[nn.Module, Any]:
    from priorzoo.extras import require

    transformers = require("transformers", what=f"the transformers backbone {name!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except OSError as err:
        hint = _did_you_mean(name, "auto") if not Path(name).exists() else ""
        if hint:  # most likely a mistyped timm / torchvision name, not a failed transformers download
            first = str(err).split(".")[0]
            raise ValueError(
                f"unknown backbone {name!r}: not a timm model, a torchvision model or a local folder, and not "
                f"loadable as a transformers Hub id ({first}){hint}"
            ) from None
        hint = _offline_hint(pretrained) or "; offline, pass a local model folder"
        raise ValueError(f"cannot load the transformers config of {name!r} ({err}){hint}") from None
    if objective == "mlm":
        auto = transformers.AutoModelForMaskedLM
    elif objective == "supervised" and modality == "text":
        auto = transformers.AutoModelForSequenceClassification
        config.num_labels = num_classes
    elif objective == "supervised":
        auto = transformers.AutoModelForImageClassification
        config.num_labels = num_classes
    else:
        auto = transformers.AutoModel
    if pretrained:
        kwargs = {"num_labels": num_classes} if objective == "supervised" else {}
        model = auto.from_pretrained(name, **kwargs, ignore_mismatched_sizes=objective == "supervised")
    else:
        model = auto.from_config(config)
    tokenizer = None
    if modality == "text" and load_tokenizer:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load a tokenizer for {name!r} ({err}); text needs the model's tokenizer"
            ) from None
    return model, tokenizer


@torch.no_grad()
def init_head_(model: nn.Module) -> list[str]:
    """Zero the new task head (weights and biases), in place; returns its parameter names.

    A fresh head's library default can be far too large for pre-trained features: timm's EfficientNet /
    MobileNet family draws a classifier uniformly in ±1/√classes (±0.32 for 10 classes), and with 1280
    pre-trained features of magnitude ~1 the first logits are ±10–20, the first loss ~20 and SGD at an
    ordinary learning rate never recovers (validation at chance). A zero head starts every class at the
    same logit (loss log C) and learns from the features' first gradient; the backbone gets gradients from
    the second step on. This is what ``priorzoo finetune`` does to every new head.

    Example:
        >>> import torch
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.fc = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
        >>> net = Net(); init_head_(net)
        ['fc.weight', 'fc.bias']
        >>> float(net.fc.weight.abs().sum())
        0.0
    """
    params = dict(model.named_parameters())
    names = [n for n in params if n in head_parameter_names(model)]
    for n in names:
        params[n].zero_()
    return names


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks in forward order: the parameterised children of its base model (transformers:
    ``base_model_prefix``), with a list-like child (``nn.Sequential``/``nn.ModuleList``, or a module whose only
    child is one, like BERT's ``encoder.layer``) expanded into its elements."""
    base = getattr(model, "base_model_prefix", None)
    prefix = ""
    if isinstance(base, str) and base and isinstance(getattr(model, base, None), nn.Module):
        prefix, model = base + ".", getattr(model, base)
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        inner, inner_name = child, name
        kids = list(child.named_children())
        if len(kids) == 1 and isinstance(kids[0][1], (nn.Sequential, nn.ModuleList)):
            inner, inner_name = kids[0][1], f"{name}.{kids[0][0]}"
        if isinstance(inner, (nn.Sequential, nn.ModuleList)) and len(inner) > 1:
            out += [
                (f"{prefix}{inner_name}.{n}", m) for n, m in inner.named_children() if any(True for _ in m.parameters())
            ]
        else:
            out.append((f"{prefix}{name}", child))
    return out


def freeze_(model: nn.Module, *, freeze: Patterns = None, trainable_layers: int | None = None) -> list[str]:
    """Freeze parameters in place (``requires_grad=False``); returns the names frozen.

    Args:
        freeze: glob pattern(s) or a predicate on parameter names (``--freeze PATTERN``).
        trainable_layers: train only the last N blocks of the backbone plus the head
            (``--trainable-layers N``; 0 = a linear probe). Blocks are the base model's parameterised
            children, list-like ones expanded (a torchvision/timm ResNet: ``conv1``, ``bn1``, ``layer1.0``, …,
            ``layer4.1``; BERT: ``embeddings``, ``encoder.layer.0``, …, ``pooler``). The head (see
            :func:`head_parameter_names`) always trains.

    Raises:
        ValueError: ``trainable_layers`` < 0, or a pattern that matches no parameter.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> freeze_(net, trainable_layers=1)  # no detected head (not named like one): the last block trains
        ['0.weight', '0.bias', '1.weight', '1.bias']
    """
    frozen: list[str] = []
    head = head_parameter_names(model)
    if freeze is not None:
        pred = compile_patterns(freeze)
        hits = [n for n, _ in model.named_parameters() if pred is not None and pred(n)]
        if not hits:
            raise ValueError(f"`--freeze` {freeze!r} matches no parameter of the model")
        frozen += hits
    if trainable_layers is not None:
        if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or trainable_layers < 0:
            raise ValueError(f"`--trainable-layers` must be an integer ≥ 0; received {trainable_layers!r}")
        blocks = [(n, m) for n, m in _blocks(model) if not all(f"{n}.{p}" in head for p, _ in m.named_parameters())]
        keep = blocks[len(blocks) - trainable_layers :] if trainable_layers else []
        trained = {f"{n}.{p}" for n, m in keep for p, _ in m.named_parameters()} | head
        frozen += [n for n, _ in model.named_parameters() if n not in trained]
    params = dict(model.named_parameters())
    out = []
    for n in dict.fromkeys(frozen):
        params[n].requires_grad_(False)
        out.append(n)
    freeze_batchnorm_(model)
    return out
