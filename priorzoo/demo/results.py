"""The comparison's rows (:class:`MethodResult`), the whole run (:class:`DemoResult`) and the Markdown table.

Example:
    >>> from priorzoo.demo.results import MethodResult
    >>> MethodResult("L2-SP", 0.5, 0.9, 0.1, "variance", 0.01).selected()
    'σ² = 0.01'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DemoResult", "MethodResult", "format_table"]


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
