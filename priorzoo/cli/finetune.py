"""``priorzoo finetune``: fine-tune a timm or transformers backbone with a learned prior and report metrics.

The objective is ``mean CE + ρ·penalty/N`` with the prior N(μ, λΣ) (a priorzoo prior folder or Hub id), the
L2-SP baseline (``--l2sp σ²``: N(w₀, σ²I) around the backbone's own weights) or no prior (``--no-prior``).
Inference: ``map`` (SGD/AdamW to a point estimate), ``bma`` (MAP, then SWAG over a constant-learning-rate
phase and Bayesian model averaging over S samples, batch-norm statistics refreshed per sample) or ``sgld``
(Langevin samples after a burn-in, averaged the same way). ``--tune-scale`` picks λ on a validation split
with short early-stopped runs first. Writes ``metrics.json`` (accuracy, NLL, ECE on the validation / test
data, the λ used and the λ curve), the fine-tuned model in ``model/`` (``priorzoo_finetune.json`` inside
records the prior and λ), and for ``bma`` the downstream posterior in ``posterior/``.

LoRA (``--lora-r 8 --lora-target query,value``): the backbone is frozen and rank-r adapters are trained
(with the new head); the prior is evaluated at the adapted layers' effective weights W₀ + ΔW, the other
covered weights held at their values (:mod:`priorzoo.binding.peft`, :mod:`priorzoo.binding.conditional`). With a
prior, W₀ starts at its mean unless ``--keep-backbone-weights``; ``--l2sp`` is then L2-SP on ΔW. ``model/`` holds
the adapters in PEFT's format, ``bma`` is SWAG over the adapters and the head.

Initialisation (default ``--init-from-prior`` when a prior is given): the covered weights start at the
prior mean μ — the source task's SWA solution for a SWAG prior, where the prior is centred — and
``--keep-backbone-weights`` starts from the backbone's own weights instead. With ``--l2sp`` and
``--no-prior`` the backbone's weights are always kept (the L2-SP prior is centred on them).

Example:
    $ priorzoo finetune ./all-MiniLM-L6-v2 --prior ./minilm-swag-prior --data train.csv --test-data test.csv \\
        --tune-scale --method map --output-dir runs/minilm
    $ priorzoo finetune ./all-MiniLM-L6-v2 --prior ./minilm-swag-prior --lora-r 8 --lora-target query,value \\
        --data train.csv --test-data test.csv --output-dir runs/minilm-lora
    $ priorzoo finetune resnet18 --l2sp 0.01 --data ./images/train --test-data ./images/test --method bma \\
        --output-dir runs/r18-l2sp
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from priorzoo.cli._common import check_at_least, default_device, fail
from priorzoo.cli._finetune_steps import data_columns as _columns
from priorzoo.cli._finetune_steps import fit_by_epoch as _fit_by_epoch  # a module global: tests patch it
from priorzoo.cli._finetune_steps import json_default as _json_default
from priorzoo.cli._finetune_steps import load_split as _load_split
from priorzoo.cli._finetune_steps import log as _log
from priorzoo.cli._finetune_steps import make_collate
from priorzoo.cli._finetune_steps import optimizer_from_args as _make_optimizer
from priorzoo.cli._finetune_steps import ranked_scales as _ranked
from priorzoo.cli._finetune_steps import save_model as _save_model
from priorzoo.cli._finetune_steps import sgld_phase as _sgld_phase
from priorzoo.cli._finetune_steps import stable_scale as _stable_scale
from priorzoo.cli._finetune_steps import swag_phase as _swag_phase
from priorzoo.cli._finetune_steps import with_lora as _with_lora
from priorzoo.data.user import DATA_FORMATS, Columns
from priorzoo.enums import Method, Metric, OptimizerKind

__all__ = ["register"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, received {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, received {text!r}")
    return value


def _grid(text: str) -> list[float]:
    return [_positive_float(t) for t in text.replace(" ", "").split(",") if t]


def _names(text: str) -> list[str]:
    return [t for t in text.replace(" ", "").split(",") if t]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand to the ``priorzoo`` parser."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a backbone with a learned prior (or L2-SP / no prior) and report metrics",
        description=__doc__.split("\n\nExample:")[0].replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from priorzoo.cli.learn import add_backbone_arguments

    p.add_argument(
        "backbone", help="transformers folder / Hub id, timm name / hf-hub: id / folder, or a torchvision name"
    )
    add_backbone_arguments(p)

    g = p.add_argument_group("prior (choose one)")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--prior", help="priorzoo prior: local folder or Hub repo id")
    which.add_argument("--no-prior", action="store_true", help="baseline: plain fine-tuning")
    which.add_argument(
        "--l2sp", type=_positive_float, metavar="SIGMA2", help="baseline: isotropic prior N(w₀, σ²I) at the backbone"
    )
    g.add_argument("--revision", default=None, help="Hub revision of --prior")
    g.add_argument(
        "--scale",
        type=_positive_float,
        default=None,
        help="covariance scale λ (default: the prior's recommended_scale, else its stored scale)",
    )
    g.add_argument("--tune-scale", action="store_true", help="choose λ on a validation split first")
    g.add_argument("--scale-grid", type=_grid, default=None, help="λ values, comma-separated (default 1,10,…,1e10)")
    g.add_argument("--tune-epochs", type=int, default=None, help="epochs of each λ run (default: --epochs)")
    g.add_argument("--tune-patience", type=int, default=2, help="evaluations without improvement before stopping")
    g.add_argument("--tune-eval-every", type=int, default=None, help="steps between evaluations (default: epoch)")
    g.add_argument("--tune-metric", choices=Metric.values(), default="nll")
    init = g.add_mutually_exclusive_group()
    init.add_argument(
        "--init-from-prior",
        dest="init_from_prior",
        action="store_true",
        default=True,
        help="start the covered weights at the prior mean μ (default with --prior)",
    )
    init.add_argument(
        "--keep-backbone-weights", dest="init_from_prior", action="store_false", help="start from the backbone"
    )
    g.add_argument("--prior-weight", type=_positive_float, default=1.0, help="ρ multiplying penalty/N")
    g.add_argument("--allow-partial", action="store_true", help="accept a prior that covers part of the backbone")

    lo = p.add_argument_group('LoRA adapters (pip install "priorzoo[peft]")')
    lo.add_argument(
        "--lora-r",
        type=int,
        default=None,
        help="train rank-r LoRA adapters (and the head) instead of every weight; the prior acts on W₀ + ΔW",
    )
    lo.add_argument("--lora-target", type=_names, default=None, help="modules to adapt, comma-separated: query,value")
    lo.add_argument("--lora-alpha", type=_positive_float, default=None, help="lora_alpha (default 2·r)")
    lo.add_argument("--lora-dropout", type=float, default=0.0)

    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="training data: CSV/TSV/JSON(L)/parquet file or an image folder")
    d.add_argument("--validation-data", default=None, help="validation data (default: split off --data if needed)")
    d.add_argument("--test-data", default=None, help="test data, for the reported metrics")
    d.add_argument("--data-format", choices=DATA_FORMATS, default="auto")
    d.add_argument("--validation-fraction", type=float, default=0.1)
    d.add_argument("--max-train-examples", type=int, default=None, help="few-shot: keep this many (seeded)")
    d.add_argument("--text-column", default=None, help="default: `text`, else the first string column")
    d.add_argument("--text-pair-column", default=None, help="second text of a pair (NLI-style tasks)")
    d.add_argument("--image-column", default=None, help="default: the first Image column")
    d.add_argument("--label-column", default=None, help="default: `label` or `labels`")
    d.add_argument("--max-length", type=int, default=128)
    d.add_argument("--image-size", type=int, default=None, help="default: the timm model's input size")

    t = p.add_argument_group("training")
    t.add_argument("--method", choices=Method.values(), default="map")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--eval-batch-size", type=int, default=64)
    t.add_argument(
        "--optimizer", choices=OptimizerKind.values(), default="sgd", help="for map and the MAP phase of bma"
    )
    t.add_argument("--lr", type=_positive_float, default=1e-2)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled decay toward 0, on top of the prior")
    t.add_argument("--max-grad-norm", type=_positive_float, default=None)
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (the prior stays float32)")
    t.add_argument("--num-samples", type=int, default=20, help="S, posterior samples for bma / sgld")
    t.add_argument("--swag-rank", type=int, default=20, help="K of the downstream SWAG posterior (bma)")
    t.add_argument("--swag-epochs", type=int, default=1, help="constant-lr epochs collecting SWAG snapshots (bma)")
    t.add_argument("--swag-lr", type=_positive_float, default=None, help="SGD lr of the SWAG phase (default --lr)")
    t.add_argument("--temperature", type=_positive_float, default=1.0, help="SGLD temperature T")
    t.add_argument("--burn-in-epochs", type=int, default=None, help="SGLD epochs before sampling (default half)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    t.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--output-dir", required=True, help="metrics.json, model/ and (bma) posterior/ go here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------------------------------------- checks
def check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or out-of-range options before anything is loaded (raises ``ValueError``).

    Example:
        >>> from priorzoo.cli import build_parser
        >>> args = build_parser().parse_args(
        ...     ["finetune", "bert", "--no-prior", "--scale", "10", "--data", "d.csv", "--output-dir", "out"]
        ... )
        >>> check_args(args)
        Traceback (most recent call last):
        ...
        ValueError: `--scale` / `--tune-scale` need a prior (`--prior` or `--l2sp`); `--no-prior` has no λ
    """
    has_prior = args.prior is not None or args.l2sp is not None
    if not has_prior and (args.scale is not None or args.tune_scale):
        raise ValueError("`--scale` / `--tune-scale` need a prior (`--prior` or `--l2sp`); `--no-prior` has no λ")
    if args.scale is not None and args.tune_scale:
        raise ValueError("give either `--scale λ` or `--tune-scale`, not both")
    if args.scale_grid is not None and not args.tune_scale:
        raise ValueError("`--scale-grid` is only used with `--tune-scale`")
    if args.scale_grid is not None and not args.scale_grid:
        raise ValueError("`--scale-grid` is empty")
    check_at_least(
        args,
        (
            ("epochs", 1),
            ("batch_size", 1),
            ("eval_batch_size", 1),
            ("num_samples", 1),
            ("swag_rank", 2),
            ("swag_epochs", 1),
            ("tune_patience", 1),
            ("max_length", 1),
        ),
    )
    if args.tune_epochs is not None and args.tune_epochs < 1:
        raise ValueError(f"`--tune-epochs` must be ≥ 1; received {args.tune_epochs}")
    if args.max_train_examples is not None and args.max_train_examples < 1:
        raise ValueError(f"`--max-train-examples` must be ≥ 1; received {args.max_train_examples}")
    if not 0 < args.validation_fraction < 1:
        raise ValueError(f"`--validation-fraction` must be in (0, 1); received {args.validation_fraction}")
    if (args.lora_r is None) != (args.lora_target is None):
        raise ValueError("LoRA needs both `--lora-r` (the rank) and `--lora-target` (modules, e.g. query,value)")
    if args.lora_r is None and (args.lora_alpha is not None or args.lora_dropout):
        raise ValueError("`--lora-alpha` / `--lora-dropout` need `--lora-r` and `--lora-target`")
    if args.lora_r is not None and args.lora_r < 1:
        raise ValueError(f"`--lora-r` must be ≥ 1; received {args.lora_r}")
    if args.lora_target is not None and not args.lora_target:
        raise ValueError("`--lora-target` names no module")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"`--lora-dropout` must be in [0, 1); received {args.lora_dropout}")
    if args.burn_in_epochs is not None and not 0 <= args.burn_in_epochs < args.epochs:
        raise ValueError(f"`--burn-in-epochs` must be in [0, --epochs); received {args.burn_in_epochs}")


# ---------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Execute ``priorzoo finetune`` (see ``priorzoo finetune --help``); returns the exit code."""
    try:
        check_args(args)
        finetune(args)
        return 0
    except (ValueError, ImportError, FileNotFoundError, RuntimeError, OSError, ArithmeticError) as err:
        return fail("finetune", err)
    except KeyboardInterrupt:
        return fail("finetune", KeyboardInterrupt("interrupted; metrics.json records what was done"))


@dataclass
class Setup:
    """Everything :func:`prepare` builds: data, model, prior (before any training step).

    Attributes:
        model, tokenizer, library: the backbone with its new head (``library``: ``timm``/``transformers``).
        columns: the data columns and label mapping.
        train_loader, eval_loaders: shuffled training loader; ``{"validation"?, "test"?}`` in fixed order.
        num_train_examples: N, the examples trained on (after any validation split / few-shot cut).
        prior: the prior (``None`` for ``--no-prior``); ``prior_info``: what goes into metrics.json.
        init: ``prior_mean`` or ``backbone``; ``scale``: λ before any search.
    """

    model: Any
    tokenizer: Any
    library: str
    columns: Columns
    train_loader: Any
    eval_loaders: dict[str, Any]
    num_train_examples: int
    prior: Any
    prior_info: dict[str, Any]
    init: str
    scale: float | None
    device: Any


def prepare(args: argparse.Namespace) -> Setup:
    """Load the data, build the backbone, load or build the prior and initialise the weights.

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
    from priorzoo.finetune.loop import l2sp_prior
    from priorzoo.finetune.scale import split_train_validation

    torch.manual_seed(args.seed)
    device = torch.device(default_device(args.device))
    train_ds = _load_split(args.data, args)
    val_ds = _load_split(args.validation_data, args)
    test_ds = _load_split(args.test_data, args)
    cols = _columns(train_ds, args, [d for d in (val_ds, test_ds) if d is not None])
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
        _log(args, "warning: no task head detected; the new classifier keeps its library initialisation")
    if args.freeze or args.trainable_layers is not None:
        frozen = freeze_(model, freeze=args.freeze, trainable_layers=args.trainable_layers)
        _log(args, f"froze {len(frozen)} parameter tensors")
    if library == "transformers" and getattr(model, "config", None) is not None:
        model.config.id2label = dict(enumerate(cols.names))
        model.config.label2id = {n: i for i, n in enumerate(cols.names)}
    model.to(device)
    collate = make_collate(cols, library, tokenizer, args, model)

    def loader(ds: Any, *, shuffle: bool, batch_size: int) -> Any:
        # the shuffling draws from torch's global RNG when an epoch starts: seeding it (tune_scale does, per λ;
        # finetune does before training) replays the same order
        return torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, num_workers=args.num_workers
        )

    eval_loaders = {
        name: loader(ds, shuffle=False, batch_size=args.eval_batch_size)
        for name, ds in (("validation", val_ds), ("test", test_ds))
        if ds is not None
    }

    prior = None
    prior_info: dict[str, Any] = {"source": None}
    if args.prior is not None:
        prior = PriorModel.from_pretrained(args.prior, revision=args.revision)
        prior_info = {"source": args.prior, "revision": args.revision}
    elif args.l2sp is not None:
        prior = l2sp_prior(model, args.l2sp)
        prior_info = {"source": "l2sp", "variance": args.l2sp}
    init = "backbone"
    scale = None
    if prior is not None:
        prior_info.update({"kind": prior.kind.value, "rank": prior.rank, "num_parameters": prior.num_parameters})
        if args.prior is not None and args.init_from_prior:
            prior.init_model_(model, allow_partial=args.allow_partial)
            init = "prior_mean"
        else:  # check the match now (init_model_ does it otherwise), before any training
            prior.match(model).check(allow_partial=args.allow_partial)
        scale = args.scale or prior.config.recommended_scale or prior.scale
        if args.scale is None and args.optimizer == "sgd":
            scale = _stable_scale(prior, scale, lr=args.lr, weight=args.prior_weight, n=len(train_part), args=args)
    if args.lora_r is not None:  # after the prior mean went into the backbone: W₀ = μ, adapters at their init
        model = _with_lora(model, library, args)
    return Setup(
        model=model,
        tokenizer=tokenizer,
        library=library,
        columns=cols,
        train_loader=loader(train_part, shuffle=True, batch_size=args.batch_size),
        eval_loaders=eval_loaders,
        num_train_examples=len(train_part),
        prior=prior,
        prior_info=prior_info,
        init=init,
        scale=scale,
        device=device,
    )


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run; returns the metrics dict it also writes to ``<output-dir>/metrics.json``.

    A failure at any point (a diverging run, bad data, an interrupt) still writes ``metrics.json`` with
    ``"status": "failed"``, the error and what was done (the λ search, the final runs' epochs) before the
    error propagates.

    Example:
        >>> from priorzoo.cli import build_parser
        >>> args = build_parser().parse_args(["finetune", "./my-bert", "--l2sp", "0.01",  # doctest: +SKIP
        ...                                   "--data", "train.csv", "--test-data", "test.csv", "--output-dir", "out"])
        >>> sorted(finetune(args)["metrics"]["test"])  # doctest: +SKIP
        ['accuracy', 'ece', 'nll', 'num_examples']
    """
    progress: dict[str, Any] = {
        "status": "running",
        "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
    }
    try:
        return _finetune(args, progress)
    except BaseException as err:
        progress["status"] = "failed"
        progress["error"] = f"{type(err).__name__}: {err}"
        out_dir = Path(args.output_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(progress, indent=2, default=_json_default) + "\n"
            (out_dir / "metrics.json").write_text(text, encoding="utf-8")
        except OSError:
            pass
        raise


def _finetune(args: argparse.Namespace, progress: dict[str, Any]) -> dict[str, Any]:
    import torch

    from priorzoo import __version__
    from priorzoo.finetune.loop import PriorRegularizer, fit, predict_proba
    from priorzoo.finetune.metrics import classification_metrics
    from priorzoo.finetune.scale import log_grid, tune_scale

    start = time.perf_counter()
    out_dir = Path(args.output_dir)
    setup = prepare(args)
    model, library, prior = setup.model, setup.library, setup.prior
    train_loader, eval_loaders, n_train = setup.train_loader, setup.eval_loaders, setup.num_train_examples
    cols, prior_info, scale = setup.columns, setup.prior_info, setup.scale
    autocast = torch.bfloat16 if args.bf16 else None

    # ---- λ search
    search = None
    if args.tune_scale:
        assert prior is not None and "validation" in eval_loaders
        template = copy.deepcopy(model)
        grid = args.scale_grid or log_grid(1.0, 1e10)
        n_val = len(eval_loaders["validation"].dataset)
        _log(args, f"searching λ over {len(grid)} values on {n_val} validation examples")
        search = tune_scale(
            prior,
            lambda: copy.deepcopy(template),
            train_loader,
            eval_loaders["validation"],
            num_train_examples=n_train,
            grid=grid,
            make_optimizer=lambda m: _make_optimizer(m, args),
            epochs=args.tune_epochs or args.epochs,
            eval_every=args.tune_eval_every,
            patience=args.tune_patience,
            metric=args.tune_metric,
            prior_weight=args.prior_weight,
            seed=args.seed,
            allow_partial=args.allow_partial,
            autocast_dtype=autocast,
            verbose=not args.quiet,
        )
        scale = search.best_scale
        progress["scale_search"] = search.to_dict()
        _log(args, search.table())
        del template

    # λ candidates for the final run: the chosen one, then (after a search) the others best first, so that a λ
    # whose full-length run diverges is recorded and the next best is used
    candidates: list[float | None] = [scale]
    if search is not None:
        candidates += [p.scale for p in _ranked(search) if p.scale != scale]
    initial_state = copy.deepcopy(model.state_dict()) if len(candidates) > 1 else None
    progress["final_runs"] = final_runs = []

    def make_regularizer(lam: float | None) -> Any:
        if prior is None:
            return None
        reg = PriorRegularizer(
            prior,
            model,
            num_train_examples=n_train,
            prior_weight=args.prior_weight,
            scale=lam,
            allow_partial=args.allow_partial,
        )
        prior_info["matched_parameters"] = len(reg.match.matched)
        return reg

    regularizer = make_regularizer(scale)
    if regularizer is not None:
        scale = regularizer.scale
    _log(
        args,
        f"fine-tuning {args.backbone} ({library}) on {n_train} examples, {cols.num_labels} classes, method "
        f"{args.method}, prior {prior_info['source']}" + (f", λ = {scale:g}" if scale is not None else ""),
    )

    # ---- training and prediction
    torch.manual_seed(args.seed)
    fit_kwargs: dict[str, Any] = {
        "regularizer": regularizer,
        "max_grad_norm": args.max_grad_norm,
        "autocast_dtype": autocast,
    }
    progress["training"] = history = {}
    predictions: dict[str, Any] = {}
    posterior = None
    if args.method in ("map", "bma"):
        for k, lam in enumerate(candidates):
            if k > 0:
                assert initial_state is not None
                model.load_state_dict(initial_state)
                fit_kwargs["regularizer"] = regularizer = make_regularizer(lam)
                scale = regularizer.scale if regularizer is not None else lam
                _log(args, f"retrying with the next best λ = {scale:g}")
            torch.manual_seed(args.seed)
            run_record: dict[str, Any] = {"scale": scale, "epochs": []}
            final_runs.append(run_record)
            try:
                res = _fit_by_epoch(
                    model, train_loader, _make_optimizer(model, args), args, eval_loaders.get("validation"),
                    cols.num_labels, run_record["epochs"], fit, fit_kwargs,
                )  # fmt: skip
            except FloatingPointError as err:
                run_record["diverged"] = str(err)
                _log(args, f"{'no prior' if scale is None else f'λ = {scale:g}'}: the final run diverged: {err}")
                if k + 1 < len(candidates):
                    continue
                raise FloatingPointError(
                    f"the final run diverged ({err})"
                    + (f"; so did every other λ of the search ({len(candidates)} tried)" if k else "")
                ) from None
            break
        progress["scale"] = scale
        history["map"] = {"steps": res.steps, "seconds": res.seconds, "history": res.history}
        if args.method == "map":
            for name, ld in eval_loaders.items():
                predictions[name] = predict_proba(model, ld)
        else:
            posterior, predictions, history["swag"] = _swag_phase(model, args, setup, fit_kwargs)
    else:  # sgld
        predictions, history["sgld"] = _sgld_phase(model, args, setup, fit_kwargs)

    metrics: dict[str, Any] = {}
    for name, (probs, labels) in predictions.items():
        metrics[name] = classification_metrics(probs, labels)
        if args.method != "map":
            metrics[name]["num_samples"] = args.num_samples if args.method == "bma" else history["sgld"]["samples"]

    # ---- outputs
    result: dict[str, Any] = {
        "status": "ok",
        "priorzoo_version": __version__,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "backbone": {"name": args.backbone, "library": library, "pretrained": bool(args.pretrained)},
        "method": args.method,
        "prior": {
            **prior_info,
            "scale": scale,
            "prior_weight": args.prior_weight if prior is not None else None,
            "init": setup.init,
        },
        "num_train_examples": n_train,
        "num_labels": cols.num_labels,
        "label_names": cols.names,
        "splits": {"train": n_train, **{k: len(v.dataset) for k, v in eval_loaders.items()}},
        "scale_search": search.to_dict() if search is not None else None,
        "lora": (
            {
                "r": args.lora_r,
                "target": args.lora_target,
                "alpha": args.lora_alpha or 2 * args.lora_r,
                "dropout": args.lora_dropout,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
            if args.lora_r is not None
            else None
        ),
        "final_runs": final_runs,
        "training": history,
        "metrics": metrics,
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_model(model, setup.tokenizer, library, out_dir / "model", result)
    if posterior is not None:
        posterior.save_pretrained(out_dir / "posterior")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    for name, m in metrics.items():
        _log(args, f"{name}: accuracy {m['accuracy']:.4f}  nll {m['nll']:.4f}  ece {m['ece']:.4f}")
    _log(args, f"wrote {out_dir / 'metrics.json'} and {out_dir / 'model'}")
    return result
