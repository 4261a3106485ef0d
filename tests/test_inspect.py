"""priorzoo.inspect: per-layer statistics checked against the dense covariance, text report, PNG plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from _models import shaped_prior

from priorzoo import PriorModel
from priorzoo.inspect import format_summary, plot_layer_scales, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_prior(*, rank: int = 3, scale: float = 2.0, eps: float = 1e-3, factor_dtype: torch.dtype = torch.float32):
    shapes = {"conv.weight": (4, 2, 3, 3), "conv.bias": (4,), "fc.weight": (3, 5)}
    return shaped_prior(
        shapes,
        rank=rank,
        variance=(0.1, 0.0),
        factor_std=0.1,
        factor_dtype=factor_dtype,
        scale=scale,
        eps=eps,
        backbone={"library": "timm", "name": "tiny"},
    )


def dense_covariance(prior: PriorModel, scale: float | None = None) -> torch.Tensor:
    lam = prior.scale if scale is None else scale
    v = torch.cat([prior.variance[n].reshape(-1) for n in prior.names]).double()
    cov = torch.diag(v)
    if prior.cov_factor is not None:
        f = torch.cat([prior.cov_factor[n].reshape(prior.rank, -1).double() for n in prior.names], dim=1)
        cov = cov + f.T @ f
    return lam * cov + prior.eps * torch.eye(len(v), dtype=torch.float64)


def test_layer_statistics_match_the_dense_covariance() -> None:
    prior = random_prior()
    s = summarize(prior)
    diag = dense_covariance(prior).diagonal()
    offset = 0
    for layer, name in zip(s["layers"], prior.names):
        n = prior.mean[name].numel()
        block = diag[offset : offset + n]
        assert layer["name"] == name and layer["numel"] == n and layer["shape"] == list(prior.mean[name].shape)
        assert layer["prior_std"] == pytest.approx(math.sqrt(float(block.mean())), rel=1e-6)
        v = prior.variance[name].reshape(-1)
        assert layer["variance_mean"] == pytest.approx(float(v.mean()), rel=1e-6)
        assert layer["variance_median"] == pytest.approx(float(v.median()))
        assert (layer["variance_min"], layer["variance_max"]) == pytest.approx((float(v.min()), float(v.max())))
        rows = prior.cov_factor[name].reshape(prior.rank, -1).norm(dim=1)
        assert layer["factor_row_norms"] == pytest.approx(rows.tolist(), rel=1e-6)
        rms = float(prior.mean[name].pow(2).mean().sqrt())
        assert layer["mean_rms"] == pytest.approx(rms, rel=1e-6)
        assert layer["relative_std"] == pytest.approx(layer["prior_std"] / rms, rel=1e-6)
        offset += n
    assert s["prior_std"] == pytest.approx(math.sqrt(float(diag.mean())), rel=1e-6)
    f = torch.cat([prior.cov_factor[n].reshape(prior.rank, -1) for n in prior.names], dim=1)
    assert s["factor_row_norms"] == pytest.approx(f.norm(dim=1).tolist(), rel=1e-6)
    low, full = float(f.pow(2).sum()), float(f.pow(2).sum()) + float(sum(v.sum() for v in prior.variance.values()))
    assert s["low_rank_fraction"] == pytest.approx(low / full, rel=1e-6)
    assert s["num_parameters"] == prior.num_parameters == 4 * 2 * 3 * 3 + 4 + 15
    assert (s["kind"], s["rank"], s["scale"], s["eps"]) == ("swag", 3, 2.0, 1e-3)
    json.dumps(s)  # JSON-ready


def test_scale_override_and_half_precision_factor() -> None:
    prior = random_prior(factor_dtype=torch.float16)
    s = summarize(prior, scale=1e4)
    assert s["evaluated_scale"] == 1e4 and s["scale"] == 2.0
    assert s["prior_std"] == pytest.approx(math.sqrt(float(dense_covariance(prior, 1e4).diagonal().mean())), rel=1e-5)
    assert s["dtypes"] == {"mean": "float32", "variance": "float32", "cov_factor": "float16"}
    with pytest.raises(ValueError, match="scale"):
        summarize(prior, scale=0.0)


def test_diagonal_prior_has_no_factor_statistics() -> None:
    prior = random_prior(rank=0, eps=0.0)
    s = summarize(prior)
    assert s["factor_row_norms"] == [] and s["low_rank_fraction"] == 0.0
    assert all(layer["factor_row_norms"] == [] for layer in s["layers"])
    assert s["dtypes"]["cov_factor"] is None


def test_format_summary_lists_config_globals_and_layers() -> None:
    text = format_summary(summarize(random_prior()))
    lines = text.splitlines()
    assert lines[0] == "priorzoo prior: kind swag, rank K = 3, λ = 2, eps = 0.001"
    assert "  covers:        3 tensors, 91 weights" in text
    assert "backbone:      library=timm, name=tiny" in text
    assert "factor rows ‖F_k‖:" in text
    assert sum(line.startswith("  conv.") or line.startswith("  fc.") for line in lines) == 3
    many = PriorModel.from_tensors({f"l{i}.weight": torch.ones(2) for i in range(10)}, variance=1.0)
    short = format_summary(summarize(many), max_layers=4)
    assert "… 6 more layers" in short and "l0.weight" in short and "l9.weight" in short and "l5.weight" not in short


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    prior = random_prior()
    out = plot_layer_scales(prior, tmp_path / "plots" / "scales.png", scale=10.0)
    assert out == tmp_path / "plots" / "scales.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    again = plot_layer_scales(summarize(prior, scale=10.0), tmp_path / "again.png")  # a summary dict works too
    assert again.read_bytes() == data  # deterministic rendering


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match=r'pip install "priorzoo\[plot\]"'):
        plot_layer_scales(random_prior(), tmp_path / "x.png")


def test_summary_reports_the_fraction_of_variances_at_the_floor_and_the_buffers() -> None:
    import torch

    from priorzoo import PriorModel
    from priorzoo.inspect import format_summary, summarize

    var = torch.full((10,), 5e-7)
    var[:2] = 1e-3  # 8 of 10 at ½·min_var
    prior = PriorModel.from_tensors(
        {"w": torch.zeros(10)},
        {"w": var},
        {"w": torch.zeros(2, 10)},
        learning={"method": "swag", "min_var": 1e-6},
        buffers={"bn.running_mean": torch.zeros(3)},
    )
    s = summarize(prior)
    assert s["variance_floor"] == {"floor": 5e-7, "fraction": 0.8}
    assert s["buffers"] == 1
    text = format_summary(s)
    assert "80.0% of the variances equal ½·min_var = 5.0e-07" in text
    assert "1 running-statistics tensors carried" in text
    assert summarize(PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0))["variance_floor"] is None
