"""``priorzoo finetune``: fine-tune a timm, torchvision or transformers backbone with a learned prior, report metrics.

The objective is ``mean CE + ρ·penalty/N`` with the prior N(μ, λΣ) (a priorzoo prior folder or Hub id), the
L2-SP baseline (``--l2sp σ²``: N(w₀, σ²I) around the starting weights) or no prior (``--no-prior``). Every
phase runs on the transformers Trainer: evaluation each epoch and the best checkpoint restored (validation
NLL) when there is validation data, warmup and a decaying learning rate, checkpoints (``--resume``),
``--report-to`` loggers, ``--bf16``, gradient accumulation, and several processes under ``torchrun`` /
``accelerate launch`` (``--batch-size`` is per process).

Inference: ``map`` (a point estimate), ``bma`` (MAP, then SWAG over a constant-learning-rate phase and
Bayesian model averaging over S samples, batch-norm statistics refreshed per sample) or ``sgld`` (Langevin
samples after a burn-in, averaged the same way). ``--tune-scale`` picks λ on validation data with one
early-stopped run per λ and keeps the model of the best run (the model it scored). ``--scale learned`` (and
``--l2sp learned``) learns one λ per group (backbone, head) on the training data instead, in the same run,
with the data-emphasized ELBO (:mod:`priorzoo.finetune.learned_scale`): no validation data, and
metrics.json records the learned λ, σ and the learning rate (with ``--validation-data`` too, which then restores
the epoch of lowest validation NLL: the λ and σ recorded are those of that epoch, ``learned_scale.epoch``; every
epoch's are in ``training.map.history``). With ``--method bma`` the SWAG phase goes on with the same objective,
σ continuing from the MAP run (``training.swag.learned_scale`` records its λ and σ at the end). ``--lr auto`` (the
default) trains the full schedule at each learning rate of a short list and keeps the run with the lowest final
training objective (data loss plus the prior term: what the run minimised): it needs no validation data.

Batch norm: a batch-norm layer that trains cannot take a batch of one example (one value per channel once the
features are pooled), so when the training data leave a last batch of exactly one example (N mod
``--batch-size`` = 1, a single process) and the backbone has batch-norm layers that train, that batch is dropped
in each epoch (its example is trained on in the others, the order being reshuffled) and in the batch-norm
refreshes of ``bma`` / ``sgld``; N stays the number of training examples. metrics.json's
``drop_last_batch_of_one`` says whether this happened.

Starting point: with ``--prior`` the covered weights (and batch-norm statistics) start at the prior mean μ
(``--keep-backbone-weights``: the backbone's own); ``--init-from PRIOR`` starts a ``--no-prior`` or ``--l2sp``
run there too — the control arm that separates what the prior term does from what its starting point does.
Every run prints and records its starting point.

A run whose training loss diverged, or whose final model is no better than always answering the most
frequent class, ends with ``"status": "diverged"`` / ``"chance"`` in metrics.json and exit status 1
(``--allow-failure``: 0). Writes ``metrics.json``, the model in ``model/`` (``priorzoo_finetune.json``
inside records the prior and λ) and for ``bma`` the downstream posterior in ``posterior/``.

LoRA (``--lora-r 8 --lora-target query,value``): the backbone is frozen and rank-r adapters are trained
(with the new head); the prior is evaluated at the adapted layers' effective weights W₀ + ΔW. ``model/`` then
holds PEFT's adapter files, whose ``adapter_config.json`` (``base_model_name_or_path``) and card name the backbone
as given on the command line: a Hub id as is, a local folder by its name only, never its path. Reload: the
backbone (``AutoModelForSequenceClassification.from_pretrained(BACKBONE, num_labels=...)``), the prior mean put in
with ``prior.init_model_(base)`` when the run started there (``priorzoo_finetune.json``'s ``prior.init`` is
``prior_mean``, the default with ``--prior``), then ``PeftModel.from_pretrained(base, "OUTPUT_DIR/model")``.

Example:
    $ priorzoo finetune ./all-MiniLM-L6-v2 --prior ./minilm-swag-prior --data train.csv --test-data test.csv \\
        --tune-scale --output-dir runs/minilm
    $ priorzoo finetune resnet18 --library torchvision --checkpoint r18.pth --no-pretrained --no-prior \\
        --init-from ./r18-prior --data ./images/train --test-data ./images/test --output-dir runs/control
    $ torchrun --nproc_per_node 2 -m priorzoo.cli finetune ./bert --l2sp 0.01 --data train.csv --output-dir runs/ddp
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from priorzoo.cli._common import SUBFOLDER_REMEDY, check_at_least, fail, saving_into
from priorzoo.cli._finetune_steps import LR_GRIDS, Setup, describe_start, lr_candidates, prepare
from priorzoo.cli._finetune_steps import json_default as _json_default
from priorzoo.cli._finetune_steps import log as _log
from priorzoo.cli._finetune_steps import save_model as _save_model
from priorzoo.data.user import DATA_FORMATS
from priorzoo.enums import Method, OptimizerKind

__all__ = ["LR_GRIDS", "Setup", "prepare", "register"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, received {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, received {text!r}")
    return value


def _lr(text: str) -> float | str:
    return "auto" if text == "auto" else _positive_float(text)


def _scale_or_learned(text: str) -> float | str:
    """A positive number or ``learned`` (the scale learned on the training data: data-emphasized ELBO)."""
    return "learned" if text == "learned" else _positive_float(text)


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
    which.add_argument("--no-prior", action="store_true", help="baseline: plain fine-tuning (no prior term)")
    which.add_argument(
        "--l2sp",
        type=_scale_or_learned,
        metavar="SIGMA2",
        help="baseline: isotropic prior N(w₀, σ²I) centred on the starting weights w₀ (`learned`: σ² learned on the "
        "training data, as --scale learned)",
    )
    g.add_argument("--revision", default=None, help="Hub revision of --prior / --init-from")
    g.add_argument(
        "--scale",
        type=_scale_or_learned,
        default=None,
        help="covariance scale λ (default: the prior's recommended_scale, else its stored scale); `learned`: one λ "
        "per group (backbone, head) learned on the training data with the data-emphasized ELBO (Harvey, Petrov & "
        "Hughes 2024), no validation data needed; metrics.json records the learned λ, σ and the lr",
    )
    g.add_argument("--tune-scale", action="store_true", help="choose λ on validation data first (one run per λ)")
    g.add_argument("--scale-grid", type=_grid, default=None, help="λ values, comma-separated (default 1,10,…,1e10)")
    g.add_argument("--tune-epochs", type=int, default=None, help="epochs of each λ run (default: --epochs)")
    g.add_argument(
        "--tune-patience", type=int, default=2, help="epochs without a better validation NLL before a λ run stops"
    )
    init = g.add_mutually_exclusive_group()
    init.add_argument(
        "--init-from-prior",
        dest="init_from_prior",
        action="store_true",
        default=True,
        help="start the covered weights at the prior mean μ (default with --prior)",
    )
    init.add_argument(
        "--keep-backbone-weights",
        dest="init_from_prior",
        action="store_false",
        help="with --prior: start from the backbone's own weights",
    )
    init.add_argument(
        "--init-from",
        metavar="PRIOR",
        default=None,
        help="with --no-prior / --l2sp: start from this prior's mean μ and batch-norm statistics (the control arm)",
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
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")

    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="training data: CSV/TSV/JSON(L)/parquet file or an image folder")
    d.add_argument(
        "--validation-data",
        default=None,
        help="validation data: the best epoch (validation NLL) is restored (default: none, or split off --data "
        "for --tune-scale)",
    )
    d.add_argument("--test-data", default=None, help="test data, for the reported metrics")
    d.add_argument("--data-format", choices=DATA_FORMATS, default="auto", help="how to read --data (auto: by path)")
    d.add_argument("--validation-fraction", type=float, default=0.1, help="share of --data held out for --tune-scale")
    d.add_argument("--max-train-examples", type=int, default=None, help="few-shot: keep this many (seeded)")
    d.add_argument("--text-column", default=None, help="default: `text`, else the first string column")
    d.add_argument("--text-pair-column", default=None, help="second text of a pair (NLI-style tasks)")
    d.add_argument("--image-column", default=None, help="default: the first Image column")
    d.add_argument("--label-column", default=None, help="default: `label` or `labels`")
    d.add_argument("--max-length", type=int, default=128, help="token limit for text")
    d.add_argument("--image-size", type=int, default=None, help="default: the backbone's own input size")

    t = p.add_argument_group("training")
    t.add_argument("--method", choices=Method.values(), default="map", help="point estimate, SWAG BMA or SGLD")
    t.add_argument("--epochs", type=int, default=10, help="epochs of training")
    t.add_argument("--batch-size", type=int, default=16, help="training batch size per process")
    t.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size per process")
    t.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimiser step")
    t.add_argument(
        "--optimizer", choices=OptimizerKind.values(), default="sgd", help="for map and the MAP phase of bma"
    )
    t.add_argument(
        "--lr",
        type=_lr,
        default="auto",
        help="learning rate, or auto: the lowest final training objective (data loss + prior term) over --lr-grid "
        "(full schedule each)",
    )
    t.add_argument(
        "--lr-grid",
        type=_grid,
        default=None,
        help="learning rates tried by --lr auto (default: sgd 1e-3,1e-2,1e-1; adamw 1e-5,1e-4,1e-3)",
    )
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled decay toward 0, on top of the prior")
    t.add_argument(
        "--schedule",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="learning-rate decay after the warmup",
    )
    t.add_argument("--warmup", type=float, default=0.1, help="share of the steps with a linear warmup")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the total gradient norm (0: no clipping)")
    t.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the prior term stays float32)")
    t.add_argument("--num-samples", type=int, default=20, help="S, posterior samples for bma / sgld")
    t.add_argument("--swag-rank", type=int, default=20, help="K of the downstream SWAG posterior (bma)")
    t.add_argument("--swag-epochs", type=int, default=1, help="constant-lr epochs collecting SWAG snapshots (bma)")
    t.add_argument("--swag-lr", type=_positive_float, default=None, help="SGD lr of the SWAG phase (default --lr)")
    t.add_argument("--temperature", type=_positive_float, default=1.0, help="SGLD temperature T")
    t.add_argument("--burn-in-epochs", type=int, default=None, help="SGLD epochs before sampling (default half)")
    t.add_argument(
        "--seed", type=int, default=0, help="seeds the data order, splits, SGLD noise and a learned scale's noise ε"
    )
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    t.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    t.add_argument("--report-to", default="none", help="Trainer loggers: none, all, tensorboard, wandb, …")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint (refused under other options than the run that "
        "wrote it, --epochs aside)",
    )
    t.add_argument("--keep-checkpoints", action="store_true", help="keep the Trainer checkpoints of finished runs")
    p.add_argument("--output-dir", required=True, help="metrics.json, model/ and (bma) posterior/ go here")
    p.add_argument(
        "--allow-failure",
        action="store_true",
        help="exit 0 even when the run diverged or ends at chance (metrics.json says so)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the result lines")
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
    learned = args.scale == "learned" or args.l2sp == "learned"
    if (args.scale is not None or learned) and args.tune_scale:
        raise ValueError("give either `--scale λ` (or `learned`) or `--tune-scale`, not both")
    if args.l2sp == "learned" and args.scale is not None:
        raise ValueError("`--l2sp learned` learns the scale already: leave out `--scale`")
    if learned and args.prior_weight != 1.0:
        raise ValueError(
            f"`--prior-weight` must be 1 with a learned scale (the data-emphasized ELBO weights the KL by 1/D); "
            f"received {args.prior_weight:g}"
        )
    if learned and args.method == "sgld":
        raise ValueError("a learned scale (`--scale learned` / `--l2sp learned`) is for --method map or bma, not sgld")
    if args.scale_grid is not None and not args.tune_scale:
        raise ValueError("`--scale-grid` is only used with `--tune-scale`")
    if args.scale_grid is not None and not args.scale_grid:
        raise ValueError("`--scale-grid` is empty")
    if args.lr_grid is not None and args.lr != "auto":
        raise ValueError("`--lr-grid` is only used with `--lr auto`")
    if args.init_from is not None and args.prior is not None:
        raise ValueError(
            "`--init-from` is for `--no-prior` / `--l2sp` runs (the control arm); with `--prior` the run starts at "
            "that prior's mean already (`--keep-backbone-weights` to start from the backbone)"
        )
    check_at_least(
        args,
        (
            ("epochs", 1),
            ("batch_size", 1),
            ("eval_batch_size", 1),
            ("gradient_accumulation_steps", 1),
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
    if not 0 <= args.warmup < 1:
        raise ValueError(f"`--warmup` must be in [0, 1) (a share of the steps); received {args.warmup}")
    if args.max_grad_norm < 0:
        raise ValueError(f"`--max-grad-norm` must be ≥ 0 (0: no clipping); received {args.max_grad_norm}")
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
class RunFailed(Exception):
    """The run finished but its result is not usable (``status`` diverged / chance): exit status 1."""


def run(args: argparse.Namespace) -> int:
    """Execute ``priorzoo finetune`` (see ``priorzoo finetune --help``); returns the exit code."""
    from priorzoo.cli._common import quiet_libraries

    try:
        check_args(args)
        quiet_libraries()
        finetune(args)
        return 0
    except RunFailed as err:
        print(f"priorzoo finetune: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, ImportError, FileNotFoundError, RuntimeError, OSError, ArithmeticError) as err:
        return fail("finetune", err)
    except KeyboardInterrupt:
        return fail("finetune", KeyboardInterrupt("interrupted; metrics.json records what was done"))


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run; returns the metrics dict it also writes to ``<output-dir>/metrics.json``.

    A failure at any point (bad data, an interrupt) still writes ``metrics.json`` with ``"status": "failed"``,
    the error and what was done before the error propagates; a run that finishes with a diverged or
    chance-level model writes its metrics with that status and raises :class:`RunFailed` (unless
    ``--allow-failure``).

    Example:
        >>> from priorzoo.cli import build_parser
        >>> args = build_parser().parse_args(["finetune", "./my-bert", "--l2sp", "0.01",  # doctest: +SKIP
        ...                                   "--data", "train.csv", "--test-data", "test.csv", "--output-dir", "out"])
        >>> sorted(finetune(args)["metrics"]["test"])  # doctest: +SKIP
        ['accuracy', 'ece', 'nll', 'num_examples']
    """
    from priorzoo.cli._trainer import is_main_process

    progress: dict[str, Any] = {
        "status": "running",
        "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
    }
    try:
        return _finetune(args, progress)
    except RunFailed:
        raise
    except BaseException as err:
        progress["status"] = "failed"
        progress["error"] = f"{type(err).__name__}: {err}"
        out_dir = Path(args.output_dir)
        if is_main_process():
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                text = json.dumps(progress, indent=2, default=_json_default) + "\n"
                (out_dir / "metrics.json").write_text(text, encoding="utf-8")
            except OSError:
                pass
        raise


_POSTERIOR_OPTION = "--output-dir/posterior"


def _check_posterior_target(out_dir: Path) -> None:
    """Refuse a ``posterior/`` in ``--output-dir`` that the downstream posterior (bma) must not be saved into."""
    from priorzoo.format.commit import check_target

    with saving_into(_POSTERIOR_OPTION, SUBFOLDER_REMEDY):
        check_target(out_dir / "posterior", _POSTERIOR_OPTION)


def _finetune(args: argparse.Namespace, progress: dict[str, Any]) -> dict[str, Any]:
    import torch

    from priorzoo import __version__
    from priorzoo.cli._finetune_phases import (
        chance_reason,
        predict_splits,
        search,
        sgld_phase,
        swag_phase,
    )
    from priorzoo.cli._trainer import drops_last_single, inner_model, is_main_process, trainer_model
    from priorzoo.finetune.metrics import classification_metrics
    from priorzoo.finetune.scale import log_grid

    start_time = time.perf_counter()
    out_dir = Path(args.output_dir)
    if args.method == "bma":  # the posterior's folder, refused before training rather than at the save after it
        _check_posterior_target(out_dir)
    setup = prepare(args)
    library, prior, cols = setup.library, setup.prior, setup.columns
    model = trainer_model(setup.model, library)
    n_train = setup.num_train_examples
    progress["start"] = setup.start
    _log(args, f"starting point: {describe_start(setup.start)}", result=True)
    if args.l2sp == "learned":
        what = "L2-SP N(w₀, λI) with λ learned on the training data"
    elif args.l2sp is not None:
        what = f"L2-SP N(w₀, σ²I) with σ² = {args.l2sp:g}"
    elif prior is not None:
        what = f"prior {args.prior}" + (
            ", λ learned on the training data"
            if setup.scale == "learned"
            else (f", λ = {setup.scale:g}" if setup.scale is not None and not args.tune_scale else "")
        )
    else:
        what = "no prior term"
    _log(
        args,
        f"fine-tuning {args.backbone} ({library}) on {n_train} examples, {cols.num_labels} classes, method "
        f"{args.method}, {what}",
    )

    drop_last = drops_last_single(model, n_train, args.batch_size)
    if drop_last:
        _log(args, f"{n_train} examples in batches of {args.batch_size} leave a last batch of one, which batch norm "
                   "cannot train on: it is dropped in each epoch")  # fmt: skip
    lrs = lr_candidates(args)
    scale = setup.scale
    lr_search = scale_search = None
    history: dict[str, Any] = {}
    progress["training"] = history
    predictions: dict[str, Any] = {}
    posterior = None
    validation = setup.eval_datasets.get("validation")
    if args.method in ("map", "bma"):
        template = model  # the starting weights: every run of a search trains a copy of them
        chosen = None
        if len(lrs) > 1:
            _log(args, f"--lr auto: training the full schedule at lr {', '.join(f'{x:g}' for x in lrs)}")
            runs = [(lr, scale) for lr in lrs]
            model, chosen, lr_search = search(template, args, setup, runs, select="train_loss", what="lr")
            progress["lr_search"] = lr_search
            if chosen.diverged is None:
                _log(args, f"--lr auto chose lr = {chosen.lr:g} (lowest final training objective)")
        if args.tune_scale and (chosen is None or chosen.diverged is None):
            lr = chosen.lr if chosen is not None else lrs[0]
            grid = args.scale_grid or log_grid(1.0, 1e10)
            _log(args, f"searching λ over {len(grid)} values on {len(validation)} validation examples")
            runs = [(lr, s) for s in grid]
            model, chosen, scale_search = search(template, args, setup, runs, select="val_nll", what="λ")
            progress["scale_search"] = scale_search
            if chosen.diverged is None:
                nll = chosen.best_metrics["nll"] if chosen.best_metrics else math.nan
                _log(args, f"--tune-scale chose λ = {chosen.scale:g} (validation NLL {nll:.4f})")
        if chosen is None:
            model, chosen, _ = search(template, args, setup, [(lrs[0], scale)], select="none", what="run")
        scale = chosen.scale
        history["map"] = chosen.to_dict()
        progress["lr"] = chosen.lr
        if args.method == "bma" and chosen.diverged is None:
            posterior, predictions, history["swag"] = swag_phase(
                model, args, setup, chosen.lr, scale, chosen.learned_scale
            )
    else:  # sgld
        lr = lrs[0]
        if len(lrs) > 1:
            _log(args, f"--lr auto with sgld: the smallest rate of the list, lr = {lr:g}")
        chosen, predictions, history["sgld"] = sgld_phase(model, args, setup, lr, scale)
        progress["lr"] = lr
    if not predictions and chosen.diverged is None:
        predictions = predict_splits(model, setup)

    metrics: dict[str, Any] = {}
    for name, (probs, labels) in predictions.items():
        metrics[name] = classification_metrics(probs, labels)
        if args.method != "map":
            metrics[name]["num_samples"] = args.num_samples if args.method == "bma" else history["sgld"]["samples"]

    status, reason = "ok", None
    if chosen.diverged is not None:
        status, reason = "diverged", chosen.diverged + ": lower --lr (or use --lr auto)"
    else:
        reason = chance_reason(model, setup, predictions)
        if reason is not None:
            status = "chance"

    # ---- outputs
    prior_record = {
        **setup.prior_info,
        "scale": scale if prior is not None else None,
        "prior_weight": args.prior_weight if prior is not None else None,
        "init": setup.init,
    }
    if args.l2sp is not None:
        prior_record["sigma2"] = args.l2sp
    if scale == "learned" and chosen is not None:  # λ per group, σ and κ of the run that was kept
        prior_record["learned_scale"] = chosen.learned_scale
    result: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "priorzoo_version": __version__,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "backbone": {"name": args.backbone, "library": library, "pretrained": bool(args.pretrained)},
        "start": setup.start,
        "method": args.method,
        "prior": prior_record,
        "lr": progress.get("lr"),
        "num_train_examples": n_train,
        "num_labels": cols.num_labels,
        "label_names": cols.names,
        "splits": {"train": n_train, **{k: len(v) for k, v in setup.eval_datasets.items()}},
        "drop_last_batch_of_one": drop_last,
        "lr_search": lr_search,
        "scale_search": scale_search,
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
        "training": history,
        "metrics": metrics,
        "seed": args.seed,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "seconds": time.perf_counter() - start_time,
    }
    if chosen.matched is not None:
        result["prior"]["matched_parameters"] = chosen.matched
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_model(inner_model(model), setup.tokenizer, library, out_dir / "model", result)
        if posterior is not None:
            with saving_into(_POSTERIOR_OPTION, SUBFOLDER_REMEDY):
                posterior.save_pretrained(out_dir / "posterior")
        text = json.dumps(result, indent=2, default=_json_default) + "\n"
        (out_dir / "metrics.json").write_text(text, encoding="utf-8")
        for name, m in metrics.items():
            _log(args, f"{name}: accuracy {m['accuracy']:.4f}  nll {m['nll']:.4f}  ece {m['ece']:.4f}", result=True)
        _log(args, f"wrote {out_dir / 'metrics.json'} and {out_dir / 'model'}", result=True)
    if status != "ok" and not args.allow_failure:
        raise RunFailed(f"status {status}: {reason} (metrics.json records the run; --allow-failure to exit 0)")
    return result
