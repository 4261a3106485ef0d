"""Importers: hand-built files in the exact layouts of the official release, swa_gaussian and laplace-torch."""

from __future__ import annotations

import enum
import math
import sys
import types

import pytest
import torch
from torch import nn
from torch.distributions import LowRankMultivariateNormal

from priorzoo import PriorFormatError, PriorModel
from priorzoo.cli import main
from priorzoo.convert import from_laplace_torch, from_pretrain_your_loss, from_swa_gaussian
from priorzoo.learn import SWAGCollector


class TinyResNet(nn.Module):
    """torchvision ResNet naming (conv1, bn1, layer1.0.*, downsample, fc) at toy size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Module())
        self.layer1[0].conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.layer1[0].bn1 = nn.BatchNorm2d(4)
        self.layer1[0].downsample = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 10)


def _flat_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("fc.")]


def _official_files(tmp_path, *, layout: str = "parameters", k: int = 8, seed: int = 0):
    """Write `<prefix>_model.pt`, `_mean.pt`, `_variance.pt`, `_covmat.pt` as the official code does:
    a backbone state_dict without fc, and vectors flattened over backbone.parameters() (raw_params=True)
    or over the whole state_dict (raw_params=False); covmat = D/√(K−1), [K, P]."""
    torch.manual_seed(seed)
    net = TinyResNet()
    state = {k_: v for k_, v in net.state_dict().items() if not k_.startswith("fc.")}
    if layout == "parameters":
        p = sum(t.numel() for _, t in _flat_params(net))
    else:
        p = sum(v.numel() for v in state.values())
    mean = torch.randn(p)
    variance = torch.rand(p) * 0.01 + 1e-6
    covmat = torch.randn(k, p) * 0.05
    prefix = tmp_path / "resnet_ssl_prior"
    torch.save(state, f"{prefix}_model.pt")
    torch.save(mean, f"{prefix}_mean.pt")
    torch.save(variance, f"{prefix}_variance.pt")
    torch.save(covmat, f"{prefix}_covmat.pt")
    return prefix, net, mean, variance, covmat


def _vector(prior: PriorModel, store: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([store[n].reshape(-1) for n in prior.names])


def test_official_release_tensors_layout_and_density(tmp_path) -> None:
    prefix, net, mean, variance, covmat = _official_files(tmp_path)
    prior = from_pretrain_your_loss(prefix)  # official defaults: the first 5 covmat rows, tensors as stored
    names = [n for n, _ in _flat_params(net)]
    assert prior.names == names  # BN running stats are buffers: not in the vector
    assert prior.rank == 5 and prior.kind.value == "swag" and prior.config.exclude == ["fc.*"]
    assert torch.equal(_vector(prior, prior.mean), mean)
    assert torch.equal(_vector(prior, prior.variance), variance)
    f = torch.cat([prior.cov_factor[n].reshape(5, -1) for n in prior.names], dim=1)
    assert torch.equal(f, covmat[:5])
    assert prior.config.learning["convention"] == "official" and prior.config.learning["covmat_rows"] == 8

    w = mean + 0.05 * torch.randn_like(mean)
    point = {
        n: t.reshape(prior.mean[n].shape)
        for n, t in zip(prior.names, torch.split(w, [prior.mean[n].numel() for n in prior.names]))
    }
    # λ = 1: exactly the official density LowRankMVN(mean, C[:5]ᵀ, v)
    official = LowRankMultivariateNormal(mean.double(), covmat[:5].T.double(), variance.double())
    assert float(prior.log_prob(point)) == pytest.approx(float(official.log_prob(w.double())), rel=1e-6)
    # λ, ε: priorzoo scales the factor by √λ; the official code's λ·C (λ² on the low-rank part) differs
    lam, eps = 10.0, 0.1
    scaled = prior.with_scale(lam, eps=eps)
    correct = LowRankMultivariateNormal(
        mean.double(), math.sqrt(lam) * covmat[:5].T.double(), lam * variance.double() + eps
    )
    defect = LowRankMultivariateNormal(mean.double(), lam * covmat[:5].T.double(), lam * variance.double() + eps)
    got = float(scaled.log_prob(point))
    assert got == pytest.approx(float(correct.log_prob(w.double())), rel=1e-6)
    assert got != pytest.approx(float(defect.log_prob(w.double())), rel=1e-3)


def test_official_swag_convention_and_factor_count(tmp_path) -> None:
    prefix, _, _, variance, covmat = _official_files(tmp_path)
    prior = from_pretrain_your_loss(prefix, convention="swag", num_factors=None)
    assert prior.rank == 8
    assert torch.allclose(_vector(prior, prior.variance), 0.5 * variance)
    f = torch.cat([prior.cov_factor[n].reshape(8, -1) for n in prior.names], dim=1)
    assert torch.allclose(f, covmat / math.sqrt(2))
    diag = from_pretrain_your_loss(prefix, num_factors=0)
    assert diag.rank == 0 and diag.cov_factor is None
    with pytest.raises(ValueError, match=r"`num_factors` must be None or an integer in \[0, 8\]"):
        from_pretrain_your_loss(prefix, num_factors=9)
    with pytest.raises(ValueError, match="`convention`"):
        from_pretrain_your_loss(prefix, convention="paper")


def test_official_state_dict_layout_is_marginalised(tmp_path) -> None:
    prefix, net, mean, variance, covmat = _official_files(tmp_path, layout="state_dict", k=4)
    prior = from_pretrain_your_loss(prefix, num_factors=None)
    assert prior.config.learning["layout"] == "state_dict"
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    keep, off = [], 0
    for k, v in state.items():
        if k.rsplit(".", 1)[-1] not in ("running_mean", "running_var", "num_batches_tracked"):
            keep.extend(range(off, off + v.numel()))
        off += v.numel()
    idx = torch.tensor(keep)
    assert torch.equal(_vector(prior, prior.mean), mean[idx])
    assert torch.equal(_vector(prior, prior.variance), variance[idx])
    f = torch.cat([prior.cov_factor[n].reshape(4, -1) for n in prior.names], dim=1)
    assert torch.equal(f, covmat[:, idx])


def test_official_errors(tmp_path) -> None:
    prefix, *_ = _official_files(tmp_path)
    for suffix in ("_model.pt", "_mean.pt", "_variance.pt"):
        (tmp_path / f"other{suffix}").write_bytes((tmp_path / f"resnet_ssl_prior{suffix}").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"missing: .*other_covmat\.pt"):
        from_pretrain_your_loss(tmp_path / "other")
    torch.save(torch.zeros(7), f"{prefix}_variance.pt")
    with pytest.raises(PriorFormatError, match="lengths disagree"):
        from_pretrain_your_loss(prefix)
    prefix, *_ = _official_files(tmp_path)
    torch.save(torch.zeros(3), f"{prefix}_mean.pt")
    torch.save(torch.zeros(3), f"{prefix}_variance.pt")
    torch.save(torch.zeros(2, 3), f"{prefix}_covmat.pt")
    with pytest.raises(PriorFormatError, match="the vectors have 3 entries"):
        from_pretrain_your_loss(prefix)


def test_pickled_objects_are_refused(tmp_path) -> None:
    prefix, *_ = _official_files(tmp_path)
    torch.save(nn.Linear(2, 2), f"{prefix}_mean.pt")  # a whole pickled module, as the official code saved SWAG
    with pytest.raises(PriorFormatError, match=r"refused to load.*never unpickles"):
        from_pretrain_your_loss(prefix)


def test_convert_cli_official(tmp_path, capsys) -> None:
    prefix, *_ = _official_files(tmp_path)
    out = tmp_path / "converted"
    assert (
        main(["convert", "official", str(prefix), str(out), "--num-factors", "3", "--scale", "100", "--eps", "0.1"])
        == 0
    )
    prior = PriorModel.from_pretrained(out)
    assert prior.rank == 3 and prior.scale == 100.0 and prior.eps == 0.1
    assert (out / "README.md").is_file()
    assert main(["convert", "official", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- swa_gaussian
def _swa_gaussian_state(snapshots: list[dict[str, torch.Tensor]], max_num_models: int) -> dict[str, torch.Tensor]:
    """The buffers swa_gaussian's SWAG.collect_model leaves, for a base Sequential(Linear, BatchNorm1d)."""
    names = list(snapshots[0])
    sd: dict[str, torch.Tensor] = {"n_models": torch.zeros(1, dtype=torch.long)}
    for n in names:
        sd[f"base.{n}_mean"] = torch.zeros_like(snapshots[0][n])
        sd[f"base.{n}_sq_mean"] = torch.zeros_like(snapshots[0][n])
        sd[f"base.{n}_cov_mat_sqrt"] = torch.empty(0, snapshots[0][n].numel())
    for snap in snapshots:
        k = int(sd["n_models"].item())
        for n in names:
            w = snap[n]
            mean = sd[f"base.{n}_mean"] * k / (k + 1.0) + w / (k + 1.0)
            sq = sd[f"base.{n}_sq_mean"] * k / (k + 1.0) + w**2 / (k + 1.0)
            cov = torch.cat((sd[f"base.{n}_cov_mat_sqrt"], (w - mean).view(-1, 1).t()), dim=0)
            if k + 1 > max_num_models:
                cov = cov[1:, :]
            sd[f"base.{n}_mean"], sd[f"base.{n}_sq_mean"], sd[f"base.{n}_cov_mat_sqrt"] = mean, sq, cov
        sd["n_models"].add_(1)
    sd["base.1.running_mean"] = torch.zeros(3)  # BN buffers stay as they are (`running_mean` has no `_sq_mean`)
    sd["base.1.running_var"] = torch.ones(3)
    sd["base.1.num_batches_tracked"] = torch.tensor(0)
    return sd


def test_swa_gaussian_equals_priorzoo_swag_over_the_same_snapshots(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    snaps = []
    collector = SWAGCollector(model, rank=3, min_var=1e-30)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        collector.collect()
    state = _swa_gaussian_state(snaps, max_num_models=3)
    torch.save({"epoch": 6, "state_dict": state}, tmp_path / "swag-6.pt")  # utils.save_checkpoint's layout

    imported = from_swa_gaussian(tmp_path / "swag-6.pt")
    native = collector.to_prior()
    assert imported.names == native.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert imported.rank == 3 and imported.config.learning["snapshots"] == 6
    for n in native.names:
        assert torch.allclose(imported.mean[n], native.mean[n], atol=1e-6)
        assert torch.allclose(imported.variance[n], native.variance[n], rtol=1e-3, atol=1e-8)
        assert torch.allclose(imported.cov_factor[n], native.cov_factor[n], atol=1e-6)

    # density: swa_gaussian's sample(scale=½, cov=True) covariance ½(diag(var) + CᵀC/(K−1))
    mean = torch.cat([state[f"base.{n}_mean"].reshape(-1) for n in native.names]).double()
    var = torch.cat(
        [(state[f"base.{n}_sq_mean"] - state[f"base.{n}_mean"] ** 2).reshape(-1) for n in native.names]
    ).double()
    c = torch.cat([state[f"base.{n}_cov_mat_sqrt"] for n in native.names], dim=1).double()
    ref = LowRankMultivariateNormal(mean, (0.5 / 2) ** 0.5 * c.T, 0.5 * var.clamp(min=1e-30))
    x = mean + 0.01 * torch.randn_like(mean)
    point = dict(zip(native.names, torch.split(x, [native.mean[n].numel() for n in native.names])))
    point = {n: t.reshape(native.mean[n].shape) for n, t in point.items()}
    assert float(imported.log_prob(point)) == pytest.approx(float(ref.log_prob(x)), rel=1e-4)


def test_swa_gaussian_options_and_errors() -> None:
    torch.manual_seed(1)
    snaps = [
        {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3), "1.weight": torch.randn(3), "1.bias": torch.randn(3)}
        for _ in range(4)
    ]
    state = _swa_gaussian_state(snaps, max_num_models=10)
    head_less = from_swa_gaussian(state, exclude="1.*", max_num_models=10)
    assert head_less.names == ["0.weight", "0.bias"] and head_less.config.exclude == ["1.*"]
    rows = state["base.0.bias_cov_mat_sqrt"]
    assert torch.allclose(head_less.cov_factor["0.bias"], rows * math.sqrt(0.5 / 9))  # max_num_models − 1 = 9
    diag_state = {k: v for k, v in state.items() if not k.endswith("_cov_mat_sqrt")}
    assert from_swa_gaussian(diag_state).rank == 0
    with pytest.raises(PriorFormatError, match="not a swa_gaussian SWAG state dict"):
        from_swa_gaussian({"weight": torch.zeros(2)})
    one = _swa_gaussian_state(snaps[:1], max_num_models=3)
    with pytest.raises(PriorFormatError, match="collected 1 snapshot"):
        from_swa_gaussian(one)


# ---------------------------------------------------------------------------------------------- laplace-torch
class _LaplaceLikelihood(str, enum.Enum):  # pickled under laplace-torch's own module path (below)
    REGRESSION = "regression"
    CLASSIFICATION = "classification"
    REWARD_MODELING = "reward_modeling"


@pytest.fixture
def laplace_enum(monkeypatch):
    """Make `laplace.utils.enums.Likelihood` importable while saving, as when laplace-torch wrote the file."""
    _LaplaceLikelihood.__module__ = "laplace.utils.enums"
    _LaplaceLikelihood.__qualname__ = "Likelihood"
    mods = {name: types.ModuleType(name) for name in ("laplace", "laplace.utils", "laplace.utils.enums")}
    mods["laplace.utils.enums"].Likelihood = _LaplaceLikelihood
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return _LaplaceLikelihood


def _laplace_state(model: nn.Module, cls_name: str, params: list[torch.Tensor], likelihood, prior_precision):
    mean = torch.cat([p.detach().reshape(-1) for p in params])
    gen = torch.Generator().manual_seed(0)
    return {  # BaseLaplace.state_dict()'s keys
        "mean": mean,
        "H": torch.rand(mean.numel(), generator=gen) * 5,
        "loss": torch.tensor(3.2),
        "prior_mean": torch.tensor(0.0),
        "prior_precision": prior_precision,
        "sigma_noise": torch.tensor(2.0),
        "n_data": 100,
        "n_outputs": 2,
        "likelihood": likelihood,
        "temperature": 0.5,
        "enable_backprop": False,
        "cls_name": cls_name,
    }


def test_laplace_diag_state_dict_file(tmp_path, laplace_enum) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    params = list(model.parameters())
    state = _laplace_state(model, "DiagLaplace", params, laplace_enum.REGRESSION, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.save(state, tmp_path / "la.bin")  # torch.save(la.state_dict(), path), the documented way
    for name in ("laplace.utils.enums", "laplace.utils", "laplace"):
        sys.modules.pop(name)  # loading must work without laplace-torch installed

    prior = from_laplace_torch(tmp_path / "la.bin", model)
    assert prior.kind.value == "laplace" and prior.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    sizes = [p.numel() for p in params]
    per_layer = torch.cat([torch.full((n,), v) for n, v in zip(sizes, [1.0, 2.0, 3.0, 4.0])])
    expected = 1.0 / (state["H"] / (2.0**2 * 0.5) + per_layer)
    got = torch.cat([prior.variance[n].reshape(-1) for n in prior.names])
    assert torch.allclose(got, expected, rtol=1e-6)
    assert torch.equal(prior.mean["2.weight"], model[2].weight.detach())
    assert prior.config.learning["likelihood"] == "regression"


def test_laplace_last_layer_object_and_errors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    last = list(model[2].parameters())
    state = _laplace_state(model, "DiagLLLaplace", last, "classification", torch.tensor(0.5))

    class FittedLaplace:  # duck-typed like a laplace-torch object
        def state_dict(self):
            return state

    prior = from_laplace_torch(FittedLaplace(), model)
    assert prior.names == ["2.weight", "2.bias"]
    assert torch.allclose(prior.variance["2.bias"].reshape(-1), 1.0 / (state["H"][-2:] / 2.0 + 0.5))
    with pytest.raises(PriorFormatError, match=r"`FullLaplace` is not supported: only diagonal"):
        from_laplace_torch({**state, "cls_name": "FullLaplace"}, model)
    with pytest.raises(PriorFormatError, match="the Laplace vector has 10 entries but the selected parameters"):
        from_laplace_torch({**state, "cls_name": "DiagLaplace"}, model)
    with pytest.raises(PriorFormatError, match="`prior_precision` has 3 entries"):
        from_laplace_torch({**state, "prior_precision": torch.ones(3)}, model)
    with pytest.raises(TypeError, match="laplace-torch Laplace object"):
        from_laplace_torch(42, model)


def test_convert_cli_swa_gaussian_and_laplace(tmp_path, laplace_enum) -> None:
    torch.manual_seed(0)
    snaps = [
        {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3), "1.weight": torch.randn(3), "1.bias": torch.randn(3)}
        for _ in range(4)
    ]
    torch.save(_swa_gaussian_state(snaps, max_num_models=3), tmp_path / "swag.pt")
    out = tmp_path / "swag-prior"
    assert main(["convert", "swa-gaussian", str(tmp_path / "swag.pt"), str(out), "--exclude", "1.*"]) == 0
    assert PriorModel.from_pretrained(out).names == ["0.weight", "0.bias"]

    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    params = [p for p in model.parameters() if p.requires_grad]
    state = _laplace_state(model, "DiagLaplace", params, laplace_enum.CLASSIFICATION, torch.tensor(1.0))
    torch.save(state, tmp_path / "la.bin")
    out = tmp_path / "la-prior"
    args = ["convert", "laplace", str(tmp_path / "la.bin"), str(out), "--model", "test_resnet", "--num-classes", "3"]
    assert main(args) == 0
    prior = PriorModel.from_pretrained(out)
    assert prior.kind.value == "laplace" and len(prior.names) == len(params)
    assert prior.config.backbone["library"] == "timm"
    assert main([*args[:-1], "4"]) == 2  # another head size: the vector no longer fits
