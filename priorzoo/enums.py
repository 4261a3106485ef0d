"""The choices of the API and the CLI as ``str`` Enums, each checked in one place (:meth:`Choice.check`).

A member compares equal to its string (``Metric.NLL == "nll"``), so plain strings keep working everywhere;
:meth:`Choice.check` turns a string (or a member) into the member, or raises a ``ValueError`` that names the
argument, what was received and every valid value.

Example:
    >>> from priorzoo.enums import Metric
    >>> Metric.check("accuracy").higher_is_better
    True
    >>> Metric.check("loss", what="select_metric")
    Traceback (most recent call last):
    ...
    ValueError: `select_metric` must be one of ['accuracy', 'ece', 'nll']; received 'loss'
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

__all__ = ["Choice", "Convention", "Method", "Metric", "OptimizerKind"]

_C = TypeVar("_C", bound="Choice")


class Choice(str, Enum):
    """Base of the choice Enums: a ``str`` Enum with one validating constructor."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> list[str]:
        """The valid strings, sorted.

        Example:
            >>> OptimizerKind.values()
            ['adamw', 'sgd']
        """
        return sorted(m.value for m in cls)

    @classmethod
    def check(cls: type[_C], value: Any, *, what: str | None = None) -> _C:
        """The member for ``value`` (a member or its string), else a ``ValueError`` naming ``what``.

        Example:
            >>> Method.check("bma") is Method.BMA
            True
        """
        try:
            return cls(value)
        except ValueError:
            name = what or cls._argument()
            raise ValueError(f"`{name}` must be one of {cls.values()}; received {value!r}") from None

    @classmethod
    def _argument(cls) -> str:
        return cls.__name__.lower()


class Metric(Choice):
    """A validation metric for early stopping and grid selection (:mod:`priorzoo.finetune.metrics`)."""

    ACCURACY = "accuracy"
    NLL = "nll"
    ECE = "ece"

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value is better (accuracy) or worse (NLL, ECE).

        Example:
            >>> Metric.NLL.higher_is_better
            False
        """
        return self is Metric.ACCURACY


class OptimizerKind(Choice):
    """The optimisers :func:`priorzoo.finetune.runners.make_optimizer` builds."""

    SGD = "sgd"
    ADAMW = "adamw"

    @classmethod
    def _argument(cls) -> str:
        return "optimizer"


class Method(Choice):
    """Inference methods of ``priorzoo finetune``: a point estimate, SWAG + BMA, or SGLD samples."""

    MAP = "map"
    BMA = "bma"
    SGLD = "sgld"


class Convention(Choice):
    """How :func:`priorzoo.convert.from_pretrain_your_loss` reads the official four-file priors."""

    OFFICIAL = "official"
    SWAG = "swag"
