"""SWAG resume state: a tampered or corrupt state is refused by name, and the collector is left unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from priorzoo.learn import SWAGCollector
from priorzoo.learn.swag_state import read_state_file, write_state_file


class Net(nn.Module):
    """P = 9 weights set by hand, and a batch-norm layer (its running statistics are in the state)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2, 3))
        self.b = nn.Parameter(torch.zeros(3))
        self.bn = nn.BatchNorm1d(3)
        self.bn.weight.requires_grad_(False)
        self.bn.bias.requires_grad_(False)


def _collector(num: int, rank: int, **kwargs) -> SWAGCollector:
    model = Net()
    collector = SWAGCollector(model, rank=rank, **kwargs)
    rng = np.random.default_rng(num)
    for w in rng.normal(size=(num, 9)):
        with torch.no_grad():
            model.a.copy_(torch.as_tensor(w[:6].reshape(2, 3)))
            model.b.copy_(torch.as_tensor(w[6:]))
            model.bn.running_var.uniform_(0.5, 2.0)
        collector.collect()
    return collector


def _snapshot(collector: SWAGCollector) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in collector.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize("num", [1, 2, 3, 4, 9])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"factor_dtype": torch.bfloat16}, {"factor_dtype": torch.float16}, {"moment_dtype": torch.float64}],
)
def test_genuine_states_load(num: int, kwargs: dict, tmp_path) -> None:
    saved = _collector(num, rank=3, **kwargs)
    path = saved.save(tmp_path / "state.safetensors")
    fresh = SWAGCollector(Net(), rank=3, **kwargs)
    fresh.load(path)
    assert fresh.num_collected == num and _same(fresh.state_dict(), saved.state_dict())


def _negate_m2(s: dict) -> None:
    s["m2"] = -s["m2"]


def _nan_mean(s: dict) -> None:
    s["mean"][4] = float("nan")


def _inf_deviation(s: dict) -> None:
    s["deviations"][1, 2] = float("inf")


def _zero_m2(s: dict) -> None:
    s["m2"] = torch.zeros_like(s["m2"])


def _wrong_shape(s: dict) -> None:
    s["mean"] = torch.zeros(10)


def _int_m2(s: dict) -> None:
    s["m2"] = s["m2"].long()


def _count(value: object):
    def tamper(s: dict) -> None:
        s["num_collected"] = value

    return tamper


def _buffers(key: str, value: object):
    def tamper(s: dict) -> None:
        s[key] = value(s) if callable(value) else value

    return tamper


@pytest.mark.parametrize(
    ("num", "tamper", "message"),
    [
        (5, _negate_m2, r"`m2` \(Welford's M₂ = T·\(E\[w²\] − w̄²\)\) has 9 negative value\(s\).*expected m2 ≥ 0"),
        (5, _nan_mean, r"`mean` holds 1 non-finite value\(s\) \(element 4: nan\); expected finite"),
        (5, _inf_deviation, r"`deviations` holds 1 non-finite value\(s\) \(element 11: inf\)"),
        (5, _zero_m2, r"`m2` is smaller than the stored `deviations` allow: element 0 has m2 0"),
        (2, _zero_m2, r"`m2` is smaller than the stored `deviations` allow"),
        (5, _wrong_shape, r"`mean` has shape \(10,\); expected \(9,\)"),
        (5, _int_m2, r"`m2` has dtype torch.int64; expected a floating dtype"),
        # the state of 3 snapshots (K = 3) claiming 10⁹: it still holds snapshot 1's zero deviation
        (
            3,
            _count(10**9),
            r"`num_collected` is 1000000000 \(> K = 3\), but the oldest stored deviation is exactly zero",
        ),
        (2, _count(10**9), r"`deviations` has shape \(2, 9\); expected \(3, 9\)"),
        # 5 snapshots claiming 3 (≤ K): the oldest stored row would be snapshot 1's, which is zero
        (5, _count(3), r"`deviations` row 0 is snapshot 1's .* holds 9 non-zero value\(s\)"),
        (5, _count(-1), r"`num_collected` is -1; expected an integer ≥ 0"),
        (5, _count(True), r"`num_collected` is True; expected an integer ≥ 0"),
        (5, _count("5"), r"`num_collected` is '5'; expected an integer ≥ 0"),
        (5, _buffers("buffer_snapshots", 10**9), r"`buffer_snapshots` is 1000000000; expected ≤ `num_collected` \(5\)"),
        (
            5,
            _buffers("buffer_sum.bn.running_var", lambda s: -s["buffer_sum.bn.running_var"]),
            r"`buffer_sum.bn.running_var` has negative values",
        ),
        (
            5,
            _buffers("buffer_sum.bn.running_mean", torch.full((3,), float("nan"), dtype=torch.float64)),
            r"`buffer_sum.bn.running_mean` holds 3 non-finite",
        ),
        (
            5,
            _buffers("buffer_sum.bn.running_mean", torch.zeros(4, dtype=torch.float64)),
            r"has shape \(4,\); expected \(3,\)",
        ),
        (
            5,
            _buffers("buffer_sum.other.running_mean", torch.zeros(3)),
            r"`buffer_sum.other.running_mean` is not a batch-norm",
        ),
    ],
)
def test_tampered_state_is_refused_and_nothing_changes(num: int, tamper, message: str, tmp_path) -> None:
    state = _snapshot(_collector(num, rank=3))
    tamper(state)
    target = _collector(4, rank=3)  # a collector with its own statistics, which must survive the refusal
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert _same(before, target.state_dict())
    if all(isinstance(v, torch.Tensor) and v.is_floating_point() for k, v in state.items() if k == "m2"):
        path = write_state_file(state, tmp_path / "tampered.safetensors")  # the same through a file
        assert read_state_file(path)["num_collected"] == state["num_collected"]
        with pytest.raises(ValueError, match=message):
            target.load(path)
        assert _same(before, target.state_dict())


def test_swag_fit_refuses_a_tampered_checkpoint_before_touching_the_model(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from priorzoo.learn import swag_fit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,))) for _ in range(2)]

    def objective(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    kwargs = {"epochs": 2, "rank": 2, "collect_every": 1, "lr": 0.01, "checkpoint_dir": tmp_path, "progress": False}
    swag_fit(model, data, objective, **kwargs)
    path = next(tmp_path.glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["collector.m2"] = -tensors["collector.m2"]
    save_file(tensors, str(path), metadata=meta)
    fresh = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="saved `m2`"):
        swag_fit(fresh, data, objective, **{**kwargs, "epochs": 3})
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
