"""Accuracy, NLL and ECE against hand computations; invalid inputs."""

from __future__ import annotations

import math

import pytest
import torch

from priorzoo.finetune.metrics import (
    accuracy,
    classification_metrics,
    expected_calibration_error,
    nll,
    probabilities,
)


def test_hand_computed_values():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    assert accuracy(probs, labels) == pytest.approx(0.75)
    assert nll(probs, labels) == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.55)) / 4)
    # 10 bins: (0.8, 0.9] {0.9 ✓}, (0.7, 0.8] {0.8 ✓}, (0.5, 0.6] {0.6 ✗, 0.55 ✓}
    ece = (abs(1 - 0.9) + abs(1 - 0.8) + abs(1 - (0.6 + 0.55))) / 4
    assert expected_calibration_error(probs, labels, num_bins=10) == pytest.approx(ece, abs=1e-7)
    # one bin: |accuracy − mean confidence|
    conf = (0.9 + 0.8 + 0.6 + 0.55) / 4
    assert expected_calibration_error(probs, labels, num_bins=1) == pytest.approx(abs(0.75 - conf), abs=1e-7)


def test_right_closed_bins_and_confidence_one():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([0, 1])
    # 1.0 falls in the last bin (0.9, 1], 0.5 in (0.4, 0.5]; argmax of a tie is class 0 → wrong
    assert expected_calibration_error(probs, labels, num_bins=10) == pytest.approx((0 + 0.5) / 2)


def test_perfectly_calibrated_predictions_have_zero_ece():
    torch.manual_seed(0)
    n = 200_000
    conf = torch.rand(n) * 0.5 + 0.5
    correct = torch.rand(n) < conf
    probs = torch.stack([conf, 1 - conf], dim=1)
    labels = torch.where(correct, 0, 1)
    assert expected_calibration_error(probs, labels) < 0.01


def test_metrics_dict_and_probabilities():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    probs = probabilities(logits)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    m = classification_metrics(probs, torch.tensor([0, 1]))
    assert set(m) == {"accuracy", "nll", "ece", "num_examples"}
    assert m["accuracy"] == 1.0 and m["num_examples"] == 2


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (torch.tensor([[2.0, -1.0]]), torch.tensor([0]), "probabilities, not"),
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), r"\[n, C\]"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), "must lie in"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), "integer"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), "n = 1"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "empty"),
    ],
)
def test_invalid_inputs(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, labels)


def test_bad_bin_count():
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), num_bins=0)
