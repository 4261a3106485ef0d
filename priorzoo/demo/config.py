"""The demo's settings: :class:`DemoConfig` (the whole pipeline) and :class:`FinetuneSettings` (the comparison).

Example:
    >>> from priorzoo.demo.config import DemoConfig
    >>> DemoConfig.quick().finetune.epochs
    8
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from priorzoo.enums import Metric, OptimizerKind
from priorzoo.validation import check_positive_int

__all__ = ["ALL_METHODS", "INIT_ONLY", "METHODS", "DemoConfig", "FinetuneSettings"]

METHODS = ("fine-tuning", "L2-SP", "learned prior", "learned prior + BMA")
"""The four methods of the comparison, in table order (the default of ``compare_methods``)."""

INIT_ONLY = "fine-tuning from prior mean"
"""The opt-in init-only control: plain fine-tuning started from the prior mean μ (and its batch-norm statistics),
with the learning-rate grid and budget of fine-tuning and no prior term: what the prior adds beyond initialisation."""

ALL_METHODS = ("fine-tuning", INIT_ONLY, "L2-SP", "learned prior", "learned prior + BMA")
"""Every method ``compare_methods`` can run, in table order."""


@dataclass
class FinetuneSettings:
    """How the four methods are fine-tuned and tuned (the same budget for each).

    Args:
        epochs: epochs of every run (the best epoch on validation is kept).
        batch_size: training batch size.
        lr: learning rate of L2-SP, the learned prior and the BMA phase.
        lr_grid: plain fine-tuning's learning rates (its tuned knob).
        l2sp_variances: L2-SP's σ² grid (its tuned knob).
        scales: the learned prior's λ grid; ``None`` matches it to ``l2sp_variances`` by the average prior
            variance (λ_g = σ²_g / (tr Σ / P)), so that both priors cover the same overall strengths.
        optimizer: ``sgd`` (with ``momentum``, as in the paper) or ``adamw``, for every method.
        momentum, weight_decay: of the optimiser (weight decay toward 0 applies to every method).
        select_metric: ``nll`` (default: a proper scoring rule, steadier than accuracy on a small validation
            split, and :func:`priorzoo.finetune.tune_scale`'s default), ``accuracy`` or ``ece``, for both the
            best epoch of a run and the best grid point (ties: the lower validation NLL, then the first point).
        bma_epochs: epochs of constant-learning-rate training after the selected learned-prior run, with a
            SWAG snapshot after every optimiser step.
        bma_rank: K of the downstream SWAG posterior.
        bma_samples: S posterior samples averaged by BMA.
        eval_batch_size: batch size for validation/test predictions.
        max_grad_norm: clip the total gradient norm (``None``: no clipping), the same for every method.
        seed: seeds data order, head initialisation, dropout and posterior samples.

    Example:
        >>> s = FinetuneSettings(lr_grid=(0.01, 0.1), l2sp_variances=(1e-3, 1e-2))
        >>> s.grid_size
        2
    """

    epochs: int = 10
    batch_size: int = 16
    lr: float = 0.03
    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1)
    l2sp_variances: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    scales: tuple[float, ...] | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    select_metric: str = "nll"
    bma_epochs: int = 3
    bma_rank: int = 8
    bma_samples: int = 20
    eval_batch_size: int = 128
    max_grad_norm: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "bma_epochs", "bma_samples", "eval_batch_size"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.bma_rank, "bma_rank", minimum=2, hint="SWAG's K")
        if self.bma_epochs < 2:
            raise ValueError(f"`bma_epochs` must be ≥ 2 (a SWAG posterior needs two snapshots); got {self.bma_epochs}")
        self.lr_grid = tuple(float(v) for v in self.lr_grid)
        self.l2sp_variances = tuple(float(v) for v in self.l2sp_variances)
        if self.scales is not None:
            self.scales = tuple(float(v) for v in self.scales)
        grids = {"lr_grid": self.lr_grid, "l2sp_variances": self.l2sp_variances}
        if self.scales is not None:
            grids["scales"] = self.scales
        for name, grid in grids.items():
            if not grid or any(not (math.isfinite(v) and v > 0) for v in grid):
                raise ValueError(f"`{name}` must be a non-empty sequence of finite numbers > 0; received {grid!r}")
        sizes = {name: len(g) for name, g in grids.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"every tuned method must get the same budget: the grids must have the same length; received {sizes}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a finite number > 0; received {self.lr!r}")
        OptimizerKind.check(self.optimizer)
        Metric.check(self.select_metric, what="select_metric")

    @property
    def grid_size(self) -> int:
        """G, the number of runs each tuned method gets."""
        return len(self.lr_grid)


@dataclass
class DemoConfig:
    """Everything ``run_demo`` does; the defaults are the embedded ``priorzoo demo`` configuration.

    Args:
        output_dir: where ``prior/`` (the zoo entry), ``results.json`` and ``results.md`` are written.
        seed: seeds the data splits and every run.
        source_data, target_data: ``None`` for the bundled tweets (source: non-airline tweets, target:
            airline tweets), or a path to your own CSV / TSV / JSON(L) / parquet file or class-per-folder
            directory with text and label columns (see :func:`priorzoo.data.bundled.load_text_classification`).
        text_column, label_column: the columns of ``source_data`` / ``target_data`` files.
        max_length: token limit of the texts.
        trainable_layers: how many top encoder layers are trained and covered by the prior (the others and
            the embeddings are frozen and their outputs cached).
        source_per_class: source examples per class (fewer if a class has fewer).
        source_epochs, source_swag_epochs: source training epochs, of which the last ``source_swag_epochs``
            collect SWAG snapshots every ``source_collect_every`` steps.
        source_lr, source_batch_size: constant SGD learning rate and batch size of the source run.
        rank: K, the SWAG prior's number of deviation rows.
        train_per_class, val_per_class, test_per_class: the class-balanced target splits.
        finetune: the :class:`FinetuneSettings` of the comparison.
        progress: show the tqdm progress bar.

    Example:
        >>> cfg = DemoConfig.quick()
        >>> cfg.trainable_layers, cfg.train_per_class
        (1, 20)
    """

    output_dir: str = "priorzoo-demo"
    seed: int = 0
    source_data: str | None = None
    target_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 48
    trainable_layers: int = 2
    source_per_class: int = 600
    source_epochs: int = 3
    source_swag_epochs: int = 2
    source_collect_every: int = 8
    source_lr: float = 0.05
    source_batch_size: int = 32
    rank: int = 10
    train_per_class: int = 20
    val_per_class: int = 50
    test_per_class: int = 200
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.finetune, Mapping):
            self.finetune = FinetuneSettings(**self.finetune)
        for name in (
            "max_length",
            "trainable_layers",
            "source_per_class",
            "source_epochs",
            "source_swag_epochs",
            "source_collect_every",
            "source_batch_size",
            "train_per_class",
            "val_per_class",
            "test_per_class",
        ):
            check_positive_int(getattr(self, name), name)
        if self.source_swag_epochs > self.source_epochs:
            raise ValueError(
                f"`source_swag_epochs` ({self.source_swag_epochs}) must be ≤ `source_epochs` ({self.source_epochs})"
            )
        check_positive_int(self.rank, "rank", minimum=2, hint="K, the SWAG prior's number of deviation rows")
        if not (math.isfinite(self.source_lr) and self.source_lr > 0):
            raise ValueError(f"`source_lr` must be a finite number > 0; received {self.source_lr!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """The same pipeline in about a minute (``priorzoo demo --quick``): one trainable layer, shorter
        texts, fewer source examples and epochs.

        Example:
            >>> DemoConfig.quick(seed=3).seed
            3
        """
        base: dict[str, Any] = {
            "max_length": 40,
            "trainable_layers": 1,
            "source_per_class": 200,
            "source_epochs": 2,
            "source_swag_epochs": 1,
            "source_collect_every": 2,
            "rank": 6,
            "train_per_class": 20,
            "val_per_class": 20,
            "test_per_class": 100,
            "finetune": FinetuneSettings(epochs=8, bma_epochs=2, bma_rank=4, bma_samples=6),
        }
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``results.json`` stores under ``config``)."""
        return dataclasses.asdict(self)
