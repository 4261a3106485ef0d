"""`priorzoo learn`: offline, random-init or local backbones, local datasets, a complete prior folder."""

from __future__ import annotations

import json

import pytest
import torch
from _models import tiny_bert_config
from huggingface_hub import ModelCard

from priorzoo import PriorModel
from priorzoo.cli import main

pytest.importorskip("datasets")


def random_images(root, per_class: int, seed: int, size: int = 24):
    """An imagefolder dataset at ``root``: classes cat and dog × ``per_class`` random ``size``² PNGs."""
    image = pytest.importorskip("PIL.Image")
    gen = torch.Generator().manual_seed(seed)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
            image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    """An imagefolder dataset: 2 classes × 4 random 24×24 PNGs."""
    return random_images(tmp_path / "images", 4, 0)


@pytest.fixture
def tiny_bert(tmp_path):
    """A local transformers folder: a random tiny BertForMaskedLM and a WordPiece tokenizer."""
    transformers = pytest.importorskip("transformers")
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "good", "bad", "movie", "film"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    folder = tmp_path / "tiny-bert"
    tokenizer = transformers.BertTokenizerFast(vocab=vocab)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=len(tokenizer))
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    return folder


def _learn(out, *options: str) -> PriorModel:
    """Run `priorzoo learn ... --output out --no-progress`, check that it succeeds, load the prior."""
    code = main(["learn", *options, "--output", str(out), "--no-progress"])
    assert code == 0
    return PriorModel.from_pretrained(out)


def test_learn_timm_supervised_on_an_image_folder(image_folder, tmp_path) -> None:
    out = tmp_path / "prior"
    prior = _learn(
        out,
        "test_resnet",
        "--no-pretrained",
        "--data",
        str(image_folder),
        "--objective",
        "supervised",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--collect-every",
        "1",
        "--rank",
        "3",
        "--image-size",
        "32",
        "--lr",
        "0.01",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    )
    assert prior.kind.value == "swag" and prior.rank == 3
    assert not any(n.startswith("fc.") for n in prior.names)  # the 2-class head is not in the prior
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"]["library"] == "timm" and cfg["backbone"]["name"] == "test_resnet"
    assert cfg["backbone"]["pretrained"] is False
    assert cfg["source"] == {
        "dataset": "images",
        "split": "train",
        "objective": "supervised",
        "num_examples": 8,
        "label_names": ["cat", "dog"],
        "local": True,
    }
    card = (out / "README.md").read_text()
    assert "\ndatasets:" not in card and "base_model:" not in card  # local data, random init: no Hub claims
    assert cfg["learning"]["snapshots"] == 4 and cfg["learning"]["image_size"] == 32
    assert (out / "README.md").read_text().startswith("---")
    (checkpoint,) = (tmp_path / "ckpt").glob("checkpoint-*")  # the Trainer's, with the SWAG collector inside
    assert (checkpoint / "swag_collector.safetensors").is_file()


def test_card_of_a_random_init_on_local_data_claims_only_what_was_measured(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image")
    gen = torch.Generator().manual_seed(1)
    data = tmp_path / "my-data"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for i in range(5):
            pixels = (torch.rand(24, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
            image.fromarray(pixels).save(data / cls / f"{i}.png")
    out = tmp_path / "prior"
    options = ["--data", str(data), "--epochs", "2", "--batch-size", "4", "--collect-every", "1", "--rank", "2"]
    _learn(
        out, "test_resnet.r160_in1k", "--no-pretrained", *options, "--image-size", "32", "--validation-fraction", "0.2"
    )
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model is None and card.data.datasets is None  # random init, local data
    assert card.data.eval_results is None  # the held-out source accuracy is no transfer result
    assert json.loads((out / "config.json").read_text())["backbone"]["pretrained"] is False
    assert "pretrained=True" not in text and "r160_in1k" not in text and "default_weights" not in text
    assert "## Source task" in text and "No transfer results were recorded" in text
    assert "is a rule of thumb, not a measurement" in text
    assert "transfer experiments below recommend" not in text and "pip install priorzoo\n" not in text


def test_learn_timm_simclr_needs_no_labels(image_folder, tmp_path) -> None:
    prior = _learn(
        tmp_path / "ssl-prior",
        "test_resnet",
        "--no-pretrained",
        "--data",
        str(image_folder),
        "--objective",
        "simclr",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--rank",
        "2",
        "--image-size",
        "32",
        "--schedule",
        "cyclic",
        "--cycle-steps",
        "2",
        "--hub-dataset",
        "org/images",
    )
    assert prior.config.source["objective"] == "simclr"
    assert prior.config.source["hub_id"] == "org/images"  # --hub-dataset: the user marks the Hub dataset
    assert ModelCard.load(tmp_path / "ssl-prior" / "README.md").data.datasets == ["org/images"]
    assert prior.config.learning["schedule"] == "cyclic" and prior.config.learning["snapshots"] == 3
    assert not any("head" in n for n in prior.names)  # the projection head is not part of the prior


def test_learn_transformers_mlm_on_a_csv(tiny_bert, tmp_path) -> None:
    csv = tmp_path / "reviews.csv"
    csv.write_text(
        "review,stars\n"
        + "\n".join(
            f"the {a} {b} on a mat,{i % 2}"
            for i, (a, b) in enumerate(
                [("cat", "sat"), ("dog", "ran"), ("good", "movie"), ("bad", "film"), ("cat", "ran"), ("dog", "sat")]
            )
        )
        + "\n"
    )
    prior = _learn(
        tmp_path / "bert-prior",
        str(tiny_bert),
        "--data",
        str(csv),
        "--text-column",
        "review",
        "--objective",
        "mlm",
        "--epochs",
        "3",
        "--batch-size",
        "3",
        "--rank",
        "2",
        "--lr",
        "0.01",
    )
    assert prior.rank == 2 and all(n.startswith("bert.") for n in prior.names)
    assert prior.config.backbone["library"] == "transformers"
    assert prior.config.source["objective"] == "mlm" and prior.config.learning["snapshots"] == 3

    prior = _learn(  # supervised text classification on the `stars` column
        tmp_path / "bert-cls-prior",
        str(tiny_bert),
        "--data",
        str(csv),
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--objective",
        "supervised",
        "--epochs",
        "2",
        "--batch-size",
        "3",
        "--rank",
        "2",
    )
    assert all(n.startswith("bert.") for n in prior.names)  # the classifier head is left out
    assert prior.config.source["objective"] == "supervised"


def test_load_local_dataset_formats(tmp_path) -> None:
    import datasets

    from priorzoo.data.user import load_data as load_local_dataset

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_json(str(tmp_path / "d.jsonl"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("d.parquet", "d.jsonl", "saved", "saved_dict"):
        loaded = load_local_dataset(str(tmp_path / source))
        assert loaded["text"] == ["a", "b", "c"] and loaded["label"] == [0, 1, 0], source
    assert len(load_local_dataset(str(tmp_path / "saved_dict"), split="test")) == 1
    with pytest.raises(ValueError, match=r"no split 'validation'; splits: \['test', 'train'\]"):
        load_local_dataset(str(tmp_path / "saved_dict"), split="validation")


def test_learn_input_errors_are_reported(image_folder, tmp_path, capsys) -> None:
    base = ["learn", "test_resnet", "--no-pretrained", "--output", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--data", str(tmp_path / "data.xyz"), "--data-format", "csv"]) == 2
    (tmp_path / "data.xyz").write_text("x\n1\n")
    assert main([*base, "--data", str(tmp_path / "data.xyz")]) == 2
    assert "cannot tell the format of `.xyz` files" in capsys.readouterr().err
    assert main([*base, "--data", str(image_folder), "--objective", "mlm"]) == 2
    assert "`--objective mlm` needs a text column" in capsys.readouterr().err
    assert main([*base, "--data", str(image_folder), "--collect-every", "0"]) == 2
    assert "`--collect-every` must be ≥ 1" in capsys.readouterr().err
    assert main([*base, "--data", str(image_folder), "--rank", "0"]) == 2
    assert "`--rank` must be ≥ 2; received 0" in capsys.readouterr().err
    assert main([*base, "--data", str(image_folder), "--epochs", "1"]) == 2  # one epoch: one snapshot only
    assert "a prior needs at least 2" in capsys.readouterr().err


def test_string_label_column_is_not_taken_for_the_text():
    import datasets

    from priorzoo.data.user import Columns

    ds = datasets.Dataset.from_dict({"label": ["pos", "neg"], "sentence": ["good", "bad"]})
    cols = Columns(ds)
    assert (cols.image, cols.text, cols.label) == (None, "sentence", "label")


def _csv(path, text: str):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,label\na,0\nb,0\nc,0\n", r"has 1 class \(`label`: \['0'\]\); classification needs at least 2"),
        ("text,label\na,0\n", r"has 1 example\(s\); training needs at least 2"),
        ("text,label\na,0\nb,1,2\nc,1\n", r"`d.csv` line 3 has 3 fields, but the header \(text, label\) has 2"),
        (
            "text,label\na,0\nb,\nc,1\n",
            r"the label column `label` has 1 empty cell\(s\) in the training data \(rows 1\)",
        ),
        ("text,stars\na,0\nb,1\n", r"no label column in \['stars', 'text'\]"),
    ],
    ids=["one-class", "one-example", "uneven-rows", "empty-label", "no-label-column"],
)
def test_learn_refuses_unusable_data_before_training(tiny_bert, tmp_path, capsys, content, message) -> None:
    import re

    data = _csv(tmp_path / "d.csv", content)
    code = main(
        ["learn", str(tiny_bert), "--no-pretrained", "--data", data, "--output", str(tmp_path / "o"), "--no-progress"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.strip().splitlines()[-1].startswith("priorzoo learn: error: ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_learn_checks_the_output_before_training(image_folder, tmp_path, capsys) -> None:
    (tmp_path / "taken").write_text("a file")
    base = ["learn", "test_resnet", "--no-pretrained", "--data", str(image_folder), "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "taken"), "--epochs", "1000"]) == 2  # fails at once
    assert "exists and is a file, not a folder" in capsys.readouterr().err
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "bert"}')
    assert main([*base, "--output", str(model_dir), "--epochs", "1000"]) == 2
    assert "is not a priorzoo prior's" in capsys.readouterr().err
    assert (model_dir / "config.json").read_text() == '{"model_type": "bert"}'
    notes = tmp_path / "notes"  # a folder of other files: refused before training, not at the save after it
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    assert main([*base, "--output", str(notes), "--epochs", "1000"]) == 2
    assert "non-empty folder that holds no prior" in capsys.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["README.md"]
    for checkpoints in (tmp_path / "fresh", tmp_path / "fresh" / "ckpt"):  # the prior's folder holds the prior only
        assert main([*base, "--output", str(tmp_path / "fresh"), "--checkpoint-dir", str(checkpoints)]) == 2
        assert "is `--output-dir`" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()


def test_reusing_a_checkpoint_dir_with_other_settings_is_refused(image_folder, tmp_path, capsys) -> None:
    base = ["learn", "test_resnet", "--no-pretrained", "--data", str(image_folder), "--no-progress"]
    common = ["--epochs", "2", "--batch-size", "4", "--collect-every", "1", "--rank", "2", "--image-size", "32"]
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main([*base, *common, *ckpt, "--output", str(tmp_path / "a")]) == 0
    assert main([*base, *common, *ckpt, "--output", str(tmp_path / "b"), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds the state of another run (lr: stored 0.01, now 0.5)" in err
    assert not (tmp_path / "b").exists()
    other = tmp_path / "other"
    import shutil

    shutil.copytree(image_folder, other)
    shutil.rmtree(other / "dog")
    (other / "bird").mkdir()
    for i, f in enumerate(sorted((image_folder / "dog").iterdir())):
        shutil.copy(f, other / "bird" / f"{i}.png")
    assert (
        main(
            [
                "learn",
                "test_resnet",
                "--no-pretrained",
                "--data",
                str(other),
                "--no-progress",
                *common,
                *ckpt,
                "--output",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "holds the state of another run (data:" in capsys.readouterr().err
    # the same data and settings resume (more epochs continue the run)
    assert main([*base, *common, *ckpt, "--output", str(tmp_path / "a2")]) == 0


def test_learn_warns_when_the_prior_mean_is_at_chance_on_held_out_source_data(tmp_path, capsys) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    data = random_images(tmp_path / "images", 6, 2)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    torch.nn.init.zeros_(net.fc.weight)
    torch.nn.init.zeros_(net.fc.bias)  # every logit equal: the prediction is always class 0, never trained (lr 0)
    save_file(net.state_dict(), str(tmp_path / "zero-head.safetensors"))
    out = tmp_path / "prior"
    prior = _learn(
        out, "test_resnet", "--no-pretrained", "--checkpoint", str(tmp_path / "zero-head.safetensors"),
        "--data", str(data), "--epochs", "2", "--batch-size", "4", "--collect-every", "1", "--rank", "2",
        "--image-size", "32", "--lr", "0", "--validation-fraction", "0.5",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: the prior mean scores" in err and "no better than always answering" in err
    assert "no better than always answering" in prior.config.learning["warning"]
    (source,) = prior.config.results
    assert source["notes"].startswith("WARNING: at or below chance")
    assert "at or below chance" in (out / "README.md").read_text()


def _files_mentioning(folder, *needles: str) -> list[str]:
    return [
        f"{f.name}: {n}"
        for f in sorted(folder.rglob("*"))
        if f.is_file()
        for n in needles
        if n.encode() in f.read_bytes()
    ]


def test_a_learned_prior_records_no_local_path(image_folder, tmp_path) -> None:
    """The checkpoint by file name and sha256; the data, output and checkpoint folders by nothing local."""
    import hashlib
    import os

    timm = pytest.importorskip("timm")
    weights = tmp_path / "weights" / "start.pth"
    weights.parent.mkdir()
    torch.save(timm.create_model("test_resnet", num_classes=2).state_dict(), weights)
    out = tmp_path / "prior"
    options = ["test_resnet", "--no-pretrained", "--checkpoint", str(weights), "--data", str(image_folder)]
    options += ["--epochs", "2", "--batch-size", "4", "--collect-every", "1", "--rank", "3", "--image-size", "32"]
    _learn(out, *options, "--checkpoint-dir", str(tmp_path / "ckpt"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"]["checkpoint"] == "start.pth"
    assert cfg["backbone"]["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "start.pth" in (out / "README.md").read_text()
    assert _files_mentioning(out, str(tmp_path), os.path.expanduser("~")) == []
