"""The running-methods layer: optimiser factory, grid search, SWAG posterior and SGLD runners, bind options."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from priorzoo import BindOptions, PriorModel
from priorzoo.finetune.loop import FitResult
from priorzoo.finetune.runners import (
    fit_fresh,
    fit_swag_posterior,
    grid_search,
    make_optimizer,
    run_sgld,
    seeded_loader,
)


def _data(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def test_make_optimizer_kinds_and_trainable_parameters_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    sgd = make_optimizer(model, "sgd", lr=0.1, momentum=0.5, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5
    assert sum(len(g["params"]) for g in sgd.param_groups) == 3
    assert isinstance(make_optimizer(model, "adamw", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"`optimizer` must be one of \['adamw', 'sgd'\]; received 'adam'"):
        make_optimizer(model, "adam", lr=0.1)


def test_seeded_loader_replays_its_order_whatever_the_global_rng() -> None:
    data = list(range(10))
    first = [b.tolist() for b in seeded_loader(data, 4, shuffle=True, seed=3)]
    torch.rand(100)
    assert [b.tolist() for b in seeded_loader(data, 4, shuffle=True, seed=3)] == first
    assert sorted(itertools.chain(*first)) == data


def _fake(values: dict[float, float]):
    def run(v: float):
        if math.isnan(values[v]):
            raise FloatingPointError("diverged")
        return torch.nn.Linear(1, 1), FitResult(steps=2, best_step=1, best_metrics={"nll": values[v], "accuracy": 0.5})

    return run


def test_grid_search_selects_skips_diverged_and_breaks_ties() -> None:
    res = grid_search([1.0, 2.0, 3.0, 4.0], _fake({1.0: math.nan, 2.0: 0.7, 3.0: 0.5, 4.0: 0.5}), keep_model=True)
    assert [p.diverged for p in res.points] == [True, False, False, False]
    assert res.points[0].error == "diverged"
    assert res.best.value == 3.0 and isinstance(res.model, torch.nn.Module)  # tie 3 vs 4: the smaller value
    by_nll = grid_search(
        [1.0, 2.0], _fake({1.0: 0.9, 2.0: 0.4}), metric="accuracy", tie_break=lambda p: p.metrics["nll"]
    )
    assert by_nll.best.value == 2.0  # equal accuracy: the lower NLL wins
    assert grid_search([1.0], _fake({1.0: 0.1})).model is None
    with pytest.raises(FloatingPointError, match="every λ run diverged"):
        grid_search([1.0], _fake({1.0: math.nan}), what="λ")
    with pytest.raises(ValueError, match="grid is empty"):
        grid_search([], _fake({}))
    with pytest.raises(ValueError, match="`metric` must be one of"):
        grid_search([1.0], _fake({1.0: 0.1}), metric="loss")


def test_fit_fresh_is_reproducible_and_binds_the_prior() -> None:
    data = list(seeded_loader(_data(), 8, shuffle=False))
    lin = torch.nn.Linear(3, 2)
    prior = PriorModel.from_tensors({n: torch.zeros_like(p) for n, p in lin.named_parameters()}, variance=0.05)

    def run(p):
        return fit_fresh(
            lambda: torch.nn.Linear(3, 2), data, lambda m: make_optimizer(m, lr=0.05), prior=p,
            num_train_examples=32, bind=BindOptions(exclude_head=False), seed=1, epochs=3,
        )  # fmt: skip

    (a, _), (b, _) = run(None), run(None)
    assert torch.equal(a.weight, b.weight)
    pulled, _ = run(prior)
    assert pulled.weight.norm() < a.weight.norm()  # the strong prior at 0 shrinks the weights
    with pytest.raises(ValueError, match="`num_train_examples`"):
        fit_fresh(lambda: torch.nn.Linear(3, 2), data, lambda m: make_optimizer(m, lr=0.1), prior=prior)


def test_bind_options_validate() -> None:
    assert BindOptions(include="encoder.*").as_kwargs()["include"] == "encoder.*"
    with pytest.raises(TypeError, match="`allow_partial` must be True or False"):
        BindOptions(allow_partial="yes")
    with pytest.raises(TypeError, match=r"`dtype` must be a floating torch\.dtype"):
        BindOptions(dtype=torch.int64)


def test_fit_swag_posterior_collects_every_k_steps() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    data = list(seeded_loader(_data(), 4, shuffle=False))  # 8 steps per epoch
    swag, res = fit_swag_posterior(lin, data, make_optimizer(lin, lr=0.05), rank=3, epochs=2, collect_every=4)
    assert res.steps == 16 and swag.num_collected == 4
    assert swag.posterior().rank == 3 and "weight" in swag.posterior().names  # the head is in the posterior
    with pytest.raises(ValueError, match="`collect_every` must be an integer ≥ 1"):
        fit_swag_posterior(lin, data, make_optimizer(lin, lr=0.05), rank=3, epochs=1, collect_every=0)


def test_run_sgld_samples_after_the_burn_in() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    data = list(seeded_loader(_data(), 8, shuffle=False))  # 4 steps per epoch
    out = run_sgld(lin, data, lr=1e-3, num_train_examples=32, epochs=4, num_samples=4, eval_loaders={"val": data})
    assert out.burn_in_epochs == 2 and out.sample_every == 2 and out.num_samples == 4
    probs = out.averager.probabilities("val")
    assert probs.shape == (32, 2) and torch.allclose(probs.sum(1), torch.ones(32, dtype=probs.dtype))
    assert run_sgld(lin, data, lr=1e-3, num_train_examples=32, epochs=2, num_samples=2).averager is None
    with pytest.raises(ValueError, match="`burn_in_epochs` must be in"):
        run_sgld(lin, data, lr=1e-3, num_train_examples=32, epochs=2, num_samples=2, burn_in_epochs=2)
