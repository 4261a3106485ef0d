"""``priorzoo record-scale``: record on a prior's card the λ a ``finetune --scale learned`` run learned.

PRIOR is the prior the run fine-tuned with (a folder or a Hub repo id, read like ``priorzoo inspect``); RUN is
the run's ``--output-dir`` (its ``metrics.json``). The prior is written to ``--output-dir`` with the same
tensors and an updated config and card: ``recommended_scale`` becomes the measured fixed-λ equivalent
λ_g·D/N of the learned λ (see :mod:`priorzoo.finetune.learned_scale_card`), and the run's test metrics
become the card's results with their task, N and method. The run must be of this prior (``metrics.json``
names its content id), have finished (status ``ok``) and have learned λ (``--scale learned``). Nothing is
written into PRIOR's folder or the Hub cache unless ``--output-dir`` names it; no local path is recorded.

Example:
    $ priorzoo finetune ./bert --prior ./bert-prior --scale learned --data train.csv --test-data test.csv \\
        --output-dir runs/learned
    $ priorzoo record-scale ./bert-prior --run runs/learned --task my-reviews --output-dir ./bert-prior-measured
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from priorzoo.cli._common import (
    add_download_arguments,
    add_overwrite_argument,
    download_kwargs,
    fail,
    hub_errors,
    saving_into,
)

__all__ = ["register"]

METRICS_NAME = "metrics.json"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``record-scale`` subcommand to the ``priorzoo`` parser."""
    p = subparsers.add_parser(
        "record-scale",
        help="record on a prior's card the λ a `finetune --scale learned` run learned, with its results",
        description=__doc__.split("\n\nExample:")[0].replace("``", ""),
    )
    p.add_argument("prior", metavar="PRIOR", help="the prior the run fine-tuned with: a folder or a Hub repo id")
    add_download_arguments(p)
    p.add_argument("--run", required=True, metavar="RUN", help="the run's --output-dir (holding metrics.json)")
    p.add_argument("--output-dir", required=True, help="folder to write the updated prior into (new, empty or a prior)")
    p.add_argument(
        "--task",
        default=None,
        help="the task's name on the card (default: the run's training data file or folder name, or its Hub id)",
    )
    p.add_argument("--hub-dataset", action="store_true", help="--task is a Hub dataset id (enters the model-index)")
    add_overwrite_argument(p, "--output-dir")
    p.set_defaults(func=run)
    return p


def read_metrics(run_dir: str) -> dict[str, Any]:
    """The parsed ``metrics.json`` of a finetune run folder (or the file itself).

    Raises:
        FileNotFoundError: no ``metrics.json`` there.
        ValueError: it is not a JSON object.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"`--run` {run_dir!r}: no {METRICS_NAME} (name the --output-dir of a finetune run)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"`--run` {run_dir!r}: {METRICS_NAME} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"`--run` {run_dir!r}: {METRICS_NAME} holds {type(data).__name__}, not a JSON object")
    return data


def _stored_dtype(tensors: Any) -> Any:
    """The 16-bit float dtype the tensors were stored in (saved the same again), else ``None`` (float32)."""
    import torch

    dtype = next(iter(tensors.values())).dtype if tensors else None
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def run(args: argparse.Namespace) -> int:
    """Execute ``priorzoo record-scale`` (see ``priorzoo record-scale --help``); returns the exit code."""
    from priorzoo.finetune.learned_scale_card import read_learned_scale_run, record_learned_scale
    from priorzoo.format.card_results import format_number, hub_repo_id
    from priorzoo.format.serialization import check_target
    from priorzoo.prior import PriorModel

    try:
        with saving_into("--output-dir"):
            check_target(args.output_dir, "--output-dir", overwrite=args.overwrite)  # before any download
            learned = read_learned_scale_run(read_metrics(args.run))
            prior = PriorModel.from_pretrained(args.prior, **download_kwargs(args))
            config = record_learned_scale(prior, learned, task=args.task, hub_dataset=args.hub_dataset)
            updated = PriorModel(config, prior.mean, prior.variance, prior.cov_factor, buffers=prior.buffers)
            folder = updated.save_pretrained(  # the tensors as they were stored
                args.output_dir,
                dtype=_stored_dtype(prior.mean),
                factor_dtype=_stored_dtype(prior.cov_factor),
                repo_id=None if Path(args.prior).exists() else hub_repo_id(args.prior),
                overwrite=args.overwrite,
            )
    except hub_errors(FileNotFoundError, FileExistsError, NotADirectoryError, OSError) as err:
        return fail("record-scale", err)
    task = config.results[-1]["dataset"]
    print(
        f"recorded on {folder}: recommended λ = {format_number(config.recommended_scale)}, the fixed-λ equivalent "
        f"λ_g·D/N of λ_{learned.prior_group} = {learned.learned_scale:.4g} learned on {task} "
        f"(D = {learned.num_trained} trained weights, N = {learned.num_train_examples})"
    )
    shown = ", ".join(f"{k} {v:.4g}" for k, v in learned.test.items() if k != "num_examples")
    print(f"results on {task} (test): {shown}")
    return 0
