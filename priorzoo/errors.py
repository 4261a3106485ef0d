"""Exceptions raised by priorzoo. Each message names the offending thing, what was received and what is valid.

Example:
    >>> from priorzoo.errors import PriorFormatError
    >>> issubclass(PriorFormatError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["MixedPriorError", "PriorFormatError", "PriorMatchError", "PriorNotFoundError", "PriorTargetError"]


class PriorFormatError(ValueError):
    """A prior's files or arguments break the format (bad config, missing/corrupt tensor, bad values)."""


class PriorNotFoundError(OSError):
    """No prior could be found at the given folder, Hub repo id, revision or subfolder."""


class PriorMatchError(ValueError):
    """A prior cannot be mapped onto a model (wrong architecture, shape mismatch, missing parameters)."""


class MixedPriorError(PriorFormatError):
    """A prior folder's files belong to different saves (a save landed between two reads, or a download mixed
    two commits): ``config.json`` names one save id and a tensor file's header carries another, or none."""


class PriorTargetError(FileExistsError):
    r"""A save refused its target folder: it holds something other than a prior (a model folder's
    ``config.json``, other files). The message is ``"`what` 'path' <problem>. <remedy>"``; the parts are kept
    so an application can name its own way out (a command-line option instead of ``overwrite=True``) with
    :meth:`reworded`, without repeating the check.

    Example:
        >>> err = PriorTargetError.refusing("save_directory", "notes", "is a non-empty folder that holds no prior")
        >>> print(str(err).replace(". ", ".\n"))
        `save_directory` 'notes' is a non-empty folder that holds no prior.
        Write the prior into a new or empty folder, or pass `overwrite=True` if the folder is yours to write into
        >>> str(err.reworded(what="--output-dir", remedy="Pass `--overwrite` to write into it"))
        "`--output-dir` 'notes' is a non-empty folder that holds no prior. Pass `--overwrite` to write into it"
    """

    what: str
    path: str
    problem: str
    remedy: str

    DEFAULT_REMEDY = (
        "Write the prior into a new or empty folder, or pass `overwrite=True` if the folder is yours to write into"
    )

    @classmethod
    def refusing(cls, what: str, path: str, problem: str, remedy: str | None = None) -> PriorTargetError:
        """The refusal of ``path`` (the argument ``what``) for ``problem``, with ``remedy`` (default: the
        library's ``overwrite=True``)."""
        remedy = cls.DEFAULT_REMEDY if remedy is None else remedy
        err = cls(f"`{what}` {path!r} {problem}. {remedy}")
        err.what, err.path, err.problem, err.remedy = what, path, problem, remedy
        return err

    def reworded(self, *, what: str | None = None, remedy: str) -> PriorTargetError:
        """The same refusal naming the argument ``what`` (default: as before) and the way out ``remedy``."""
        return self.refusing(self.what if what is None else what, self.path, self.problem, remedy)
