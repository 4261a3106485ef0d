"""`priorzoo finetune --lora-r R --lora-target ...`: a prior-informed LoRA run end to end on a tiny BERT folder
(offline), and the refusals of the LoRA options."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from test_finetune_cli import _args, _finetune, _text_csv, bert_folder, bert_prior_folder  # noqa: F401

from priorzoo import PriorModel
from priorzoo.cli import build_parser, main

pytest.importorskip("peft")


def test_lora_run_with_a_prior(bert_folder, bert_prior_folder, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    train = _text_csv(tmp_path / "train.csv", 12, 0)
    test = _text_csv(tmp_path / "test.csv", 8, 1)
    out = tmp_path / "run"
    lora = ("--lora-r", "2", "--lora-target", "query,value")
    common = (str(bert_folder), "--prior", str(bert_prior_folder), "--data", str(train), *lora)
    metrics = _finetune(out, *common, "--test-data", str(test), "--epochs", "1", "--lr", "0.05", "--scale", "100")
    # 2 layers × (query, value) × (A [2, 32] + B [32, 2]), and the 2-class head in full
    assert metrics["lora"] == {
        "r": 2,
        "target": ["query", "value"],
        "alpha": 4,
        "dropout": 0.0,
        "trainable_parameters": 4 * (2 * 32 + 32 * 2) + 32 * 2 + 2,
    }
    assert metrics["prior"]["init"] == "prior_mean" and metrics["prior"]["matched_parameters"] > 4
    assert 0 <= metrics["metrics"]["test"]["accuracy"] <= 1
    assert (out / "model" / "adapter_config.json").is_file()  # the adapters, in PEFT's format
    base = AutoModelForSequenceClassification.from_pretrained(bert_folder, num_labels=2)
    model = PeftModel.from_pretrained(base, out / "model")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # trained

    # the base weights start at the prior mean, the adapters at their init (B = 0)
    from priorzoo.cli.finetune import prepare

    args = build_parser().parse_args(_args(*common, "--output-dir", str(tmp_path / "x")))
    setup = prepare(args)
    prior = PriorModel.from_pretrained(bert_prior_folder)
    name = "encoder.layer.0.attention.self.query.weight"
    weights = dict(setup.model.named_parameters())
    assert torch.equal(
        weights[f"base_model.model.bert.{name.removesuffix('.weight')}.base_layer.weight"], prior.mean[name]
    )
    assert all(float(p.abs().sum()) == 0 for n, p in weights.items() if "lora_B" in n)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-r", "4"], "needs both"),
        (["--lora-target", "query"], "needs both"),
        (["--lora-r", "0", "--lora-target", "query"], "`--lora-r` must be ≥ 1"),
        (["--lora-alpha", "8"], "need `--lora-r`"),
        (["--lora-r", "2", "--lora-target", "query", "--lora-dropout", "1.5"], "`--lora-dropout`"),
    ],
)
def test_bad_lora_options(extra, message, tmp_path, capsys):
    code = main(_args("bert", "--no-prior", *extra, "--data", "missing.csv", "--output-dir", str(tmp_path)))
    assert code == 2
    assert message in capsys.readouterr().err


def test_lora_target_that_names_no_module(bert_folder, tmp_path, capsys):  # noqa: F811
    train = _text_csv(tmp_path / "train.csv", 8, 0)
    lora = ("--lora-r", "2", "--lora-target", "qkv")
    code = main(_args(str(bert_folder), "--no-prior", *lora, "--data", str(train), "--output-dir", str(tmp_path / "o")))
    assert code != 0
    err = capsys.readouterr().err
    assert "['qkv'] name no module" in err and "query" in err


def test_lora_adapters_name_the_backbone_never_its_path(bert_folder, bert_prior_folder, tmp_path, monkeypatch):  # noqa: F811
    """PEFT records the base model as the path it was loaded from (adapter_config.json's `base_model_name_or_path`,
    the card's `base_model`), and users upload `model/` with PEFT's own `push_to_hub`: the folder names the backbone
    as given (a local folder by its name), and the documented reload (the backbone, μ put in when the run started
    at the prior mean, then `PeftModel.from_pretrained`) gives back the model the run trained."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import priorzoo.cli.finetune as finetune_cli

    trained = {}
    save_model = finetune_cli._save_model

    def keep(model, *rest):
        trained["model"] = model
        save_model(model, *rest)

    monkeypatch.setattr(finetune_cli, "_save_model", keep)
    train = _text_csv(tmp_path / "train.csv", 8, 0)
    out = tmp_path / "run"
    lora = ("--lora-r", "2", "--lora-target", "query,value")
    metrics = _finetune(out, str(bert_folder), "--prior", str(bert_prior_folder), "--data", str(train), *lora,
                        "--epochs", "1", "--lr", "0.05", "--scale", "100")  # fmt: skip
    folder = out / "model"
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == bert_folder.name
    for path in folder.iterdir():  # no file of the folder names a local path
        assert str(bert_folder.parent).encode() not in path.read_bytes(), path.name
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == bert_folder.name and f"base_model:adapter:{bert_folder.name}" in card.data.tags

    assert json.loads((folder / "priorzoo_finetune.json").read_text())["prior"]["init"] == "prior_mean"
    base = AutoModelForSequenceClassification.from_pretrained(bert_folder, num_labels=metrics["num_labels"])
    PriorModel.from_pretrained(bert_prior_folder).init_model_(base)  # the run's W₀ = μ
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.randint(0, base.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained["model"].eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
