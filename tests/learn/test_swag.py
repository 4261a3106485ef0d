"""SWAGCollector: moments, ring buffer, factor and density against numpy; known posteriors; resume; errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from priorzoo import PriorModel
from priorzoo.learn import (
    ConstantLRSchedule,
    CrossEntropyObjective,
    CyclicCosineSchedule,
    SWAGCollector,
    swag_fit,
)
from priorzoo.learn.callbacks import FIT_STATE_NAME


class TwoParams(nn.Module):
    """A model whose weights we set by hand: a [2, 3] matrix and a [3] vector (P = 9)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2, 3))
        self.b = nn.Parameter(torch.zeros(3))

    def set_(self, flat: np.ndarray) -> None:
        with torch.no_grad():
            self.a.copy_(torch.as_tensor(flat[:6].reshape(2, 3)))
            self.b.copy_(torch.as_tensor(flat[6:]))


def _reference(snapshots: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """Maddox et al.'s SWAG quantities over the snapshots, in float64 numpy."""
    t = len(snapshots)
    mean = snapshots.mean(0)
    var = (snapshots**2).mean(0) - mean**2
    running = np.cumsum(snapshots, 0) / np.arange(1, t + 1)[:, None]
    devs = (snapshots - running)[-rank:]  # deviations from the mean *after* including each snapshot
    return {"mean": mean, "var": var, "devs": devs}


def _flat(d: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([d["a"].double().numpy().ravel(), d["b"].double().numpy().ravel()], axis=-1)


def _flat_factor(prior: PriorModel) -> np.ndarray:
    f = prior.cov_factor
    return np.concatenate([f["a"].double().reshape(prior.rank, -1).numpy(), f["b"].double().numpy()], axis=1)


def _collect(snapshots: np.ndarray, rank: int, **kwargs) -> SWAGCollector:
    model = TwoParams()
    collector = SWAGCollector(model, rank=rank, **kwargs)
    for w in snapshots:
        model.set_(w)
        collector.collect()
    return collector


@pytest.mark.parametrize("num", [2, 3, 4, 5, 11])  # fewer than K, exactly K, wrap-around once and twice
def test_moments_deviations_and_factor_equal_numpy(num: int) -> None:
    rank = 4
    rng = np.random.default_rng(num)
    snaps = rng.normal(0.3, 0.1, size=(num, 9)).astype(np.float32).astype(np.float64)
    collector = _collect(snaps, rank, min_var=0.0)
    ref = _reference(snaps, rank)

    assert collector.num_collected == num
    assert collector.num_deviations == min(num, rank)
    np.testing.assert_allclose(_flat(collector.mean()), ref["mean"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(_flat(collector.raw_variance()), ref["var"], rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(collector.deviations().double().numpy(), ref["devs"], rtol=0, atol=1e-6)

    # while T ≤ K the first deviation (from a one-snapshot mean) is 0: it is never a factor row
    k = min(num, rank) - (1 if num <= rank else 0)
    if k < rank:
        with pytest.warns(UserWarning, match=rf"{num} snapshots give {k} non-zero deviation\(s\), fewer than"):
            prior = collector.to_prior()
    else:
        prior = collector.to_prior()
    np.testing.assert_allclose(_flat(prior.variance), 0.5 * ref["var"], rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(_flat(prior.mean), ref["mean"], atol=1e-7)
    if k < 2:
        assert prior.rank == 0 and prior.cov_factor is None
        return
    assert prior.rank == k and prior.kind.value == "swag"
    devs = ref["devs"][-k:]
    assert np.abs(devs).sum(axis=1).min() > 0  # no dead row
    np.testing.assert_allclose(_flat_factor(prior), devs / math.sqrt(2 * (k - 1)), rtol=0, atol=1e-6)


def test_prior_density_is_the_swag_gaussian() -> None:
    """λ = 1: Σ = ½ (diag(E[w²] − w̄²) + DDᵀ/(K−1)), checked against a dense numpy covariance."""
    rng = np.random.default_rng(0)
    snaps = rng.normal(size=(7, 9)) * np.linspace(0.05, 0.5, 9)
    collector = _collect(snaps, rank=5, min_var=0.0)
    prior = collector.to_prior()
    ref = _reference(snaps, 5)
    cov = 0.5 * (np.diag(ref["var"]) + ref["devs"].T @ ref["devs"] / (5 - 1))
    x = rng.normal(size=9) * 0.1 + ref["mean"]
    diff = x - ref["mean"]
    _, logdet = np.linalg.slogdet(cov)
    expected = -0.5 * (9 * math.log(2 * math.pi) + logdet + diff @ np.linalg.solve(cov, diff))
    got = prior.log_prob({"a": torch.tensor(x[:6].reshape(2, 3)), "b": torch.tensor(x[6:])})
    assert float(got) == pytest.approx(expected, rel=1e-4)


def test_min_var_clamps_before_the_half() -> None:
    snaps = np.zeros((3, 9))
    snaps[:, 0] = [1.0, 2.0, 3.0]  # only the first weight moves
    prior = _collect(snaps, rank=3, min_var=1e-4).to_prior()
    var = _flat(prior.variance)
    assert var[0] == pytest.approx(0.5 * 2.0 / 3.0)
    np.testing.assert_allclose(var[1:], 0.5e-4, rtol=1e-6)
    assert _flat(_collect(snaps, rank=3, min_var=0.0).to_prior(min_var=1e-2).variance)[5] == pytest.approx(0.5e-2)


def test_rank_truncation_keeps_latest_deviations() -> None:
    rng = np.random.default_rng(3)
    snaps = rng.normal(size=(6, 9))
    collector = _collect(snaps, rank=5)
    ref = _reference(snaps, 5)
    p3 = collector.to_prior(rank=3)
    np.testing.assert_allclose(_flat_factor(p3), ref["devs"][-3:] / math.sqrt(4), atol=1e-6)
    p0 = collector.to_prior(rank=0)
    assert p0.rank == 0 and p0.cov_factor is None and p0.kind.value == "swag"


@pytest.mark.parametrize(
    ("kwargs", "tol"),
    [
        ({"chunk_size": 4}, 1e-7),  # chunks straddle both parameters' boundaries
        ({"moment_dtype": torch.float64}, 1e-7),
        ({"factor_dtype": torch.float16}, 2e-3),
        ({"factor_dtype": torch.bfloat16}, 1e-2),
    ],
)
def test_storage_options_give_the_same_prior(kwargs: dict, tol: float) -> None:
    rng = np.random.default_rng(5)
    snaps = rng.normal(0, 0.5, size=(8, 9))
    base = _collect(snaps, rank=4).to_prior()
    other = _collect(snaps, rank=4, **kwargs).to_prior()
    np.testing.assert_allclose(_flat(other.mean), _flat(base.mean), atol=1e-7)
    np.testing.assert_allclose(_flat(other.variance), _flat(base.variance), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(_flat_factor(other), _flat_factor(base), atol=tol)


def test_welford_float32_is_accurate_where_naive_moments_cancel() -> None:
    """Weights ≈ 1 moving by 1e-4: var/w² ≈ 1e-8, far below float32's resolution of E[w²] − w̄²."""
    rng = np.random.default_rng(0)
    snaps = (1.0 + 1e-4 * rng.normal(size=(200, 9))).astype(np.float32).astype(np.float64)
    collector = _collect(snaps, rank=4, min_var=0.0)
    exact = snaps.var(0)
    np.testing.assert_allclose(_flat(collector.raw_variance()), exact, rtol=1e-3)
    s32 = snaps.astype(np.float32)
    naive = (s32**2).mean(0) - s32.mean(0) ** 2  # what E[w²] − w̄² in float32 gives
    assert np.max(np.abs(naive - exact) / exact) > 0.5


# ---------------------------------------------------------------------------------------------- known posteriors
def test_quadratic_loss_with_known_sgd_noise() -> None:
    """SGD on ½(w−μ)ᵀA(w−μ) with gradient noise ξ ~ N(0, diag(s)): the stationary law is Gaussian with
    mean μ and (A diagonal) variance η² s / (1 − (1 − η a)²), exactly. SWAG must recover both."""
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 4.0, 0.8, 2.0])
    s = torch.tensor([1.0, 0.5, 2.0, 1.0])
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0])
    eta, thin, snapshots = 0.1, 25, 400  # thin ≈ 2/(η·a_min) steps: nearly independent snapshots
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(mu.view(1, 4))
    collector = SWAGCollector(model, rank=20, min_var=0.0)
    w = model.weight.data.view(-1)
    noise = torch.randn(snapshots * thin + 100, 4, generator=gen) * s.sqrt()
    for step in range(snapshots * thin + 100):
        w -= eta * (a * (w - mu) + noise[step])  # one SGD step on the noisy gradient
        if step >= 100 and (step - 100) % thin == thin - 1:
            collector.collect()
    assert collector.num_collected == snapshots
    prior = collector.to_prior()
    stationary = eta**2 * s / (1 - (1 - eta * a) ** 2)
    mean = prior.mean["weight"].view(-1)
    assert torch.all((mean - mu).abs() < 4 * (stationary / snapshots).sqrt()), (mean, mu)
    # λ = 1 marginal variances: ½ (diag from all snapshots + low-rank from the last 20) ≈ stationary
    marginal = prior.variance["weight"].view(-1) + prior.cov_factor["weight"].view(prior.rank, -1).pow(2).sum(0)
    ratio = marginal / stationary
    assert torch.all((ratio > 0.6) & (ratio < 1.6)), ratio
    diag_only = 2 * prior.variance["weight"].view(-1)  # E[w²] − w̄² over 400 snapshots
    assert torch.all((diag_only / stationary - 1).abs() < 0.2), (diag_only, stationary)


def test_bayesian_linear_regression_posterior() -> None:
    """Constant-lr SGD (minibatches drawn with replacement) with η = 2B/N on least squares with XᵀX = N·I
    samples the Bayesian posterior N(ŵ, σ²(XᵀX)⁻¹) up to O(η) (Mandt, Hoffman & Blei 2017): SWAG's mean
    ≈ ŵ and its marginal variances ≈ σ²/N."""
    gen = torch.Generator().manual_seed(1)
    n, d, sigma, batch = 500, 3, 0.5, 25
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=gen))
    x = q * math.sqrt(n)  # XᵀX = N·I exactly
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + sigma * torch.randn(n, generator=gen)
    w_hat = torch.linalg.solve(x.T @ x, x.T @ y)
    post_var = sigma**2 / n  # σ²(XᵀX)⁻¹ = σ²/N · I
    eta, thin, snapshots = 2 * batch / n, 20, 300  # decorrelation time 1/(η·1) = 10 steps

    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_hat.view(1, d))
    collector = SWAGCollector(model, rank=20, min_var=0.0)
    w = model.weight.data.view(-1)
    for step in range(snapshots * thin + 50):
        idx = torch.randint(0, n, (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        w -= eta * xb.T @ (xb @ w - yb) / batch  # SGD on the mean loss ½(xᵀw − y)²
        if step >= 50 and (step - 50) % thin == thin - 1:
            collector.collect()
    prior = collector.to_prior()
    mean = prior.mean["weight"].view(-1)
    assert torch.allclose(mean, w_hat, atol=4 * math.sqrt(post_var / 10)), (mean, w_hat)
    marginal = prior.variance["weight"].view(-1) + prior.cov_factor["weight"].view(prior.rank, -1).pow(2).sum(0)
    ratio = marginal / post_var
    assert torch.all((ratio > 0.6) & (ratio < 1.6)), ratio


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rank", [0, -3, 1, 2.5, True, "20", None])
def test_invalid_rank_is_a_clear_error(rank: object) -> None:
    with pytest.raises(ValueError, match=r"`rank` must be an integer ≥ 2; received") as info:
        SWAGCollector(nn.Linear(2, 2), rank=rank)  # type: ignore[arg-type]
    assert repr(rank) in str(info.value)


def test_to_prior_before_any_or_one_snapshot() -> None:
    collector = SWAGCollector(nn.Linear(2, 2), rank=3)
    with pytest.raises(RuntimeError, match=r"to_prior\(\) needs at least 2 collected snapshot\(s\); 0 collected"):
        collector.to_prior()
    with pytest.raises(RuntimeError, match="mean"):
        collector.mean()
    collector.collect()
    with pytest.raises(RuntimeError, match=r"1 collected so far.*one snapshot has no spread"):
        collector.to_prior()


def test_to_prior_rank_argument_checked() -> None:
    collector = _collect(np.random.default_rng(0).normal(size=(3, 9)), rank=5)
    for bad in (1, 3, -1, 2.0):  # 3 snapshots: 2 non-zero deviations (d_1 = 0 is not usable)
        with pytest.raises(ValueError, match=r"`rank` must be 0 \(diagonal only\) or an integer in \[2, 2\]"):
            collector.to_prior(rank=bad)  # type: ignore[arg-type]


def test_parameter_shape_change_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    collector = SWAGCollector(model, rank=3)
    collector.collect()
    model[1] = nn.Linear(4, 5)
    with pytest.raises(
        RuntimeError, match=r"parameter `1.weight` has shape \(5, 4\), but the collector was built for shape \(2, 4\)"
    ):
        collector.collect()
    model[1] = nn.Identity()
    with pytest.raises(RuntimeError, match=r"parameter `1\.weight` is no longer in the model"):
        collector.collect()
    assert collector.num_collected == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_and_state_unchanged(bad: float) -> None:
    model = TwoParams()
    collector = SWAGCollector(model, rank=3)
    model.set_(np.arange(9.0))
    collector.collect()
    before = collector.state_dict()
    w = np.arange(9.0) + 1
    w[7] = bad
    model.set_(w)
    with pytest.raises(
        FloatingPointError, match=r"parameter `b` holds 1 non-finite value\(s\) \(NaN or ±inf\) out of 3"
    ):
        collector.collect()
    after = collector.state_dict()
    assert after["num_collected"] == 1
    for key in ("mean", "m2", "deviations"):
        assert torch.equal(before[key], after[key])


def test_huge_but_finite_weights_are_accepted() -> None:
    model = TwoParams()
    collector = SWAGCollector(model, rank=2, moment_dtype=torch.float64)
    model.set_(np.full(9, 3e38))  # float32 sum overflows; every element is finite
    collector.collect()
    assert collector.num_collected == 1


def test_nothing_selected_and_head_excluded() -> None:
    with pytest.raises(ValueError, match=r"SWAGCollector: no parameter selected \(include='nope\*'"):
        SWAGCollector(nn.Linear(2, 2), rank=2, include="nope*")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=True"):
        SWAGCollector(frozen, rank=2)


def test_exclude_patterns_are_recorded_in_the_prior() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    collector = SWAGCollector(model, rank=2, exclude="2.*")
    for _ in range(2):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        collector.collect()
    prior = collector.to_prior()
    assert prior.names == ["0.weight", "0.bias"]
    assert prior.config.exclude == ["2.*"]
    by_callable = SWAGCollector(model, rank=2, include=lambda n: n.startswith("0."))
    by_callable.collect()
    by_callable.collect()
    assert by_callable.to_prior().config.exclude == ["2.weight", "2.bias"]


# ---------------------------------------------------------------------------------------------- state
def test_save_load_resumes_to_the_identical_prior(tmp_path) -> None:
    rng = np.random.default_rng(7)
    snaps = rng.normal(size=(10, 9))
    whole = _collect(snaps, rank=4).to_prior()

    first = _collect(snaps[:6], rank=4)  # the ring has wrapped: slot order ≠ chronological order
    path = first.save(tmp_path / "swag.safetensors")
    model = TwoParams()
    resumed = SWAGCollector(model, rank=4)
    resumed.load(path)
    assert resumed.num_collected == 6
    for w in snaps[6:]:
        model.set_(w)
        resumed.collect()
    again = resumed.to_prior()
    for n in whole.names:
        assert torch.equal(whole.mean[n], again.mean[n])
        assert torch.equal(whole.variance[n], again.variance[n])
        assert torch.equal(whole.cov_factor[n], again.cov_factor[n])


def test_saved_state_is_safetensors_with_a_json_header(tmp_path) -> None:
    from safetensors import safe_open

    collector = _collect(np.ones((2, 9)), rank=3)
    path = collector.save(tmp_path / "state.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["deviations", "m2", "mean"]
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert '"format": "priorzoo.swag_collector"' in meta["priorzoo"]
    assert not list(tmp_path.glob("*.tmp"))


def test_load_refuses_other_rank_parameters_or_files(tmp_path) -> None:
    collector = _collect(np.ones((2, 9)), rank=3)
    path = collector.save(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match="saved state has rank K = 3 but this collector has rank 4"):
        SWAGCollector(TwoParams(), rank=4).load(path)
    with pytest.raises(ValueError, match="the saved state covers 2 parameters and this collector 1"):
        SWAGCollector(TwoParams(), rank=3, include="a").load(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors SWAGCollector state"):
        SWAGCollector(TwoParams(), rank=3).load(bad)
    with pytest.raises(FileNotFoundError):
        SWAGCollector(TwoParams(), rank=3).load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------- schedules
def test_constant_schedule_drives_the_optimizer() -> None:
    sched = ConstantLRSchedule(swa_lr=0.01, swa_start=3, anneal_steps=2, collect_every=2)
    lin = nn.Linear(1, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    lr_sched = sched.scheduler(opt)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        lr_sched.step()
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.055, 0.01, 0.01, 0.01])
    assert [g for g in range(1, 12) if sched.should_collect(g)] == [7, 9, 11]


def test_cyclic_schedule_one_snapshot_per_cycle() -> None:
    sched = CyclicCosineSchedule(cycle_steps=5, lr_min=0.001, lr_max=0.1, start_step=3)
    assert sched.lr(0, base_lr=1.0) == 0.1
    assert sched.lr(3, base_lr=1.0) == pytest.approx(0.1)
    assert sched.lr(7, base_lr=1.0) < sched.lr(6, base_lr=1.0)
    assert sched.lr(8, base_lr=1.0) == pytest.approx(0.1)
    assert [g for g in range(1, 20) if sched.should_collect(g)] == [8, 13, 18]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: ConstantLRSchedule(swa_lr=0.0), "`swa_lr` must be a finite number > 0"),
        (lambda: ConstantLRSchedule(swa_lr=0.1, collect_every=0), "`collect_every` must be an integer ≥ 1"),
        (lambda: CyclicCosineSchedule(cycle_steps=1), "`cycle_steps` must be an integer ≥ 2"),
        (lambda: CyclicCosineSchedule(cycle_steps=4, lr_min=0.5, lr_max=0.1), "`lr_max` must be a finite number > 0.5"),
    ],
)
def test_schedule_arguments_validated(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


# ---------------------------------------------------------------------------------------------- swag_fit
def _toy_run(tmp_path, *, stop_after_epoch=None, epochs=4, checkpoint=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    return swag_fit(
        model,
        loader,
        CrossEntropyObjective(),
        epochs=epochs,
        rank=3,
        lr=0.05,
        collect_every=2,
        warmup_epochs=1,
        exclude="3.*",
        schedule=None,
        checkpoint_dir=tmp_path if checkpoint else None,
        stop_after_epoch=stop_after_epoch,
        progress=False,
    )


def test_swag_fit_resume_gives_the_same_prior(tmp_path) -> None:
    whole = _toy_run(tmp_path / "a").to_prior()
    partial = _toy_run(tmp_path / "b", stop_after_epoch=2)
    assert partial.num_collected == 3 and (tmp_path / "b" / FIT_STATE_NAME).is_file()
    resumed = _toy_run(tmp_path / "b")  # a fresh model and optimizer: everything comes from the checkpoint
    assert resumed.num_collected == 8
    again = resumed.to_prior()
    assert whole.names == again.names == ["0.weight", "0.bias"]
    for n in whole.names:
        assert torch.equal(whole.mean[n], again.mean[n])
        assert torch.equal(whole.variance[n], again.variance[n])
        assert torch.equal(whole.cov_factor[n], again.cov_factor[n])


def test_swag_fit_with_cyclic_schedule_collects_once_per_cycle() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(6)]
    collector = swag_fit(
        model,
        data,
        CrossEntropyObjective(),
        epochs=2,
        rank=4,
        lr=0.1,
        exclude_head=False,
        schedule=CyclicCosineSchedule(cycle_steps=3),
        progress=False,
    )
    assert collector.num_collected == 4


def test_swag_fit_argument_errors() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="`warmup_epochs` \\(2\\) must be < `epochs` \\(2\\)"):
        swag_fit(model, [], CrossEntropyObjective(), epochs=2, warmup_epochs=2, progress=False)
    with pytest.raises(
        ValueError, match='`collect_every` must be an integer ≥ 1; received 0 \\(or the string "epoch"\\)'
    ):
        swag_fit(model, [], CrossEntropyObjective(), epochs=2, collect_every=0, progress=False)
