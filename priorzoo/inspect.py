r"""Look inside a prior: config summary, size, rank, per-layer variance statistics and a plot of prior scales.

For a prior ``N(μ, Σ)``, ``Σ = λ(diag(v) + FᵀF) + eps·I`` (``docs/format.md``), the statistics are computed per
parameter tensor ("layer") p with n_p weights, from the stored tensors and without forming Σ:

- variance statistics of v over the layer: mean, median, min, max;
- factor row norms ‖F_{k,p}‖₂ for k = 1…K (how much of each low-rank direction lies in this layer);
- the low-rank part of the diagonal, mean_i Σ_k F_{k,i}² = Σ_k ‖F_{k,p}‖² / n_p;
- the **prior std** of the layer, ``sqrt(mean diag Σ_p) = sqrt(λ(mean v_p + Σ_k‖F_{k,p}‖²/n_p) + eps)``, i.e.
  the typical distance a weight of that layer may move under the prior, next to the RMS of its mean
  weights ``sqrt(mean μ_p²)`` and their ratio (the *relative* prior scale).

:func:`summarize` returns all of it as a JSON-ready dict; :func:`format_summary` renders it as text (what
``priorzoo inspect`` prints); :func:`plot_layer_scales` draws the per-layer prior std and weight RMS as a PNG
(needs matplotlib: ``pip install "priorzoo[plot]"``).

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> prior = PriorModel.from_tensors({"a": torch.ones(4), "b": torch.ones(2, 2)},
    ...                                 variance={"a": torch.full((4,), 4.0), "b": torch.full((2, 2), 1.0)})
    >>> s = summarize(prior)
    >>> s["num_parameters"], [layer["prior_std"] for layer in s["layers"]]
    (8, [2.0, 1.0])
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from priorzoo.prior import PriorModel

__all__ = ["format_summary", "plot_layer_scales", "summarize"]

_PLOT_HINT = 'pip install "priorzoo[plot]"'


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _f(x: Tensor | float) -> float:
    return float(x)


@torch.no_grad()
def _layer_stats(prior: PriorModel, name: str, scale: float) -> dict[str, Any]:
    mean = prior.mean[name]
    var = prior.variance[name].detach().reshape(-1).float()
    numel = var.numel()
    stats: dict[str, Any] = {
        "name": name,
        "shape": list(mean.shape),
        "numel": numel,
    }
    if numel == 0:
        stats.update(
            variance_mean=0.0, variance_median=0.0, variance_min=0.0, variance_max=0.0, factor_row_norms=[],
            low_rank_diag_mean=0.0, prior_std=math.sqrt(prior.eps), mean_rms=0.0, relative_std=None,
        )  # fmt: skip
        return stats
    var_mean = _f(var.mean(dtype=torch.float64))  # float64 accumulation: tiny SWAG variances, many weights
    # row by row, accumulated in float64 without a converted copy (a [K, n] float copy of a large embedding
    # would cost K times its memory)
    row_sq: list[float] = []
    if prior.cov_factor is not None:
        f = prior.cov_factor[name].detach()
        row_sq = [_f(torch.linalg.vector_norm(f[k], dtype=torch.float64)) ** 2 for k in range(f.shape[0])]
    low_rank = sum(row_sq) / numel
    diag_mean = scale * (var_mean + low_rank) + prior.eps
    mean_rms = math.sqrt(_f(mean.detach().float().pow(2).mean(dtype=torch.float64)))
    std = math.sqrt(diag_mean)
    stats.update(
        variance_mean=var_mean,
        variance_median=_f(var.median()),
        variance_min=_f(var.min()),
        variance_max=_f(var.max()),
        factor_row_norms=[math.sqrt(s) for s in row_sq],
        low_rank_diag_mean=low_rank,
        prior_std=std,
        mean_rms=mean_rms,
        relative_std=std / mean_rms if mean_rms > 0 else None,
    )
    return stats


@torch.no_grad()
def summarize(prior: PriorModel, *, scale: float | None = None) -> dict[str, Any]:
    """Everything :mod:`priorzoo.inspect` reports about a prior, as a JSON-ready dict.

    Args:
        prior: the prior to describe.
        scale: λ to evaluate the prior std at (default: the prior's stored λ; pass e.g. its
            ``config.recommended_scale`` to see the scales fine-tuning will use).

    Returns:
        A dict with the config summary (``kind``, ``rank``, ``scale``, ``eps``, ``recommended_scale``,
        ``license``, ``backbone``, ``source``, ``learning``, ``exclude``, ``format_version``,
        ``priorzoo_version``), sizes (``num_parameters``, ``num_tensors``, ``dtypes``, ``storage_bytes``),
        global statistics (``variance`` mean/median/min/max over all weights, ``factor_row_norms`` ‖F_k‖,
        ``prior_std`` = sqrt(mean diag Σ), ``low_rank_fraction`` = share of trace(Σ − eps·I) from FᵀF),
        ``variance_floor`` (``floor``: ½·``learning.min_var`` of a SWAG prior, and ``fraction``: the share of
        variances at it — most of them means λ = 1 is a precision of 1/floor per weight; ``None`` when the
        prior records no floor), ``buffers`` (how many batch-norm statistics tensors it carries), the
        λ used (``evaluated_scale``) and ``layers``: one dict per parameter tensor, in prior order, with
        ``name``, ``shape``, ``numel``, ``variance_mean``/``_median``/``_min``/``_max``,
        ``factor_row_norms``, ``low_rank_diag_mean``, ``prior_std``, ``mean_rms`` and ``relative_std``.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> p = PriorModel.from_tensors({"w": torch.zeros(4)}, variance={"w": torch.ones(4)},
        ...                             cov_factor={"w": torch.tensor([[2.0, 0.0, 0.0, 0.0]])})
        >>> s = summarize(p)
        >>> s["factor_row_norms"], s["prior_std"], s["low_rank_fraction"]  # mean diag Σ = 1 + 4/4
        ([2.0], 1.4142135623730951, 0.5)
    """
    lam = prior.scale if scale is None else float(scale)
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"`scale` (λ) must be a finite number > 0; received {scale!r}")
    cfg = prior.config
    layers = [_layer_stats(prior, n, lam) for n in prior.names]
    total = prior.num_parameters
    all_var = torch.cat([prior.variance[n].detach().reshape(-1).float() for n in prior.names])
    var_sum = sum(layer["variance_mean"] * layer["numel"] for layer in layers)
    low_sum = sum(layer["low_rank_diag_mean"] * layer["numel"] for layer in layers)
    rank = prior.rank if prior.cov_factor is not None else 0
    row_norms = [math.sqrt(sum(layer["factor_row_norms"][k] ** 2 for layer in layers)) for k in range(rank)]

    def dtypes(store: Mapping[str, Tensor] | None) -> str | None:
        if not store:
            return None
        return "/".join(sorted({_dtype_name(t) for t in store.values()}))

    floor_info = None
    min_var = cfg.learning.get("min_var")
    if prior.kind.value == "swag" and isinstance(min_var, (int, float)) and min_var > 0:
        from priorzoo.learn.recommended_scale import variance_floor_fraction

        floor = 0.5 * float(min_var)
        floor_info = {"floor": floor, "fraction": variance_floor_fraction(prior.variance, floor)}
    stores = [prior.mean, prior.variance, *([prior.cov_factor] if prior.cov_factor is not None else [])]
    storage = sum(t.numel() * t.element_size() for store in stores for t in store.values())
    return {
        "kind": prior.kind.value,
        "rank": prior.rank,
        "scale": prior.scale,
        "eps": prior.eps,
        "evaluated_scale": lam,
        "recommended_scale": cfg.recommended_scale,
        "license": cfg.license,
        "format_version": cfg.format_version,
        "priorzoo_version": cfg.priorzoo_version,
        "backbone": dict(cfg.backbone),
        "source": dict(cfg.source),
        "learning": dict(cfg.learning),
        "exclude": list(cfg.exclude),
        "num_parameters": total,
        "num_tensors": len(prior.names),
        "dtypes": {
            "mean": dtypes(prior.mean),
            "variance": dtypes(prior.variance),
            "cov_factor": dtypes(prior.cov_factor),
        },
        "storage_bytes": storage,
        "variance": {
            "mean": var_sum / total if total else 0.0,
            "median": _f(all_var.median()) if total else 0.0,
            "min": _f(all_var.min()) if total else 0.0,
            "max": _f(all_var.max()) if total else 0.0,
        },
        "factor_row_norms": row_norms,
        "prior_std": math.sqrt(lam * (var_sum + low_sum) / total + prior.eps) if total else 0.0,
        "low_rank_fraction": low_sum / (var_sum + low_sum) if var_sum + low_sum > 0 else 0.0,
        "variance_floor": floor_info,
        "buffers": len(prior.buffers),
        "layers": layers,
    }


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover - loop always returns


def _short(items: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in items.items()) or "not recorded"


def format_summary(summary: Mapping[str, Any], *, max_layers: int | None = 60) -> str:
    """Human-readable text of a :func:`summarize` dict (what ``priorzoo inspect`` prints).

    Args:
        summary: the dict from :func:`summarize`.
        max_layers: show at most this many layers (the first and last halves), ``None`` for all.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> text = format_summary(summarize(PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0)))
        >>> text.splitlines()[0]
        'priorzoo prior: kind isotropic, rank K = 0, λ = 1, eps = 0'
    """
    s = summary
    lines = [
        f"priorzoo prior: kind {s['kind']}, rank K = {s['rank']}, λ = {s['scale']:g}, eps = {s['eps']:g}",
        f"  recommended λ: {s['recommended_scale']:g}"
        if s.get("recommended_scale") is not None
        else "  recommended λ: not measured",
        f"  covers:        {s['num_tensors']} tensors, {s['num_parameters']:,} weights "
        f"({_size(s['storage_bytes'])} of tensors; dtypes "
        + ", ".join(f"{k} {v}" for k, v in s["dtypes"].items() if v)
        + ")",
        f"  backbone:      {_short(s['backbone'])}",
        f"  source:        {_short(s['source'])}",
        f"  learning:      {_short(s['learning'])}",
        f"  excluded:      {', '.join(s['exclude']) or 'none'}",
        f"  license:       {s['license'] or 'not recorded'}",
        f"  format:        format_version {s['format_version']}, written by priorzoo {s['priorzoo_version']}",
        "",
        f"variance v:      mean {s['variance']['mean']:.3e}, median {s['variance']['median']:.3e}, "
        f"min {s['variance']['min']:.3e}, max {s['variance']['max']:.3e}",
        f"prior std:       {s['prior_std']:.3e} = sqrt(mean diag Σ) at λ = {s['evaluated_scale']:g} "
        f"(low-rank share of the trace: {100 * s['low_rank_fraction']:.1f}%)",
    ]
    floor = s.get("variance_floor")
    if floor:
        lines.append(
            f"at the floor:    {100 * floor['fraction']:.1f}% of the variances equal ½·min_var = {floor['floor']:.1e}"
            f" (precision {1 / floor['floor']:.1e} per weight at λ = 1)"
        )
    lines.append(
        f"batch norm:      {s['buffers']} running-statistics tensors carried"
        if s.get("buffers")
        else "batch norm:      no running statistics carried (init_model_ keeps the model's own)"
    )
    if s["factor_row_norms"]:
        lines.append("factor rows ‖F_k‖: " + ", ".join(f"{x:.3e}" for x in s["factor_row_norms"]))
    lines += [
        "",
        f"per layer (prior std = sqrt(mean diag Σ) at λ = {s['evaluated_scale']:g}; "
        "rel = prior std / RMS of the mean weights):",
    ]
    width = min(max((len(layer["name"]) for layer in s["layers"]), default=10), 60)
    header = f"  {'layer':<{width}} {'shape':>18} {'var mean':>10} {'var median':>10} {'lowrank':>10}"
    header += f" {'prior std':>10} {'rel':>8}"
    lines.append(header)
    layers = list(s["layers"])
    hidden = 0
    if max_layers is not None and len(layers) > max_layers:
        half = max(max_layers // 2, 1)
        hidden = len(layers) - 2 * half
        layers = [*layers[:half], None, *layers[-half:]]
    for layer in layers:
        if layer is None:
            lines.append(f"  … {hidden} more layers (use --json for all) …")
            continue
        name = layer["name"] if len(layer["name"]) <= width else "…" + layer["name"][-(width - 1) :]
        rel = f"{layer['relative_std']:.2e}" if layer["relative_std"] is not None else "-"
        lines.append(
            f"  {name:<{width}} {'x'.join(map(str, layer['shape'])) or 'scalar':>18} {layer['variance_mean']:>10.3e}"
            f" {layer['variance_median']:>10.3e} {layer['low_rank_diag_mean']:>10.3e} {layer['prior_std']:>10.3e}"
            f" {rel:>8}"
        )
    return "\n".join(lines)


def plot_layer_scales(
    prior: PriorModel | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    scale: float | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Draw the per-layer prior std next to the weights' RMS (log scale) and save it as a PNG.

    The top panel shows, for every parameter tensor in prior order, the prior std sqrt(mean diag Σ) (bars;
    matrices/kernels and vectors such as biases and norm scales in two colours) and the RMS of the mean
    weights (black ticks); the bottom panel shows their ratio, the relative prior scale, and the low-rank
    share of the diagonal. Rendered with matplotlib's Agg canvas (no display needed, no global backend
    change).

    Args:
        prior: a :class:`~priorzoo.PriorModel`, or a dict from :func:`summarize`.
        path: the PNG file to write (parent folders are created).
        scale: λ to evaluate the prior std at (default: the stored λ; ignored for a summary dict).
        title: figure title (default: kind, backbone and λ).
        dpi: resolution.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is missing (``pip install "priorzoo[plot]"``).

    Example:
        >>> import tempfile, torch
        >>> from priorzoo import PriorModel
        >>> prior = PriorModel.from_tensors({"w": torch.ones(3, 3), "b": torch.ones(3)}, variance=0.01)
        >>> plot_layer_scales(prior, tempfile.mkdtemp() + "/scales.png").suffix
        '.png'
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib: `{_PLOT_HINT}`") from err

    s = summarize(prior, scale=scale) if isinstance(prior, PriorModel) else dict(prior)
    layers = s["layers"]
    n = len(layers)
    x = list(range(n))
    std = [max(layer["prior_std"], 1e-30) for layer in layers]
    rms = [layer["mean_rms"] if layer["mean_rms"] > 0 else float("nan") for layer in layers]
    rel = [layer["relative_std"] if layer["relative_std"] else float("nan") for layer in layers]
    share = [
        layer["low_rank_diag_mean"] / (layer["low_rank_diag_mean"] + layer["variance_mean"])
        if layer["low_rank_diag_mean"] + layer["variance_mean"] > 0
        else 0.0
        for layer in layers
    ]
    matrix = [len(layer["shape"]) >= 2 for layer in layers]
    colors = ["tab:blue" if m else "tab:orange" for m in matrix]

    fig = Figure(figsize=(min(max(8.0, 0.16 * n + 3.0), 30.0), 7.5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    ax1.bar(x, std, color=colors, width=0.8)
    ax1.plot(x, rms, color="black", linestyle="none", marker="_", markersize=9, mew=2, label="RMS of mean weights μ")
    ax1.set_yscale("log")
    tops = [v for v in (*std, *rms) if v == v]  # headroom above the bars for the legend
    ax1.set_ylim(top=max(tops) * 8)
    ax1.set_ylabel("prior std  sqrt(mean diag Σ)")
    ax1.grid(True, axis="y", which="major", alpha=0.3)
    handles = [
        Patch(color="tab:blue", label="prior std: matrices / kernels"),
        Patch(color="tab:orange", label="prior std: vectors (bias, norm)"),
        *ax1.get_lines(),
    ]
    ax1.legend(handles=handles, loc="best", fontsize="small", framealpha=0.85)
    ax2.plot(x, rel, color="tab:green", marker=".", linewidth=1, label="prior std / weight RMS")
    ax2.set_yscale("log")
    ax2.set_ylabel("relative prior scale")
    ax2.grid(True, axis="y", which="major", alpha=0.3)
    if s["rank"]:
        twin = ax2.twinx()
        twin.plot(x, share, color="tab:purple", linestyle="--", linewidth=1, label="low-rank share of diag Σ")
        twin.set_ylim(0, 1)
        twin.set_ylabel("low-rank share")
        lines = ax2.get_lines() + twin.get_lines()
        ax2.legend(lines, [line.get_label() for line in lines], loc="best", fontsize="small", framealpha=0.85)
    else:
        ax2.legend(loc="best", fontsize="small")
    step = max(1, math.ceil(n / 60))
    ticks = x[::step]
    ax2.set_xticks(ticks)
    ax2.set_xticklabels([_tick(layers[i]["name"]) for i in ticks], rotation=90, fontsize=7)
    ax2.set_xlabel("parameter tensor (prior order)")
    bb = s.get("backbone") or {}
    backbone = " ".join(str(v) for v in (bb.get("library"), bb.get("name")) if v) or "backbone"
    fig.suptitle(
        title
        or f"priorzoo {s['kind']} prior (K = {s['rank']}) for {backbone}: per-layer prior scale at "
        f"λ = {s['evaluated_scale']:g}",
        fontsize="medium",
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _tick(name: str, limit: int = 32) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]
