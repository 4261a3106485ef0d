"""The prior's content id (priorzoo.format.content_id): kept by a save and load and by card edits, changed by
anything a fine-tuning run reads (tensors, λ₀, ε, exclude patterns, buffers); a 16-bit factor hashes as the values
it loads as."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from priorzoo import PriorModel
from priorzoo.format.content_id import content_id


def _prior(**kw) -> PriorModel:
    g = torch.Generator().manual_seed(0)
    args = {
        "mean": {"a": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g)},
        "variance": {"a": torch.rand(2, 3, generator=g), "b": torch.rand(4, generator=g)},
        "cov_factor": {"a": torch.randn(2, 2, 3, generator=g), "b": torch.randn(2, 4, generator=g)},
        "buffers": {"bn.running_mean": torch.zeros(3)},
        "exclude": ["fc.*"],
    }
    args.update(kw)
    return PriorModel.from_tensors(**args)


def test_a_save_and_load_and_card_edits_keep_the_id(tmp_path):
    prior = _prior()
    loaded = PriorModel.from_pretrained(prior.save_pretrained(tmp_path / "p"))
    assert content_id(loaded) == content_id(prior)
    edited = dataclasses.replace(
        prior.config,
        recommended_scale=30.0,
        learning={"recommended_scale_measured": "on x"},
        results=[{"dataset": "x", "metric": "accuracy", "value": 0.9}],
        backbone={"name": "other"},
        license="mit",
    )
    assert content_id(PriorModel(edited, prior.mean, prior.variance, prior.cov_factor, buffers=prior.buffers)) == (
        content_id(prior)
    )


@pytest.mark.parametrize(
    "change",
    [
        {"scale": 2.0},
        {"eps": 1e-6},
        {"exclude": ["head.*"]},
        {"buffers": {"bn.running_mean": torch.ones(3)}},
        {"buffers": {}},
    ],
)
def test_what_a_run_reads_changes_the_id(change):
    assert content_id(_prior(**change)) != content_id(_prior())


@pytest.mark.parametrize("store", ["mean", "variance", "cov_factor"])
def test_every_tensor_is_part_of_the_id(store):
    prior = _prior()
    tensors = {n: t.clone() for n, t in getattr(prior, store).items()}
    tensors["b"].view(-1)[-1] += 1e-6
    setattr(prior, store, tensors)
    assert content_id(prior) != content_id(_prior())


def test_a_16_bit_factor_hashes_as_the_values_it_loads_as(tmp_path):
    prior = _prior()
    loaded = PriorModel.from_pretrained(prior.save_pretrained(tmp_path / "p", factor_dtype="float16"))
    rounded = _prior(cov_factor={n: f.half().float() for n, f in prior.cov_factor.items()})
    assert content_id(loaded) == content_id(rounded)
