"""Exceptions raised by priorzoo. Each message names the offending thing, what was received and what is valid.

Example:
    >>> from priorzoo.errors import PriorFormatError
    >>> issubclass(PriorFormatError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["MixedPriorError", "PriorFormatError", "PriorMatchError", "PriorNotFoundError"]


class PriorFormatError(ValueError):
    """A prior's files or arguments break the format (bad config, missing/corrupt tensor, bad values)."""


class PriorNotFoundError(OSError):
    """No prior could be found at the given folder, Hub repo id, revision or subfolder."""


class PriorMatchError(ValueError):
    """A prior cannot be mapped onto a model (wrong architecture, shape mismatch, missing parameters)."""


class MixedPriorError(PriorFormatError):
    """A prior folder's files belong to different saves (a save landed between two reads, or a download mixed
    two commits): ``config.json`` names one save id and a tensor file's header carries another, or none."""
