"""``priorzoo inspect``: what a prior covers, its rank, per-layer variance statistics, and a plot.

PRIOR is a local prior folder or a Hub repo id (downloaded through the cache like ``priorzoo pull``). The
text report gives the config summary (kind, rank K, λ, backbone, source task, how it was learned), the
number of weights, global variance statistics and factor row norms, and one line per parameter tensor:
mean and median variance, the low-rank part of the diagonal, and the prior std sqrt(mean diag Σ) next to
the RMS of the mean weights (see :mod:`priorzoo.inspect`). ``--json`` prints the same as JSON;
``--plot FILE.png`` draws the per-layer prior scales (needs ``pip install "priorzoo[plot]"``).

Example:
    $ priorzoo inspect ./r18-prior
    $ priorzoo inspect me/resnet18-cifar10-swag --scale 1e4 --plot r18-scales.png
    $ priorzoo inspect ./r18-prior --json > r18-summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from priorzoo.cli._common import add_download_arguments, download_kwargs, fail, hub_errors

__all__ = ["register"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to the ``priorzoo`` parser."""
    p = subparsers.add_parser(
        "inspect",
        help="summarise a prior: config, size, rank, per-layer variance statistics, plot",
        description="Summarise a prior (a local folder or a Hub repo id): config, parameter count, rank, global "
        "and per-layer variance statistics and prior scales; optionally plot the per-layer prior scale.",
    )
    p.add_argument("prior", metavar="PRIOR", help='a prior folder or a Hub repo id "org/name"')
    add_download_arguments(p)
    p.add_argument("--scale", type=float, default=None, help="λ to evaluate the prior std at (default: the stored λ)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a PNG plot of the per-layer prior scale")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (machine-readable)")
    p.add_argument("--all-layers", action="store_true", help="list every layer (default: at most 60)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``priorzoo inspect`` (see ``priorzoo inspect --help``); returns the exit code.

    Example:
        >>> from priorzoo.cli import main
        >>> main(["inspect", "./r18-prior", "--plot", "r18-scales.png"])  # doctest: +SKIP
        0
    """
    from priorzoo.inspect import format_summary, plot_layer_scales, summarize
    from priorzoo.prior import PriorModel

    try:
        prior = PriorModel.from_pretrained(args.prior, **download_kwargs(args))
        summary = summarize(prior, scale=args.scale)
        plotted = plot_layer_scales(summary, args.plot) if args.plot else None
    except hub_errors(ImportError) as err:
        return fail("inspect", err)
    try:
        if args.json:
            print(json.dumps(summary, indent=2, ensure_ascii=False))
        else:
            print(format_summary(summary, max_layers=None if args.all_layers else 60))
        if plotted is not None:
            print(f"wrote the per-layer prior scale plot to {plotted}", file=sys.stderr if args.json else sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `priorzoo inspect … | head`: the reader stopped early, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
    return 0
