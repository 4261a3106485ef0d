"""The steps of ``priorzoo finetune`` (:mod:`priorzoo.cli.finetune`): its data columns and collate, the
optimizer of its flags, the SGD-stable default λ, the BMA (SWAG) and SGLD phases and the saved outputs.

Private to the CLI: the library's own layer is :mod:`priorzoo.finetune` (fit, runners, tune_scale), which
these call; what is here is the glue between ``argparse`` flags and that layer.

Example:
    >>> import argparse
    >>> log(argparse.Namespace(quiet=False), "hello")
    hello
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from priorzoo.data.user import IMAGENET_MEAN, IMAGENET_STD, Columns, image_tensor

__all__ = [
    "RESULT_NAME",
    "data_columns",
    "fit_by_epoch",
    "json_default",
    "load_split",
    "log",
    "make_collate",
    "optimizer_from_args",
    "ranked_scales",
    "save_model",
    "sgld_phase",
    "stable_scale",
    "swag_phase",
    "with_lora",
]

RESULT_NAME = "priorzoo_finetune.json"


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, flush=True)


def optimizer_from_args(
    model: Any, args: argparse.Namespace, *, lr: float | None = None, kind: str | None = None
) -> Any:
    from priorzoo.finetune import make_optimizer

    return make_optimizer(
        model,
        kind or args.optimizer,
        lr=args.lr if lr is None else lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )


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
    from priorzoo.data.user import load_data

    ds = load_data(path, data_format=args.data_format, split="train")
    if len(ds) == 0:
        raise ValueError(f"the data {path!r} is empty")
    return ds


def make_collate(cols: Columns, library: str, tokenizer: Any, args: argparse.Namespace, model: Any) -> Callable:
    """The DataLoader ``collate_fn``: text → tokenizer batch dict with ``labels``; images → ``(x, y)``."""
    import torch

    if cols.modality == "image":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = args.image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))

        def collate_images(rows: list[dict[str, Any]]) -> Any:
            x = torch.stack([image_tensor(r[cols.image], size, mean, std) for r in rows])
            y = torch.tensor([cols.label_id(r[cols.label]) for r in rows], dtype=torch.long)
            if library in ("timm", "torchvision"):
                return x, y
            return {"pixel_values": x, "labels": y}

        return collate_images

    if tokenizer is None:
        raise ValueError("text data needs the backbone's tokenizer, and none could be loaded")

    def collate_text(rows: list[dict[str, Any]]) -> Any:
        texts = [str(r[cols.text]) for r in rows]
        pairs = [str(r[cols.text_pair]) for r in rows] if cols.text_pair else None
        enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        batch = dict(enc)
        batch["labels"] = torch.tensor([cols.label_id(r[cols.label]) for r in rows], dtype=torch.long)
        return batch

    return collate_text


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


def swag_phase(model: Any, args: argparse.Namespace, setup: Any, fit_kwargs: dict[str, Any]) -> tuple[Any, dict, dict]:
    """``--method bma`` after the MAP run: SWAG over a constant-lr SGD phase, then BMA over ``--num-samples``
    draws (batch-norm statistics refreshed per draw); the model is left at the SWA mean with its statistics.
    Returns ``(posterior, {split: (probabilities, labels)}, the phase's history entry)``."""
    import torch

    from priorzoo.finetune import bma_predict, fit_swag_posterior, refresh_batchnorm_

    train_loader, eval_loaders, device = setup.train_loader, setup.eval_loaders, setup.device
    predictions: dict[str, Any] = {}
    steps = args.swag_epochs * len(train_loader)
    every = max(1, steps // (args.swag_rank + 1))
    swag_opt = optimizer_from_args(model, args, lr=args.swag_lr or args.lr, kind="sgd")
    swag, res = fit_swag_posterior(
        model,
        train_loader,
        swag_opt,
        rank=args.swag_rank,
        epochs=args.swag_epochs,
        collect_every=every,
        **fit_kwargs,
    )
    entry = {"steps": res.steps, "seconds": res.seconds, "snapshots": swag.num_collected, "collect_every": every}
    if swag.num_collected < 2:
        raise RuntimeError(f"the SWAG phase collected {swag.num_collected} snapshot(s); raise --swag-epochs")
    posterior = swag.posterior()
    if eval_loaders:
        avg = bma_predict(  # = swag.predict(...), without building the posterior a second time
            model,
            posterior,
            eval_loaders,
            num_samples=args.num_samples,
            bn_loader=train_loader,
            generator=torch.Generator(device=device).manual_seed(args.seed),
        )
        predictions = {name: (avg.probabilities(name), avg.labels(name)) for name in eval_loaders}
    # the saved model is the SWA mean, with its BN statistics
    posterior.init_model_(model, exclude_head=False, allow_partial=True)
    refresh_batchnorm_(model, train_loader)
    return posterior, predictions, entry


def sgld_phase(model: Any, args: argparse.Namespace, setup: Any, fit_kwargs: dict[str, Any]) -> tuple[dict, dict]:
    """``--method sgld``: Langevin samples after a burn-in, averaged over the evaluation splits.
    Returns ``({split: (probabilities, labels)}, the run's history entry)``."""
    import torch

    from priorzoo.finetune import run_sgld

    eval_loaders = setup.eval_loaders
    predictions: dict[str, Any] = {}
    chain = run_sgld(
        model,
        setup.train_loader,
        lr=args.lr,
        num_train_examples=setup.num_train_examples,
        epochs=args.epochs,
        num_samples=args.num_samples,
        eval_loaders=eval_loaders or None,
        burn_in_epochs=args.burn_in_epochs,
        temperature=args.temperature,
        generator=torch.Generator(device=setup.device).manual_seed(args.seed),
        **fit_kwargs,
    )
    res, averager = chain.fit, chain.averager
    entry = {
        "steps": res.steps,
        "seconds": res.seconds,
        "burn_in_epochs": chain.burn_in_epochs,
        "sample_every": chain.sample_every,
        "samples": chain.num_samples,
    }
    if averager is not None:
        if averager.num_samples == 0:
            raise RuntimeError("SGLD collected no sample; raise --epochs or lower --burn-in-epochs")
        predictions = {name: (averager.probabilities(name), averager.labels(name)) for name in eval_loaders}
    return predictions, entry


def json_default(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return repr(value)


def ranked_scales(search: Any) -> list[Any]:
    """The λ points of a search that did not diverge, best first (its metric; ties: smaller λ)."""
    higher = search.metric == "accuracy"
    points = [p for p in search.curve if not p.diverged and search.metric in p.metrics]
    return sorted(points, key=lambda p: ((-1 if higher else 1) * p.metrics[search.metric], p.scale))


def fit_by_epoch(
    model: Any,
    loader: Any,
    optimizer: Any,
    args: argparse.Namespace,
    val_loader: Any,
    num_labels: int,
    epochs_log: list[dict[str, Any]],
    fit: Callable,
    fit_kwargs: dict[str, Any],
) -> Any:
    """``fit`` one epoch at a time (the same run: one optimizer, the loader reshuffled each epoch), printing a
    train/validation line per epoch and warning when the loss explodes or validation stays at chance."""
    total = None
    first_loss = None
    chance = 1.0 / num_labels
    for epoch in range(1, args.epochs + 1):
        res = fit(model, loader, optimizer, epochs=1, val_loader=val_loader, restore_best=False, **fit_kwargs)
        entry = dict(res.history[-1]) if res.history else {}
        entry["epoch"] = epoch
        epochs_log.append(entry)
        if total is None:
            total = res
        else:
            total.steps += res.steps
            total.seconds += res.seconds
            total.history += res.history
        line = f"epoch {epoch}/{args.epochs}: train loss {entry.get('train_loss', float('nan')):.4f}"
        if entry.get("prior_term"):
            line += f" (prior term {entry['prior_term']:.4g})"
        if "val_accuracy" in entry:
            line += f", validation accuracy {entry['val_accuracy']:.4f} nll {entry['val_nll']:.4f}"
        log(args, line)
        loss = entry.get("train_loss")
        if loss is not None:
            if first_loss is None:
                first_loss = loss
            elif loss > 1e3 * max(first_loss, math.log(num_labels)):
                raise FloatingPointError(
                    f"the training loss exploded from {first_loss:.3g} to {loss:.3g} in epoch {epoch} (prior term "
                    f"{entry.get('prior_term', 0.0):.3g}): lower --lr or raise the prior scale λ"
                )
            elif loss > 3 * first_loss and loss > 2 * math.log(num_labels):
                log(args, f"warning: the training loss exploded ({first_loss:.3g} → {loss:.3g}): lower --lr")
    last = epochs_log[-1] if epochs_log else {}
    if "val_accuracy" in last and args.epochs >= 2 and last["val_accuracy"] <= chance + 0.02:
        log(
            args,
            f"warning: validation accuracy {last['val_accuracy']:.3f} is at chance (1/{num_labels} = {chance:.3f}) "
            "after training: check --lr, the labels, and that the backbone's weights loaded",
        )
    assert total is not None
    return total


def save_model(model: Any, tokenizer: Any, library: str, folder: Path, result: dict[str, Any]) -> None:
    from priorzoo.binding.peft import is_peft_model

    folder.mkdir(parents=True, exist_ok=True)
    if library == "transformers" or is_peft_model(model):  # a LoRA run saves its adapters (PEFT's format)
        model.save_pretrained(folder)
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
    (folder / RESULT_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
