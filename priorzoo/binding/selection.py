"""Which parameters: name patterns and the one rule that finds a model's output head.

These are the selection helpers every part of priorzoo shares (the learners' ``include``/``exclude``, the
head a prior leaves out, :func:`priorzoo.binding.matching.match_parameters`, the PEFT view). They live below
``matching`` so that modules ``matching`` itself uses (``priorzoo.binding.peft``) can use them without an import cycle;
``priorzoo.binding.matching`` re-exports every public name.

Example:
    >>> import torch
    >>> from priorzoo.binding.selection import compile_patterns, head_parameter_names
    >>> compile_patterns("fc.*")("fc.weight")
    True
    >>> sorted(head_parameter_names(torch.nn.Sequential()))
    []
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "Patterns",
    "compile_patterns",
    "head_parameter_names",
    "output_layer",
    "pattern_strings",
    "resolve_head",
    "select_parameters",
    "warn_if_output_layer",
]

Patterns = str | Sequence[str] | Callable[[str], bool] | None
"""Which parameters: a glob, a list of globs, a predicate on the name, or ``None`` (no filter)."""

_DDP_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def compile_patterns(patterns: Patterns) -> Callable[[str], bool] | None:
    """Turn :data:`Patterns` into a predicate (``None`` stays ``None``).

    Example:
        >>> compile_patterns(["fc.*", "*.bias"])("fc.weight")
        True
    """
    if patterns is None:
        return None
    if callable(patterns):
        return patterns
    if isinstance(patterns, str):
        patterns = [patterns]
    pats = list(patterns)
    for p in pats:
        if not isinstance(p, str):
            raise TypeError(f"patterns must be glob strings or a callable; received {p!r} in {pats!r}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)


def pattern_strings(patterns: Patterns) -> list[str]:
    """The glob strings of :data:`Patterns`, as a list (a predicate or ``None`` has none).

    What a prior's ``config.exclude`` can record: it holds globs, not code.

    Example:
        >>> pattern_strings("fc.*"), pattern_strings(["fc.*", "*.bias"]), pattern_strings(lambda n: True)
        (['fc.*'], ['fc.*', '*.bias'], [])
    """
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, Sequence) and all(isinstance(p, str) for p in patterns):
        return list(patterns)
    return []


def select_parameters(
    model: torch.nn.Module, include: Patterns = None, exclude: Patterns = None, *, trainable_only: bool = True
) -> dict[str, torch.nn.Parameter]:
    """Ordered ``name -> parameter`` of ``model`` filtered by include/exclude patterns.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> list(select_parameters(m, exclude="1.*"))
        ['0.weight', '0.bias']
    """
    inc, exc = compile_patterns(include), compile_patterns(exclude)
    out = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        if inc is not None and not inc(name):
            continue
        if exc is not None and exc(name):
            continue
        out[name] = p
    return out


_HEAD_NAMES = frozenset({"classifier", "cls", "fc", "head", "heads", "last_linear", "lm_head", "logits"})
"""Module names that mark a plain model's final ``nn.Linear`` as its task head (torchvision's ``fc``,
``classifier.1``, ``heads.head``; ``last_linear`` of pretrainedmodels; ``head`` of many research codes)."""


def _unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    names = [n for n, _ in model.named_parameters()]
    for ddp in _DDP_PREFIXES:
        inner = getattr(model, ddp.rstrip("."), None)
        if isinstance(inner, torch.nn.Module) and names and all(n.startswith(ddp) for n in names):
            return inner, ddp
    return model, ""


def output_layer(model: torch.nn.Module) -> str | None:
    """The module name of what looks like the model's output layer, or ``None``.

    That is the last module holding parameters (in registration order, the order a plain ``forward``
    normally runs them) when it is an ``nn.Linear``: ``fc`` of a torchvision ResNet, ``classifier.1`` of a
    MobileNet, ``2`` of ``Sequential(Linear, ReLU, Linear)``. A backbone that ends in a norm layer (a ViT
    without head, a timm model built with ``num_classes=0``) has none.

    Example:
        >>> output_layer(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
        '2'
        >>> output_layer(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))) is None
        True
    """
    last: tuple[str, torch.nn.Module] | None = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = (name, module)
    if last is None or not isinstance(last[1], torch.nn.Linear):
        return None
    return last[0]


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the model's task head, which a prior never covers by default: one rule for every library.

    1. timm models name their classifier in ``pretrained_cfg["classifier"]`` (``fc``, ``head``, ``head.fc``);
    2. transformers task models keep the backbone under ``base_model_prefix`` and everything outside it
       (``classifier.*``, ``cls.*``, ``qa_outputs.*``) is the head;
    3. any other model (torchvision, plain PyTorch): its :func:`output_layer` — the last parameterised
       module, when it is an ``nn.Linear`` — if that module is named like a head (``fc``, ``classifier``,
       ``head``, ``heads``, ``last_linear``, ``logits``, ``lm_head``, ``cls``; Sequential indices such as
       ``classifier.1`` are skipped when reading the name).

    A DDP/compile wrapper (``module.``, ``_orig_mod.``) is looked through. An output layer with another name
    is not assumed to be a head; the learners warn when they would put it in a prior (pass ``head=``).

    Example:
        >>> sorted(head_parameter_names(torch.nn.Linear(2, 2)))
        []
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.classifier = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
        >>> sorted(head_parameter_names(Net()))
        ['classifier.bias', 'classifier.weight']
    """
    model, prefix = _unwrap(model)
    heads: set[str] = set()
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    classifier = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if classifier:
        cls_list = [classifier] if isinstance(classifier, str) else list(classifier)
        for n, _ in model.named_parameters():
            if any(n == c or n.startswith(c + ".") for c in cls_list):
                heads.add(prefix + n)
        return heads
    base = getattr(model, "base_model_prefix", None)
    if isinstance(base, str) and base and hasattr(model, base) and getattr(model, base) is not model:
        for n, _ in model.named_parameters():
            if not n.startswith(base + "."):
                heads.add(prefix + n)
        return heads
    layer = output_layer(model)
    if layer:
        words = [w for w in layer.split(".") if not w.isdigit()]
        if words and words[-1] in _HEAD_NAMES:
            heads = {f"{prefix}{layer}.{n}" for n, _ in model.get_submodule(layer).named_parameters()}
    return heads


def resolve_head(model: torch.nn.Module, head: Patterns = None) -> set[str]:
    """The head's parameter names: ``head`` patterns when given (``[]``: no head), else
    :func:`head_parameter_names`.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> sorted(resolve_head(m, "1.*")), sorted(resolve_head(m))
        (['1.bias', '1.weight'], [])
    """
    if head is None:
        return head_parameter_names(model)
    pred = compile_patterns(head)
    return {n for n, _ in model.named_parameters() if pred is not None and pred(n)}


def warn_if_output_layer(model: torch.nn.Module, chosen: Sequence[str] | set[str], what: str) -> list[str]:
    """Warn (naming them) when the parameters ``chosen`` for a prior include what looks like an output
    layer (:func:`output_layer`); returns those names.

    Example:
        >>> import warnings
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     warn_if_output_layer(m, ["0.weight", "1.weight", "1.bias"], "SWAGCollector")
        ['1.weight', '1.bias']
    """
    inner, prefix = _unwrap(model)
    layer = output_layer(inner)
    if layer is None:
        return []
    names = [f"{prefix}{layer}.{n}" for n, _ in inner.get_submodule(layer).named_parameters()]
    chosen = set(chosen)
    hit = [n for n in names if n in chosen]
    if hit:
        import warnings

        out = getattr(inner.get_submodule(layer), "out_features", "?")
        warnings.warn(
            f"{what}: the prior would include {', '.join(f'`{n}`' for n in hit)}, which look like the model's "
            f"output layer (its last parameterised module, an nn.Linear with {out} outputs). A task head is "
            f'replaced downstream and should get no learned prior: pass head="{layer}.*" (or exclude=...). '
            "Pass head=[] to keep it on purpose.",
            UserWarning,
            stacklevel=3,
        )
    return hit
