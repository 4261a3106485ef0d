"""Which weights share one learned prior scale λ_g: the group specifications of
:mod:`priorzoo.finetune.learned_scale` (``default`` = {backbone, head}, ``layer``, ``block``, or a callable).

Example:
    >>> group_of("encoder.layer.3.output.dense.weight", "block")
    'encoder.layer.3'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["GROUPINGS", "check_groups", "group_of"]

GROUPINGS = ("default", "layer", "block")
"""The named group specifications: ``default`` ({backbone, head}), ``layer`` (one group per module of the
prior-covered weights, plus the head), ``block`` (one group per numbered block, e.g. ``encoder.layer.3``)."""


def group_of(name: str, groups: str | Callable[[str], str]) -> str:
    """The group of the prior parameter ``name`` (the prior's own name, so that a wrapper's prefix such as
    DDP's ``module.`` does not change it) under the group specification ``groups``.

    ``default``: ``backbone``; ``layer``: the module (the name without its last component);
    ``block``: the name up to its first numeric component (``bert.encoder.layer.3``), else its module;
    a callable: ``groups(name)``.

    Raises:
        ValueError: an unknown specification (naming the valid ones).

    Example:
        >>> group_of("bert.encoder.layer.3.attention.self.query.weight", "block")
        'bert.encoder.layer.3'
        >>> group_of("0.weight", "layer")
        '0'
    """
    if callable(groups):
        out = groups(name)
        if not isinstance(out, str) or not out or out == "head":
            raise ValueError(
                f"the `groups` callable must return a non-empty group name other than 'head'; for `{name}` it "
                f"returned {out!r}"
            )
        return out
    check_groups(groups)
    if groups == "default":
        return "backbone"
    module = name.rsplit(".", 1)[0] if "." in name else name
    if groups == "layer":
        return module
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if re.fullmatch(r"\d+", part):
            return ".".join(parts[: i + 1])
    return module


def check_groups(groups: Any) -> str | Callable[[str], str]:
    """``groups`` if it is one of :data:`GROUPINGS` or a callable, else a ValueError naming the valid ones.

    Example:
        >>> check_groups("layer")
        'layer'
    """
    if callable(groups) or (isinstance(groups, str) and groups in GROUPINGS):
        return groups
    raise ValueError(
        f"`groups` must be one of {', '.join(repr(g) for g in GROUPINGS)} or a callable name -> group; "
        f"received {groups!r}"
    )
