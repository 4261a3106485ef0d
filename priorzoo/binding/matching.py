"""Map a prior's parameter names onto a model: prefixes, the new head, include/exclude patterns.

A prior learned on a backbone names its parameters as the source model did (``layer1.0.conv1.weight`` for a
timm ResNet, ``embeddings.word_embeddings.weight`` for a ``BertModel``). The model being fine-tuned may hold
that backbone under a prefix (``bert.`` in ``BertForSequenceClassification``, ``model.``, DDP's
``module.``) and has a new head with another number of classes. :func:`match_parameters` finds the one
(prior prefix → model prefix) rewrite that matches the most names (ties: the shortest rewrite, then the most
names with the prior's shapes), then sorts every prior parameter into
*matched*, *excluded* (a pattern, or the model's head), *missing* (no such parameter in the model) or
*shape mismatch*; model parameters without a prior (the new head) are reported as *no prior*.

Patterns are shell globs matched against the full name (``fnmatch``: ``"fc.*"``, ``"*.bias"``), a list of
them, or a callable ``name -> bool``.

Example:
    >>> import torch
    >>> from priorzoo.binding.matching import match_parameters
    >>> src = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 10))
    >>> dst = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    >>> shapes = {n: tuple(p.shape) for n, p in src.named_parameters()}
    >>> m = match_parameters(shapes, dst, exclude="1.*")
    >>> m.matched
    {'0.weight': '0.weight', '0.bias': '0.bias'}
    >>> m.excluded
    ['1.weight', '1.bias']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from priorzoo.binding.selection import (
    Patterns,
    compile_patterns,
    head_parameter_names,
    output_layer,
    pattern_strings,
    resolve_head,
    select_parameters,
    warn_if_output_layer,
)
from priorzoo.errors import PriorMatchError
from priorzoo.validation import short_list as _short

__all__ = [
    "MatchResult",
    "Patterns",
    "compile_patterns",
    "head_parameter_names",
    "match_parameters",
    "output_layer",
    "pattern_strings",
    "resolve_head",
    "select_parameters",
    "warn_if_output_layer",
]

# layers a task model adds on top of a backbone checkpoint that lacks them (a masked-LM BERT has no pooler):
# when the prior does not cover them they count as part of the new head, not as uncovered backbone weights
_NEW_LAYER_HINTS = ("pooler.",)


@dataclass
class MatchResult:
    """How a prior's parameters map onto a model.

    Attributes:
        matched: prior name → model name, in prior order.
        excluded: prior names left out on purpose (patterns, the prior's own ``exclude``, the model's head).
        missing: prior names with no parameter of that name in the model.
        shape_mismatch: ``(prior name, model name, prior shape, model shape)`` outside the head.
        no_prior: model parameters the prior does not cover (typically the new head).
        uncovered: the part of ``no_prior`` that is neither the model's head, nor frozen
            (``requires_grad=False``), nor named by a pattern (include/exclude, the prior's own ``exclude``):
            trainable backbone weights the prior knows nothing about, e.g. the extra blocks of a deeper
            architecture (on a PEFT model: the adapters of layers the prior does not cover; its
            ``modules_to_save`` copies count as the head).
        prior_prefix / model_prefix: the rewrite applied (``prior_prefix`` stripped, ``model_prefix`` added).
        frozen: the matched prior names whose model tensor does not train (``requires_grad=False``, or a PEFT
            model's base weights outside the adapted layers): the prior is conditioned on their values
            (see :mod:`priorzoo.binding.conditional`).
        adapted: for a PEFT model, matched prior name → the adapter tensors that move its effective weight
            W₀ + ΔW (``lora_A``, ``lora_B``, …); ``matched`` maps it to the frozen base weight W₀.
        adapters: for a PEFT model, every trainable adapter tensor.
        peft_methods: for a PEFT model, its adapter methods (``["LoRA"]``).

    Example:
        >>> r = MatchResult(matched={"w": "w"})
        >>> r.is_complete
        True
    """

    matched: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    no_prior: list[str] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)
    prior_prefix: str = ""
    model_prefix: str = ""
    frozen: list[str] = field(default_factory=list)
    adapted: dict[str, list[str]] = field(default_factory=dict)
    adapters: list[str] = field(default_factory=list)
    peft_methods: list[str] = field(default_factory=list)

    @property
    def absent(self) -> list[str]:
        """Prior names with no block in the model (the same list as ``missing``)."""
        return self.missing

    @property
    def is_complete(self) -> bool:
        """Every prior parameter not deliberately excluded found a parameter of the right shape, and every
        model parameter without prior is the head or deliberately excluded."""
        return bool(self.matched) and not self.missing and not self.shape_mismatch and not self.uncovered

    def summary(self) -> str:
        """One human-readable paragraph (what :meth:`PriorModel.match` users print)."""
        lines = [
            f"matched {len(self.matched)} parameters"
            + (
                f" (prior prefix {self.prior_prefix!r} → model prefix {self.model_prefix!r})"
                if self.prior_prefix or self.model_prefix
                else ""
            ),
            f"excluded {len(self.excluded)}: {_short(self.excluded)}",
            f"missing in model {len(self.missing)}: {_short(self.missing)}",
            f"shape mismatch {len(self.shape_mismatch)}: "
            + _short([f"{p} {ps}→{ms}" for p, _, ps, ms in self.shape_mismatch]),
            f"model parameters without prior {len(self.no_prior)}: {_short(self.no_prior)}",
            f"of which not the head nor excluded {len(self.uncovered)}: {_short(self.uncovered)}",
        ]
        if self.frozen:
            lines.insert(1, f"of which frozen (held at their values) {len(self.frozen)}: {_short(self.frozen)}")
        if self.peft_methods:
            lines.insert(
                1,
                f"of which adapted ({', '.join(self.peft_methods)}: effective weight W₀ + ΔW) {len(self.adapted)}: "
                f"{_short(list(self.adapted))}; adapter tensors {len(self.adapters)}: {_short(self.adapters)}",
            )
        return "\n".join(lines)

    def check(self, *, allow_partial: bool = False) -> None:
        """Raise :class:`PriorMatchError` unless the match is usable.

        Zero matches and shape mismatches always raise; missing prior parameters and uncovered model
        parameters raise unless ``allow_partial`` (then the prior's marginal over the matched parameters is
        used, which is exact for a Gaussian, and the uncovered ones train without a prior).
        """
        if self.shape_mismatch:
            detail = "; ".join(
                f"`{p}` prior {tuple(ps)} vs model `{m}` {tuple(ms)}" for p, m, ps, ms in self.shape_mismatch[:5]
            )
            more = f" (+{len(self.shape_mismatch) - 5} more)" if len(self.shape_mismatch) > 5 else ""
            raise PriorMatchError(
                f"{len(self.shape_mismatch)} parameter(s) have another shape in the model than in the prior: "
                f"{detail}{more}. Is this prior for another architecture or width? Exclude them with "
                "exclude=[...] if they are a new head."
            )
        if not self.matched:
            raise PriorMatchError(
                "no prior parameter matches a model parameter: the prior is for another architecture "
                f"(prior names such as {_short(self.missing, 3)}; model parameters such as "
                f"{_short(self.no_prior, 3)})"
            )
        if (self.adapters or self.peft_methods) and not set(self.matched) - set(self.frozen):
            raise PriorMatchError(
                f"none of the {len(self.matched)} prior parameter(s) found in this PEFT model trains: the adapters "
                f"({_short(self.adapters, 3)}) adapt no layer the prior covers, so the prior would add a constant. "
                "Target layers of the backbone (e.g. LoraConfig(target_modules=['query', 'value']))"
            )
        if self.uncovered and not allow_partial:
            raise PriorMatchError(
                f"{len(self.uncovered)} model parameter(s) outside the head have no prior: "
                f"{_short(self.uncovered)}. Is the prior for a smaller architecture? Pass allow_partial=True "
                "to fine-tune them without a prior, or exclude=[...] to name them."
            )
        if self.missing and not allow_partial:
            raise PriorMatchError(
                f"{len(self.missing)} prior parameter(s) are missing in the model: {_short(self.missing)}. "
                "Pass allow_partial=True to use the prior's marginal over the matched parameters, or "
                "exclude=[...] to drop them."
            )


def _prefixes(names: Sequence[str], depth: int = 2) -> set[str]:
    out = {""}
    for n in names:
        parts = n.split(".")
        for d in range(1, min(depth, len(parts) - 1) + 1):
            out.add(".".join(parts[:d]) + ".")
    return out


def match_parameters(
    prior_shapes: Mapping[str, Sequence[int]],
    model: torch.nn.Module,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    prior_exclude: Sequence[str] = (),
    exclude_head: bool = True,
) -> MatchResult:
    """Match prior parameters (``name -> shape``, in prior order) onto ``model``'s named parameters.

    Args:
        prior_shapes: the prior's ordered parameter names and shapes.
        model: any ``torch.nn.Module`` (timm, transformers, DDP-wrapped, …).
        include: only these prior names take part (patterns on the *prior* names).
        exclude: prior names to leave out (patterns on the prior names).
        prior_exclude: the prior's own ``config.exclude`` patterns (its head at learning time).
        exclude_head: leave out prior parameters that land on the model's head (see
            :func:`head_parameter_names`), e.g. a 1000-class ``fc`` onto a 3-class one.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> match_parameters({"weight": (2, 3)}, lin).matched
        {'weight': 'weight'}
    """
    from priorzoo.binding.peft import peft_view

    inc, exc = compile_patterns(include), compile_patterns(exclude)
    pexc = compile_patterns(list(prior_exclude)) if prior_exclude else None
    view = peft_view(model)
    real_params = dict(model.named_parameters())
    if view is None:
        head = head_parameter_names(model) if exclude_head else set()
        return _match_in(prior_shapes, real_params, {n: n for n in real_params}, head, None, inc, exc, pexc)
    # a PEFT model: match on the adapted model's plain names (a prior over the backbone's W, seen through the
    # adapters), or on its own names when they fit better (a prior over the adapters themselves, such as the
    # downstream SWAG posterior of a LoRA run)
    real_head = {view.prefix + n for n in head_parameter_names(view.inner)} if exclude_head else set()
    to_plain = {real: plain for plain, real in view.names.items()}
    plain_head = {to_plain[r] for r in real_head if r in to_plain}
    through = _match_in(prior_shapes, real_params, dict(view.names), plain_head, view, inc, exc, pexc)
    own = _match_in(prior_shapes, real_params, {n: n for n in real_params}, real_head, None, inc, exc, pexc)
    return own if len(own.matched) > len(through.matched) else through


def _match_in(
    prior_shapes: Mapping[str, Sequence[int]],
    real_params: Mapping[str, torch.nn.Parameter],
    real_of: dict[str, str],
    head: set[str],
    view,
    inc,
    exc,
    pexc,
) -> MatchResult:
    """Match in one namespace: ``real_of`` maps its names to the model's parameter names."""
    model_names = list(real_of)
    shapes = {n: tuple(real_params[r].shape) for n, r in real_of.items()}
    adapted = view.adapted if view is not None else {}
    trainable = {n: adapted[n].trainable if n in adapted else real_params[r].requires_grad for n, r in real_of.items()}

    result = MatchResult()
    candidates: list[str] = []
    for name in prior_shapes:
        if (inc is not None and not inc(name)) or (exc is not None and exc(name)) or (pexc and pexc(name)):
            result.excluded.append(name)
        else:
            candidates.append(name)

    # the (strip, add) prefix rewrite that matches the most candidate names; ties → the shortest rewrite, then the
    # most of them with the prior's shapes, then the first in sorted order (never the order of a set)
    best: tuple[str, str, tuple[int, int, int]] = ("", "", (-1, -1, 0))
    for strip in sorted(_prefixes(candidates), key=lambda x: (len(x), x)):
        for add in sorted(_prefixes(model_names), key=lambda x: (len(x), x)):
            targets = [(n, add + n[len(strip) :]) for n in candidates if n.startswith(strip)]
            found = [(n, t) for n, t in targets if t in shapes]
            same = sum(1 for n, t in found if tuple(int(d) for d in prior_shapes[n]) == shapes[t])
            score = (len(found), -(len(strip) + len(add)), same)
            if score > best[2]:
                best = (strip, add, score)
    strip, add, _ = best
    result.prior_prefix = strip
    result.model_prefix = (view.prefix if view is not None else "") + add

    used: set[str] = set()
    for name in candidates:
        target = add + name[len(strip) :] if name.startswith(strip) else None
        if target is None or target not in shapes:
            result.missing.append(name)
            continue
        if target in head:
            result.excluded.append(name)
            continue
        pshape, mshape = tuple(int(s) for s in prior_shapes[name]), shapes[target]
        if pshape != mshape:
            result.shape_mismatch.append((name, real_of[target], pshape, mshape))
            continue
        result.matched[name] = real_of[target]
        if target in adapted:
            result.adapted[name] = list(adapted[target].tensors)
        if not trainable[target]:
            result.frozen.append(name)
        used.add(target)

    def intended(model_name: str) -> bool:
        """A model parameter left without prior on purpose: the head, or a pattern names it."""
        if model_name in head or any(hint in model_name for hint in _NEW_LAYER_HINTS):
            return True
        if view is not None and model_name in view.saved:  # PEFT's modules_to_save: the new head, trained in full
            return True
        if not trainable[model_name]:  # frozen: it does not train, it needs no prior
            return True
        pname = strip + model_name[len(add) :] if model_name.startswith(add) else model_name
        return any(
            f is not None and hit
            for f, hit in (
                (inc, inc is not None and not inc(pname)),
                (exc, exc is not None and exc(pname)),
                (pexc, pexc is not None and pexc(pname)),
            )
        )

    unused = [n for n in model_names if n not in used]
    result.no_prior = [real_of[n] for n in unused]
    for n in unused:
        if intended(n):
            continue
        if n in adapted:  # an adapted layer the prior does not cover: its adapters train without a prior
            layer = adapted[n]
            result.uncovered += [layer.weight_name] if layer.weight.requires_grad else []
            result.uncovered += [t for t, p in layer.tensors.items() if p.requires_grad]
        else:
            result.uncovered.append(real_of[n])
    if view is not None:
        result.adapters = list(view.adapter_tensors)
        result.peft_methods = list(view.methods)
    return result
