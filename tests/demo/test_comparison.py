"""compare_methods: the default four methods, the opt-in init-only control, the baselines' start, bad ``methods``."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from priorzoo import PriorModel
from priorzoo.demo import ALL_METHODS, INIT_ONLY, METHODS, FinetuneSettings, compare_methods, count_units
from priorzoo.learn import SWAGCollector

SETTINGS = dict(epochs=2, lr_grid=(0.05, 0.2), l2sp_variances=(1e-2, 1.0), bma_epochs=2, bma_rank=2, bma_samples=2)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.classifier = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _data() -> list[torch.utils.data.Dataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(72, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    return list(torch.utils.data.random_split(data, [24, 24, 24], torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def source() -> tuple[nn.Module, PriorModel, list]:
    """A trained BN net (the source checkpoint) and a SWAG prior from its last steps, with BN statistics."""
    torch.manual_seed(0)
    train, val, test = _data()
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    collector = SWAGCollector(model, rank=3)
    for epoch in range(6):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if epoch >= 2:
                collector.collect()
    prior = collector.to_prior(rank=3, bn_data=loader)
    return model, prior, [train, val, test]


def _starts(model: nn.Module, prior: PriorModel):
    def fresh() -> nn.Module:
        torch.manual_seed(1)  # the same new head for every start
        return _Net()

    def at_mean() -> nn.Module:
        m = fresh()
        prior.init_model_(m)
        return m

    def at_checkpoint() -> nn.Module:
        m = fresh()
        m.features.load_state_dict(copy.deepcopy(model.features.state_dict()))
        return m

    return at_mean, at_checkpoint


def _key(row) -> tuple:
    return row.method, row.value, round(row.accuracy, 6), round(row.nll, 6)


def test_default_is_the_four_methods(source) -> None:
    model, prior, parts = source
    at_mean, _ = _starts(model, prior)
    rows = compare_methods(at_mean, prior, *parts, FinetuneSettings(**SETTINGS))
    assert [r.method for r in rows] == list(METHODS)
    assert INIT_ONLY not in METHODS and len(ALL_METHODS) == 5


class _Phases:
    """Records what compare_methods reports: one (name, total, units counted, stages) per phase."""

    def __init__(self) -> None:
        self.phases: list[list] = []

    def phase(self, name: str, total: int) -> None:
        self.phases.append([name, total, 0, []])

    def stage(self, text: str) -> None:
        self.phases[-1][3].append(text)

    def update(self, n: int = 1) -> None:
        self.phases[-1][2] += n


def test_each_method_gets_its_own_progress_phase(source) -> None:
    from priorzoo.demo._progress import Progress

    model, prior, parts = source
    at_mean, _ = _starts(model, prior)
    s = FinetuneSettings(**SETTINGS)
    recorder = _Phases()
    compare_methods(at_mean, prior, *parts, s, progress=recorder)
    assert [p[0] for p in recorder.phases] == list(METHODS)
    steps = -(-24 // s.batch_size)  # batches per epoch of the 24 training examples
    assert [p[1] for p in recorder.phases] == [2 * 2 * steps] * 3 + [2 * steps + 2]
    assert sum(p[1] for p in recorder.phases) == count_units(s, 24)
    assert all(p[2] == p[1] for p in recorder.phases)  # each bar's total is what its phase counts
    assert recorder.phases[0][3] == ["lr 1/2", "lr 2/2"]
    bars = Progress(enabled=False)  # the demo's bars: a fresh tqdm per phase, its own total and rate
    bars.phase("a", 3)
    first = bars.bar
    bars.update(3)
    bars.phase("b", 5)
    assert bars.bar is not first and (bars.bar.n, bars.bar.total) == (0, 5)
    bars.close()


def test_init_only_control_starts_from_the_prior_mean_and_baselines_from_the_checkpoint(source) -> None:
    model, prior, parts = source
    at_mean, at_checkpoint = _starts(model, prior)
    s = FinetuneSettings(**SETTINGS)
    # the prior carries the BN statistics of μ: the start is not the checkpoint's
    assert not torch.equal(at_mean().features[1].running_mean, at_checkpoint().features[1].running_mean)
    rows = compare_methods(at_mean, prior, *parts, s, methods=ALL_METHODS, make_source_model=at_checkpoint)
    assert [r.method for r in rows] == list(ALL_METHODS)
    by = {r.method: r for r in rows}
    assert by[INIT_ONLY].hyperparameter == "lr" and by[INIT_ONLY].value in s.lr_grid
    assert [c["value"] for c in by[INIT_ONLY].curve] == list(s.lr_grid)
    # the control is plain fine-tuning from μ, the fine-tuning arm plain fine-tuning from the checkpoint
    (from_mean,) = compare_methods(at_mean, prior, *parts, s, methods=["fine-tuning"])
    (from_ckpt,) = compare_methods(at_checkpoint, prior, *parts, s, methods=["fine-tuning"])
    assert _key(by[INIT_ONLY])[1:] == _key(from_mean)[1:]
    assert _key(by["fine-tuning"]) == _key(from_ckpt)
    assert [c["val_nll"] for c in by[INIT_ONLY].curve] != [c["val_nll"] for c in by["fine-tuning"].curve]


def test_count_units_follows_methods() -> None:
    s = FinetuneSettings(epochs=1, lr_grid=(0.1,), l2sp_variances=(1.0,), bma_epochs=2, bma_samples=3, batch_size=4)
    assert count_units(s, 8) == count_units(s, 8, METHODS) == 3 * 2 + 2 * 2 + 3
    assert count_units(s, 8, ALL_METHODS) == 4 * 2 + 2 * 2 + 3
    assert count_units(s, 8, [INIT_ONLY]) == 2


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["fine-tuning", "ridge"], "non-empty subset"),
        ([], "non-empty subset"),
        (["learned prior + BMA"], "continues the 'learned prior' run"),
    ],
)
def test_bad_methods(source, methods, message) -> None:
    model, prior, parts = source
    at_mean, _ = _starts(model, prior)
    with pytest.raises(ValueError, match=r"`methods`") as err:
        compare_methods(at_mean, prior, *parts, FinetuneSettings(**SETTINGS), methods=methods)
    assert message in str(err.value)


def _bench_transfer():
    path = Path(__file__).parents[2] / "benchmarks" / "bench_transfer.py"
    spec = importlib.util.spec_from_file_location("bench_transfer_under_test", path)
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    return bt


def test_bench_transfer_runs_the_control_from_the_shared_starts(source, monkeypatch) -> None:
    """benchmarks/bench_transfer.py's starts: the checkpoint (no head) for the baselines, μ for the rest."""
    bt = _bench_transfer()
    model, prior, parts = source
    checkpoint = bt.source_checkpoint(model, prior)
    assert "features.1.running_mean" in checkpoint and not any(k.startswith("classifier") for k in checkpoint)
    assert torch.equal(checkpoint["features.0.weight"], model.features[0].weight)

    def fresh() -> nn.Module:
        torch.manual_seed(1)
        return _Net()

    s = FinetuneSettings(**SETTINGS)
    rows = bt._compare(fresh, lambda m: m, prior, checkpoint, *parts, s)
    assert [r.method for r in rows] == list(bt.METHOD_ORDER) == list(ALL_METHODS)
    at_mean, at_checkpoint = _starts(model, prior)
    (from_ckpt,) = compare_methods(at_checkpoint, prior, *parts, s, methods=["fine-tuning"])
    assert _key(rows[0]) == _key(from_ckpt)
    monkeypatch.setattr(bt, "METHODS_RUN", METHODS)
    monkeypatch.setattr(bt, "BASELINES_FROM_SOURCE", False)  # bench_peft_transfer.py: every method from μ
    (from_mean,) = compare_methods(at_mean, prior, *parts, s, methods=["fine-tuning"])
    assert _key(bt._compare(fresh, lambda m: m, prior, checkpoint, *parts, s)[0]) == _key(from_mean)


def test_bench_transfer_resnet_source_has_no_ragged_batch_and_scores_held_out_digits(monkeypatch, tmp_path) -> None:
    """The vision pair's source stage: every batch full (layer4 of test_resnet is 1×1, so a ragged batch of 1 would
    give batch norm one number per channel), the held-out digits kept out of training and scored."""
    pytest.importorskip("timm")
    import priorzoo.data.bundled as bundled

    bt = _bench_transfer()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(13)  # 13 per digit: 65 source images, 15 held out, 50 trained on
    monkeypatch.setattr(bundled, "load_mnist_5k", lambda: (torch.rand(len(y), 1, 28, 28, generator=g), y))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    seen = []
    swag = bt.source_swag

    def recording_swag(model, loader, spec, **kwargs):
        seen.extend(len(xb) for xb, _ in loader)
        return swag(model, loader, spec, **kwargs)

    monkeypatch.setattr(bt, "source_swag", recording_swag)
    spec = dict(bt.VISION, source_heldout_per_class=3, source_batch_size=8, source_epochs=2, source_swag_epochs=1)
    spec.update(collect_every=2, rank=2)
    _, _, _, yt, info = bt.resnet_source(spec)
    assert seen == [8] * 6  # 50 images: 6 batches of 8, the last 2 images dropped
    assert set(info["source_accuracy"]) == {"final", "mean"}
    assert all(set(a) == {"training", "held_out"} for a in info["source_accuracy"].values())
    assert "50 images, 15 held out" in info["source"]
    assert len(yt) == 65 and int(yt.max()) == 4
