"""Batch-norm running statistics travel with a learned prior: ``init_model_`` reproduces the source model.

A prior holds weights; a batch-norm network also needs its running statistics. These tests train small BN
networks on real data (scikit-learn's 8×8 digits), learn a SWAG prior, and check that ``init_model_`` into a
fresh copy (with the source head copied in) gives the source validation accuracy back, within 2 points —
while the same weights with the fresh model's statistics do not.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from priorzoo import PriorModel
from priorzoo.learn import SWAGCollector, isotropic_prior


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)  # raw 0…16 pixels: BN statistics far from 0/1
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[va], y[va]


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _batches(x: torch.Tensor, y: torch.Tensor, seed: int, size: int = 64):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(perm), size):
        yield x[perm[i : i + size]], y[perm[i : i + size]]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def _train_and_collect(model: nn.Module, x, y, *, epochs: int, swag_epochs: int, lr: float) -> SWAGCollector:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    collector = None
    for epoch in range(epochs + swag_epochs):
        if epoch == epochs:
            collector = SWAGCollector(model, rank=5)
            for group in opt.param_groups:
                group["lr"] = lr / 5
        for xb, yb in _batches(x, y, epoch):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if collector is not None:
            collector.collect()
    assert collector is not None
    return collector


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True], ids=["averaged", "recomputed"])
def test_plain_bn_net_prior_reproduces_source_accuracy(recompute: bool, tmp_path) -> None:
    xt, yt, xv, yv = _digits()
    torch.manual_seed(0)
    source = DigitsNet()
    collector = _train_and_collect(source, xt, yt, epochs=6, swag_epochs=8, lr=0.05)
    assert collector.head_names == ["classifier.bias", "classifier.weight"]  # plain model: head detected
    source_acc = _accuracy(source, xv, yv)
    assert source_acc > 0.9
    bn_data = list(_batches(xt, yt, 99)) if recompute else None
    prior = collector.to_prior(bn_data=bn_data)
    assert "classifier.weight" not in prior.names
    assert sorted(prior.buffers) == sorted(
        f"features.{i}.{k}" for i in (1, 4) for k in ("running_mean", "running_var", "num_batches_tracked")
    )
    assert ("recomputed" if recompute else "averaged") in prior.config.learning["buffers"]
    # the source model keeps its own weights and statistics
    assert _accuracy(source, xv, yv) == source_acc

    loaded = PriorModel.from_pretrained(prior.save_pretrained(tmp_path / "prior"))
    assert loaded.buffers.keys() == prior.buffers.keys()
    assert all(torch.equal(loaded.buffers[n], prior.buffers[n]) for n in prior.buffers)
    assert loaded.buffers["features.1.num_batches_tracked"].dtype == torch.int64

    torch.manual_seed(1)
    fresh = DigitsNet()
    fresh.classifier.load_state_dict(source.classifier.state_dict())
    loaded.init_model_(fresh)
    assert abs(_accuracy(fresh, xv, yv) - source_acc) <= 0.02

    torch.manual_seed(1)
    stale = DigitsNet()
    stale.classifier.load_state_dict(source.classifier.state_dict())
    loaded.init_model_(stale, buffers=False)  # the weights alone: the defect this format fixes
    assert _accuracy(stale, xv, yv) < source_acc - 0.2


@pytest.mark.slow
def test_timm_test_resnet_prior_reproduces_source_accuracy() -> None:
    timm = pytest.importorskip("timm")
    xt, yt, xv, yv = _digits()

    def rgb32(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x / 16.0, size=32, mode="nearest").expand(-1, 3, -1, -1).contiguous()

    xt, xv = rgb32(xt), rgb32(xv)
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=10, pretrained=False)
    collector = _train_and_collect(source, xt[:700], yt[:700], epochs=3, swag_epochs=6, lr=0.05)
    assert collector.head_names == ["fc.bias", "fc.weight"]
    source_acc = _accuracy(source, xv, yv)
    assert source_acc > 0.8
    prior = collector.to_prior(bn_data=list(_batches(xt[:700], yt[:700], 99)))
    assert prior.buffers and all(
        n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in prior.buffers
    )

    torch.manual_seed(1)
    fresh = timm.create_model("test_resnet", num_classes=10, pretrained=False)
    fresh.fc.load_state_dict(source.fc.state_dict())
    prior.init_model_(fresh)
    assert abs(_accuracy(fresh, xv, yv) - source_acc) <= 0.02


def test_prior_without_buffers_says_so_once_and_names_the_refresh() -> None:
    net = DigitsNet()
    mean = {n: p.detach().clone() for n, p in net.named_parameters() if not n.startswith("classifier")}
    prior = PriorModel.from_tensors(mean, variance=1.0, exclude=["classifier.*"])
    assert prior.buffers == {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            prior.init_model_(DigitsNet())
    hits = [w for w in caught if "refresh_batchnorm_" in str(w.message)]
    assert len(hits) == 1 and "no batch-norm running statistics" in str(hits[0].message)


def test_isotropic_prior_carries_the_models_statistics_and_old_priors_still_load(tmp_path) -> None:
    net = DigitsNet()
    with torch.no_grad():
        net.features[1].running_mean.fill_(3.0)
    prior = isotropic_prior(net, variance=0.1)
    assert torch.equal(prior.buffers["features.1.running_mean"], torch.full((16,), 3.0))
    folder = prior.save_pretrained(tmp_path / "iso")
    import json

    config = json.loads((folder / "config.json").read_text())
    assert {"name": "features.1.running_mean", "shape": [16]} in config["buffers"]
    fresh = DigitsNet()
    PriorModel.from_pretrained(folder).init_model_(fresh)
    assert torch.equal(fresh.features[1].running_mean, torch.full((16,), 3.0))

    # a prior written before buffers existed: no `buffers` key, no `.buffer` tensors
    plain = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0)
    old = plain.save_pretrained(tmp_path / "old")
    assert "buffers" not in json.loads((old / "config.json").read_text())
    assert PriorModel.from_pretrained(old).buffers == {}


def test_buffer_listed_in_config_but_missing_is_refused(tmp_path) -> None:
    import json

    from priorzoo.errors import PriorFormatError

    prior = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0, buffers={"bn.running_mean": torch.zeros(2)})
    folder = prior.save_pretrained(tmp_path / "p")
    config = json.loads((folder / "config.json").read_text())
    config["buffers"].append({"name": "bn.running_var", "shape": [2]})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        PriorFormatError, match=r"buffer tensor\(s\) listed in config.json are missing: \['bn.running_var'\]"
    ):
        PriorModel.from_pretrained(folder)


def test_collector_resume_keeps_the_statistics(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    a = SWAGCollector(net, rank=2, head="2.*")
    for i in range(3):
        net(torch.randn(8, 3) + i)
        a.collect()
    path = a.save(tmp_path / "swag.safetensors")
    b = SWAGCollector(net, rank=2, head="2.*")
    b.load(path)
    sa, sb = a.running_statistics(), b.running_statistics()
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[n], sb[n]) for n in sa)
