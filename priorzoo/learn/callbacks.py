r"""Run SWAG from a training loop: a transformers ``TrainerCallback`` and :func:`swag_fit` for plain/timm loops.

Both keep a :class:`~priorzoo.learn.SWAGCollector` over the backbone (the head excluded by default) and
call ``collect()`` at the snapshot steps; both checkpoint its state so a stopped run resumes with its
snapshots intact.

* :class:`SWAGCallback` (needs ``pip install "priorzoo[transformers]"``): collects every
  ``every_n_steps`` optimizer steps and/or at each epoch end; saves the collector into each Trainer
  checkpoint folder (``checkpoint-<step>/swag_collector.safetensors``) and reloads it when the Trainer
  resumes from that checkpoint.
* :func:`swag_fit`: a small, complete SGD loop for timm or any PyTorch model, any
  :mod:`~priorzoo.learn.objectives` objective, with LR schedules and per-epoch checkpoints.

Example:
    >>> import torch
    >>> from priorzoo.learn import CrossEntropyObjective, swag_fit
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]
    >>> collector = swag_fit(model, data, CrossEntropyObjective(), epochs=3, rank=3, lr=0.05,
    ...                      exclude="2.*", progress=False)
    >>> collector.num_collected  # one snapshot per epoch
    3
    >>> prior = collector.to_prior(source={"dataset": "toy", "objective": "supervised"})
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from priorzoo.batches import move_to_device
from priorzoo.binding.matching import Patterns
from priorzoo.extras import require
from priorzoo.learn.checkpoint import atomic_save_safetensors, flatten_tree, load_safetensors_with_meta, unflatten_tree
from priorzoo.learn.schedules import _Schedule
from priorzoo.learn.swag import SWAGCollector
from priorzoo.validation import check_positive_int

__all__ = ["COLLECTOR_STATE_NAME", "FIT_STATE_NAME", "SWAGCallback", "swag_fit"]

COLLECTOR_STATE_NAME = "swag_collector.safetensors"
"""File name of the collector state inside a Trainer checkpoint folder."""
FIT_STATE_NAME = "swag_fit_state.safetensors"
"""File name of :func:`swag_fit`'s resumable state inside ``checkpoint_dir``."""

_CALLBACK_CLASS: type | None = None
SWAGCallback: type  # built on first access by the module __getattr__ below (transformers is optional)


def _make_callback_class() -> type:
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is not None:
        return _CALLBACK_CLASS
    transformers = require("transformers", what="SWAGCallback (a transformers TrainerCallback)")

    class SWAGCallback(transformers.TrainerCallback):
        """Collect SWAG snapshots during ``transformers.Trainer.train()``.

        Args:
            collector: an existing :class:`SWAGCollector`; by default one is built on the Trainer's model at
                ``on_train_begin`` with ``rank``/``include``/``exclude``/``collector_kwargs`` (the task head
                is excluded: see ``SWAGCollector(exclude_head=True)``).
            every_n_steps: collect after every n-th optimizer step (counted from ``start_step``).
            every_epoch: collect at the end of each epoch (after ``start_step``).
            start_step: no snapshot before this many optimizer steps (the SWA burn-in).
            schedule: a :class:`~priorzoo.learn.ConstantLRSchedule`/:class:`~priorzoo.learn.CyclicCosineSchedule`
                whose ``should_collect(global_step)`` decides instead (drive the lr with
                ``schedule.scheduler(optimizer)`` passed to the Trainer's ``optimizers=``).
            save_state: write the collector into every Trainer checkpoint and restore it on resume (on an
                FSDP2 model every process writes and reads its own shard's file, collectively; the checkpoint
                folder must be on a file system all processes see).

        Example:
            >>> from priorzoo.learn import SWAGCallback  # doctest: +SKIP
            >>> swag = SWAGCallback(rank=20, every_n_steps=100, start_step=1000)  # doctest: +SKIP
            >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[swag])  # doctest: +SKIP
            >>> trainer.train()  # doctest: +SKIP
            >>> swag.to_prior(source={"dataset": "imdb", "objective": "mlm"}).save_pretrained("prior")  # doctest: +SKIP
        """

        def __init__(
            self,
            collector: SWAGCollector | None = None,
            *,
            rank: int = 20,
            include: Patterns = None,
            exclude: Patterns = None,
            every_n_steps: int | None = None,
            every_epoch: bool | None = None,
            start_step: int = 0,
            schedule: _Schedule | None = None,
            save_state: bool = True,
            **collector_kwargs: Any,
        ) -> None:
            if every_n_steps is not None:
                check_positive_int(every_n_steps, "every_n_steps")
            check_positive_int(start_step, "start_step", minimum=0)
            if every_epoch is None:
                every_epoch = every_n_steps is None and schedule is None
            if every_n_steps is None and not every_epoch and schedule is None:
                raise ValueError("SWAGCallback never collects: set every_n_steps, every_epoch=True or schedule")
            self.collector = collector
            self.rank = rank
            self.include = include
            self.exclude = exclude
            self.collector_kwargs = collector_kwargs
            self.every_n_steps = every_n_steps
            self.every_epoch = bool(every_epoch)
            self.start_step = start_step
            self.schedule = schedule
            self.save_state = save_state
            self._last_collected_step = -1

        def _collect(self, state: Any) -> None:
            if self._last_collected_step == state.global_step or self.collector is None:
                return  # a step that ends an epoch is collected once
            self.collector.collect()
            self._last_collected_step = state.global_step

        def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
            if self.collector is None:
                if model is None:
                    raise RuntimeError("SWAGCallback: the Trainer passed no model to on_train_begin")
                self.collector = SWAGCollector(
                    model, self.rank, include=self.include, exclude=self.exclude, **self.collector_kwargs
                )
            if state.global_step > 0 and self.save_state:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / COLLECTOR_STATE_NAME
                if path.is_dir() if self._sharded() else path.is_file():  # sharded: a folder, loaded by all
                    self.collector.load(path)
                    self._last_collected_step = state.global_step if self._due(state.global_step) else -1
                elif self.collector.num_collected == 0 and state.global_step > self.start_step:
                    import warnings

                    warnings.warn(
                        f"SWAGCallback: resuming at step {state.global_step} but {path} does not exist; "
                        "the snapshots collected before the interruption are lost",
                        UserWarning,
                        stacklevel=2,
                    )
            return control

        def _due(self, step: int) -> bool:
            if self.schedule is not None:
                return self.schedule.should_collect(step)
            if self.every_n_steps is None:
                return False
            since = step - self.start_step
            return since >= 1 and since % self.every_n_steps == 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
            if self._due(state.global_step):
                self._collect(state)
            elif self.every_epoch and state.global_step > self.start_step and _ends_epoch(state.epoch):
                # the last step of an epoch: collect now, before the Trainer saves a checkpoint at this
                # step, so that resuming from it keeps the epoch's snapshot (on_epoch_end comes after)
                self._collect(state)
            return control

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
            if self.every_epoch and state.global_step > self.start_step:
                self._collect(state)
            return control

        def _sharded(self) -> bool:
            """An FSDP2 collector: every process saves (and loads) its own file, collectively."""
            cls = SWAGCollector.sharded_class
            return cls is not None and isinstance(self.collector, cls)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
            if self.save_state and self.collector is not None:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                # sharded: every process (save is collective), one file each in checkpoint-<step>/<state name>/
                if self._sharded() or (state.is_world_process_zero and folder.is_dir()):
                    self.collector.save(folder / COLLECTOR_STATE_NAME)
            return control

        def to_prior(self, **kwargs: Any) -> Any:
            """``collector.to_prior(**kwargs)``: the learned :class:`~priorzoo.PriorModel`."""
            if self.collector is None:
                raise RuntimeError("SWAGCallback.to_prior(): training has not started, nothing was collected")
            return self.collector.to_prior(**kwargs)

    SWAGCallback.__module__ = __name__
    _CALLBACK_CLASS = SWAGCallback
    return SWAGCallback


def _ends_epoch(epoch: float | None) -> bool:
    """The Trainer sets ``state.epoch = e + (step + 1)/steps_in_epoch``: a whole number after an epoch's last step."""
    return epoch is not None and epoch > 0 and abs(epoch - round(epoch)) < 1e-9


def __getattr__(name: str) -> Any:
    if name == "SWAGCallback":
        return _make_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- swag_fit
def _save_fit_state(
    path: Path,
    *,
    epoch: int,
    global_step: int,
    model: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    collector: SWAGCollector,
) -> None:
    tensors: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v
    if isinstance(objective, nn.Module):
        for k, v in objective.state_dict().items():
            tensors[f"objective.{k}"] = v
    cstate = collector.state_dict()
    for key in [k for k, v in cstate.items() if isinstance(v, Tensor)]:
        tensors[f"collector.{key}"] = cstate.pop(key)
    meta = {
        "format": "priorzoo.swag_fit",
        "version": 1,
        "epoch": epoch,
        "global_step": global_step,
        "collector": cstate,
        "optimizer": flatten_tree(optimizer.state_dict(), "optimizer.", tensors),
        "scheduler": flatten_tree(scheduler.state_dict(), "scheduler.", tensors) if scheduler is not None else None,
        "rng": flatten_tree({"torch": torch.get_rng_state()}, "rng.", tensors),
    }
    atomic_save_safetensors(tensors, path, meta)


def _load_fit_state(
    path: Path,
    *,
    model: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    collector: SWAGCollector,
) -> tuple[int, int]:
    tensors, meta = load_safetensors_with_meta(path, what="swag_fit checkpoint")
    if meta.get("format") != "priorzoo.swag_fit":
        raise ValueError(f"{path}: not a swag_fit checkpoint (format {meta.get('format')!r})")
    # the collector's state is checked first: a refused one leaves the model untouched as well
    collector.load_state_dict(
        {**meta["collector"], **{k[len("collector.") :]: v for k, v in tensors.items() if k.startswith("collector.")}}
    )
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if isinstance(objective, nn.Module):
        objective.load_state_dict({k[len("objective.") :]: v for k, v in tensors.items() if k.startswith("objective.")})
    optimizer.load_state_dict(unflatten_tree(meta["optimizer"], tensors))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(unflatten_tree(meta["scheduler"], tensors))
    torch.set_rng_state(unflatten_tree(meta["rng"], tensors)["torch"])
    return int(meta["epoch"]), int(meta["global_step"])


def swag_fit(
    model: nn.Module,
    loader: Iterable[Any],
    objective: Callable[[nn.Module, Any], Tensor],
    *,
    epochs: int = 10,
    rank: int = 20,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: _Schedule | None = None,
    collect_every: int | str = "epoch",
    warmup_epochs: int = 0,
    include: Patterns = None,
    exclude: Patterns = None,
    collector: SWAGCollector | None = None,
    device: torch.device | str | None = None,
    seed: int | None = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    max_grad_norm: float | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    **collector_kwargs: Any,
) -> SWAGCollector:
    r"""Train ``model`` with SGD on ``objective`` and collect SWAG snapshots; returns the collector.

    This is the SWAG phase of Maddox et al. (2019): start from trained (e.g. pre-trained) weights, keep SGD
    going at a constant (or cyclic) learning rate, and take a snapshot once per epoch (``collect_every=
    "epoch"``), every n optimizer steps (``collect_every=n``), or when ``schedule.should_collect`` says.
    ``warmup_epochs`` epochs run first without snapshots.

    Determinism and resume: at the start of epoch e the global torch RNG is seeded with ``seed + e`` (data
    order of a shuffling ``DataLoader``, augmentations, dropout), and with ``checkpoint_dir`` the complete
    state — model, objective (e.g. SimCLR's head), optimizer, lr scheduler, collector — is written
    atomically at each epoch end (safetensors + JSON, no pickle). Calling again with the same arguments
    continues after the last finished epoch and yields the same prior as an uninterrupted run.

    Args:
        model: the backbone (plus head for supervised objectives); trained in place.
        loader: an iterable of batches (re-iterated each epoch), e.g. a ``DataLoader``.
        objective: ``objective(model, batch) -> loss`` (see :mod:`priorzoo.learn.objectives`); an
            ``nn.Module`` objective's own parameters (a projection head) are trained too, never collected.
        epochs: total epochs including ``warmup_epochs``.
        rank, include, exclude, collector_kwargs: for the :class:`SWAGCollector` (or pass ``collector``).
        lr, momentum, weight_decay: of the default ``torch.optim.SGD`` (ignored with ``optimizer``).
        schedule: drives the lr (``LambdaLR``) and decides the snapshot steps.
        collect_every: ``"epoch"`` or a number of optimizer steps (without ``schedule``).
        device: move model, objective and batches there.
        seed: base seed (``None`` leaves the RNG alone; resume is then not bit-identical).
        checkpoint_dir: where ``swag_fit_state.safetensors`` is written each epoch; with ``resume=True``
            an existing one is loaded first.
        max_grad_norm: clip the global gradient norm.
        progress: show a tqdm bar.
        stop_after_epoch: stop (after checkpointing) once this many epochs are done — to split a long run.

    Example:
        >>> import timm  # doctest: +SKIP
        >>> model = timm.create_model("resnet50", pretrained=True, num_classes=10)  # doctest: +SKIP
        >>> c = swag_fit(model, loader, CrossEntropyObjective(), epochs=10, lr=0.01, rank=20)  # doctest: +SKIP
        >>> c.to_prior().save_pretrained("resnet50-cifar10-swag")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    check_positive_int(epochs, "epochs")
    check_positive_int(warmup_epochs, "warmup_epochs", minimum=0)
    if warmup_epochs >= epochs:
        raise ValueError(f"`warmup_epochs` ({warmup_epochs}) must be < `epochs` ({epochs}): no snapshot would be taken")
    if schedule is None and collect_every != "epoch":
        check_positive_int(collect_every, "collect_every", hint='or the string "epoch"')
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if isinstance(objective, nn.Module):
        objective.to(dev)
    if collector is None:
        collector = SWAGCollector(model, rank, include=include, exclude=exclude, **collector_kwargs)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if isinstance(objective, nn.Module):
            params += [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = schedule.scheduler(optimizer) if schedule is not None else None

    start_epoch, global_step = 0, 0
    state_path = Path(checkpoint_dir) / FIT_STATE_NAME if checkpoint_dir is not None else None
    if state_path is not None and resume and state_path.is_file():
        done, global_step = _load_fit_state(
            state_path, model=model, objective=objective, optimizer=optimizer, scheduler=scheduler, collector=collector
        )
        start_epoch = done + 1

    try:
        steps_per_epoch: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    for epoch in range(start_epoch, epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        if seed is not None:
            torch.manual_seed(seed + epoch)
        model.train()
        if isinstance(objective, nn.Module):
            objective.train()
        swag_phase = epoch >= warmup_epochs
        bar = tqdm(loader, total=steps_per_epoch, disable=not progress, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for batch in bar:
            loss = objective(model, move_to_device(batch, dev))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss is {loss.item()} at step {global_step + 1}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            global_step += 1
            if swag_phase:
                if schedule is not None:
                    if schedule.should_collect(global_step):
                        collector.collect()
                elif collect_every != "epoch" and global_step % int(collect_every) == 0:
                    collector.collect()
            if progress:
                bar.set_postfix(loss=f"{loss.item():.4f}", snapshots=collector.num_collected)
        if swag_phase and schedule is None and collect_every == "epoch":
            collector.collect()
        if state_path is not None:
            _save_fit_state(
                state_path,
                epoch=epoch,
                global_step=global_step,
                model=model,
                objective=objective,
                optimizer=optimizer,
                scheduler=scheduler,
                collector=collector,
            )
    if collector.num_collected < 2 and (stop_after_epoch is None or stop_after_epoch >= epochs):
        import warnings

        warnings.warn(
            f"swag_fit collected {collector.num_collected} snapshot(s); to_prior() needs at least 2 — train longer "
            "or collect more often",
            UserWarning,
            stacklevel=2,
        )
    return collector
