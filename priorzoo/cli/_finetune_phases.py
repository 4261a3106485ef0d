"""The phases of ``priorzoo finetune`` (:mod:`priorzoo.cli.finetune`), each a Trainer run of
:func:`priorzoo.cli._trainer.train_run`: a search over runs (``--lr auto``, ``--tune-scale``, or the one MAP run),
the SWAG phase of ``bma``, the SGLD chain; then the predictions and the chance check of the result.

Example:
    >>> import torch
    >>> majority_share(torch.tensor([0, 0, 1]))
    0.6666666666666666
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from pathlib import Path
from typing import Any

import torch

from priorzoo.cli._finetune_steps import log
from priorzoo.cli._trainer import RunResult, drops_last_single, inner_model, train_run

__all__ = ["chance_reason", "majority_share", "predict_splits", "search", "sgld_phase", "swag_phase"]


def _steps_per_epoch(args: argparse.Namespace, n: int, model: Any) -> int:
    """Optimiser steps per epoch, as the Trainer counts them (a last partial accumulation is a step)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = n // args.batch_size if drops_last_single(model, n, args.batch_size) else math.ceil(n / args.batch_size)
    return max(1, math.ceil(math.ceil(batches / world) / args.gradient_accumulation_steps))


def _loader(setup: Any, ds: Any, batch_size: int, *, drop_last: bool = False) -> Any:
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, collate_fn=setup.collate, drop_last=drop_last
    )


def _train_loader(setup: Any, model: Any, batch_size: int) -> Any:
    """The training data in order, for batch-norm statistics (a last batch of one dropped as in training)."""
    drop = drops_last_single(model, len(setup.train_dataset), batch_size)
    return _loader(setup, setup.train_dataset, batch_size, drop_last=drop)


def _run(model: Any, args: argparse.Namespace, setup: Any, folder: str, lr: float, scale: float | None, **kw: Any):
    return train_run(
        model,
        args=args,
        train_dataset=setup.train_dataset,
        collate=setup.collate,
        num_labels=setup.columns.num_labels,
        folder=Path(args.output_dir) / "checkpoints" / folder,
        lr=lr,
        prior=setup.prior,
        scale=scale,
        num_train_examples=setup.num_train_examples,
        log=lambda m: log(args, m),
        **kw,
    )


def search(
    template: Any,
    args: argparse.Namespace,
    setup: Any,
    runs: list[tuple[float, float | None]],
    *,
    select: str,
    what: str,
) -> tuple[Any, RunResult, dict[str, Any] | None]:
    """Train one run per ``(lr, λ)`` from copies of ``template``'s weights and keep the selected run's model.

    ``select``: ``train_loss`` (``--lr auto``: the lowest final training objective — data loss plus the prior
    term, :attr:`RunResult.final_objective` — full schedule, last iterate —
    or the restored best epoch with validation data), ``val_nll`` (``--tune-scale``: the lowest validation NLL
    of a run's restored best epoch; ties go to the smaller λ) or ``none`` (one run, on ``template`` itself).
    The model returned is the selected run's model, the one that was scored: nothing is retrained. Runs that
    diverged are never selected; when all did, the first is returned (its ``diverged`` says why).
    Returns ``(model, its RunResult, the search record for metrics.json or None)``.
    """
    validation = setup.eval_datasets.get("validation")
    if select == "none":
        (lr, scale) = runs[0]
        res = _run(template, args, setup, "map", lr, scale, eval_dataset=validation, epochs=args.epochs,
                   optimizer=args.optimizer, schedule=args.schedule, warmup=args.warmup)  # fmt: skip
        return template, res, None
    best: tuple[tuple[float, float], Any, RunResult] | None = None
    first: tuple[Any, RunResult] | None = None
    curve = []
    tuning = select == "val_nll"
    epochs = (args.tune_epochs or args.epochs) if tuning else args.epochs
    for lr, scale in runs:
        value = scale if tuning else lr
        label = f"[{what} = {value:g}] "
        model = copy.deepcopy(template)
        res = _run(
            model, args, setup, f"{'scale' if tuning else 'lr'}-{value:g}", lr, scale,
            eval_dataset=validation, epochs=epochs, optimizer=args.optimizer, schedule=args.schedule,
            warmup=args.warmup, patience=args.tune_patience if tuning else None, label=label,
        )  # fmt: skip
        point = res.to_dict()
        point["metrics"] = res.best_metrics or {}
        point["final_train_loss"] = res.final_train_loss
        point["final_objective"] = res.final_objective
        curve.append(point)
        if tuning:
            score = (res.best_metrics or {}).get("nll", math.inf) if res.diverged is None else math.inf
            key = (score if math.isfinite(score) else math.inf, float(scale or 0.0))
        else:
            key = (res.final_objective, 0.0)
        summary = "diverged" if res.diverged else (
            f"validation nll {score:.4f}" if tuning else f"final training objective {res.final_objective:.4f}"
        )  # fmt: skip
        log(args, f"{label}{summary}")
        if first is None:
            first = (model, res)
        if math.isfinite(key[0]) and (best is None or key < best[0]):
            best = (key, model, res)
        elif model is not first[0]:
            del model
    chosen_model, chosen = (best[1], best[2]) if best is not None else first  # type: ignore[misc]
    record = {
        f"best_{'scale' if tuning else 'lr'}": (chosen.scale if tuning else chosen.lr),
        "metric": "nll" if tuning else "final_objective",
        "curve": curve,
        "settings": {
            "epochs": epochs,
            "patience": args.tune_patience if tuning else None,
            "grid": [s if tuning else lr for lr, s in runs],
            "num_train_examples": setup.num_train_examples,
            "seed": args.seed,
        },
    }
    return chosen_model, chosen, record


def swag_phase(
    model: Any, args: argparse.Namespace, setup: Any, lr: float, scale: float | str | None, learned: Any = None
) -> tuple:
    """``--method bma`` after the MAP run: SWAG over a constant-lr SGD Trainer run, then BMA over
    ``--num-samples`` draws (batch-norm statistics refreshed per draw); the model is left at the SWA mean with
    its statistics. With a learned scale (``scale="learned"``) the phase goes on with the data-emphasized ELBO,
    λ_g re-solved every step as in the MAP run and σ starting where the MAP run left it (``learned``: that run's
    ``RunResult.learned_scale``), not at its initial value. Returns ``(posterior, {split: (probabilities,
    labels)}, the phase's history entry)``."""
    from transformers import TrainerCallback

    from priorzoo.finetune import DownstreamSWAG, bma_predict, refresh_batchnorm_

    swag = DownstreamSWAG(inner_model(model), rank=args.swag_rank)
    steps = args.swag_epochs * _steps_per_epoch(args, setup.num_train_examples, model)
    every = max(1, steps // (args.swag_rank + 1))

    class Collect(TrainerCallback):
        def on_step_end(self, targs: Any, state: Any, control: Any, **kwargs: Any):
            if state.global_step % every == 0:
                swag.collect()

    res = _run(model, args, setup, "swag", args.swag_lr or lr, scale, epochs=args.swag_epochs, optimizer="sgd",
               schedule="constant", warmup=0.0, callbacks=[Collect()], label="[swag] ",
               sigma_init=(learned or {}).get("sigma"))  # fmt: skip
    entry = {**res.to_dict(), "snapshots": swag.num_collected, "collect_every": every}
    if res.diverged is not None:
        raise FloatingPointError(f"the SWAG phase diverged: {res.diverged}; lower --swag-lr")
    if swag.num_collected < 2:
        raise RuntimeError(f"the SWAG phase collected {swag.num_collected} snapshot(s); raise --swag-epochs")
    posterior = swag.posterior()
    train_loader = _train_loader(setup, model, args.batch_size)
    predictions: dict[str, Any] = {}
    if setup.eval_datasets:
        loaders = {name: _loader(setup, ds, args.eval_batch_size) for name, ds in setup.eval_datasets.items()}
        device = next(model.parameters()).device
        avg = bma_predict(
            model,
            posterior,
            loaders,
            num_samples=args.num_samples,
            bn_loader=train_loader,
            generator=torch.Generator(device=device).manual_seed(args.seed),
        )
        predictions = {name: (avg.probabilities(name), avg.labels(name)) for name in loaders}
    # the saved model is the SWA mean, with its BN statistics
    posterior.init_model_(model, exclude_head=False, allow_partial=True)
    refresh_batchnorm_(model, train_loader)
    return posterior, predictions, entry


def sgld_phase(model: Any, args: argparse.Namespace, setup: Any, lr: float, scale: float | None) -> tuple:
    """``--method sgld``: a Langevin chain as a Trainer run (the :class:`~priorzoo.finetune.SGLD` optimiser at a
    constant step, no clipping), samples after the burn-in averaged over the evaluation splits.
    Returns ``(the run's RunResult, {split: (probabilities, labels)}, the run's history entry)``."""
    from transformers import TrainerCallback

    from priorzoo.finetune.bayes import SGLD, PredictiveAverager

    n = setup.num_train_examples
    device = next(model.parameters()).device
    sgld = SGLD(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        num_train_examples=n,
        temperature=args.temperature,
        generator=torch.Generator(device=device).manual_seed(args.seed),
    )
    constant = torch.optim.lr_scheduler.LambdaLR(sgld, lambda _step: 1.0)
    per_epoch = _steps_per_epoch(args, n, model)
    burn = args.epochs // 2 if args.burn_in_epochs is None else args.burn_in_epochs
    every = max(1, (args.epochs - burn) * per_epoch // args.num_samples)
    loaders = {name: _loader(setup, ds, args.eval_batch_size) for name, ds in setup.eval_datasets.items()}
    train_loader = _train_loader(setup, model, args.batch_size)
    averager = PredictiveAverager(loaders, bn_loader=train_loader) if loaders else None

    class Sample(TrainerCallback):
        def on_step_end(self, targs: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
            k = state.global_step - burn * per_epoch
            if averager is not None and k > 0 and k % every == 0 and averager.num_samples < args.num_samples:
                averager.add(model)

    res = _run(model, args, setup, "sgld", lr, scale, epochs=args.epochs, optimizers=(sgld, constant),
               callbacks=[Sample()], clip=0.0, label="[sgld] ")  # fmt: skip
    entry = {**res.to_dict(), "burn_in_epochs": burn, "sample_every": every}
    entry["samples"] = averager.num_samples if averager is not None else 0
    predictions: dict[str, Any] = {}
    if averager is not None and res.diverged is None:
        if averager.num_samples == 0:
            raise RuntimeError("SGLD collected no sample; raise --epochs or lower --burn-in-epochs")
        predictions = {name: (averager.probabilities(name), averager.labels(name)) for name in loaders}
    return res, predictions, entry


def predict_splits(model: Any, setup: Any, *, batch_size: int = 64) -> dict[str, tuple[Any, Any]]:
    """``{split: (probabilities, labels)}`` of the model on every evaluation split."""
    from priorzoo.finetune.loop import predict_proba

    return {name: predict_proba(model, _loader(setup, ds, batch_size)) for name, ds in setup.eval_datasets.items()}


def majority_share(labels: torch.Tensor) -> float:
    """The accuracy of always answering the most frequent class of ``labels``."""
    return float(torch.bincount(labels.long()).max()) / max(int(labels.numel()), 1)


def chance_reason(model: Any, setup: Any, predictions: dict[str, Any]) -> str | None:
    """Why the final model is at chance — its accuracy no better than always answering the most frequent class —
    on the validation split (else test, else the training data); ``None`` when it is above."""
    from priorzoo.finetune.loop import predict_proba

    for name in ("validation", "test"):
        if name in predictions:
            probs, labels = predictions[name]
            break
    else:
        name = "training"
        probs, labels = predict_proba(model, _loader(setup, setup.train_dataset, 64))
    accuracy = float((probs.argmax(-1) == labels).float().mean())
    floor = majority_share(labels)
    if accuracy > floor or floor >= 1.0:  # a split of one class cannot tell
        return None
    return (
        f"accuracy {accuracy:.4f} on the {name} data is no better than always answering its most frequent class "
        f"({floor:.4f}): check --lr, the labels, and that the backbone's weights loaded"
    )
