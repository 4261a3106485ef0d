"""One validated fine-tuning term: N, ρ, λ and the bind options are checked once, where they enter, and the checked
value travels down to PriorModel.bind; one rule ranks the runs of a λ search."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import priorzoo.finetune as ft
import priorzoo.validation as validation
from priorzoo import BindOptions, PriorModel
from priorzoo.finetune import PriorRegularizer, PriorTerm, ScaleSearchResult
from priorzoo.finetune.runners import ranking_key
from priorzoo.finetune.scale import ScalePoint


def _prior_and_model() -> tuple[PriorModel, torch.nn.Module]:
    lin = torch.nn.Linear(2, 1)
    return PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0, exclude=["bias"]), lin


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_train_examples": 0}, "num_train_examples"),
        ({"prior_weight": -1.0}, "prior_weight"),
        ({"scale": 0.0}, "scale"),
        ({"scale": "fixed"}, "scale"),
        ({"scale": "learned", "prior_weight": 2.0}, "prior_weight"),
        ({"scale": "learned", "groups": "rows"}, "groups"),
    ],
)
def test_a_term_refuses_bad_values(kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        PriorTerm(**kwargs)


def test_a_term_is_frozen_and_knows_its_coefficient() -> None:
    term = PriorTerm(num_train_examples=8, prior_weight=2.0, bind=BindOptions(allow_partial=True))
    assert term.coefficient == 0.25 and not term.learned
    with pytest.raises(dataclasses.FrozenInstanceError):
        term.prior_weight = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="not known yet"):
        _ = PriorTerm().coefficient
    assert PriorTerm().with_num_train_examples(4).coefficient == 0.25
    with pytest.raises(TypeError, match=r"`bind` must be a priorzoo\.BindOptions"):
        PriorTerm(bind={"allow_partial": True})  # type: ignore[arg-type]


def test_n_rho_and_lambda_are_checked_once_on_the_way_to_the_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("check_num_train_examples", "check_prior_weight", "check_scale"):
        real = getattr(validation, name)

        def counted(value, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(value, *args, **kwargs)

        monkeypatch.setattr(f"priorzoo.finetune.term.{name}", counted)
    prior, model = _prior_and_model()
    reg = PriorRegularizer(prior, model, num_train_examples=10, prior_weight=0.5, scale=3.0, allow_partial=True)
    assert sorted(calls) == ["check_num_train_examples", "check_prior_weight", "check_scale"]
    assert reg.term.scale == 3.0 and reg.prior.scale == 3.0 and reg.coefficient == 0.05
    calls.clear()
    again = PriorRegularizer.from_term(prior, model, reg.term)  # a built term is not checked again
    assert calls == [] and again.coefficient == reg.coefficient


def test_prior_model_bind_takes_the_options_object_or_the_keywords_not_both() -> None:
    prior, model = _prior_and_model()
    by_object = prior.bind(model, BindOptions(allow_partial=True))
    by_keywords = prior.bind(model, allow_partial=True)
    assert by_object.prior_names == by_keywords.prior_names == ["weight"]
    with pytest.raises(TypeError, match="not both"):
        prior.bind(model, BindOptions(allow_partial=True), exclude_head=False)
    with pytest.raises(TypeError, match=r"`options` must be a priorzoo\.BindOptions"):
        prior.bind(model, {"allow_partial": True})  # type: ignore[arg-type]


def test_one_ranking_rule_for_grid_search_and_the_scale_curve() -> None:
    assert ranking_key({"nll": 0.5}, "nll", 10.0) < ranking_key({"nll": 0.5}, "nll", 100.0)  # ties: smaller λ
    assert ranking_key({"accuracy": 0.9}, "accuracy", 1e3) < ranking_key({"accuracy": 0.8}, "accuracy", 1.0)
    assert ranking_key({"nll": float("nan")}, "nll", 1.0) == (float("inf"), float("inf"))
    curve = [
        ScalePoint(1.0, {"nll": 0.7}, 1, 1, False, 0.0),
        ScalePoint(10.0, {"nll": 0.5}, 1, 1, False, 0.0),
        ScalePoint(1e2, {"nll": 0.5}, 1, 1, False, 0.0),
        ScalePoint(1e3, {}, None, 1, False, 0.0, diverged=True),
    ]
    assert [p.scale for p in ScaleSearchResult(best_scale=10.0, metric="nll", curve=curve).ranked()] == [
        10.0,
        100.0,
        1.0,
    ]


def test_the_finetune_surface_is_small_and_has_no_moved_names() -> None:
    assert len(ft.__all__) <= 16
    for gone in ("l2sp_prior", "BindOptions", "fit_fresh", "grid_search", "predict_proba", "accuracy"):
        with pytest.raises(AttributeError):
            getattr(ft, gone)
