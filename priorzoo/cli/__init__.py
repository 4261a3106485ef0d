"""The ``priorzoo`` command line.

Each subcommand lives in its own module under :mod:`priorzoo.cli` and exposes
``register(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code). Modules are imported only when listed, so a missing
optional extra only breaks the subcommand that needs it.

Every failure prints one line, ``priorzoo COMMAND: error: …``, and exits with status 2 (130 on Ctrl-C);
set ``PRIORZOO_DEBUG=1`` to see the traceback of an unexpected error instead.

Example:
    $ priorzoo --help
    $ priorzoo inspect ./my-prior
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

# subcommand module names, in the order `--help` lists them
_SUBCOMMANDS = ("demo", "learn", "finetune", "convert", "inspect", "hub")


def build_parser() -> argparse.ArgumentParser:
    from priorzoo import __version__

    parser = argparse.ArgumentParser(
        prog="priorzoo",
        description="Learned Bayesian priors for transfer learning: learn, share and fine-tune with them.",
    )
    parser.add_argument("--version", action="version", version=f"priorzoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"priorzoo.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"priorzoo.cli.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())
