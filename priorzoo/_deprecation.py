"""Deprecated names keep working for one release, with a warning the user actually sees.

:func:`warn_deprecated` emits a ``DeprecationWarning``; where the active warning filters would hide it (Python
ignores ``DeprecationWarning`` raised inside libraries by default), it emits a ``FutureWarning`` instead.
:func:`renamed_keyword` resolves an old keyword against its new name.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     renamed_keyword(None, 10.0, new="scale", old="prior_scale", where="PriorTrainer")
    10.0
    >>> caught[0].category.__name__
    'DeprecationWarning'
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["UNSET", "renamed_keyword", "warn_deprecated"]

REMOVED_IN = "0.3"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Default of a deprecated keyword: tells "not given" apart from an explicit ``None``."""


def warn_deprecated(message: str, *, stacklevel: int = 2) -> None:
    """Warn with ``DeprecationWarning``, or ``FutureWarning`` where the filters would hide the former.

    ``stacklevel`` counts from the caller of this function, as in :func:`warnings.warn`.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     warnings.simplefilter("always", FutureWarning)
        ...     warn_deprecated("`old` is deprecated")
        >>> caught[0].category.__name__
        'FutureWarning'
    """
    with warnings.catch_warnings(record=True) as seen:  # the active filters decide, nothing is shown here
        warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)
    category = DeprecationWarning if seen else FutureWarning
    warnings.warn(message, category, stacklevel=stacklevel + 1)


def renamed_keyword(
    new_value: Any, old_value: Any, *, new: str, old: str, where: str, default: Any = None, stacklevel: int = 2
) -> Any:
    """The value of a renamed keyword: ``new_value``, or ``old_value`` (with a deprecation warning) when the old
    name was given (``old_value`` is not :data:`UNSET`). ``stacklevel`` counts from the caller, as in
    :func:`warnings.warn` (2: the warning points at the caller's caller).

    Raises:
        TypeError: both names were given.

    Example:
        >>> renamed_keyword(3.0, UNSET, new="scale", old="prior_scale", where="PriorTrainer")
        3.0
    """
    if old_value is UNSET:
        return new_value
    if new_value is not default:
        raise TypeError(f"`{where}` received both `{new}` and its deprecated name `{old}`; pass only `{new}`")
    warn_deprecated(
        f"`{where}({old}=...)` is deprecated and will be removed in priorzoo {REMOVED_IN}; use `{new}=...`",
        stacklevel=stacklevel + 1,
    )
    return old_value
