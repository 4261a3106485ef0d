"""The choice Enums: strings work everywhere, one error wording."""

from __future__ import annotations

import json

import pytest

from priorzoo.enums import Convention, Method, Metric, OptimizerKind


def test_members_are_their_strings() -> None:
    assert Metric.NLL == "nll" and json.dumps({"m": Metric.ACCURACY}) == '{"m": "accuracy"}'
    assert str(Method.BMA) == "bma" and OptimizerKind.check("adamw") is OptimizerKind.ADAMW
    assert [m.higher_is_better for m in Metric] == [True, False, False]


@pytest.mark.parametrize(
    ("enum", "what", "valid"),
    [
        (Metric, "metric", "['accuracy', 'ece', 'nll']"),
        (OptimizerKind, "optimizer", "['adamw', 'sgd']"),
        (Method, "method", "['bma', 'map', 'sgld']"),
        (Convention, "convention", "['official', 'swag']"),
    ],
)
def test_check_names_the_argument_and_the_valid_values(enum, what, valid) -> None:
    with pytest.raises(ValueError) as info:
        enum.check("bogus")
    assert str(info.value) == f"`{what}` must be one of {valid}; received 'bogus'"
    with pytest.raises(ValueError, match=r"^`select_metric` must be"):
        enum.check(3, what="select_metric")
