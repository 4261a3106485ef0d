"""Small helpers shared by the ``priorzoo`` subcommands: error reporting, repeated options and checks.

Nothing here is public API. Heavy imports (torch, numpy, huggingface_hub) happen inside the functions, so
``priorzoo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

__all__: list[str] = []


def fail(command: str, err: BaseException) -> int:
    r"""Report ``err`` as one line ``priorzoo COMMAND: error: …`` on stderr; return the exit status 2.

    Errors priorzoo raises say what went wrong in their message; any other exception (a protocol or
    recursion error from a library) is named by its type too.

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     fail("pull", RecursionError("maximum recursion depth exceeded\nwhile decoding"))
        2
        >>> err.getvalue()
        'priorzoo pull: error: RecursionError: maximum recursion depth exceeded while decoding\n'
    """
    from priorzoo.errors import PriorFormatError, PriorMatchError, PriorNotFoundError

    own = (PriorFormatError, PriorMatchError, PriorNotFoundError, ValueError, FileNotFoundError, FileExistsError)
    text = " ".join(str(err).split()) or "(no message)"
    if not isinstance(err, own) or type(err).__module__.split(".")[0] not in ("builtins", "priorzoo"):
        text = f"{type(err).__name__}: {text}"
    print(f"priorzoo {command}: error: {text}", file=sys.stderr)
    return 2


def hub_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The failures of loading a prior (locally or from the Hub) that a command reports as a message."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from priorzoo.errors import PriorFormatError, PriorNotFoundError

    return (PriorNotFoundError, PriorFormatError, OfflineModeIsEnabled, HfHubHTTPError, ValueError, *extra)


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """``--revision``, ``--subfolder``, ``--cache-dir``, ``--local-files-only``, ``--token``: where a prior
    is read from (see :func:`download_kwargs`)."""
    parser.add_argument("--revision", default=None, help="branch, tag or commit id (Hub)")
    parser.add_argument("--subfolder", default=None, help="folder inside the repo or folder that holds the prior")
    parser.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder (default: HF_HUB_CACHE)")
    parser.add_argument("--local-files-only", action="store_true", help="use the cache only, never the network")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / saved login)")


def download_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``PriorModel.from_pretrained`` / ``download_prior`` that
    :func:`add_download_arguments` parsed."""
    return {
        "revision": args.revision,
        "token": args.token,
        "cache_dir": args.cache_dir,
        "local_files_only": args.local_files_only,
        "subfolder": args.subfolder,
    }


def check_at_least(args: argparse.Namespace, minimums: Iterable[tuple[str, int]]) -> None:
    """Raise ``ValueError("`--flag` must be ≥ least; received …")`` for the first option below its minimum.

    Example:
        >>> check_at_least(argparse.Namespace(batch_size=0), [("batch_size", 1)])
        Traceback (most recent call last):
        ...
        ValueError: `--batch-size` must be ≥ 1; received 0
    """
    for flag, least in minimums:
        if getattr(args, flag) < least:
            raise ValueError(f"`--{flag.replace('_', '-')}` must be ≥ {least}; received {getattr(args, flag)}")


OVERWRITE_REMEDY = "Name a new or empty folder, or pass `--overwrite` if the folder is yours to write into"
"""The way out of a refused prior folder for the commands that write a prior where the user says (``learn``,
``convert``, ``pull``): their ``--overwrite`` (see :func:`add_overwrite_argument`)."""


def add_overwrite_argument(parser: argparse.ArgumentParser, option: str) -> None:
    """``--overwrite``: write the prior into ``option``'s folder even when it holds other files (the library's
    ``overwrite=True``); the refusal it lifts names it (:data:`OVERWRITE_REMEDY`)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"write into {option} even when it is a non-empty folder without a prior or a model folder (its "
        "README.md and prior-named files are replaced, nothing else is removed)",
    )


SUBFOLDER_REMEDY = "Choose another `--output-dir`, or move that folder out of it"
"""The way out for the commands that write a prior into a fixed sub-folder of their results folder (``finetune``'s
``posterior/``, ``demo``'s ``prior/``): they have no ``--overwrite``, since the sub-folder is theirs to fill."""


@contextlib.contextmanager
def saving_into(option: str, remedy: str = OVERWRITE_REMEDY) -> Iterator[None]:
    """Word a save's refusal of its target folder for the command line: the save's own
    :class:`~priorzoo.errors.PriorTargetError`, naming the command's ``option`` and ``remedy`` (its own flag,
    never a Python keyword argument).

    Example:
        >>> from priorzoo.errors import PriorTargetError
        >>> with saving_into("--local-dir"):
        ...     raise PriorTargetError.refusing("save_directory", "notes", "is a non-empty folder that holds no prior")
        Traceback (most recent call last):
        ...
        priorzoo.errors.PriorTargetError: `--local-dir` 'notes' is a non-empty folder that holds no prior. Name a new \
or empty folder, or pass `--overwrite` if the folder is yours to write into
    """
    from priorzoo.errors import PriorTargetError

    try:
        yield
    except PriorTargetError as err:
        raise err.reworded(what=option, remedy=remedy) from None


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def quiet_libraries() -> None:
    """Silence the progress bars and info logs of ``datasets``, ``transformers`` and ``huggingface_hub`` (the
    CLI prints its own lines: "reading N images from …", one line per epoch); errors still show."""
    import importlib

    for module, calls in (
        ("datasets", ("disable_progress_bars", "utils.logging.set_verbosity_error")),
        ("transformers", ("utils.logging.set_verbosity_error", "utils.logging.disable_progress_bar")),
        ("huggingface_hub", ("utils.disable_progress_bars",)),
    ):
        try:
            root = importlib.import_module(module)
        except ImportError:
            continue
        for dotted in calls:
            target: Any = root
            for part in dotted.split("."):
                target = getattr(target, part, None)
            if callable(target):
                target()


def reading_line(path: str) -> str:
    """What a command prints before it reads local data: ``reading 50 images from ./train (5 class folders)``,
    ``reading train.csv``, or ``reading the Hub dataset org/name``.

    Example:
        >>> reading_line("no/such/file.csv")
        'reading the Hub dataset no/such/file.csv'
    """
    from pathlib import Path

    folder = Path(path)
    if folder.is_dir():
        images = [p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES]
        if images:
            classes = {p.parent for p in images}
            return f"reading {len(images)} images from {path} ({len(classes)} class folders)"
        return f"reading the dataset saved in {path}"
    if folder.is_file():
        return f"reading {path}"
    return f"reading the Hub dataset {path}"
