"""``config.json`` validation: every key's type checked strictly, with the key, what was received and what is valid."""

from __future__ import annotations

import json

import pytest
import torch

from priorzoo import PriorModel
from priorzoo.errors import PriorFormatError
from priorzoo.format.config import ParameterSpec, PriorConfig
from priorzoo.format.files import CONFIG_NAME


def base(**changes):
    data = {"format_version": 1, "kind": "diagonal", "rank": 0, "parameters": [{"name": "w", "shape": [4, 8]}]}
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"parameters": [{"name": "w", "shape": "48"}]},
            r"parameter `w` has shape '48'; expected a list of non-negative",
        ),
        ({"parameters": [{"name": "w", "shape": [4.7, 8.2]}]}, r"parameter `w` has shape \[4\.7, 8\.2\]; expected"),
        ({"parameters": [{"name": "w", "shape": [True, 8]}]}, r"parameter `w` has shape"),
        ({"parameters": [{"name": 3, "shape": [4]}]}, r"parameter `name` must be a non-empty string, received 3"),
        ({"parameters": "w"}, r"`parameters` must be a list of \{name, shape\} objects; received 'w'"),
        ({"license": 3}, r"`license` must be a string or null; received 3"),
        ({"priorzoo_version": 1}, r"`priorzoo_version` must be a string; received 1"),
        ({"exclude": ["fc.*", 7]}, r"`exclude` must be a list of glob pattern strings; received \[7\]"),
        ({"kind": ["swag"]}, r"`kind` must be one of swag, diagonal, isotropic, laplace; received \['swag'\]"),
    ],
)
def test_wrong_types_are_refused(changes, message):
    with pytest.raises(PriorFormatError, match=message):
        PriorConfig.from_dict(base(**changes))


def test_a_string_shape_in_a_file_is_refused_not_split(tmp_path):
    folder = PriorModel.from_tensors({"w": torch.zeros(4, 8)}, variance=1.0).save_pretrained(tmp_path / "p")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["parameters"][0]["shape"] = "48"
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(PriorFormatError, match="has shape '48'"):
        PriorModel.from_pretrained(folder)


def test_integer_like_shapes_still_work():
    assert ParameterSpec("w", torch.Size([2, 3])).shape == (2, 3)
    assert ParameterSpec("w", [2, 3]).shape == (2, 3)


def test_duplicate_names_are_found_in_linear_time():
    # 200,000 entries: a quadratic check (list.count per name) would take hours, not a moment
    params = [{"name": f"p{i}", "shape": [1]} for i in range(200_000)] + [{"name": "p7", "shape": [1]}]
    with pytest.raises(PriorFormatError, match=r"lists these names more than once: \['p7'\]"):
        PriorConfig.from_dict(base(parameters=params))


def test_deeply_nested_json_is_a_format_error(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PriorFormatError, match="nested too deeply"):
        PriorConfig.from_json_file(path)


def test_one_string_is_one_pattern():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    mean = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("0.")}
    prior = PriorModel.from_tensors(mean, variance=1.0, exclude="1.*")
    assert prior.config.exclude == ["1.*"]
    match = prior.match(model)
    assert sorted(match.matched) == ["0.bias", "0.weight"] and match.uncovered == []


def test_one_string_is_one_pattern_when_a_learner_records_exclude():
    from priorzoo.learn import SWAGCollector

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    collector = SWAGCollector(model, rank=2, exclude_head=False)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        collector.collect()
    assert collector.to_prior(exclude="1.*").config.exclude == ["1.*"]


def test_a_chosen_scale_of_one_is_kept_and_only_none_means_not_chosen(tmp_path):
    recommended = {"variance": 1.0, "recommended_scale": 1e4}
    unchosen = PriorModel.from_tensors({"w": torch.zeros(2)}, **recommended)
    assert unchosen.config.scale is None and unchosen.scale == 1.0  # the density uses λ = 1
    assert "scale" not in unchosen.config.to_dict()  # absent from config.json
    assert unchosen.resolve_scale().scale == 1e4  # fine-tuning takes the recommended λ
    chosen = PriorModel.from_tensors({"w": torch.zeros(2)}, scale=1.0, **recommended)
    assert chosen.resolve_scale().scale == 1.0  # λ = 1 chosen is a choice, not "no choice"
    reloaded = PriorModel.from_pretrained(unchosen.with_scale(1.0).save_pretrained(tmp_path / "chosen"))
    assert reloaded.config.scale == 1.0 and reloaded.resolve_scale().scale == 1.0
    fresh = PriorModel.from_pretrained(unchosen.save_pretrained(tmp_path / "fresh"))
    assert fresh.config.scale is None and fresh.resolve_scale().scale == 1e4
