"""Old names keep working for one release, with a warning; new names are the only spelling in the code."""

from __future__ import annotations

import warnings

import pytest
import torch

from priorzoo._deprecation import UNSET, renamed_keyword, warn_deprecated


def test_warn_deprecated_falls_back_to_futurewarning_when_deprecationwarning_is_filtered() -> None:
    def old_api(name: str) -> None:
        warn_deprecated(f"`{name}` is deprecated")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_api("x")
        warnings.simplefilter("ignore", DeprecationWarning)
        old_api("y")
    assert [w.category for w in caught] == [DeprecationWarning, FutureWarning]
    assert caught[0].filename == __file__  # points at the caller


def test_renamed_keyword() -> None:
    assert renamed_keyword(2.0, UNSET, new="scale", old="prior_scale", where="F") == 2.0
    with pytest.warns(DeprecationWarning, match=r"`F\(prior_scale=...\)` is deprecated .* use `scale=...`"):
        assert renamed_keyword(None, 3.0, new="scale", old="prior_scale", where="F") == 3.0
    with pytest.raises(TypeError, match="both `scale` and its deprecated name `prior_scale`"):
        renamed_keyword(2.0, 3.0, new="scale", old="prior_scale", where="F")


@pytest.mark.parametrize("name", ["PredictiveAverager", "average_predictive", "accuracy", "nll", "predict_proba"])
def test_names_moved_out_of_priorzoo_finetune_still_import(name: str) -> None:
    import importlib

    import priorzoo.finetune as ft

    with pytest.warns(DeprecationWarning, match=f"`priorzoo.finetune.{name}` is deprecated"):
        value = getattr(ft, name)
    assert value is getattr(importlib.import_module(ft._MOVED[name]), name)
    assert name not in ft.__all__


def _swag_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = [torch.randn(3) for _ in range(3)]
    mean = torch.stack(w).mean(0)
    return {
        "base.w_mean": mean,
        "base.w_sq_mean": torch.stack(w).pow(2).mean(0),
        "base.w_cov_mat_sqrt": torch.stack([x - mean for x in w]),
        "n_models": torch.tensor(3),
    }


def test_importers_take_source_and_accept_source_task_for_one_release() -> None:
    from priorzoo.convert import from_swa_gaussian

    task = {"dataset": "cifar10", "objective": "supervised"}
    new = from_swa_gaussian(_swag_state(), source=task)
    assert new.config.source["dataset"] == "cifar10"
    with pytest.warns(DeprecationWarning, match="source_task"):
        old = from_swa_gaussian(_swag_state(), source_task=task)
    assert old.config.source == new.config.source
    with pytest.warns(DeprecationWarning, match="pass the checkpoint as the first argument"):
        by_keyword = from_swa_gaussian(source=_swag_state())
    assert torch.equal(by_keyword.mean["w"], new.mean["w"])
    with pytest.raises(TypeError, match="missing its first argument `checkpoint`"):
        from_swa_gaussian(source=task)


def test_prior_trainer_prior_scale_is_a_deprecated_alias_of_scale(tmp_path) -> None:
    pytest.importorskip("transformers")
    from priorzoo import PriorModel
    from priorzoo.finetune import PriorTrainer

    transformers = pytest.importorskip("transformers")
    model = torch.nn.Linear(2, 2, bias=False)
    prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0)
    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    data = [{"x": torch.zeros(2)}] * 4
    with pytest.warns(DeprecationWarning, match=r"`PriorTrainer\(prior_scale=...\)` is deprecated"):
        old = PriorTrainer(model=model, args=args, train_dataset=data, prior=prior, prior_scale=10.0)
    new = PriorTrainer(model=model, args=args, train_dataset=data, prior=prior, scale=10.0)
    assert old.prior.scale == new.prior.scale == 10.0
    with pytest.raises(TypeError, match="both `scale`"):
        PriorTrainer(model=model, args=args, train_dataset=data, prior=prior, scale=1.0, prior_scale=10.0)
