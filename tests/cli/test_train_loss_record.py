"""What `priorzoo finetune` records as an epoch's `train_loss` (the number the divergence check reads): the data loss,
for a fixed λ (the Trainer's loss includes the prior term: it is taken out) and for a learned scale (the loss does
not include KL/D, which is only logged: nothing is taken out); and what `--lr auto` ranks runs by: the final
training objective, data loss plus prior term."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from priorzoo import PriorModel

pytest.importorskip("transformers")


class _Net(torch.nn.Module):
    """A Trainer-ready classifier: ``forward(x, labels) -> {"loss", "logits"}``, its head `head.*`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(torch.tanh(self.body(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


@pytest.mark.parametrize("prior_in_loss", [True, False])
def test_the_epoch_log_keeps_the_data_loss(prior_in_loss):
    from priorzoo.cli._trainer import _epoch_callback

    log = _epoch_callback(2, lambda _m: None, "", prior_in_loss=prior_in_loss)
    control = SimpleNamespace(should_training_stop=False)
    log.on_log(SimpleNamespace(eval_strategy="no"), SimpleNamespace(global_step=3, epoch=1.0), control, logs={
        "loss": 0.5, "prior_term": 0.2, "learning_rate": 0.1})  # fmt: skip
    assert log.history[-1]["train_loss"] == pytest.approx(0.3 if prior_in_loss else 0.5)
    assert log.history[-1]["prior_term"] == 0.2


@pytest.mark.parametrize("scale", [10.0, "learned"])
def test_a_runs_train_loss_is_the_trainers_data_loss(scale, tmp_path):
    """Through `train_run` (the CLI's one Trainer run): `train_loss` equals the data loss the Trainer logged, for a
    learned scale as for a fixed one (before, a learned run recorded data loss − KL/D, which can be negative)."""
    from transformers import TrainerCallback

    from priorzoo.cli import build_parser
    from priorzoo.cli._trainer import train_run

    class Capture(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    torch.manual_seed(0)
    net = _Net()
    g = torch.Generator().manual_seed(1)
    mean = {n: p.detach() + 0.5 * torch.randn(p.shape, generator=g) for n, p in net.named_parameters() if "body" in n}
    prior = PriorModel.from_tensors(mean, variance=1e-4, exclude=["head.*"])
    data = [{"x": torch.randn(4, generator=g), "labels": i % 2} for i in range(16)]

    def collate(rows):
        return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}

    args = build_parser().parse_args(["finetune", "m", "--prior", "p", "--data", "d", "--output-dir", str(tmp_path)])
    args.batch_size, args.device = 4, "cpu"
    capture = Capture()
    result = train_run(
        net, args=args, train_dataset=data, collate=collate, num_labels=2, folder=tmp_path / "run", lr=0.05, epochs=2,
        prior=prior, scale=scale, num_train_examples=len(data), callbacks=[capture], log=lambda _m: None,
    )  # fmt: skip
    assert len(result.history) == len(capture.logs) == 2
    for entry, logged in zip(result.history, capture.logs, strict=True):
        assert logged["prior_term"] > 0
        data_loss = logged["loss"] - (logged["prior_term"] if scale != "learned" else 0.0)
        assert entry["train_loss"] == pytest.approx(data_loss, rel=1e-12)


def test_the_final_objective_adds_the_prior_term():
    from priorzoo.cli._trainer import RunResult

    res = RunResult(history=[{"train_loss": 0.9, "prior_term": 0.5}, {"train_loss": 0.3, "prior_term": 0.2}])
    assert res.final_train_loss == pytest.approx(0.3)
    assert res.final_objective == pytest.approx(0.5)
    assert RunResult(history=[{"train_loss": 0.3}]).final_objective == pytest.approx(0.3)  # no prior: the data loss
    assert RunResult(history=[{"train_loss": 0.3, "prior_term": 0.1}], diverged="nan").final_objective == float("inf")
    assert RunResult().final_objective == float("inf")


def test_lr_auto_keeps_the_lowest_objective_not_the_lowest_data_loss(monkeypatch, tmp_path):
    """`--lr auto` ranks runs by what they minimised: a run whose data loss is lowest only because it moved far
    from the prior (a large prior term) is not kept; metrics.json's curve records both numbers."""
    from priorzoo.cli import _finetune_phases as phases
    from priorzoo.cli import build_parser
    from priorzoo.cli._trainer import RunResult

    parts = {0.01: (0.40, 0.05), 0.1: (0.10, 0.50)}  # lr -> (final data loss, final prior term)

    def fake_run(model, args, setup, folder, lr, scale, **kw):
        loss, term = parts[lr]
        return RunResult(history=[{"train_loss": loss, "prior_term": term}], lr=lr, scale=scale)

    monkeypatch.setattr(phases, "_run", fake_run)
    args = build_parser().parse_args(["finetune", "m", "--prior", "p", "--data", "d", "--output-dir", str(tmp_path)])
    setup = SimpleNamespace(eval_datasets={}, num_train_examples=8)
    _, chosen, record = phases.search(torch.nn.Linear(2, 2), args, setup, [(0.1, "learned"), (0.01, "learned")],
                                      select="train_loss", what="lr")  # fmt: skip
    assert chosen.lr == 0.01 and record["best_lr"] == 0.01 and record["metric"] == "final_objective"
    assert [p["final_train_loss"] for p in record["curve"]] == [0.10, 0.40]
    assert [p["final_objective"] for p in record["curve"]] == pytest.approx([0.60, 0.45])
