r"""SWA learning-rate schedules that also say when to take a SWAG snapshot.

:class:`ConstantLRSchedule` is the SWA schedule of Maddox et al. (NeurIPS 2019): the base lr, a cosine
anneal to a constant ``swa_lr``, then one snapshot every few steps. :class:`CyclicCosineSchedule` is the
cyclical schedule of Zhang et al. (cSG-MCMC, ICLR 2020) with one snapshot per cycle, which the official
"Pre-Train Your Loss" code uses. Both count optimizer steps and give a ``LambdaLR`` via ``scheduler()``.

Example:
    >>> from priorzoo.learn import CyclicCosineSchedule
    >>> s = CyclicCosineSchedule(cycle_steps=2)
    >>> [g for g in range(1, 7) if s.should_collect(g)]
    [2, 4, 6]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from priorzoo.validation import check_float, check_positive_int

__all__ = ["ConstantLRSchedule", "CyclicCosineSchedule"]


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be an integer ≥ 0 (optimizer steps taken); received {step!r}")
    return step


class _Schedule:
    """Shared protocol: ``lr(step, base_lr)``, ``should_collect(global_step)``, ``scheduler(optimizer)``."""

    def lr(self, step: int, base_lr: float) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def should_collect(self, global_step: int) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` that follows this schedule for every param group (call ``.step()`` after each
        optimizer step). Each group's own initial lr is the ``base_lr``.

        Example:
            >>> import torch
            >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
            >>> sched = ConstantLRSchedule(swa_lr=0.02, swa_start=1).scheduler(opt)
            >>> opt.step(); sched.step(); opt.param_groups[0]["lr"]
            0.02
        """
        lambdas: list[Callable[[int], float]] = []
        for group in optimizer.param_groups:
            base = float(group.get("initial_lr", group["lr"]))
            if base <= 0:
                raise ValueError(f"param group lr must be > 0 to follow a schedule; received {base}")
            lambdas.append(lambda t, b=base: self.lr(t, b) / b)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


@dataclass(frozen=True)
class ConstantLRSchedule(_Schedule):
    """SWA schedule: the base lr until ``swa_start``, a cosine anneal to ``swa_lr`` over ``anneal_steps``,
    then constant ``swa_lr``; a snapshot every ``collect_every`` steps once at ``swa_lr``.

    Steps count optimizer steps: ``lr(t)`` is the learning rate of step t+1 (t steps already taken) and
    ``should_collect(g)`` is asked after the optimizer step that makes ``global_step == g``.

    Example:
        >>> s = ConstantLRSchedule(swa_lr=0.01, swa_start=2, anneal_steps=2, collect_every=3)
        >>> [round(s.lr(t, base_lr=0.1), 4) for t in range(6)]
        [0.1, 0.1, 0.1, 0.055, 0.01, 0.01]
        >>> [g for g in range(1, 14) if s.should_collect(g)]
        [7, 10, 13]
    """

    swa_lr: float
    swa_start: int = 0
    anneal_steps: int = 0
    collect_every: int = 1

    def __post_init__(self) -> None:
        check_float(self.swa_lr, "swa_lr", minimum=0.0, strict=True)
        check_positive_int(self.swa_start, "swa_start", minimum=0)
        check_positive_int(self.anneal_steps, "anneal_steps", minimum=0)
        check_positive_int(self.collect_every, "collect_every")

    def lr(self, step: int, base_lr: float) -> float:
        """Learning rate after ``step`` optimizer steps."""
        t = _check_step(step)
        if t < self.swa_start:
            return base_lr
        if t < self.swa_start + self.anneal_steps:
            alpha = (t - self.swa_start) / self.anneal_steps
            return self.swa_lr + (base_lr - self.swa_lr) * 0.5 * (1.0 + math.cos(math.pi * alpha))
        return self.swa_lr

    def should_collect(self, global_step: int) -> bool:
        """True after the steps ``s0 + collect_every·j`` (j ≥ 1), ``s0 = swa_start + anneal_steps``."""
        since = _check_step(global_step) - (self.swa_start + self.anneal_steps)
        return since >= 1 and since % self.collect_every == 0


@dataclass(frozen=True)
class CyclicCosineSchedule(_Schedule):
    """Cyclic cosine schedule with one snapshot per cycle, at its end (lowest lr).

    From ``start_step`` on, each cycle of ``cycle_steps`` goes from ``lr_max`` (default: the optimizer's
    lr) down to ``lr_min`` by a half cosine: ``lr = lr_min + ½(lr_max − lr_min)(1 + cos(π r / c))`` with r
    the position in the cycle. This is the cyclical schedule of Zhang et al. (cSG-MCMC, 2020) that the
    official "Pre-Train Your Loss" code uses to sample.

    Example:
        >>> s = CyclicCosineSchedule(cycle_steps=4, lr_min=0.0)
        >>> [round(s.lr(t, base_lr=1.0), 3) for t in range(8)]
        [1.0, 0.854, 0.5, 0.146, 1.0, 0.854, 0.5, 0.146]
        >>> [g for g in range(1, 13) if s.should_collect(g)]
        [4, 8, 12]
    """

    cycle_steps: int
    lr_min: float = 0.0
    lr_max: float | None = None
    start_step: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.cycle_steps, "cycle_steps", minimum=2)
        check_float(self.lr_min, "lr_min", minimum=0.0)
        if self.lr_max is not None:
            check_float(self.lr_max, "lr_max", minimum=self.lr_min, strict=True)
        check_positive_int(self.start_step, "start_step", minimum=0)

    def lr(self, step: int, base_lr: float) -> float:
        """Learning rate after ``step`` optimizer steps."""
        t = _check_step(step)
        top = self.lr_max if self.lr_max is not None else base_lr
        if t < self.start_step:
            return top
        r = (t - self.start_step) % self.cycle_steps
        return self.lr_min + 0.5 * (top - self.lr_min) * (1.0 + math.cos(math.pi * r / self.cycle_steps))

    def should_collect(self, global_step: int) -> bool:
        """True after the last step of each cycle."""
        since = _check_step(global_step) - self.start_step
        return since >= 1 and since % self.cycle_steps == 0
