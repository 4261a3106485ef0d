"""``priorzoo learn``: learn a SWAG prior for a timm or transformers backbone on a local dataset.

The data is a ``datasets`` dataset read from a local folder (``save_to_disk`` output or an image folder
``<class>/<image>``), a CSV / JSON(L) / parquet file, or — when online — a Hub dataset id. The objective
is supervised cross-entropy (images or text with a label column), SimCLR (images, no labels needed) or
masked-LM (text, transformers ``*ForMaskedLM``). Training runs :func:`priorzoo.learn.swag_fit` with a
progress bar and writes a complete prior folder (``config.json``, ``prior.safetensors``, ``README.md``).

Example:
    $ priorzoo learn resnet18 --data ./images --objective simclr --epochs 20 --rank 20 --output ./r18-ssl-prior
    $ priorzoo learn ./my-bert --data reviews.csv --text-column review --objective mlm --output ./bert-prior
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from priorzoo.cli._common import DATA_FORMATS, check_at_least, default_device, fail, image_tensor

__all__ = ["build_backbone", "load_local_dataset", "register", "run"]

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``learn`` subcommand to the ``priorzoo`` parser."""
    p = subparsers.add_parser(
        "learn",
        help="learn a SWAG prior for a backbone on your data",
        description=__doc__.split("\n\n")[0].replace("``", "")
        + " Writes a prior folder loadable with PriorModel.from_pretrained.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("backbone", help="timm model name, transformers model name/Hub id, or local transformers folder")
    p.add_argument("--library", choices=("auto", "timm", "transformers"), default="auto")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start from pre-trained weights (--no-pretrained: random init, no download)",
    )
    p.add_argument("--data", required=True, help="local folder/CSV/JSON/parquet, or a Hub dataset id (online)")
    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto")
    p.add_argument("--split", default="train")
    p.add_argument("--image-column", default=None, help="default: the first Image column")
    p.add_argument("--text-column", default=None, help="default: `text`, else the first string column")
    p.add_argument("--label-column", default=None, help="default: `label` or `labels`")
    p.add_argument("--objective", choices=("supervised", "simclr", "mlm"), default="supervised")
    p.add_argument("--output", required=True, help="folder to write the prior into")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=int, default=0, help="epochs of training before the first snapshot")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (the SWA lr with --schedule constant)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=("constant", "cyclic"), default="constant")
    p.add_argument(
        "--cycle-steps", type=int, default=None, help="steps per cycle of --schedule cyclic (one snapshot each)"
    )
    p.add_argument(
        "--collect-every", default="epoch", help='"epoch" or a number of optimizer steps (constant schedule)'
    )
    p.add_argument("--rank", type=int, default=20, help="K, deviations kept for the low-rank factor")
    p.add_argument("--min-var", type=float, default=1e-6)
    p.add_argument("--include", action="append", default=None, help="glob of parameters to include (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="glob of parameters to exclude (repeatable)")
    p.add_argument("--image-size", type=int, default=None, help="default: the timm model's input size, else 224")
    p.add_argument("--max-length", type=int, default=128, help="token limit for text")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N examples")
    p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature (simclr)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None, help="write resumable state here each epoch; rerun to resume")
    p.add_argument("--license", default=None)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------------------------------------- data
def _is_local(path: str) -> bool:
    return Path(path).exists()


def load_local_dataset(data: str, *, data_format: str = "auto", split: str = "train") -> Any:
    """Load a ``datasets.Dataset`` from a local folder/file (or a Hub id with ``data_format="hub"``/auto).

    Example:
        >>> ds = load_local_dataset("reviews.csv")  # doctest: +SKIP
    """
    from priorzoo.learn._common import require

    datasets = require("datasets", what="reading training data")
    path = Path(data)
    fmt = data_format
    if fmt == "auto":
        if path.is_dir():
            fmt = (
                "disk"
                if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                else "imagefolder"
            )
        elif path.is_file():
            fmt = _FILE_BUILDERS.get(path.suffix.lower(), "")
            if not fmt:
                raise ValueError(
                    f"`--data` {data!r}: cannot tell the format of `{path.suffix}` files; valid: "
                    f"{sorted(_FILE_BUILDERS)} or a folder (pass --data-format)"
                )
        else:
            fmt = "hub"
    if fmt == "disk":
        ds = datasets.load_from_disk(str(path))
    elif fmt == "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=str(path))
    elif fmt == "hub":
        try:
            ds = datasets.load_dataset(data)
        except Exception as err:  # wrap whatever the Hub/network raised
            raise ValueError(
                f"`--data` {data!r} is not a local file or folder, and loading it as a Hub dataset failed ({err}); "
                "offline, pass a local folder / CSV / JSON / parquet file"
            ) from None
    else:
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        ds = datasets.load_dataset(fmt, data_files=str(path), **kwargs)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"the dataset has no split {split!r}; splits: {sorted(ds)} (pass --split)")
        ds = ds[split]
    return ds


def _columns(ds: Any, args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    import datasets

    feats = ds.features
    image = args.image_column or next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    text = args.text_column
    label = args.label_column or next((k for k in ("label", "labels") if k in feats), None)
    if image is None and text is None:
        strings = [
            k for k, f in feats.items() if getattr(f, "dtype", None) in ("string", "large_string") and k != label
        ]
        text = "text" if "text" in strings else (strings[0] if strings else None)
    for name, col in (("--image-column", image), ("--text-column", text), ("--label-column", label)):
        if col is not None and col not in feats:
            raise ValueError(f"`{name}` {col!r} is not a column of the dataset; columns: {sorted(feats)}")
    if image is None and text is None:
        raise ValueError(
            f"found neither an image nor a text column in {sorted(feats)}; pass --image-column/--text-column"
        )
    return image, text, label


def _label_mapping(ds: Any, label: str) -> tuple[int, Callable[[Any], int]]:
    import datasets

    feat = ds.features[label]
    if isinstance(feat, datasets.ClassLabel):
        return feat.num_classes, int
    values = sorted(set(ds[label]), key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(values)}
    return len(values), index.__getitem__


# ---------------------------------------------------------------------------------------------- models
def _pick_library(name: str, library: str) -> str:
    if library != "auto":
        return library
    path = Path(name)
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            if "architecture" in data and "model_type" not in data:
                return "timm"
        return "transformers"
    try:
        import timm

        if timm.is_model(name):
            return "timm"
    except ImportError:
        pass
    return "transformers"


def build_backbone(
    name: str,
    *,
    library: str = "auto",
    pretrained: bool = True,
    objective: str = "supervised",
    num_classes: int = 0,
    modality: str = "image",
    load_tokenizer: bool = True,
) -> tuple[Any, Any, str]:
    """Create ``(model, tokenizer_or_None, library)`` for ``learn``/``convert``.

    timm: ``timm.create_model(name, pretrained, num_classes)`` (0 classes: a feature extractor).
    transformers: ``Auto*`` classes from ``name`` (a local folder works offline), the head chosen by the
    objective (sequence / image classification, masked LM, or the bare ``AutoModel``); with
    ``pretrained=False`` the architecture comes from the config and the weights are random.

    Example:
        >>> model, tok, lib = build_backbone("resnet18", pretrained=False, num_classes=10)  # doctest: +SKIP
    """
    from priorzoo.learn._common import require

    lib = _pick_library(name, library)
    if lib == "timm":
        timm = require("timm", what=f"the timm backbone {name!r}")
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
        except RuntimeError as err:
            raise ValueError(f"cannot create timm model {name!r} (pretrained={pretrained}): {err}") from None
        return model, None, lib
    transformers = require("transformers", what=f"the transformers backbone {name!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except OSError as err:
        raise ValueError(
            f"cannot load the transformers config of {name!r} ({err}); offline, pass a local model folder"
        ) from None
    if objective == "mlm":
        auto = transformers.AutoModelForMaskedLM
    elif objective == "supervised" and modality == "text":
        auto = transformers.AutoModelForSequenceClassification
        config.num_labels = num_classes
    elif objective == "supervised":
        auto = transformers.AutoModelForImageClassification
        config.num_labels = num_classes
    else:
        auto = transformers.AutoModel
    if pretrained:
        kwargs = {"num_labels": num_classes} if objective == "supervised" else {}
        model = auto.from_pretrained(name, **kwargs, ignore_mismatched_sizes=objective == "supervised")
    else:
        model = auto.from_config(config)
    tokenizer = None
    if modality == "text" and load_tokenizer:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load a tokenizer for {name!r} ({err}); text needs the model's tokenizer"
            ) from None
    return model, tokenizer, lib


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
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as err:
        return fail("learn", err)


def _run(args: argparse.Namespace) -> int:
    # Local data (folder / CSV / JSON / parquet), a timm model with --no-pretrained and a local transformers
    # folder are all read from disk: nothing here reaches the network unless the user names a Hub id.
    import torch

    from priorzoo.learn import (
        CrossEntropyObjective,
        CyclicCosineSchedule,
        MaskedLMObjective,
        SimCLRObjective,
        swag_fit,
    )

    check_at_least(args, (("epochs", 1), ("batch_size", 1), ("rank", 2)))
    collect_every = _collect_every(str(args.collect_every))
    torch.manual_seed(args.seed)
    ds = load_local_dataset(args.data, data_format=args.data_format, split=args.split)
    if args.max_examples is not None:
        ds = ds.select(range(min(args.max_examples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"the dataset {args.data!r} (split {args.split!r}) is empty")
    image_col, text_col, label_col = _columns(ds, args)
    modality = "image" if image_col is not None else "text"
    objective_name = args.objective
    if objective_name == "simclr" and modality != "image":
        raise ValueError("`--objective simclr` needs an image column; for text use `mlm` or `supervised`")
    if objective_name == "mlm" and modality != "text":
        raise ValueError("`--objective mlm` needs a text column; for images use `simclr` or `supervised`")
    num_classes, to_id = 0, int
    if objective_name == "supervised":
        if label_col is None:
            raise ValueError("`--objective supervised` needs a label column (pass --label-column), or use simclr / mlm")
        num_classes, to_id = _label_mapping(ds, label_col)

    model, tokenizer, library = build_backbone(
        args.backbone,
        library=args.library,
        pretrained=args.pretrained,
        objective=objective_name,
        num_classes=num_classes,
        modality=modality,
    )
    image_size = args.image_size
    if modality == "image" and image_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        image_size = int(cfg.get("input_size", (3, 224, 224))[-1]) if library == "timm" else 224

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if modality == "image":
            out["pixel_values"] = torch.stack([image_tensor(r[image_col], image_size) for r in rows])
        else:
            enc = tokenizer(
                [str(r[text_col]) for r in rows],
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
            out.update(dict(enc))
        if objective_name == "supervised":
            out["labels"] = torch.tensor([to_id(r[label_col]) for r in rows], dtype=torch.long)
        return out

    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate, num_workers=args.num_workers
    )
    if objective_name == "supervised":
        objective: Any = CrossEntropyObjective(input_key="pixel_values" if library == "timm" else None)
    elif objective_name == "simclr":
        objective = SimCLRObjective.for_model(model, temperature=args.temperature, input_key="pixel_values")
    else:
        objective = MaskedLMObjective.from_tokenizer(tokenizer)

    schedule = None
    if args.schedule == "cyclic":
        steps = args.cycle_steps or len(loader)
        schedule = CyclicCosineSchedule(cycle_steps=steps, start_step=args.warmup_epochs * len(loader))
    device = default_device(args.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="swag_fit collected")  # reported below as an error
        collector = swag_fit(
            model,
            loader,
            objective,
            epochs=args.epochs,
            warmup_epochs=args.warmup_epochs,
            rank=args.rank,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            schedule=schedule,
            collect_every=collect_every,
            include=args.include,
            exclude=args.exclude,
            min_var=args.min_var,
            device=device,
            seed=args.seed,
            checkpoint_dir=args.checkpoint_dir,
            progress=args.progress,
        )
    if collector.num_collected < 2:
        raise RuntimeError(
            f"only {collector.num_collected} snapshot(s) were collected; a prior needs at least 2 — raise --epochs "
            "or lower --collect-every"
        )
    backbone: dict[str, Any] = {
        "library": library,
        "name": args.backbone,
        "pretrained": bool(args.pretrained),
        "architecture": type(model).__name__,
    }
    if library == "transformers" and getattr(model, "config", None) is not None:
        backbone["model_type"] = str(model.config.model_type)
    prior = collector.to_prior(
        backbone=backbone,
        source={
            "dataset": args.data if not _is_local(args.data) else Path(args.data).name,
            "split": args.split,
            "objective": objective_name,
            "num_examples": len(ds),
        },
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
            **({"image_size": image_size} if modality == "image" else {"max_length": args.max_length}),
        },
        license=args.license,
    )
    folder = prior.save_pretrained(args.output)
    print(f"wrote {prior!r} to {folder} ({collector.num_collected} snapshots)")
    return 0
