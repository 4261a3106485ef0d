"""The argument checks every module shares: one wording of each error (the name in backticks, what was received,
what is valid).

Example:
    >>> from priorzoo.validation import check_positive_int
    >>> check_positive_int(3, "epochs")
    3
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

__all__ = [
    "check_float",
    "check_num_train_examples",
    "check_positive_int",
    "check_prior_weight",
    "check_scale",
    "positive_real",
    "short_list",
]


def check_positive_int(value: Any, what: str, *, minimum: int = 1, hint: str = "") -> int:
    """``value`` as an int ≥ ``minimum``, else a ValueError naming ``what``, the value and what is valid.

    Example:
        >>> check_positive_int(0, "epochs")
        Traceback (most recent call last):
        ...
        ValueError: `epochs` must be an integer ≥ 1; received 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"`{what}` must be an integer ≥ {minimum}; received {value!r}" + (f" ({hint})" if hint else "")
        )
    return value


def check_float(value: Any, what: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a finite float ≥ (or > when ``strict``) ``minimum``, else a clear ValueError.

    Example:
        >>> check_float(0.5, "lr", strict=True)
        0.5
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        cmp = ">" if strict else "≥"
        raise ValueError(f"`{what}` must be a finite number {cmp} {minimum:g}; received {value!r}")
    return float(value)


def positive_real(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number > 0 (not a bool), else ``None``.

    Example:
        >>> positive_real(2), positive_real(-1.0), positive_real(True)
        (2.0, None, None)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def check_num_train_examples(value: Any) -> int:
    """N must be a positive integer (the number of training examples); returns it as ``int``.

    Integers of any kind (``int``, NumPy integers) and integral floats (``5e4``) are accepted.

    Example:
        >>> check_num_train_examples(50000)
        50000
    """
    n = None
    if not isinstance(value, bool):
        try:
            n = operator.index(value)
        except TypeError:
            if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
                n = int(value)
    if n is None:
        raise ValueError(
            f"`num_train_examples` (N) must be a positive integer, the number of training examples; received {value!r}"
        )
    if n <= 0:
        raise ValueError(
            f"`num_train_examples` (N) must be > 0: the loss adds penalty / N, N = number of training "
            f"examples; received {value!r}"
        )
    return n


def check_prior_weight(value: Any) -> float:
    """ρ must be a finite number > 0 (1 = the Bayesian posterior); returns it as ``float``.

    Example:
        >>> check_prior_weight(1)
        1.0
    """
    return _check_positive(
        value,
        "`prior_weight` must be a finite number > 0 (1.0 = the posterior; to train without a prior, "
        "do not add the term)",
    )


def check_scale(value: Any) -> float:
    """λ must be a finite number > 0 (it multiplies the prior covariance); returns it as ``float``.

    Example:
        >>> check_scale(1e4)
        10000.0
    """
    return _check_positive(
        value,
        "the prior scale λ must be a finite number > 0 (it multiplies the covariance: large λ = weak prior)",
    )


def _check_positive(value: Any, message: str) -> float:
    checked = positive_real(value)
    if checked is None:
        raise ValueError(f"{message}; received {value!r}")
    return checked


def short_list(items: Sequence[str], n: int = 4) -> str:
    """The first ``n`` items in backticks, then how many more: the way error messages list names.

    Example:
        >>> short_list(["a", "b", "c"], 2)
        '`a`, `b`, … (+1 more)'
    """
    items = list(items)
    if not items:
        return "none"
    shown = ", ".join(f"`{i}`" for i in items[:n])
    return shown + (f", … (+{len(items) - n} more)" if len(items) > n else "")
