"""The runs of ``priorzoo finetune`` and ``priorzoo learn`` on the transformers ``Trainer``.

Every training phase of the CLI — a MAP run, each run of a learning-rate or λ search, the SWAG phase of
``bma``, the SGLD chain, the SWAG run of ``learn`` — is one ``Trainer.train()`` here, so users get what they
know from the Trainer instead of a second hand-written loop: evaluation each epoch and
``load_best_model_at_end`` on the validation NLL, warmup and a decaying learning-rate schedule, checkpoints
and ``--resume``, ``report_to`` loggers, bf16, gradient accumulation, and multi-process runs under
``torchrun``/``accelerate launch`` (DDP) with no code of ours. The prior term enters through
:class:`~priorzoo.finetune.PriorTrainer` (inside ``compute_loss``).

timm and torchvision classifiers take a tensor and return logits; :class:`WithLoss` wraps them so that the
Trainer sees a module whose ``forward(pixel_values, labels)`` returns ``{"loss", "logits"}`` (mean cross-entropy).
The prior's names still match: :mod:`priorzoo.binding.matching` finds the ``model.`` prefix.

Private to the CLI: the library's own layer is :mod:`priorzoo.finetune`.

Example:
    >>> import torch
    >>> out = WithLoss(torch.nn.Linear(3, 2, bias=False))(torch.zeros(4, 3), labels=torch.tensor([0, 1, 0, 1]))
    >>> sorted(out), round(float(out["loss"].detach()), 4)
    (['logits', 'loss'], 0.6931)
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "RUN_FILE",
    "ObjectiveModel",
    "RunResult",
    "WithLoss",
    "check_resume",
    "drops_last_single",
    "inner_model",
    "is_main_process",
    "run_settings",
    "swag_run",
    "train_run",
    "trainer_model",
]


class WithLoss(nn.Module):
    """A classifier taking one tensor (timm, torchvision, any ``nn.Module``) as a Trainer model:
    ``forward(pixel_values, labels=None) -> {"logits", "loss"?}`` with the mean cross-entropy as loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.model(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.float(), labels)
        return out


class ObjectiveModel(nn.Module):
    """A backbone and its source objective (:mod:`priorzoo.learn.objectives`) as a Trainer model:
    ``forward(**batch) -> {"loss": objective(model, batch)}``; an ``nn.Module`` objective's own parameters
    (SimCLR's projection head) train with it."""

    def __init__(self, model: nn.Module, objective: Any) -> None:
        super().__init__()
        self.model = model
        self.objective = objective  # registered as a submodule when it is one

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        batch.pop("num_items_in_batch", None)
        return {"loss": self.objective(self.model, batch)}


def trainer_model(model: nn.Module, library: str) -> nn.Module:
    """The module the Trainer trains: transformers models as they are, others wrapped in :class:`WithLoss`."""
    return model if library == "transformers" else WithLoss(model)


def inner_model(model: nn.Module) -> nn.Module:
    """The backbone inside a :class:`WithLoss` (what is saved and what posteriors are named after)."""
    return model.model if isinstance(model, WithLoss) else model


def drops_last_single(model: nn.Module, num_examples: int, batch_size: int) -> bool:
    """Whether a training loader of ``model`` drops its last batch: it would hold exactly one example and the model
    has batch-norm layers that train.

    A batch-norm layer in train mode needs more than one value per channel; where the spatial size has shrunk to
    1×1 (timm's ``test_resnet`` at 32 px, any classifier's pooled features) a batch of one example stops the run
    with "Expected more than 1 value per channel when training". Only that last batch of one is dropped (its
    example is trained on in the other epochs: the data order is reshuffled each epoch), only in a single
    process (under DDP, accelerate completes every process's last batch from the start of the data), and only
    when a batch-norm layer is not frozen (:func:`~priorzoo.binding.batchnorm.freeze_batchnorm_` keeps those in
    eval mode). N, the number of training examples in the prior term and κ = D/N, is unchanged.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> drops_last_single(net, 9, 8), drops_last_single(net, 10, 8), drops_last_single(net[0], 9, 8)
        (True, False, False)
    """
    from priorzoo.binding.batchnorm import is_frozen_batchnorm

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or num_examples <= batch_size or num_examples % batch_size != 1:
        return False
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not is_frozen_batchnorm(m) for m in model.modules())


RUN_FILE = "priorzoo_run.json"
"""Written into a run's checkpoint folder: the options that define the run, checked by ``--resume``."""

# what a resumed run must share with the run that wrote the checkpoints (--epochs may grow: that is what a resume
# of a finished run is for), as the command line spells it
_RUN_OPTIONS = (
    "backbone", "library", "pretrained", "checkpoint", "freeze", "trainable_layers", "image_size", "max_length",
    "prior", "l2sp", "revision", "init_from", "init_from_prior",
    "prior_weight", "allow_partial", "lora_r", "lora_target", "lora_alpha", "lora_dropout", "batch_size",
    "gradient_accumulation_steps", "momentum", "weight_decay", "max_grad_norm", "bf16", "seed",
)  # fmt: skip


def run_settings(args: Any, **run: Any) -> dict[str, Any]:
    """The options that define a Trainer run (``--name: value``), JSON-ready: ``args``'s :data:`_RUN_OPTIONS` and
    the run's own ``run`` values (λ, lr, schedule, N, ...); a ``--resume`` must match them (:func:`check_resume`).

    Example:
        >>> from types import SimpleNamespace
        >>> run_settings(SimpleNamespace(batch_size=8, l2sp="learned"), lr=0.1, scale="learned")
        {'--l2sp': 'learned', '--batch-size': 8, '--lr': 0.1, '--scale': 'learned'}
    """
    import json

    out = {f"--{k.replace('_', '-')}": getattr(args, k) for k in _RUN_OPTIONS if hasattr(args, k)}
    out.update({f"--{k.replace('_', '-')}": v for k, v in run.items()})
    return json.loads(json.dumps(out, default=str))


def check_resume(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume the checkpoints in ``folder`` under other options than the run that wrote them (its
    :data:`RUN_FILE`): the weights, the optimiser and a learned scale's σ would continue under another objective,
    learning rate or data, and metrics.json would describe a run that never happened. Checkpoints written before
    :data:`RUN_FILE` existed are accepted as they are.

    Raises:
        ValueError: the options that differ, with the checkpoint's value and this run's.
    """
    import json

    path = folder / RUN_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if differ:
        what = ", ".join(f"`{k}` {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
        raise ValueError(
            f"`--resume`: the checkpoints in {folder} were written with other options ({what}); resume with the same "
            "options (only --epochs may change), or start afresh without --resume or in another --output-dir"
        )


def is_main_process() -> bool:
    """Whether this process writes files and prints (process 0 under torchrun, or a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class RunResult:
    """What one Trainer run did.

    Attributes:
        history: one entry per epoch: global ``step``, ``epoch``, ``train_loss`` (data loss, mean over the epoch),
            ``prior_term``, ``learned_scale`` (λ per group and σ at the epoch's end) with a learned scale, and
            ``val_nll``/``val_accuracy`` when there is validation data.
        steps, seconds: optimiser steps taken, wall-clock time.
        best_epoch, best_metrics: the epoch whose checkpoint was restored (validation NLL) and its metrics.
        diverged: why the training loss counts as diverged (``None``: it did not).
        lr, scale: the learning rate and λ of the run (``"learned"``: learned on the training data).
        learned_scale: with a learned scale, λ per group, σ and κ (:meth:`LearnedScale.state`) at the end of the run,
            or, when a best epoch was restored, at the end of that epoch (``epoch`` says which).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    best_epoch: float | None = None
    best_metrics: dict[str, float] | None = None
    diverged: str | None = None
    lr: float | None = None
    scale: float | str | None = None
    matched: int | None = None
    learned_scale: dict[str, Any] | None = None

    @property
    def final_train_loss(self) -> float:
        """The data loss of the last epoch (``inf`` when the run diverged or logged nothing)."""
        if self.diverged or not self.history:
            return math.inf
        return float(self.history[-1].get("train_loss", math.inf))

    @property
    def final_objective(self) -> float:
        """The training objective of the last epoch: its data loss plus its prior term (``inf`` when the run
        diverged or logged nothing).

        The prior term is ρ·penalty/N at a fixed λ and KL(q‖p)/D at a learned λ (the data-emphasized ELBO), so
        this is the quantity the run minimised, the same number :func:`priorzoo.finetune.fit` records as
        ``train_loss``; without a prior it is the data loss. ``--lr auto`` keeps the run where it is lowest.
        """
        loss = self.final_train_loss
        if not math.isfinite(loss):
            return math.inf
        total = loss + float(self.history[-1].get("prior_term", 0.0))
        return total if math.isfinite(total) else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "scale": self.scale,
            "steps": self.steps,
            "seconds": self.seconds,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "diverged": self.diverged,
            "matched_parameters": self.matched,
            "learned_scale": self.learned_scale,
            "history": self.history,
        }


def _accuracy(pred: Any) -> dict[str, float]:
    import numpy as np

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(pred.label_ids)).mean())}


def _epoch_callback(num_labels: int, log: Callable[[str], None], label: str, *, prior_in_loss: bool = True) -> Any:
    """The callback that records ``train_loss``, the *data* loss: the Trainer's logged ``loss`` minus the logged
    ``prior_term`` when the term is part of that loss (a fixed λ: ``PriorTrainer.compute_loss`` adds it), the logged
    ``loss`` itself when it is not (``prior_in_loss=False``: a learned scale, whose KL/D enters the gradient at the
    optimiser step and is only logged)."""
    from transformers import TrainerCallback

    class EpochLog(TrainerCallback):
        """Records one history entry per epoch (global step), prints it, and stops a diverging run."""

        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []
            self.diverged: str | None = None
            self._first: float | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
            if not logs:
                return
            if "loss" in logs:
                data = float(logs["loss"]) - (float(logs.get("prior_term", 0.0)) if prior_in_loss else 0.0)
                entry = {"step": state.global_step, "epoch": round(float(state.epoch or 0), 4), "train_loss": data}
                if "prior_term" in logs:
                    entry["prior_term"] = float(logs["prior_term"])
                entry["lr"] = float(logs.get("learning_rate", math.nan))
                if "prior_sigma" in logs:  # a learned scale: λ_g and σ at the end of the epoch (its checkpoint's)
                    scales = {k.removeprefix("prior_scale_"): float(v) for k, v in logs.items()
                              if k.startswith("prior_scale_")}  # fmt: skip
                    entry["learned_scale"] = {"scales": scales, "sigma": float(logs["prior_sigma"])}
                self.history.append(entry)
                self._check(entry, control)
                if args.eval_strategy == "no":
                    self._print(entry)
            if "eval_loss" in logs and self.history:
                entry = self.history[-1]
                entry["val_nll"] = float(logs["eval_loss"])
                if "eval_accuracy" in logs:
                    entry["val_accuracy"] = float(logs["eval_accuracy"])
                self._print(entry)

        def _check(self, entry: dict[str, float], control: Any) -> None:
            loss = entry["train_loss"]
            if self._first is None:
                self._first = loss
            ceiling = 10 * max(self._first, math.log(num_labels))
            if not math.isfinite(loss) or loss > ceiling:
                self.diverged = (
                    f"the training loss became {loss:.4g} at step {entry['step']} (epoch {entry['epoch']:g}; "
                    f"{'first epoch' if len(self.history) > 1 else 'chance'} level "
                    f"{max(self._first, math.log(num_labels)):.3g})"
                )
                control.should_training_stop = True

        def finish(self) -> None:
            """After training: a last epoch whose loss is over twice the first epoch's and chance's counts as
            diverged (a smaller rise leaves the verdict to the chance check of the final model)."""
            if self.diverged or len(self.history) < 2 or self._first is None:
                return
            last = self.history[-1]["train_loss"]
            if last > 2 * max(self._first, math.log(num_labels)):
                self.diverged = (
                    f"the training loss rose from {self._first:.4g} (first epoch) to {last:.4g} (last epoch), above "
                    f"chance level log {num_labels} = {math.log(num_labels):.3g}"
                )

        def _print(self, e: dict[str, float]) -> None:
            line = f"{label}epoch {e['epoch']:g} (step {e['step']}): train loss {e['train_loss']:.4f}"
            if e.get("prior_term"):
                line += f" (prior term {e['prior_term']:.4g})"
            if "val_nll" in e:
                line += f", validation nll {e['val_nll']:.4f}"
                if "val_accuracy" in e:
                    line += f" accuracy {e['val_accuracy']:.4f}"
            log(line)

    return EpochLog()


def train_run(
    model: nn.Module,
    *,
    args: Any,
    train_dataset: Any,
    collate: Callable,
    num_labels: int,
    folder: Path,
    lr: float,
    epochs: int,
    eval_dataset: Any = None,
    prior: Any = None,
    scale: float | str | None = None,
    num_train_examples: int | None = None,
    optimizer: str = "sgd",
    schedule: str = "cosine",
    warmup: float = 0.0,
    patience: int | None = None,
    callbacks: Sequence[Any] = (),
    optimizers: tuple[Any, Any] | None = None,
    clip: float | None = None,
    log: Callable[[str], None] = print,
    label: str = "",
    sigma_init: float | None = None,
) -> RunResult:
    """Train ``model`` (in place) in one ``Trainer.train()``; return its history.

    With ``eval_dataset`` the run evaluates each epoch, keeps the best checkpoint by validation NLL (the mean
    cross-entropy, ``eval_loss``) and restores it at the end (``patience``: stop after that many epochs without
    improvement). With ``prior`` the loss is ``mean CE + ρ·penalty/N`` (:class:`~priorzoo.finetune.PriorTrainer`).
    A non-finite or exploding training loss stops the run and is reported in ``RunResult.diverged``. ``clip``
    overrides ``args.max_grad_norm`` (0: no clipping; SGLD); ``optimizers``: the Trainer's ``(optimizer,
    scheduler)`` instead of ``optimizer``/``schedule``/``warmup``. ``sigma_init``: with a learned scale, σ at the start
    (default :class:`~priorzoo.finetune.PriorTrainer`'s); ``RunResult.learned_scale["sigma_init"]`` records it.
    A last batch of exactly one example is dropped when batch norm would fail on it (:func:`drops_last_single`).
    Checkpoints go to ``folder`` (removed after a finished run unless ``args.keep_checkpoints``); with
    ``args.resume`` an interrupted run restarts from its last checkpoint there, if the options that define the run
    are those it was written with (:func:`check_resume`).
    """
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    has_eval = eval_dataset is not None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = str(getattr(args, "device", None) or "")
    optim_kwargs: dict[str, Any] = {}
    if optimizers is None:
        optim_kwargs = (
            {"optim": "sgd", "optim_args": f"momentum={args.momentum}"}
            if optimizer == "sgd"
            else {"optim": "adamw_torch"}
        )
    targs = TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=epochs,
        dataloader_drop_last=drops_last_single(model, len(train_dataset), args.batch_size),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=schedule,
        warmup_steps=warmup,
        max_grad_norm=float(args.max_grad_norm if clip is None else clip),
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        logging_strategy="epoch",
        logging_nan_inf_filter=False,
        report_to=args.report_to,
        bf16=args.bf16,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=args.num_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=device == "cpu" or (not device and not torch.cuda.is_available()),
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None,
        disable_tqdm=True,
        save_only_model=False,
        **optim_kwargs,
    )
    epoch_log = _epoch_callback(
        num_labels, log if is_main_process() else lambda _m: None, label, prior_in_loss=scale != "learned"
    )
    cbs: list[Any] = [epoch_log, *callbacks]
    if has_eval and patience is not None:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=patience))
    kwargs: dict[str, Any] = {
        "model": model,
        "args": targs,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "data_collator": collate,
        "compute_metrics": _accuracy if has_eval else None,
        "callbacks": cbs,
    }
    if optimizers is not None:
        kwargs["optimizers"] = optimizers
    if prior is not None:
        from priorzoo.finetune.trainer import PriorTrainer

        trainer: Any = PriorTrainer(
            **kwargs,
            prior=prior,
            num_train_examples=num_train_examples,
            prior_weight=args.prior_weight,
            scale=scale,
            prior_allow_partial=args.allow_partial,
            prior_seed=int(args.seed),  # a learned scale's noise ε
            **({} if sigma_init is None else {"prior_sigma_init": sigma_init}),
        )
    else:
        trainer = Trainer(**kwargs)
    # every model here returns the mean loss of its micro-batch (a transformers classifier takes **kwargs but
    # ignores num_items_in_batch): the Trainer must average micro-batches and processes, not sum them
    trainer.model_accepts_loss_kwargs = False
    trainer.remove_callback(PrinterCallback)  # the epoch lines above replace the Trainer's raw log dicts
    settings = run_settings(
        args, lr=lr, scale=scale, optimizer=optimizer if optimizers is None else "custom", schedule=schedule,
        warmup=warmup, clip=clip, num_train_examples=num_train_examples,
    )  # fmt: skip
    resume = get_last_checkpoint(str(folder)) if args.resume and folder.is_dir() else None
    if resume is not None:
        check_resume(folder, settings)
        if is_main_process():
            print(f"{label}resuming from {resume}", flush=True)  # under --quiet too: it says what the run is
    if is_main_process():
        import json

        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    learned = getattr(getattr(trainer, "prior_regularizer", None), "learned", None)
    sigma_start = learned.sigma if learned is not None else None
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    epoch_log.finish()
    result = RunResult(
        history=epoch_log.history,
        steps=trainer.state.global_step,
        seconds=time.perf_counter() - start,
        diverged=epoch_log.diverged,
        lr=lr,
        scale=scale,
    )
    regularizer = getattr(trainer, "prior_regularizer", None)
    if regularizer is not None:
        result.matched = len(regularizer.match.matched)
        if regularizer.learned is not None:
            result.learned_scale = {**regularizer.learned.state(), "sigma_init": sigma_start}
    if has_eval:
        evals = [e for e in epoch_log.history if "val_nll" in e and math.isfinite(e["val_nll"])]
        if evals:
            best = min(evals, key=lambda e: e["val_nll"])
            result.best_epoch = best["epoch"]
            result.best_metrics = {"nll": best["val_nll"], "accuracy": best.get("val_accuracy", math.nan)}
            if result.learned_scale is not None and "learned_scale" in best:  # those of the weights restored
                result.learned_scale = {**result.learned_scale, **best["learned_scale"], "epoch": best["epoch"]}
    if not getattr(args, "keep_checkpoints", False) and is_main_process():
        shutil.rmtree(folder, ignore_errors=True)
    return result


def swag_run(
    model: nn.Module,
    objective: Any,
    train_dataset: Any,
    collate: Callable,
    args: Any,
    *,
    steps_per_epoch: int,
    every: int | str,
) -> Any:
    """``priorzoo learn``'s training: SGD at a constant (or cyclic, ``--schedule cyclic``) learning rate in one
    ``Trainer.train()`` with :class:`~priorzoo.learn.SWAGCallback` collecting snapshots of the backbone (the
    head excluded) once per epoch or every ``every`` steps after ``--warmup-epochs``. With
    ``--checkpoint-dir`` the Trainer checkpoints there each epoch (the collector inside) and resumes from the
    last checkpoint. Returns the collector. A diverging loss raises ``FloatingPointError``.
    """
    import tempfile

    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from priorzoo.learn import CyclicCosineSchedule, SWAGCallback, SWAGCollector

    wrapped = ObjectiveModel(model, objective)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start = args.warmup_epochs * steps_per_epoch
    schedule = None
    if args.schedule == "cyclic":
        schedule = CyclicCosineSchedule(cycle_steps=args.cycle_steps or steps_per_epoch, start_step=start)
        scheduler = schedule.scheduler(optimizer)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    collector = SWAGCollector(model, args.rank, include=args.include, exclude=args.exclude, min_var=args.min_var)
    swag = SWAGCallback(
        collector,
        every_n_steps=every if isinstance(every, int) and schedule is None else None,
        every_epoch=every == "epoch" and schedule is None,
        start_step=start,
        schedule=schedule,
    )
    folder = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(tempfile.mkdtemp(prefix="priorzoo-learn-"))
    device = str(args.device or "")
    targs = TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        logging_strategy="epoch",
        logging_nan_inf_filter=False,
        save_strategy="epoch" if args.checkpoint_dir else "no",
        save_total_limit=1,
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=args.num_workers,
        remove_unused_columns=False,
        max_grad_norm=0.0,
        use_cpu=device == "cpu" or (not device and not torch.cuda.is_available()),
        disable_tqdm=not args.progress,
    )
    epoch_log = _epoch_callback(2, print if args.progress and is_main_process() else lambda _m: None, "")
    trainer = Trainer(
        model=wrapped,
        args=targs,
        train_dataset=train_dataset,
        data_collator=collate,
        optimizers=(optimizer, scheduler),
        callbacks=[swag, epoch_log],
    )
    trainer.model_accepts_loss_kwargs = False  # forward(**batch) takes any key; the loss is a mean per batch
    trainer.remove_callback(PrinterCallback)
    resume = get_last_checkpoint(str(folder)) if args.checkpoint_dir and folder.is_dir() else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if not args.checkpoint_dir:
            shutil.rmtree(folder, ignore_errors=True)
    if epoch_log.diverged:
        raise FloatingPointError(f"{epoch_log.diverged}: lower --lr")
    return swag.collector
