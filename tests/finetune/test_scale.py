"""λ search: picks the scale that generalises on a problem where the answer is known; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from priorzoo import PriorModel
from priorzoo.finetune import ScaleSearchResult, tune_scale
from priorzoo.finetune.scale import log_grid, split_train_validation


def _teacher_problem(n_train: int = 12, n_val: int = 400, d: int = 30):
    """Logistic teacher w*; a prior N(w*, λ·0.05·I) is informative, so small λ must win on 12 examples."""
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(2, d, generator=g)
    x = torch.randn(n_train + n_val, d, generator=g)
    y = torch.distributions.Categorical(logits=x @ w_star.T).sample()
    train = [(x[i : i + 4], y[i : i + 4]) for i in range(0, n_train, 4)]
    val = [(x[n_train:], y[n_train:])]
    prior = PriorModel.from_tensors({"weight": w_star.clone()}, variance=0.05)

    def make_model():
        model = torch.nn.Linear(d, 2, bias=False)
        torch.nn.init.zeros_(model.weight)
        return model

    return prior, make_model, train, val, n_train


def test_tune_scale_prefers_the_informative_prior_and_reports_the_curve():
    prior, make_model, train, val, n = _teacher_problem()
    grid = [1.0, 100.0, 1e6]
    result = tune_scale(
        prior, make_model, train, val, num_train_examples=n, grid=grid, lr=0.2, epochs=40, patience=None
    )
    assert [p.scale for p in result.curve] == grid
    nlls = [p.metrics["nll"] for p in result.curve]
    assert result.best_scale == 1.0
    assert nlls[0] < nlls[1] < nlls[2]  # weaker prior, worse held-out NLL on 12 examples
    assert all(p.steps == 40 * len(train) for p in result.curve)
    # stored with the result: JSON round trip
    data = json.loads(json.dumps(result.to_dict()))
    assert data["best_scale"] == 1.0 and len(data["curve"]) == 3 and data["settings"]["grid"] == grid
    assert "*" in result.table().splitlines()[1]
    # deterministic: the same search gives the same curve
    again = tune_scale(
        prior, make_model, train, val, num_train_examples=n, grid=grid[:1], lr=0.2, epochs=40, patience=None
    )
    assert again.curve[0].metrics == result.curve[0].metrics


def test_tune_scale_early_stops_and_uses_the_metric():
    prior, make_model, train, val, n = _teacher_problem()
    result = tune_scale(
        prior,
        make_model,
        train,
        val,
        num_train_examples=n,
        grid=[1e6],
        lr=2.0,
        epochs=50,
        eval_every=1,
        patience=2,
        metric="accuracy",
    )
    point = result.curve[0]
    assert point.stopped_early and point.steps < 50 * len(train)
    assert point.best_step is not None and point.best_step <= point.steps
    assert result.metric == "accuracy"


def test_bad_arguments():
    prior, make_model, train, val, n = _teacher_problem()
    with pytest.raises(ValueError, match="empty"):
        tune_scale(prior, make_model, train, val, num_train_examples=n, grid=[])
    with pytest.raises(ValueError, match="duplicates"):
        tune_scale(prior, make_model, train, val, num_train_examples=n, grid=[1.0, 1.0])
    with pytest.raises(ValueError, match="metric"):
        tune_scale(prior, make_model, train, val, num_train_examples=n, grid=[1.0], metric="f1")
    with pytest.raises(ValueError, match="num_train_examples"):
        tune_scale(prior, make_model, train, val, num_train_examples=0, grid=[1.0])


def test_log_grid_and_split():
    assert log_grid(1.0, 1e10) == [10.0**k for k in range(11)]
    assert log_grid(5.0, 5.0) == [5.0]
    with pytest.raises(ValueError):
        log_grid(10.0, 1.0)
    train, val = split_train_validation(list(range(100)), 0.1, seed=3)
    assert len(train) == 90 and len(val) == 10
    assert sorted(list(train) + list(val)) == list(range(100))
    assert list(val) == list(split_train_validation(list(range(100)), 0.1, seed=3)[1])
    with pytest.raises(ValueError):
        split_train_validation([1], 0.5)
    assert isinstance(ScaleSearchResult(best_scale=1.0, metric="nll").to_dict(), dict)


def test_every_scale_sees_the_same_shuffled_batches():
    """A shuffling DataLoader draws its order from the global RNG, which tune_scale seeds per λ: running a λ
    alone or after another gives the same result."""
    prior, make_model, train, val, n = _teacher_problem()
    xs = torch.cat([x for x, _ in train])
    ys = torch.cat([y for _, y in train])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=4, shuffle=True)
    kwargs = {"num_train_examples": n, "lr": 0.2, "epochs": 3, "patience": None}
    alone = tune_scale(prior, make_model, loader, val, grid=[100.0], **kwargs)
    after = tune_scale(prior, make_model, loader, val, grid=[1.0, 100.0], **kwargs)
    assert after.curve[1].metrics == alone.curve[0].metrics


def test_a_diverging_scale_is_recorded_and_never_chosen():
    prior, make_model, train, val, n = _teacher_problem()
    # λ = 1e-6: the prior's gradient Σ⁻¹r/N is ~1e6 times stiffer, so SGD at lr 0.2 blows up
    result = tune_scale(prior, make_model, train, val, num_train_examples=n, grid=[1e-6, 1.0], lr=0.2, epochs=5)
    assert [p.diverged for p in result.curve] == [True, False]
    assert result.best_scale == 1.0
    assert "diverged" in result.table()
    with pytest.raises(FloatingPointError, match="every λ in the grid"):
        tune_scale(prior, make_model, train, val, num_train_examples=n, grid=[1e-6], lr=0.2, epochs=5)
