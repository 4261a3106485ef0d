"""Recording a learned λ on a prior's card (priorzoo.finetune.learned_scale_card): at the recorded recommended λ
the fixed-λ penalty's gradient equals the data-emphasized ELBO's prior gradient on w̄ (dense reference too), the
record (measured_on, result rows, raw λ_g/κ/D/N), every refused input, the prior id check, no local path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_learned_scale import _dense_shape, _flat, _net, _prior

from priorzoo import PriorModel
from priorzoo.finetune import PriorRegularizer
from priorzoo.finetune.learned_scale import LearnedScale
from priorzoo.finetune.learned_scale_card import (
    fixed_scale_equivalent,
    read_learned_scale_run,
    record_learned_scale,
)
from priorzoo.format.card_results import result_rows
from priorzoo.format.content_id import content_id

N = 7


def _metrics(prior: PriorModel, learned_state: dict, **changes) -> dict:
    """A finetune --scale learned metrics.json for `prior` with the LearnedScale.state() `learned_state`."""
    metrics = {
        "status": "ok",
        "reason": None,
        "num_train_examples": N,
        "lr": 0.01,
        "method": "map",
        "arguments": {"data": "/home/alice/secret/reviews.csv", "optimizer": "sgd"},
        "prior": {
            "source": "/home/alice/priors/p",
            "scale": "learned",
            "content_id": content_id(prior),
            "learned_scale": copy.deepcopy(learned_state),
        },
        "metrics": {"test": {"accuracy": 0.75, "nll": 0.6, "ece": 0.04, "num_examples": 40}},
        "lora": None,
    }
    metrics.update(changes)
    return metrics


def _state(scales: dict, groups: dict, sigma: float = 0.01) -> dict:
    return {"scales": scales, "sigma": sigma, "kappa": sum(groups.values()) / N, "groups": groups}


@pytest.fixture
def prior() -> PriorModel:
    return _prior(_net(), "lowrank")


@pytest.fixture
def good(prior) -> dict:
    return _metrics(prior, _state({"backbone": 0.02, "head": 1.5}, {"backbone": 16, "head": 10}))


def _prior_grads(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for n, p in net.named_parameters() if n.startswith("0.")]).double()


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "lowrank"])
@pytest.mark.parametrize("stored_scale", [1.0, 4.0])
def test_recommended_scale_gives_the_learned_objectives_prior_gradient(kind, stored_scale):
    """At recommended_scale = λ_g·D/N the fixed-λ penalty (weighted 1/N) pulls w̄ exactly as the DE-ELBO's KL/D did
    at λ_g: the same gradient on every prior-covered weight, and the dense S⁻¹(w̄ − μ)/(λ N). At λ_g itself it does
    not (the factor κ = D/N)."""
    net = _net()
    prior = _prior(net, kind, scale=stored_scale)
    learned = LearnedScale(prior, net, num_train_examples=N, sigma_init=0.05, overlap=False)
    net.zero_grad(set_to_none=False)
    learned.add_to_grad_()  # not perturbed: only the KL's gradient at w̄, at the λ_g solved now
    de_elbo = _prior_grads(net)
    state = learned.state()
    config = record_learned_scale(prior, _metrics(prior, state), task="reviews")
    d = sum(state["groups"].values())
    assert config.recommended_scale == pytest.approx(state["scales"]["backbone"] * d / N, rel=1e-12)
    assert d == 16 + 10 and state["kappa"] == pytest.approx(d / N)

    net.zero_grad(set_to_none=False)
    PriorRegularizer(prior, net, num_train_examples=N, scale=config.recommended_scale).add_to_grad_()
    fixed = _prior_grads(net)
    torch.testing.assert_close(fixed, de_elbo, rtol=1e-5, atol=1e-9)

    mu, s = _dense_shape(prior)
    dense = torch.linalg.solve(s, _flat(net, "0.") - mu) / (config.recommended_scale * N)
    torch.testing.assert_close(fixed, dense, rtol=1e-4, atol=1e-8)

    net.zero_grad(set_to_none=False)
    PriorRegularizer(prior, net, num_train_examples=N, scale=state["scales"]["backbone"]).add_to_grad_()
    raw = _prior_grads(net)
    assert float(raw.norm() / de_elbo.norm()) == pytest.approx(d / N, rel=1e-4)  # λ_g itself: κ times too strong


def test_record_sets_a_measured_scale_and_result_rows(prior, good):
    prior.config.recommended_scale = 1e4
    prior.config.learning["recommended_scale_rule"] = "10^round(...) = 10000"
    config = record_learned_scale(prior, good, task="my-reviews")
    assert config.recommended_scale == pytest.approx(0.02 * 26 / N)
    assert "recommended_scale_rule" not in config.learning
    text = config.learning["recommended_scale_measured"]
    for part in ("my-reviews", f"N = {N}", "data-emphasized ELBO", "no validation", "λ_backbone = 0.02", "26"):
        assert part in text
    rows = result_rows(config)
    assert [(r["metric"], r["value"]) for r in rows] == [("accuracy", 0.75), ("nll", 0.6), ("ece", 0.04)]
    for r in rows:
        assert r["role"] == "prior" and r["dataset"] == "my-reviews" and r["split"] == "test"
        assert r["num_train_examples"] == N and r["scale"] == config.recommended_scale
        assert r["method"] == "SGD + this prior, λ learned (DE-ELBO)"
    record = config.results[0]["learned_scale"]
    assert record["scales"] == {"backbone": 0.02, "head": 1.5} and record["num_trained"] == 26
    assert record["kappa"] == pytest.approx(26 / N) and record["sigma"] == 0.01
    # the prior given is unchanged
    assert prior.config.recommended_scale == 1e4 and prior.config.results == []


def test_no_local_path_is_recorded_and_the_task_defaults_to_the_data_name(prior, good):
    config = record_learned_scale(prior, good)
    assert config.results[0]["dataset"] == "reviews.csv"
    assert "/home/alice" not in config.to_json_string() and "secret" not in config.to_json_string()


def test_a_second_task_is_recorded_on_the_updated_prior(prior, good):
    """Recording keeps the prior's content id (the card is not part of it): a run of the original prior records
    on the updated one too; the last record is the recommendation, earlier rows stay."""
    first = record_learned_scale(prior, good, task="a")
    updated = PriorModel(first, prior.mean, prior.variance, prior.cov_factor, buffers=prior.buffers)
    assert content_id(updated) == content_id(prior)
    other = _metrics(prior, _state({"backbone": 0.5, "head": 1.0}, {"backbone": 16, "head": 10}))
    second = record_learned_scale(updated, other, task="b")
    assert second.recommended_scale == pytest.approx(0.5 * 26 / N)
    assert [r["dataset"] for r in second.results] == ["a"] * 3 + ["b"] * 3
    assert "on b (" in second.learning["recommended_scale_measured"]


def test_a_run_of_another_prior_is_refused_naming_both_ids(prior, good):
    other = _prior(_net(), "lowrank", seed=2)
    with pytest.raises(ValueError, match="another prior") as err:
        record_learned_scale(other, good)
    assert content_id(prior) in str(err.value) and content_id(other) in str(err.value)


def _set(metrics: dict, path: str, value) -> dict:
    out = copy.deepcopy(metrics)
    *keys, last = path.split(".")
    target = out
    for k in keys:
        target = target[k]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return out


_DELETE = object()
_TWO_LAYERS = _state({"0": 0.1, "1": 0.2, "head": 1.0}, {"0": 10, "1": 10, "head": 10})


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("status", "diverged", "status` is 'diverged'"),
        ("status", "failed", "status` is 'failed'"),
        ("prior.scale", 1000.0, "fixed λ"),
        ("prior", {"source": None, "scale": None}, "no prior"),
        ("prior.source", "l2sp", "L2-SP"),
        ("prior.content_id", _DELETE, "does not name the prior"),
        ("prior.learned_scale", _DELETE, "`prior.learned_scale` must be an object"),
        ("prior.learned_scale.scales.backbone", float("nan"), "scales.backbone` must be a finite number > 0"),
        ("prior.learned_scale.scales.backbone", -1.0, "scales.backbone` must be a finite number > 0"),
        ("prior.learned_scale.scales.backbone", None, "scales.backbone` must be a finite number > 0"),
        ("prior.learned_scale.scales", {"head": 1.0, "backbone": 0.1}, "same groups"),
        ("prior.learned_scale.scales", {}, "same groups"),
        ("prior.learned_scale.sigma", float("inf"), "sigma` must be a finite number > 0"),
        ("prior.learned_scale.kappa", 1.0, "inconsistent"),
        ("prior.learned_scale", _TWO_LAYERS, "learned 2 prior groups"),
        ("prior.learned_scale", {**_TWO_LAYERS, "scales": {"head": 1.0}, "groups": {"head": 10}}, "no prior-covered"),
        ("num_train_examples", 0, "`num_train_examples` must be an integer ≥ 1"),
        ("lr", float("nan"), "`lr` must be a finite number > 0"),
        ("arguments.data", "", "arguments.data"),
        ("metrics.test", {"accuracy": float("nan"), "num_examples": 3}, "--test-data"),
        ("metrics", {}, "`metrics.test` must be an object"),
    ],
)
def test_bad_runs_are_refused(good, prior, path, value, message):
    bad = _set(good, path, value)
    with pytest.raises(ValueError) as err:
        record_learned_scale(prior, bad)
    assert message in str(err.value)


def test_bad_task_names_are_refused(prior, good):
    with pytest.raises(ValueError, match="`task` must name"):
        record_learned_scale(prior, good, task="  ")
    with pytest.raises(ValueError, match="not a Hub dataset id"):
        record_learned_scale(prior, good, task="my reviews", hub_dataset=True)
    config = record_learned_scale(prior, good, task="org/reviews", hub_dataset=True)
    assert result_rows(config)[0]["hub_dataset"] == "org/reviews"


def test_read_refuses_what_is_not_a_dict():
    with pytest.raises(TypeError, match=r"parsed metrics\.json"):
        read_learned_scale_run([1, 2])  # type: ignore[arg-type]


def test_fixed_scale_equivalent_checks_its_inputs():
    assert fixed_scale_equivalent(2.0, num_trained=30, num_train_examples=10) == 6.0
    with pytest.raises(ValueError, match="`num_train_examples` must be an integer ≥ 1"):
        fixed_scale_equivalent(2.0, num_trained=30, num_train_examples=0)
    with pytest.raises(ValueError, match="`scale` must be a finite number > 0"):
        fixed_scale_equivalent(math.nan, num_trained=30, num_train_examples=10)
