"""``priorzoo learn``: learn a SWAG prior for a timm or transformers backbone on a local dataset.

The data is a ``datasets`` dataset read from a local folder (``save_to_disk`` output or an image folder
``<class>/<image>``), a CSV / JSON(L) / parquet file, or — when online — a Hub dataset id. The objective
is supervised cross-entropy (images or text with a label column), SimCLR (images, no labels needed) or
masked-LM (text, transformers ``*ForMaskedLM``). Training runs on the transformers ``Trainer`` with
:class:`priorzoo.learn.SWAGCallback` (constant or cyclic learning rate; ``--checkpoint-dir`` holds its
checkpoints, and a rerun with the same settings resumes) and writes a complete prior folder
(``config.json``, ``prior.safetensors``, ``README.md``). When the prior mean is no better than always answering
the most frequent class on held-out source data, ``learn`` warns and says so in the config and the card.

Example:
    $ priorzoo learn resnet18 --data ./images --objective simclr --epochs 20 --rank 20 --output-dir ./r18-ssl-prior
    $ priorzoo learn ./my-bert --data reviews.csv --text-column review --objective mlm --output-dir ./bert-prior
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from priorzoo.cli._common import (
    add_overwrite_argument,
    check_at_least,
    fail,
    quiet_libraries,
    reading_line,
    saving_into,
)
from priorzoo.data.user import DATA_FORMATS

__all__ = ["add_backbone_arguments", "register", "run"]

_RUN_SETTINGS = "learn_settings.json"
"""Inside ``--checkpoint-dir``: the settings of the run whose state is stored there."""


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """``--library``, ``--pretrained``, ``--checkpoint``, ``--freeze``, ``--trainable-layers`` (learn and finetune)."""
    from priorzoo.backbones import LIBRARIES

    p.add_argument("--library", choices=LIBRARIES, default="auto", help="torchvision must be named")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start from pre-trained weights (--no-pretrained: random init, no download)",
    )
    p.add_argument("--checkpoint", default=None, help="state-dict file to load into the backbone (a new head stays)")
    p.add_argument("--freeze", action="append", default=None, help="glob of parameters to freeze (repeatable)")
    p.add_argument(
        "--trainable-layers", type=int, default=None, help="train only the last N blocks of the backbone + the head"
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``learn`` subcommand to the ``priorzoo`` parser."""
    p = subparsers.add_parser(
        "learn",
        help="learn a SWAG prior for a backbone on your data",
        description=__doc__.split("\n\n")[0].replace("``", "")
        + " Writes a prior folder loadable with PriorModel.from_pretrained.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "backbone",
        help="timm name / hf-hub: id / folder, transformers id or folder, or torchvision name (--library torchvision)",
    )
    add_backbone_arguments(p)
    p.add_argument("--data", required=True, help="local folder/CSV/JSON/parquet, or a Hub dataset id (online)")
    p.add_argument(
        "--hub-dataset",
        default=None,
        metavar="ID",
        help="the Hub dataset a local --data copies, named in the card's `datasets:` (default: only a --data "
        "loaded from the Hub is named there)",
    )
    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto", help="how to read --data (auto: by path)")
    p.add_argument("--split", default="train", help="split of a dataset with several (save_to_disk / Hub)")
    p.add_argument("--image-column", default=None, help="default: the first Image column")
    p.add_argument("--text-column", default=None, help="default: `text`, else the first string column")
    p.add_argument("--label-column", default=None, help="default: `label` or `labels`")
    p.add_argument(
        "--objective",
        choices=("supervised", "simclr", "mlm"),
        default="supervised",
        help="source task: labels (cross-entropy), SimCLR on images, masked-LM on text",
    )
    p.add_argument(
        "--output-dir",
        "--output",
        dest="output_dir",
        required=True,
        help="folder to write the prior into (--output is an alias)",
    )
    add_overwrite_argument(p, "--output-dir")
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="supervised: hold out this share to report the prior mean's source accuracy in the card (0: none)",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs of SGD, warmup included")
    p.add_argument("--warmup-epochs", type=int, default=0, help="epochs of training before the first snapshot")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (the SWA lr with --schedule constant)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay")
    p.add_argument(
        "--schedule",
        choices=("constant", "cyclic"),
        default="constant",
        help="SWA learning rate: constant or cyclic cosine",
    )
    p.add_argument(
        "--cycle-steps", type=int, default=None, help="steps per cycle of --schedule cyclic (one snapshot each)"
    )
    p.add_argument(
        "--collect-every", default="epoch", help='"epoch" or a number of optimizer steps (constant schedule)'
    )
    p.add_argument("--rank", type=int, default=20, help="K, deviations kept for the low-rank factor")
    p.add_argument("--min-var", type=float, default=1e-6, help="floor of the SWAG diagonal variance")
    p.add_argument("--include", action="append", default=None, help="glob of parameters to include (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="glob of parameters to exclude (repeatable)")
    p.add_argument("--image-size", type=int, default=None, help="default: the timm model's input size, else 224")
    p.add_argument("--max-length", type=int, default=128, help="token limit for text")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N examples")
    p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature (simclr)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order, split and initialisation")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--checkpoint-dir", default=None, help="write resumable state here each epoch; rerun to resume")
    p.add_argument("--license", default=None, help="license of the prior, for its model card (e.g. apache-2.0)")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar and one line per epoch"
    )
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------------------------------------- run
def _collect_every(value: str) -> int | str:
    if value == "epoch":
        return value
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f'`--collect-every` must be "epoch" or a positive integer; received {value!r}') from None
    if n < 1:
        raise ValueError(f"`--collect-every` must be ≥ 1; received {n}")
    return n


def run(args: argparse.Namespace) -> int:
    """Execute ``priorzoo learn`` (see ``priorzoo learn --help``); returns the exit code."""
    try:
        return _run(args)
    except (ValueError, ImportError, FileNotFoundError, RuntimeError, OSError, ArithmeticError) as err:
        return fail("learn", err)


def _check_output(output: str, overwrite: bool = False, checkpoint_dir: str | None = None) -> None:
    """Refuse an ``--output-dir`` that cannot hold a prior before any training starts: the save's own
    :func:`~priorzoo.format.serialization.check_target` (a model folder, a non-empty folder without a prior),
    after the refusals worded for the command line — among them a ``--checkpoint-dir`` that is the output folder
    or inside it (its checkpoints and ``learn_settings.json``, which records local paths, would sit in the
    prior's folder, and the save would refuse that folder after training)."""
    from priorzoo.format.serialization import check_target

    if not output:
        raise ValueError("`--output-dir` is empty; name the folder to write the prior into")
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`--output-dir` {output!r} exists and is a file, not a folder: name a new or prior folder")
    if checkpoint_dir and Path(checkpoint_dir).resolve().is_relative_to(path.resolve()):
        raise ValueError(
            f"`--checkpoint-dir` {checkpoint_dir!r} is `--output-dir` {output!r} or inside it: the prior's folder "
            "must hold the prior only (checkpoints and the run's local settings are no part of it). Give the "
            "checkpoints a folder of their own"
        )
    with saving_into("--output-dir"):
        check_target(path, "--output-dir", overwrite=overwrite)


def _fingerprint(ds: Any) -> str:
    fp = getattr(ds, "_fingerprint", None)
    if fp:
        return f"{len(ds)}:{fp}"
    return f"{len(ds)}:" + hashlib.sha256(repr(ds[: min(len(ds), 64)]).encode()).hexdigest()[:16]


def _check_run_settings(checkpoint_dir: str | None, settings: dict[str, Any]) -> None:
    """With ``--checkpoint-dir``: record this run's settings there, or refuse to resume another run's state."""
    if checkpoint_dir is None:
        return
    folder = Path(checkpoint_dir)
    path = folder / _RUN_SETTINGS
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            saved = None
        if not isinstance(saved, dict):
            raise ValueError(f"`--checkpoint-dir` {checkpoint_dir!r}: {_RUN_SETTINGS} is corrupt; use a new folder")
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if diff:
            shown = "; ".join(f"{k}: stored {saved.get(k)!r}, now {settings.get(k)!r}" for k in diff[:4])
            raise ValueError(
                f"`--checkpoint-dir` {checkpoint_dir!r} holds the state of another run ({shown}); resuming it "
                "would return that run's prior. Use a new folder, or the same data and settings to resume"
            )
        return
    if any(folder.glob("checkpoint-*")):
        raise ValueError(
            f"`--checkpoint-dir` {checkpoint_dir!r} holds Trainer checkpoints without {_RUN_SETTINGS} (written by "
            "another tool or an older priorzoo): their settings cannot be checked. Use a new folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _run(args: argparse.Namespace) -> int:
    # Local data (folder / CSV / JSON / parquet), a timm model with --no-pretrained and a local transformers
    # folder are all read from disk: nothing here reaches the network unless the user names a Hub id.
    import torch

    from priorzoo.backbones import freeze_, load_backbone
    from priorzoo.cli._trainer import swag_run
    from priorzoo.data.user import Columns, image_input, load_data, make_collate
    from priorzoo.finetune.scale import split_train_validation
    from priorzoo.learn import CrossEntropyObjective, MaskedLMObjective, SimCLRObjective

    check_at_least(args, (("epochs", 1), ("batch_size", 1), ("rank", 2)))
    if not 0 <= args.validation_fraction < 1:
        raise ValueError(f"`--validation-fraction` must be in [0, 1); received {args.validation_fraction}")
    collect_every = _collect_every(str(args.collect_every))
    if args.hub_dataset is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.hub_dataset)
        except HFValidationError as err:
            raise ValueError(f"`--hub-dataset` {args.hub_dataset!r} is not a Hub dataset id ({err})") from None
    _check_output(args.output_dir, args.overwrite, args.checkpoint_dir)
    quiet_libraries()
    torch.manual_seed(args.seed)
    print(reading_line(args.data), flush=True)
    ds = load_data(args.data, data_format=args.data_format, split=args.split)
    if args.max_examples is not None:
        ds = ds.select(range(min(args.max_examples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"the dataset {args.data!r} (split {args.split!r}) is empty")
    objective_name = args.objective
    cols = Columns(
        ds,
        image=args.image_column,
        text=args.text_column,
        label=args.label_column,
        need_label=objective_name == "supervised",
    )
    modality = cols.modality
    if objective_name == "simclr" and modality != "image":
        raise ValueError("`--objective simclr` needs an image column; for text use `mlm` or `supervised`")
    if objective_name == "mlm" and modality != "text":
        raise ValueError("`--objective mlm` needs a text column; for images use `simclr` or `supervised`")
    num_classes = 0
    if objective_name == "supervised":
        cols.check_classification(len(ds), what=f"the dataset {args.data!r}")
        num_classes = cols.num_labels
    elif len(ds) < 2:
        raise ValueError(f"the dataset {args.data!r} has {len(ds)} example; learning a prior needs at least 2")
    train_ds, val_ds = ds, None
    if objective_name == "supervised" and args.validation_fraction > 0 and len(ds) >= 10:
        train_ds, val_ds = split_train_validation(ds, float(args.validation_fraction), seed=args.seed)
    _check_run_settings(
        args.checkpoint_dir,
        {
            "data": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
            "data_fingerprint": _fingerprint(ds),
            **{
                k: getattr(args, k)
                for k in (
                    "backbone", "library", "pretrained", "checkpoint", "freeze", "trainable_layers", "split",
                    "image_column", "text_column", "label_column", "objective", "warmup_epochs", "batch_size",
                    "lr", "momentum", "weight_decay", "schedule", "cycle_steps", "collect_every", "rank",
                    "min_var", "include", "exclude", "image_size", "max_length", "max_examples", "temperature",
                    "seed", "validation_fraction",
                )
            },
        },
    )  # fmt: skip

    bb = load_backbone(
        args.backbone,
        library=args.library,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        objective=objective_name,
        num_classes=num_classes,
        modality=modality,
    )
    model, tokenizer, library = bb.model, bb.tokenizer, bb.library
    if args.freeze or args.trainable_layers is not None:
        freeze_(model, freeze=args.freeze, trainable_layers=args.trainable_layers)
    image = image_input(model, name=args.backbone, size=args.image_size) if modality == "image" else None
    plain_input = library in ("timm", "torchvision")
    collate = make_collate(
        cols, tokenizer=tokenizer, image=image, max_length=args.max_length, labels=objective_name == "supervised"
    )

    def make_loader(part: Any, shuffle: bool) -> Any:
        return torch.utils.data.DataLoader(
            part, batch_size=args.batch_size, shuffle=shuffle, collate_fn=collate, num_workers=args.num_workers
        )

    loader = make_loader(train_ds, True)
    if objective_name == "supervised":
        objective: Any = CrossEntropyObjective(input_key="pixel_values" if plain_input else None)
    elif objective_name == "simclr":
        objective = SimCLRObjective.for_model(model, temperature=args.temperature, input_key="pixel_values")
    else:
        objective = MaskedLMObjective.from_tokenizer(tokenizer)

    def forward(m: Any, batch: Any) -> Any:
        if plain_input:
            return m(batch["pixel_values"])
        return m(**{k: v for k, v in batch.items() if k != "labels"})

    collector = swag_run(model, objective, train_ds, collate, args, steps_per_epoch=len(loader), every=collect_every)
    if collector.num_collected < 2:
        raise RuntimeError(
            f"only {collector.num_collected} snapshot(s) were collected; a prior needs at least 2 — raise --epochs "
            "or lower --collect-every"
        )
    local = Path(args.data).exists()
    source: dict[str, Any] = {
        "dataset": Path(args.data).name if local else args.data,
        "split": args.split,
        "objective": objective_name,
        "num_examples": len(train_ds),
    }
    if objective_name == "supervised":
        source["label_names"] = cols.names  # class id i is label_names[i] (the one label rule)
    if local:
        source["local"] = True  # a folder name is no Hub dataset id: the card claims no `datasets:`
    else:
        source["hub_id"] = args.data  # loaded from the Hub: a Hub dataset
    if args.hub_dataset:
        source["hub_id"] = args.hub_dataset  # the user's statement: the local data is a copy of this Hub dataset
    prior = collector.to_prior(
        backbone=bb.describe(),
        source=source,
        learning={
            "epochs": args.epochs,
            "warmup_epochs": args.warmup_epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "momentum": args.momentum,
            "weight_decay": args.weight_decay,
            "schedule": args.schedule if args.schedule == "cyclic" else "constant",
            "collect_every": collect_every,
            "seed": args.seed,
            **({"image_size": image.size} if image is not None else {"max_length": args.max_length}),
        },
        license=args.license,
        bn_data=loader,
        bn_forward=forward,
    )
    if val_ds is not None:
        device = next(model.parameters()).device
        accuracy, floor = _source_accuracy(prior, model, make_loader(val_ds, False), forward, device)
        notes = "source solution: the prior mean with batch-norm statistics and the source head"
        at_chance = accuracy <= floor < 1.0
        if at_chance:
            warning = (
                f"the prior mean scores {accuracy:.4f} on {len(val_ds)} held-out source examples, no better than "
                f"always answering the most frequent class ({floor:.4f}): this prior's mean is not a trained network "
                "(check --lr, --epochs, the labels and the backbone's weights)"
            )
            print(f"warning: {warning}", file=sys.stderr)
            notes = f"WARNING: at or below chance ({floor:.4f}, the most frequent class). " + notes
            prior.config.learning["warning"] = warning
        prior.config.results.append(
            {
                "role": "source",  # the source task, not a transfer result: never in the card's model-index
                "task_name": "source task",
                "dataset": source["dataset"],
                "split": f"held-out {args.validation_fraction:.0%} of {args.split}",
                "method": "prior mean (SWA) + source head",
                "metric": "accuracy",
                "value": round(accuracy, 4),
                "num_train_examples": len(train_ds),
                "notes": notes,
            }
        )
        print(f"source accuracy of the prior mean on {len(val_ds)} held-out examples: {accuracy:.4f}")
    with saving_into("--output-dir"):
        folder = prior.save_pretrained(args.output_dir, overwrite=args.overwrite)
    print(f"wrote {prior!r} to {folder} ({collector.num_collected} snapshots)")
    return 0


def _source_accuracy(prior: Any, model: Any, loader: Any, forward: Any, device: Any) -> tuple[float, float]:
    """Validation accuracy of the prior mean (weights + batch-norm statistics) with the source head, and the
    accuracy of always answering the most frequent validation class."""
    import copy

    import torch

    probe = copy.deepcopy(model).to(device)
    prior.init_model_(probe, allow_partial=True)
    probe.eval()
    right = total = 0
    counts: dict[int, int] = {}
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = forward(probe, batch)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            total += int(batch["labels"].numel())
            for y in batch["labels"].tolist():
                counts[y] = counts.get(y, 0) + 1
    return right / max(total, 1), max(counts.values(), default=0) / max(total, 1)
