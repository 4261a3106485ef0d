"""PriorModel: construction, save/load round trips, sharding, float16 factors, failures, binding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _models import rewrite_tensors, shaped_prior
from safetensors.torch import load_file
from torch.distributions import LowRankMultivariateNormal

from priorzoo import PriorFormatError, PriorMatchError, PriorModel, PriorNotFoundError
from priorzoo.prior import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME


def make_prior(rank: int = 3, seed: int = 0, **kwargs) -> PriorModel:
    shapes = {"layer.weight": (4, 3), "layer.bias": (4,), "out.weight": (2, 4), "out.bias": (2,)}
    return shaped_prior(shapes, rank=rank, seed=seed, backbone={"library": "torch", "name": "toy"}, **kwargs)


def flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def assert_same(a: PriorModel, b: PriorModel) -> None:
    assert a.config.to_dict() | {"priorzoo_version": None} == b.config.to_dict() | {"priorzoo_version": None}
    for n in a.names:
        assert torch.equal(a.mean[n], b.mean[n])
        assert torch.equal(a.variance[n], b.variance[n])
        if a.cov_factor is not None:
            assert torch.equal(a.cov_factor[n], b.cov_factor[n])


def test_from_tensors_kinds():
    assert make_prior(3).kind.value == "swag"
    assert make_prior(0).kind.value == "diagonal"
    iso = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=0.5)
    assert iso.kind.value == "isotropic"
    assert iso.variance["w"].tolist() == [0.5, 0.5]


def test_log_prob_of_mapping_matches_reference():
    prior = make_prior(3).with_scale(4.0, eps=0.01)
    names = prior.names
    f = torch.cat([prior.cov_factor[n].reshape(3, -1) for n in names], dim=1).double()
    ref = LowRankMultivariateNormal(
        flat(prior.mean, names).double(), 2.0 * f.T, 4.0 * flat(prior.variance, names).double() + 0.01
    )
    w = {n: prior.mean[n] + 0.1 for n in names}
    assert torch.allclose(prior.log_prob(w), ref.log_prob(flat(w, names).double()), rtol=1e-5)


@pytest.mark.parametrize("rank", [0, 3])
def test_round_trip(tmp_path, rank):
    prior = make_prior(rank, scale=2.0, eps=1e-3, source={"dataset": "toy", "objective": "supervised"})
    folder = prior.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    loaded = PriorModel.from_pretrained(folder)
    assert_same(prior, loaded)
    w = {n: prior.mean[n] * 0.5 for n in prior.names}
    assert torch.equal(prior.log_prob(w), loaded.log_prob(w))


def test_file_layout_follows_the_spec(tmp_path):
    prior = make_prior(2)
    folder = prior.save_pretrained(tmp_path / "p")
    tensors = load_file(folder / WEIGHTS_NAME)
    assert set(tensors) == {f"{n}.{s}" for n in prior.names for s in ("mean", "variance", "cov_factor")}
    assert tensors["layer.weight.cov_factor"].shape == (2, 4, 3)
    from safetensors import safe_open

    with safe_open(folder / WEIGHTS_NAME, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert all(isinstance(v, str) for v in meta.values())
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 1
    assert cfg["parameters"][0] == {"name": "layer.weight", "shape": [4, 3]}


def test_sharded_and_unsharded_load_the_same(tmp_path):
    prior = make_prior(3)
    one = prior.save_pretrained(tmp_path / "one")
    many = prior.save_pretrained(tmp_path / "many", max_shard_size=200)
    shards = sorted(p.name for p in many.glob("prior-*.safetensors"))
    assert len(shards) >= 3
    assert shards[0] == f"prior-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert_same(PriorModel.from_pretrained(one), PriorModel.from_pretrained(many))


def test_resaving_replaces_stale_shards(tmp_path):
    prior = make_prior(3)
    prior.save_pretrained(tmp_path / "p", max_shard_size=200)
    prior.save_pretrained(tmp_path / "p")
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert_same(prior, PriorModel.from_pretrained(tmp_path / "p"))


def test_failed_save_leaves_earlier_prior_intact(tmp_path, monkeypatch):
    prior = make_prior(3)
    folder = prior.save_pretrained(tmp_path / "p")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("priorzoo.format.commit.write_tensor_file", boom)
    with pytest.raises(OSError, match="disk full"):
        make_prior(3, seed=9).save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary folder left behind


@pytest.mark.parametrize("factor_dtype", ["float16", torch.bfloat16])
def test_half_precision_factors(tmp_path, factor_dtype):
    prior = make_prior(3)
    folder = prior.save_pretrained(tmp_path / "p", factor_dtype=factor_dtype)
    loaded = PriorModel.from_pretrained(folder)
    assert loaded.cov_factor["layer.weight"].dtype in (torch.float16, torch.bfloat16)
    assert loaded.mean["layer.weight"].dtype == torch.float32
    w = {n: prior.mean[n] + 0.2 for n in prior.names}
    # documented tolerance (docs/format.md): relative 1e-2 on log_prob for half-precision factors
    assert torch.allclose(prior.log_prob(w), loaded.log_prob(w), rtol=1e-2)


def test_with_scale_shares_tensors_and_rescales_covariance():
    prior = make_prior(2)
    big = prior.with_scale(10.0)
    assert big.mean["layer.bias"] is prior.mean["layer.bias"]
    w = {n: prior.mean[n] + 0.3 for n in prior.names}
    q1 = prior.gaussian().half_quad([w[n] for n in prior.names])
    q10 = big.gaussian().half_quad([w[n] for n in prior.names])
    assert torch.allclose(q10 * 10, q1, rtol=1e-5)


def test_sample_shapes_and_to():
    prior = make_prior(2).to(dtype=torch.float64)
    draw = prior.sample(torch.Generator().manual_seed(0))
    assert {n: tuple(t.shape) for n, t in draw.items()} == {s.name: s.shape for s in prior.config.parameters}
    assert draw["layer.bias"].dtype == torch.float64


# ---------------------------------------------------------------- bad input, one test per kind
def test_truncated_safetensors(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(PriorFormatError, match="corrupted or truncated"):
        PriorModel.from_pretrained(folder)


def test_corrupted_safetensors_header(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    (folder / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(PriorFormatError, match="corrupted or truncated"):
        PriorModel.from_pretrained(folder)


def test_missing_tensor(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    tensors = load_file(folder / WEIGHTS_NAME)
    del tensors["layer.bias.variance"]
    rewrite_tensors(folder / WEIGHTS_NAME, tensors)
    with pytest.raises(PriorFormatError, match=r"missing tensor `layer\.bias\.variance`"):
        PriorModel.from_pretrained(folder)


@pytest.mark.parametrize(("value", "match"), [(-1.0, "≥ 0"), (float("nan"), "non-finite")])
def test_negative_or_nan_variance(tmp_path, value, match):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors["layer.weight.variance"][1, 1] = value
    rewrite_tensors(folder / WEIGHTS_NAME, tensors)
    with pytest.raises(PriorFormatError, match=match):
        PriorModel.from_pretrained(folder)


def test_factor_with_wrong_rank(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors["out.weight.cov_factor"] = torch.zeros(3, 2, 4)
    rewrite_tensors(folder / WEIGHTS_NAME, tensors)
    with pytest.raises(PriorFormatError, match=r"cov_factor` has shape \(3, 2, 4\); expected \(2, 2, 4\)"):
        PriorModel.from_pretrained(folder)


def test_tensor_shape_disagrees_with_config(tmp_path):
    folder = make_prior(0).save_pretrained(tmp_path / "p")
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors["layer.bias.mean"] = torch.zeros(5)
    rewrite_tensors(folder / WEIGHTS_NAME, tensors)
    with pytest.raises(PriorFormatError, match=r"`layer\.bias\.mean` has shape \(5,\); the config says \(4,\)"):
        PriorModel.from_pretrained(folder)


def test_missing_config_key(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    del cfg["rank"]
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(PriorFormatError, match=r"missing required key\(s\) \['rank'\]"):
        PriorModel.from_pretrained(folder)


def test_unknown_config_key_warns_and_loads(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["shiny_new_field"] = 1
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="shiny_new_field"):
        PriorModel.from_pretrained(folder)


def test_newer_format_version(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["format_version"] = 2
    cfg["kind"] = "something-new"
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(PriorFormatError, match=r"format_version 2.*upgrade priorzoo"):
        PriorModel.from_pretrained(folder)


def test_invalid_json_config(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    (folder / CONFIG_NAME).write_text("{ nope")
    with pytest.raises(PriorFormatError, match="not valid JSON"):
        PriorModel.from_pretrained(folder)


def test_directory_that_is_not_a_prior(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(PriorNotFoundError, match=r"is not a prior: no config\.json there .*model\.bin"):
        PriorModel.from_pretrained(tmp_path)


def test_config_without_weights(tmp_path):
    folder = make_prior(2).save_pretrained(tmp_path / "p")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(PriorNotFoundError, match="not a complete prior"):
        PriorModel.from_pretrained(folder)


def test_missing_shard(tmp_path):
    folder = make_prior(3).save_pretrained(tmp_path / "p", max_shard_size=200)
    sorted(folder.glob("prior-*.safetensors"))[1].unlink()
    with pytest.raises(PriorFormatError, match="missing"):
        PriorModel.from_pretrained(folder)


def test_unpickling_is_never_used(tmp_path, monkeypatch):
    folder = make_prior(2).save_pretrained(tmp_path / "p")

    def forbidden(*a, **k):
        raise AssertionError("torch.load / pickle must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    PriorModel.from_pretrained(folder)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mean": {}}, PriorFormatError, "non-empty"),
        (
            {"mean": {"w": torch.zeros(2, dtype=torch.long)}, "variance": 1.0},
            PriorFormatError,
            "floating-point",
        ),
        ({"mean": {"w": torch.zeros(2)}, "variance": -1.0}, PriorFormatError, "> 0"),
        ({"mean": {"w": torch.zeros(2)}, "variance": {"v": torch.ones(2)}}, PriorFormatError, "missing"),
        ({"mean": {"w": torch.zeros(2)}, "variance": 1.0, "scale": 0.0}, PriorFormatError, "scale"),
        ({"mean": {"w": torch.zeros(2)}, "variance": 1.0, "eps": -1.0}, PriorFormatError, "eps"),
        ({"mean": {"w": torch.zeros(2)}, "variance": 1.0, "kind": "fancy"}, PriorFormatError, "kind"),
    ],
)
def test_from_tensors_bad_input(kwargs, exc, match):
    kwargs.setdefault("variance", 1.0)
    with pytest.raises(exc, match=match):
        PriorModel.from_tensors(**kwargs)


def test_bad_save_arguments(tmp_path):
    prior = make_prior(1)
    with pytest.raises(ValueError, match="max_shard_size"):
        prior.save_pretrained(tmp_path / "p", max_shard_size="lots")
    with pytest.raises(ValueError, match="factor_dtype"):
        prior.save_pretrained(tmp_path / "p", factor_dtype="int8")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        prior.save_pretrained(tmp_path / "file")


# ---------------------------------------------------------------- binding to models
class Toy(torch.nn.Module):
    def __init__(self, classes: int = 2):
        super().__init__()
        self.layer = torch.nn.Linear(3, 4)
        self.out = torch.nn.Linear(4, classes)


def test_penalty_on_model_equals_mapping_computation():
    prior = make_prior(3)
    model = Toy()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    pen = prior.penalty(model)
    ref = -prior.log_prob(w) - prior.gaussian().log_normalizer
    assert torch.allclose(pen.double(), ref, rtol=1e-5)
    pen.backward()
    expected = prior.gaussian().grad_half_quad([w[n] for n in prior.names])
    for n, g in zip(prior.names, expected):
        assert torch.allclose(dict(model.named_parameters())[n].grad.reshape(-1), g, rtol=1e-4, atol=1e-6)


def test_binding_is_cached_and_refreshed_after_dtype_change():
    prior = make_prior(2)
    model = Toy()
    b1 = prior._cached_binding(model, {})
    assert prior._cached_binding(model, {}) is b1
    model.double()
    b2 = prior._cached_binding(model, {})
    assert b2 is not b1
    assert prior.penalty(model).dtype == torch.float32


def test_init_model_copies_mean():
    prior = make_prior(2)
    model = Toy()
    prior.init_model_(model)
    params = dict(model.named_parameters())
    for n in prior.names:
        assert torch.equal(params[n].detach(), prior.mean[n])
    assert prior.penalty(model).item() == pytest.approx(0.0, abs=1e-10)


def test_partial_match_needs_allow_partial_and_uses_marginal():
    prior = make_prior(2)
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(3, 4)
    with pytest.raises(PriorMatchError, match="missing in the model"):
        prior.penalty(model)
    pen = prior.penalty(model, allow_partial=True)
    marginal = prior.gaussian(["layer.weight", "layer.bias"])
    assert torch.allclose(pen, marginal.half_quad([model.layer.weight, model.layer.bias]))


def test_prior_for_another_architecture():
    prior = make_prior(2)
    with pytest.raises(PriorMatchError, match="another shape"):
        prior.bind(Toy(classes=5))  # `out` is 5-class here, 2-class in the prior
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3))
    with pytest.raises(PriorMatchError, match="another architecture"):
        prior.bind(other)


def test_log_prob_bad_input():
    prior = make_prior(1)
    with pytest.raises(PriorFormatError, match="lacks"):
        prior.log_prob({"layer.weight": torch.zeros(4, 3)})
    with pytest.raises(TypeError):
        prior.log_prob([1, 2])


def test_penalty_value_is_finite_for_extreme_scales():
    prior = make_prior(3)
    model = Toy()
    for lam in (1e-3, 1e8):
        assert math.isfinite(prior.with_scale(lam).penalty(model).item())


def test_saving_twice_gives_identical_bytes(tmp_path):
    prior = make_prior(3, source={"dataset": "d"})
    a = prior.save_pretrained(tmp_path / "a")
    b = prior.save_pretrained(tmp_path / "b", max_shard_size="10GB")
    for name in ("prior.safetensors", "config.json", "README.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_saved_files_follow_the_umask(tmp_path) -> None:
    import os
    import stat

    old = os.umask(0o027)
    try:
        folder = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0).save_pretrained(tmp_path / "p")
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}
    assert modes == {"README.md": 0o640, "config.json": 0o640, "prior.safetensors": 0o640}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


def test_from_tensors_copies_so_a_prior_of_live_parameters_is_a_snapshot():
    lin = torch.nn.Linear(3, 2)
    for source in (dict(lin.named_parameters()), lin.state_dict()):
        prior = PriorModel.from_tensors(source, variance=1.0)
        before = prior.mean["weight"].clone()
        with torch.no_grad():
            lin.weight.add_(1.0)
        assert torch.equal(prior.mean["weight"], before)  # the prior did not follow the training


def test_a_binding_shares_the_mean_and_factor_storage_with_its_prior():
    prior = make_prior(rank=3)
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(3, 4)
    model.out = torch.nn.Linear(4, 2)
    g = prior.bind(model).gaussian
    for flat, tensors in ((g.mean_flat, prior.mean), (g.factor_flat, prior.cov_factor)):
        base = flat.untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == base for t in tensors.values())
