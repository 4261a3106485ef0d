"""The steps of ``priorzoo finetune`` (:mod:`priorzoo.cli.finetune`): its data columns, the SGD-stable default λ,
LoRA, the progress lines and the saved outputs (the training phases are in :mod:`priorzoo.cli._finetune_phases`).

Private to the CLI: what is here is the glue between ``argparse`` flags and the library.

Example:
    >>> import argparse
    >>> log(argparse.Namespace(quiet=False), "hello")
    hello
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from priorzoo.data.user import Columns
from priorzoo.format.local_paths import public_name, strip_local_paths

__all__ = [
    "LR_GRIDS",
    "RESULT_NAME",
    "Setup",
    "data_columns",
    "describe_start",
    "json_default",
    "load_split",
    "log",
    "lr_candidates",
    "prepare",
    "save_model",
    "stable_scale",
    "with_lora",
]

RESULT_NAME = "priorzoo_finetune.json"


def log(args: argparse.Namespace, msg: str, *, result: bool = False) -> None:
    """Print a progress line (``result``: a line ``--quiet`` keeps), on the main process only."""
    from priorzoo.cli._trainer import is_main_process

    if (result or not args.quiet) and is_main_process():
        print(msg, flush=True)


def data_columns(ds: Any, args: argparse.Namespace, others: Sequence[Any] = ()) -> Columns:
    """The columns and label mapping of the ``--*-column`` options (:class:`priorzoo.data.user.Columns`)."""
    return Columns(
        ds,
        image=args.image_column,
        text=args.text_column,
        text_pair=args.text_pair_column,
        label=args.label_column,
        others=others,
    )


def load_split(path: str | None, args: argparse.Namespace) -> Any:
    if path is None:
        return None
    from priorzoo.cli._common import reading_line
    from priorzoo.data.user import load_data

    log(args, reading_line(path))
    ds = load_data(path, data_format=args.data_format, split="train")
    if len(ds) == 0:
        raise ValueError(f"the data {path!r} is empty")
    return ds


def with_lora(model: Any, library: str, args: argparse.Namespace) -> Any:
    """Wrap the backbone in LoRA adapters; the new head is trained in full (``modules_to_save``)."""
    from priorzoo.binding.matching import head_parameter_names
    from priorzoo.binding.peft import lora_model

    heads = sorted({n.rsplit(".", 1)[0] for n in head_parameter_names(model)})
    return lora_model(
        model,
        r=args.lora_r,
        target_modules=args.lora_target,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        modules_to_save=heads if library == "timm" else None,
        task_type="SEQ_CLS" if library == "transformers" else None,
    )


def stable_scale(prior: Any, scale: float, *, lr: float, weight: float, n: int, args: argparse.Namespace) -> float:
    """λ raised (by powers of ten) until plain SGD is stable on the prior term: its stiffest direction has
    curvature ρ/(N·λ·v_min) (v_min the smallest variance), and a step stays stable while lr times that is
    ≤ 1 (momentum amplifies it; half the classical bound of 2)."""
    v_min = min(float(v.min()) for v in prior.variance.values())
    if v_min <= 0:
        return scale
    needed = lr * weight / (n * v_min)
    if scale >= needed:
        return scale
    raised = float(10.0 ** math.ceil(math.log10(needed)))
    log(
        args,
        f"λ = {scale:g} would make SGD unstable on the prior term (lr·ρ/(N·λ·v_min) = {needed / scale:.3g} > 1 with "
        f"N = {n}, v_min = {v_min:.2e}); using λ = {raised:g} (pass --scale or --tune-scale to choose it)",
    )
    return raised


def json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return repr(value)


def _name_base_model(folder: Path, model: Any, name: str) -> None:
    """Name the base model in PEFT's saved adapter files by the backbone as given (``name``, already through
    :func:`~priorzoo.format.local_paths.public_name`: a Hub id as is, a local folder by its name only).

    PEFT records the string the backbone was loaded from — a local folder's absolute path — as
    ``adapter_config.json``'s ``base_model_name_or_path`` and as the card's ``base_model`` and
    ``base_model:adapter:…`` tag; users upload this folder with PEFT's own ``push_to_hub``. The two files are
    rewritten after PEFT's save (so its save runs as it always does, with no Hub lookup of a bare folder name).
    ``PeftModel.from_pretrained(base, folder)`` never reads the field (it takes the base model as given); only
    ``AutoPeftModel*`` loads the base from it, which a Hub id still allows. Nothing changes when PEFT recorded no
    name (timm and torchvision backbones) or the name was already public.
    """
    recorded = next(iter(model.peft_config.values())).base_model_name_or_path
    if not recorded or recorded == name:
        return
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") == recorded:
        config["base_model_name_or_path"] = name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    card_path = folder / "README.md"
    if card_path.is_file():
        from huggingface_hub import ModelCard

        card = ModelCard.load(card_path)
        if card.data.base_model == recorded:
            card.data.base_model = name
        if card.data.tags:
            card.data.tags = [
                t.replace(f"base_model:adapter:{recorded}", f"base_model:adapter:{name}") for t in card.data.tags
            ]
        card.save(card_path)


def save_model(model: Any, tokenizer: Any, library: str, folder: Path, result: dict[str, Any]) -> None:
    from priorzoo.binding.peft import is_peft_model

    folder.mkdir(parents=True, exist_ok=True)
    if library == "transformers" or is_peft_model(model):  # a LoRA run saves its adapters (PEFT's format)
        model.save_pretrained(folder)
        if is_peft_model(model):
            _name_base_model(folder, model, public_name(result["backbone"]["name"]))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    elif library == "timm":
        from timm.models import save_for_hf

        save_for_hf(model, str(folder), safe_serialization=True)
    else:  # torchvision: the state dict, loadable with load_state_dict (or --checkpoint)
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors")
        )
    summary = {k: result[k] for k in ("method", "prior", "num_train_examples", "label_names", "backbone")}
    if result.get("scale_search") is not None:
        summary["scale_search"] = {k: result["scale_search"][k] for k in ("best_scale", "metric")}
    summary = strip_local_paths(summary)  # published with the model: names, never local paths
    (folder / RESULT_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


LR_GRIDS = {"sgd": (1e-3, 1e-2, 1e-1), "adamw": (1e-5, 1e-4, 1e-3)}
"""``--lr auto``: the learning rates tried per optimiser (see benchmarks/bench_cli_defaults.py)."""


@dataclass
class Setup:
    """Everything :func:`prepare` builds: data, model, prior (before any training step).

    Attributes:
        model, tokenizer, library: the backbone with its new head (``library``: timm/torchvision/transformers).
        columns: the data columns and label mapping; ``collate``: rows → batch (``make_collate``).
        train_dataset, eval_datasets: the training part; ``{"validation"?, "test"?}`` in fixed order.
        num_train_examples: N, the examples trained on (after any validation split / few-shot cut).
        prior: the prior of the loss (``None`` for ``--no-prior``); ``prior_info``: what goes into metrics.json.
        init: ``prior_mean`` or ``backbone``; ``start``: the starting point, recorded and printed.
        scale: λ before any search.
    """

    model: Any
    tokenizer: Any
    library: str
    columns: Columns
    collate: Any
    train_dataset: Any
    eval_datasets: dict[str, Any]
    num_train_examples: int
    prior: Any
    prior_info: dict[str, Any]
    init: str
    start: dict[str, Any]
    scale: float | None


def lr_candidates(args: argparse.Namespace) -> list[float]:
    if args.lr != "auto":
        return [float(args.lr)]
    return list(args.lr_grid or LR_GRIDS[args.optimizer])


def prepare(args: argparse.Namespace) -> Setup:
    """Load the data, build the backbone, load or build the prior and set the starting weights.

    Example:
        >>> from priorzoo.cli import build_parser
        >>> args = build_parser().parse_args(["finetune", "./my-bert", "--prior", "./my-prior",  # doctest: +SKIP
        ...                                   "--data", "train.csv", "--output-dir", "out"])
        >>> prepare(args).init  # doctest: +SKIP
        'prior_mean'
    """
    import torch

    from priorzoo import PriorModel
    from priorzoo.backbones import freeze_, init_head_, load_backbone
    from priorzoo.data.user import image_input, make_collate
    from priorzoo.finetune.scale import split_train_validation
    from priorzoo.format.content_id import content_id
    from priorzoo.learn import isotropic_prior

    torch.manual_seed(args.seed)
    train_ds = load_split(args.data, args)
    val_ds = load_split(args.validation_data, args)
    test_ds = load_split(args.test_data, args)
    cols = data_columns(train_ds, args, [d for d in (val_ds, test_ds) if d is not None])
    val_ds, test_ds = (cols.align(d) if d is not None else None for d in (val_ds, test_ds))  # ids by name
    cols.check_classification(len(train_ds))
    train_part: Any = train_ds
    if val_ds is None and args.tune_scale:
        train_part, val_ds = split_train_validation(train_ds, float(args.validation_fraction), seed=args.seed)
    if args.max_train_examples is not None and args.max_train_examples < len(train_part):
        gen = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(len(train_part), generator=gen)[: args.max_train_examples].tolist()
        train_part = torch.utils.data.Subset(train_part, sorted(keep))

    bb = load_backbone(
        args.backbone,
        library=args.library,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        objective="supervised",
        num_classes=cols.num_labels,
        modality=cols.modality,
    )
    model, tokenizer, library = bb.model, bb.tokenizer, bb.library
    if not init_head_(model):  # the library's own head init can swamp pre-trained features (see init_head_)
        log(args, "warning: no task head detected; the new classifier keeps its library initialisation")
    if library == "transformers" and getattr(model, "config", None) is not None:
        model.config.id2label = dict(enumerate(cols.names))
        model.config.label2id = {n: i for i, n in enumerate(cols.names)}
    image = image_input(model, name=args.backbone, size=args.image_size) if cols.modality == "image" else None
    collate = make_collate(cols, tokenizer=tokenizer, image=image, max_length=args.max_length)

    # ---- the starting point
    start: dict[str, Any] = {"weights": "backbone", "backbone_weights": bb.weights, "pretrained": bb.pretrained}
    prior = None
    prior_info: dict[str, Any] = {"source": None}
    init = "backbone"
    if args.prior is not None:
        prior = PriorModel.from_pretrained(args.prior, revision=args.revision)
        # content_id: which prior this run used, for `priorzoo record-scale` (the save id is not kept by loading)
        prior_info = {"source": args.prior, "revision": args.revision, "content_id": content_id(prior)}
        if args.init_from_prior:
            prior.init_model_(model, allow_partial=args.allow_partial)
            init = "prior_mean"
            start = {"weights": "prior_mean", "prior": args.prior, "buffers": len(prior.buffers)}
        else:  # check the match now (init_model_ does it otherwise), before any training
            prior.match(model).check(allow_partial=args.allow_partial)
    elif args.init_from is not None:
        source = PriorModel.from_pretrained(args.init_from, revision=args.revision)
        source.init_model_(model, allow_partial=args.allow_partial)
        init = "prior_mean"
        start = {"weights": "prior_mean", "prior": args.init_from, "buffers": len(source.buffers)}
    if args.l2sp is not None:  # centred on the starting weights (the backbone's, or μ with --init-from)
        learned_l2sp = args.l2sp == "learned"  # shape I, its scale learned on the training data
        prior = isotropic_prior(model, 1.0 if learned_l2sp else args.l2sp)
        prior_info = {"source": "l2sp", "variance": None if learned_l2sp else args.l2sp}
    if args.freeze or args.trainable_layers is not None:
        frozen = freeze_(model, freeze=args.freeze, trainable_layers=args.trainable_layers)
        log(args, f"froze {len(frozen)} parameter tensors (their batch norm runs in eval mode)")
    scale = None
    if prior is not None:
        prior_info.update({"kind": prior.kind.value, "rank": prior.rank, "num_parameters": prior.num_parameters})
        scale = args.scale or prior.config.recommended_scale or prior.scale
        if args.scale == "learned" or args.l2sp == "learned":
            scale = "learned"  # λ per group from the data-emphasized ELBO (priorzoo.finetune.learned_scale)
        elif args.scale is None and args.optimizer == "sgd" and args.l2sp is None:
            lr = max(lr_candidates(args))
            scale = stable_scale(prior, scale, lr=lr, weight=args.prior_weight, n=len(train_part), args=args)
    if args.lora_r is not None:  # after the prior mean went into the backbone: W₀ = μ, adapters at their init
        model = with_lora(model, library, args)
    return Setup(
        model=model,
        tokenizer=tokenizer,
        library=library,
        columns=cols,
        collate=collate,
        train_dataset=train_part,
        eval_datasets={name: ds for name, ds in (("validation", val_ds), ("test", test_ds)) if ds is not None},
        num_train_examples=len(train_part),
        prior=prior,
        prior_info=prior_info,
        init=init,
        start=start,
        scale=scale,
    )


def describe_start(start: dict[str, Any]) -> str:
    if start["weights"] == "prior_mean":
        return f"the prior mean μ of {start['prior']} (its weights and {start['buffers']} batch-norm buffers)"
    if start.get("backbone_weights"):
        return f"the backbone's pre-trained weights ({start['backbone_weights']})"
    return "a random initialisation (no pre-trained weights)"
