"""End to end: learn a prior on a tiny timm and a tiny transformers model, save, load, bind to a new head."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from _models import tiny_bert_config

from priorzoo import PriorModel
from priorzoo.learn import CrossEntropyObjective, SimCLRObjective, swag_fit
from priorzoo.learn import callbacks as callbacks_module


def _image_loader(num_classes: int, n: int = 16, size: int = 32) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)


@pytest.mark.slow
def test_timm_supervised_prior_round_trip_and_new_head(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    collector = swag_fit(
        model, _image_loader(4), CrossEntropyObjective(), epochs=2, rank=3, lr=0.01, collect_every=1, progress=False
    )
    assert collector.head_names == ["fc.bias", "fc.weight"]  # timm's pretrained_cfg["classifier"]
    prior = collector.to_prior(source={"dataset": "random", "objective": "supervised"})
    assert prior.rank == 3 and not any(n.startswith("fc.") for n in prior.names)
    assert prior.config.backbone["library"] == "timm" and prior.config.backbone["name"] == "test_resnet"
    assert prior.config.exclude == ["fc.weight", "fc.bias"]

    folder = prior.save_pretrained(tmp_path / "prior")
    loaded = PriorModel.from_pretrained(folder)
    assert loaded.names == prior.names
    for n in prior.names:
        assert torch.equal(loaded.mean[n], prior.mean[n])
        assert torch.equal(loaded.cov_factor[n], prior.cov_factor[n])

    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    match = loaded.match(fresh)
    assert match.is_complete
    assert sorted(match.no_prior) == ["fc.bias", "fc.weight"]
    assert len(match.matched) == len(prior.names)
    loaded.init_model_(fresh)
    first = prior.names[0]
    assert torch.equal(dict(fresh.named_parameters())[first].detach(), prior.mean[first])
    penalty = loaded.penalty(fresh)
    assert penalty.item() == pytest.approx(0.0, abs=1e-6)  # at the mean
    penalty.backward()


@pytest.mark.slow
def test_timm_simclr_prior_excludes_the_projection_head() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    objective = SimCLRObjective.for_model(backbone, projection_dim=16, temperature=0.5)
    before = [p.detach().clone() for p in objective.head.parameters()]
    collector = swag_fit(
        backbone, _image_loader(2), objective, epochs=2, rank=2, lr=0.01, collect_every=1, progress=False
    )
    prior = collector.to_prior(source={"objective": "simclr"})
    assert set(prior.names) == {n for n, _ in backbone.named_parameters()}
    assert not any("head" in n for n in prior.names)
    after = list(objective.head.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))  # the projection head was trained too


def _bert_config(**kwargs):
    pytest.importorskip("transformers")
    return tiny_bert_config(**kwargs)


class _MLMData(torch.utils.data.Dataset):
    """32 fixed masked sequences (masking precomputed, so every run sees the same data)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 100, (32, 12), generator=gen)
        self.mask = torch.rand(32, 12, generator=gen) < 0.15

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, labels = self.ids[i].clone(), self.ids[i].clone()
        labels[~self.mask[i]] = -100
        x[self.mask[i]] = 4
        return {"input_ids": x, "labels": labels}


def _train_mlm(out, *, resume=None, every_n_steps=1, every_epoch=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(_bert_config())
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=8,
        learning_rate=1e-3,
        save_steps=4,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        logging_steps=100,
    )
    swag = callbacks_module.SWAGCallback(rank=3, every_n_steps=every_n_steps, every_epoch=every_epoch)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_MLMData(), callbacks=[swag])
    trainer.train(resume_from_checkpoint=resume)
    return swag


@pytest.mark.slow
def test_transformers_trainer_callback_prior_and_resume(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    swag = _train_mlm(tmp_path / "run")
    assert swag.collector.num_collected == 8
    assert all(n.startswith("cls.") for n in swag.collector.head_names)  # the MLM head is left out
    prior = swag.to_prior(source={"dataset": "random tokens", "objective": "mlm"})
    assert prior.config.backbone["library"] == "transformers"
    assert all(n.startswith("bert.") for n in prior.names)
    assert (tmp_path / "run" / "checkpoint-4" / callbacks_module.COLLECTOR_STATE_NAME).is_file()

    loaded = PriorModel.from_pretrained(prior.save_pretrained(tmp_path / "prior"))
    classifier = transformers.BertForSequenceClassification(_bert_config(num_labels=3))
    match = loaded.match(classifier)
    assert len(match.matched) == len(prior.names) and not match.missing
    assert {"classifier.weight", "classifier.bias"} <= set(match.no_prior)
    # BertForMaskedLM has no pooler, so the classifier's pooler has no prior: bind the marginal explicitly
    bound = loaded.bind(classifier, allow_partial=True)
    assert torch.isfinite(bound.penalty())

    # resume from checkpoint-4 (checkpoint-8 removed): the same prior as the uninterrupted run
    shutil.rmtree(tmp_path / "run" / "checkpoint-8")
    resumed = _train_mlm(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed.collector.num_collected == 8
    again = resumed.to_prior()
    for n in prior.names:
        assert torch.equal(prior.mean[n], again.mean[n])
        assert torch.equal(prior.variance[n], again.variance[n])
        assert torch.equal(prior.cov_factor[n], again.cov_factor[n])


@pytest.mark.slow
def test_transformers_epoch_snapshots_survive_a_resume(tmp_path) -> None:
    """4 steps per epoch, a checkpoint at step 4 (an epoch end): the epoch's snapshot is in that checkpoint."""
    whole = _train_mlm(tmp_path / "a", every_n_steps=None, every_epoch=True)
    assert whole.collector.num_collected == 2
    shutil.rmtree(tmp_path / "a" / "checkpoint-8")
    resumed = _train_mlm(
        tmp_path / "a", every_n_steps=None, every_epoch=True, resume=str(tmp_path / "a" / "checkpoint-4")
    )
    assert resumed.collector.num_collected == 2
    with pytest.warns(UserWarning, match="fewer than the requested rank"):  # 2 snapshots: diagonal only
        p, q = whole.to_prior(), resumed.to_prior()
    assert p.rank == q.rank == 0
    for n in p.names:
        assert torch.equal(p.mean[n], q.mean[n]) and torch.equal(p.variance[n], q.variance[n])


def test_swag_callback_without_transformers_names_the_extra(monkeypatch) -> None:
    monkeypatch.setattr(callbacks_module, "_CALLBACK_CLASS", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "priorzoo\[transformers\]"'):
        callbacks_module.SWAGCallback  # noqa: B018
    import priorzoo.learn

    with pytest.raises(ImportError, match="SWAGCallback"):
        priorzoo.learn.SWAGCallback  # noqa: B018


def test_swag_callback_needs_a_collection_rule() -> None:
    with pytest.raises(ValueError, match="never collects"):
        callbacks_module.SWAGCallback(every_epoch=False)
