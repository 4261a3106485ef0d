"""The ``priorzoo`` command line.

Each subcommand lives in its own module under :mod:`priorzoo.cli` and exposes
``register(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code). Modules are imported only when listed, so a missing
optional extra only breaks the subcommand that needs it.

Every failure prints one line, ``priorzoo COMMAND: error: …``, and exits with status 2 (130 on Ctrl-C);
set ``PRIORZOO_DEBUG=1`` to see the traceback of an unexpected error instead. A mistyped flag is reported
with the subcommand's usage and the closest flag; Python warnings print as one ``warning: …`` line.

Example:
    $ priorzoo --help
    $ priorzoo inspect ./my-prior
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

__all__ = ["main"]

# subcommand module names, in the order `--help` lists them
_SUBCOMMANDS = ("demo", "learn", "finetune", "record_scale", "convert", "inspect", "hub")


def build_parser() -> argparse.ArgumentParser:
    from priorzoo import __version__

    parser = argparse.ArgumentParser(
        prog="priorzoo",
        description="Learned Bayesian priors for transfer learning: learn, share and fine-tune with them.",
    )
    parser.add_argument("--version", action="version", version=f"priorzoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands: dict[str, argparse.ArgumentParser] = {}
    parser.subcommands = subcommands  # type: ignore[attr-defined]  # name -> parser, for error messages
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"priorzoo.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"priorzoo.cli.{name}":
                continue  # subcommand not shipped in this build
            raise
        registered = module.register(sub)
        for p in registered if isinstance(registered, list) else [registered]:
            if isinstance(p, argparse.ArgumentParser):
                subcommands[p.prog.split()[-1]] = p
    return parser


def _subparser(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser of the subcommand given (for its usage line in errors), else the top-level parser."""
    return getattr(parser, "subcommands", {}).get(getattr(args, "command", None), parser)


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """``unrecognized arguments: --rnak (did you mean --rank?)``."""
    import difflib

    flags = [s for a in parser._actions for s in a.option_strings]
    parts = []
    for arg in extra:
        close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.6) if arg.startswith("-") else []
        parts.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return "unrecognized arguments: " + " ".join(parts)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the CLI: one ``warning: …`` line, no file path or source line."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if extra:  # argparse would name the top-level usage: name the subcommand's, and the flag meant
        sub = _subparser(args, parser)
        sub.error(_unrecognized(sub, extra))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"priorzoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line; PRIORZOO_DEBUG=1 shows the traceback
        if os.environ.get("PRIORZOO_DEBUG"):
            raise
        from priorzoo.cli._common import fail

        return fail(args.command, err)
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    raise SystemExit(main())
