"""`priorzoo finetune` end to end on tiny local backbones and data (offline): a BERT folder with a learned
prior, λ search and MAP; a timm model on an image folder with L2-SP and BMA; SGLD without a prior; bad
option combinations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _models import tiny_bert_config

from priorzoo import PriorModel
from priorzoo.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "actor", "the", "a", "was"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A random-init 2-layer BertModel (width 32) saved with a word-level tokenizer."""
    from transformers import BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = tiny_bert_config(vocab_size=5 + len(WORDS))
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_prior_folder(bert_folder, tmp_path_factory) -> Path:
    """A SWAG-kind prior over the BertModel's parameters, mean shifted away from the saved weights."""
    from transformers import BertModel

    model = BertModel.from_pretrained(bert_folder)
    g = torch.Generator().manual_seed(1)
    named = dict(model.named_parameters())
    prior = PriorModel.from_tensors(
        {n: p.detach() + 0.02 * torch.randn(p.shape, generator=g) for n, p in named.items()},
        {n: torch.full_like(p, 1e-3) for n, p in named.items()},
        {n: 0.01 * torch.randn((3, *p.shape), generator=g) for n, p in named.items()},
        backbone={"library": "transformers", "name": str(bert_folder)},
    )
    return prior.save_pretrained(tmp_path_factory.mktemp("prior") / "bert-prior")


def _text_csv(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    rows = ["text,label"]
    pos, neg = WORDS[:3], WORDS[3:6]
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        pool = pos if label == "pos" else neg
        words = [
            pool[int(torch.randint(0, 3, (1,), generator=g))],
            *[WORDS[6 + int(j)] for j in torch.randint(0, 6, (3,), generator=g)],
        ]
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _args(*extra: str) -> list[str]:
    return ["finetune", *extra, "--quiet", "--batch-size", "4", "--eval-batch-size", "8", "--max-length", "8"]


def _finetune(out: Path, *extra: str) -> dict:
    """Run `priorzoo finetune ... --output-dir out --allow-failure`, check that it succeeds, return its metrics.json.

    The tiny random BERTs here test the mechanics, not learning: a few steps may leave them at chance, which
    `--allow-failure` lets through (metrics.json still says so)."""
    code = main(_args(*extra, "--allow-failure", "--output-dir", str(out)))
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_bert_prior_tune_scale_map(bert_folder, bert_prior_folder, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train = _text_csv(tmp_path / "train.csv", 16, 0)
    test = _text_csv(tmp_path / "test.csv", 8, 1)
    out = tmp_path / "run"
    metrics = _finetune(
        out,
        str(bert_folder),
        "--prior",
        str(bert_prior_folder),
        "--data",
        str(train),
        "--test-data",
        str(test),
        "--tune-scale",
        "--scale-grid",
        "1,1000",
        "--tune-epochs",
        "1",
        "--epochs",
        "2",
        "--lr",
        "0.05",
    )
    assert metrics["method"] == "map"
    assert metrics["prior"]["init"] == "prior_mean" and metrics["prior"]["kind"] == "swag"
    search = metrics["scale_search"]
    assert [p["scale"] for p in search["curve"]] == [1.0, 1000.0]
    assert metrics["prior"]["scale"] == search["best_scale"]
    # 10% of 16 held out for the λ search; N counts only what is trained on
    assert metrics["num_train_examples"] == 14 and metrics["splits"]["validation"] == 2
    assert metrics["label_names"] == ["neg", "pos"]
    test_m = metrics["metrics"]["test"]
    assert test_m["num_examples"] == 8 and 0 <= test_m["accuracy"] <= 1 and test_m["nll"] > 0
    stored = json.loads((out / "model" / "priorzoo_finetune.json").read_text())
    assert stored["prior"]["scale"] == search["best_scale"]  # λ stored with the fine-tuned model
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_init_from_prior_is_the_default_and_can_be_turned_off(bert_folder, bert_prior_folder, tmp_path):
    from priorzoo.cli import build_parser
    from priorzoo.cli.finetune import prepare

    train = _text_csv(tmp_path / "train.csv", 8, 0)
    prior = PriorModel.from_pretrained(bert_prior_folder)
    mu = prior.mean["encoder.layer.0.attention.self.query.weight"]
    for flag, init in (([], "prior_mean"), (["--keep-backbone-weights"], "backbone")):
        args = build_parser().parse_args(
            _args(
                str(bert_folder),
                "--prior",
                str(bert_prior_folder),
                "--data",
                str(train),
                "--output-dir",
                str(tmp_path / "x"),
                *flag,
            )
        )
        setup = prepare(args)
        assert setup.init == init
        w = setup.model.bert.encoder.layer[0].attention.self.query.weight.detach()
        assert torch.equal(w, mu) is (init == "prior_mean")
        # λ = 1 raised for SGD stability at the largest rate of --lr auto: lr·ρ/(N·λ·v_min) = 0.1 / (8 · 1 · 1e-3)
        # = 12.5 > 1 → λ = 100
        assert prior.scale == 1.0 and setup.scale == 100.0


def test_integer_labels_are_names_and_splits_share_their_ids(bert_folder, tmp_path):
    """A 2-row CSV with labels 0 and 10⁸ has 2 classes (never a 10⁸-class head); a test split whose labels
    read as text ("100000000", "x") gets the same ids by name."""
    from priorzoo.cli import build_parser
    from priorzoo.cli.finetune import prepare

    train = tmp_path / "train.csv"
    train.write_text("text,label\ngood movie,0\nawful plot,100000000\n")
    test = tmp_path / "test.csv"
    test.write_text("text,label\nawful movie,100000000\ngood plot,0\nfine actor,x\n")
    args = build_parser().parse_args(
        _args(
            str(bert_folder),
            "--no-prior",
            "--data",
            str(train),
            "--test-data",
            str(test),
            "--output-dir",
            str(tmp_path),
        )
    )
    setup = prepare(args)
    assert setup.columns.names == ["0", "100000000", "x"]
    assert setup.model.classifier.out_features == 3
    assert setup.model.config.id2label == {0: "0", 1: "100000000", 2: "x"}
    test_ds = setup.eval_datasets["test"]
    labels = setup.collate([test_ds[i] for i in range(len(test_ds))])["labels"]
    assert labels.tolist() == [1, 0, 2]


def test_timm_image_folder_l2sp_bma(tmp_path):
    timm = pytest.importorskip("timm")

    _image_folders(tmp_path)
    out = tmp_path / "run"
    metrics = _finetune(
        out,
        "test_resnet",
        "--library",
        "timm",
        "--no-pretrained",
        "--l2sp",
        "0.01",
        "--data",
        str(tmp_path / "train"),
        "--test-data",
        str(tmp_path / "test"),
        "--image-size",
        "32",
        "--method",
        "bma",
        "--num-samples",
        "3",
        "--swag-rank",
        "2",
        "--epochs",
        "1",
        "--swag-epochs",
        "2",
        "--lr",
        "0.01",
    )
    assert metrics["prior"]["source"] == "l2sp" and metrics["prior"]["init"] == "backbone"
    assert metrics["metrics"]["test"]["num_samples"] == 3 and metrics["metrics"]["test"]["num_examples"] == 4
    assert metrics["training"]["swag"]["snapshots"] >= 2
    posterior = PriorModel.from_pretrained(out / "posterior")
    assert "fc.weight" in posterior.names  # the downstream posterior covers the new head too
    from safetensors.torch import load_file

    saved = load_file(str(out / "model" / "model.safetensors"))
    fresh = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    assert set(saved) == set(fresh.state_dict())  # the fine-tuned SWA-mean weights, loadable into the model
    fresh.load_state_dict(saved)


def test_sgld_without_prior(bert_folder, tmp_path):
    train = _text_csv(tmp_path / "train.csv", 8, 0)
    metrics = _finetune(
        tmp_path / "run",
        str(bert_folder),
        "--no-prior",
        "--data",
        str(train),
        "--validation-data",
        str(train),
        "--method",
        "sgld",
        "--epochs",
        "2",
        "--num-samples",
        "2",
        "--lr",
        "0.01",
    )
    assert metrics["prior"]["source"] is None and metrics["prior"]["scale"] is None
    assert metrics["training"]["sgld"]["samples"] == 2
    assert metrics["metrics"]["validation"]["num_samples"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no-prior", "--scale", "10"], "need a prior"),
        (["--no-prior", "--tune-scale"], "need a prior"),
        (["--l2sp", "0.1", "--scale", "10", "--tune-scale"], "not both"),
        (["--l2sp", "0.1", "--scale-grid", "1,10"], "only used with"),
        (["--l2sp", "0.1", "--epochs", "0"], "--epochs"),
        (["--l2sp", "0.1", "--method", "bma", "--swag-rank", "1"], "--swag-rank"),
        (["--l2sp", "learned", "--tune-scale"], "not both"),
        (["--l2sp", "learned", "--scale", "10"], "leave out `--scale`"),
        (["--l2sp", "learned", "--method", "sgld"], "not sgld"),
        (["--l2sp", "learned", "--prior-weight", "2"], "`--prior-weight` must be 1 with a learned scale"),
    ],
)
def test_bad_option_combinations(extra, message, tmp_path, capsys):
    code = main(_args("bert", *extra, "--data", "missing.csv", "--output-dir", str(tmp_path)))
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--prior", "p", "--no-prior"], ["--scale", "0", "--l2sp", "1"], ["--l2sp", "-1"]])
def test_argparse_refusals(extra, tmp_path):
    with pytest.raises(SystemExit):
        main(_args("bert", *extra, "--data", "d.csv", "--output-dir", str(tmp_path)))


@pytest.mark.parametrize("which", ["prior", "l2sp"])
def test_learned_scale_records_scales_sigma_and_lr(which, bert_folder, bert_prior_folder, tmp_path):
    """`--scale learned` / `--l2sp learned` with `--lr auto`: no validation split, metrics.json records the learned λ
    per group, σ and the chosen lr."""
    train = _text_csv(tmp_path / "train.csv", 16, 0)
    test = _text_csv(tmp_path / "test.csv", 8, 1)
    prior = ["--prior", str(bert_prior_folder), "--scale", "learned"] if which == "prior" else ["--l2sp", "learned"]
    metrics = _finetune(
        tmp_path / "run",
        str(bert_folder),
        *prior,
        "--data",
        str(train),
        "--test-data",
        str(test),
        "--epochs",
        "2",
        "--lr",
        "auto",
        "--lr-grid",
        "0.01,0.05",
    )
    assert metrics["prior"]["scale"] == "learned" and metrics["num_train_examples"] == 16  # no validation split
    learned = metrics["prior"]["learned_scale"]
    assert sorted(learned["scales"]) == ["backbone", "head"] and all(v > 0 for v in learned["scales"].values())
    assert learned["sigma"] > 0 and learned["sigma"] != pytest.approx(1e-3)
    assert metrics["lr"] in (0.01, 0.05)


def test_prior_for_another_model_is_a_clean_error(bert_folder, tmp_path, capsys):
    wrong = PriorModel.from_tensors({"conv1.weight": torch.zeros(4, 3, 3, 3)}, variance=1.0)
    folder = wrong.save_pretrained(tmp_path / "wrong")
    train = _text_csv(tmp_path / "train.csv", 8, 0)
    code = main(
        _args(str(bert_folder), "--prior", str(folder), "--data", str(train), "--output-dir", str(tmp_path / "o"))
    )
    assert code == 2
    assert "no prior parameter matches" in capsys.readouterr().err


def test_a_diverging_run_fails_in_one_line_and_keeps_metrics_json(bert_folder, tmp_path, capsys):
    train = _text_csv(tmp_path / "train.csv", 12, 0)
    out = tmp_path / "run"
    code = main(
        _args(
            str(bert_folder),
            "--no-prior",
            "--data",
            str(train),
            "--epochs",
            "2",
            "--lr",
            "1e12",
            "--output-dir",
            str(out),
        )
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("priorzoo finetune: error: status diverged: the training loss became")
    assert "Traceback" not in "\n".join(err)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and "the training loss became" in metrics["reason"]
    assert metrics["arguments"]["lr"] == 1e12 and metrics["metrics"] == {}
    code = main(_args(str(bert_folder), "--no-prior", "--data", str(train), "--epochs", "2", "--lr", "1e12",
                      "--output-dir", str(out), "--allow-failure"))  # fmt: skip
    assert code == 0 and json.loads((out / "metrics.json").read_text())["status"] == "diverged"


def test_tune_scale_returns_the_model_it_scored(bert_folder, bert_prior_folder, tmp_path):
    train = _text_csv(tmp_path / "train.csv", 16, 0)
    val = _text_csv(tmp_path / "val.csv", 8, 2)
    metrics = _finetune(
        tmp_path / "run", str(bert_folder), "--prior", str(bert_prior_folder), "--data", str(train),
        "--validation-data", str(val), "--tune-scale", "--scale-grid", "1,1000", "--epochs", "2", "--lr", "0.05",
    )  # fmt: skip
    search = metrics["scale_search"]
    assert search["settings"]["epochs"] == 2  # tuning runs are as long as the final run by default
    best = next(p for p in search["curve"] if p["scale"] == search["best_scale"])
    # no retraining: the model evaluated at the end is the best checkpoint of the best λ's run
    assert metrics["metrics"]["validation"]["nll"] == pytest.approx(best["metrics"]["nll"], abs=1e-5)
    assert metrics["prior"]["scale"] == search["best_scale"] and metrics["training"]["map"]["scale"] == best["scale"]
    steps = [e["step"] for e in best["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == best["steps"]  # global steps, one entry per epoch


@pytest.mark.slow
def test_torchvision_resnet18_learn_then_finetune_end_to_end(tmp_path, capsys):
    pytest.importorskip("torchvision")
    _image_folders(tmp_path, (("train", 6), ("test", 2)), size=32)
    tv = ["resnet18", "--library", "torchvision", "--no-pretrained", "--image-size", "32"]
    learn = ["learn", *tv, "--data", str(tmp_path / "train"), "--epochs", "3", "--batch-size", "4"]
    assert main([*learn, "--rank", "2", "--output", str(tmp_path / "prior"), "--no-progress"]) == 0
    out = tmp_path / "run"
    code = main(
        ["finetune", *tv, "--prior", str(tmp_path / "prior"), "--data", str(tmp_path / "train"), "--test-data",
         str(tmp_path / "test"), "--epochs", "2", "--batch-size", "4", "--lr", "0.01", "--output-dir", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "epoch 1 (step 3): train loss" in printed and "epoch 2 (step 6): train loss" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["prior"]["init"] == "prior_mean"
    learned = PriorModel.from_pretrained(tmp_path / "prior")
    (source,) = learned.config.results  # the source solution's held-out accuracy, for the card
    assert source["task_name"] == "source task" and source["metric"] == "accuracy" and 0 <= source["value"] <= 1
    assert "source task" in (tmp_path / "prior" / "README.md").read_text()
    recommended = learned.config.recommended_scale
    assert metrics["prior"]["scale"] >= recommended  # the recommended λ, raised when SGD would be unstable
    assert [e["epoch"] for e in metrics["training"]["map"]["history"]] == [1, 2]
    assert metrics["metrics"]["test"]["num_examples"] == 4
    import torchvision
    from safetensors.torch import load_file

    fresh = torchvision.models.get_model("resnet18", num_classes=2)
    fresh.load_state_dict(load_file(str(out / "model" / "model.safetensors")))


def _image_folders(root: Path, sizes=(("train", 4), ("test", 2)), size: int = 16) -> Path:
    """``root/<split>/{cat,dog}/<i>.png``: dark and bright noisy ``size``² images (a learnable 2-class task)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in sizes:
        for cls, base in (("cat", 40), ("dog", 200)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = (base + 30 * torch.rand(size, size, 3, generator=g)).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_init_from_starts_at_the_prior_mean_and_buffers_without_a_prior_term(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from priorzoo.cli import build_parser
    from priorzoo.cli.finetune import prepare

    data = _image_folders(tmp_path / "images")
    net = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    g = torch.Generator().manual_seed(3)
    mean = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}
    buffers = {n: b + 0.5 for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))}
    prior = PriorModel.from_tensors(mean, variance=1e-3, buffers=buffers, exclude=["fc.*"])
    folder = prior.save_pretrained(tmp_path / "prior")
    argv = _args(
        "test_resnet", "--library", "timm", "--no-pretrained", "--no-prior", "--init-from", str(folder),
        "--data", str(data / "train"), "--test-data", str(data / "test"), "--image-size", "16", "--epochs", "1",
        "--lr", "0.01", "--allow-failure", "--output-dir", str(tmp_path / "run"),
    )  # fmt: skip
    setup = prepare(build_parser().parse_args(argv))
    assert setup.prior is None
    assert setup.start == {"weights": "prior_mean", "prior": str(folder), "buffers": len(buffers)}
    model_buffers = dict(setup.model.named_buffers())
    assert all(torch.equal(model_buffers[n], b) for n, b in buffers.items())  # the prior's batch-norm statistics
    params = dict(setup.model.named_parameters())
    assert all(torch.equal(params[n], m) for n, m in mean.items() if not n.startswith("fc."))  # at μ
    assert main(argv) == 0
    assert "starting point: the prior mean μ of" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["start"]["weights"] == "prior_mean" and metrics["prior"]["source"] is None
    assert metrics["prior"]["scale"] is None
    assert all("prior_term" not in e for e in metrics["training"]["map"]["history"])  # no prior term
    with pytest.raises(SystemExit):  # --init-from is the control arm of --no-prior / --l2sp, not of --prior
        build_parser().parse_args([*argv, "--keep-backbone-weights"])
    assert main(_args("x", "--prior", str(folder), "--init-from", str(folder), "--data", "d.csv",
                      "--output-dir", str(tmp_path / "o"))) == 2  # fmt: skip


def test_trainable_layers_keep_the_frozen_batch_norm_statistics_through_a_trainer_run(tmp_path):
    pytest.importorskip("timm")
    from safetensors.torch import load_file

    from priorzoo.cli import build_parser
    from priorzoo.cli.finetune import prepare

    data = _image_folders(tmp_path / "images")
    argv = _args(
        "test_resnet", "--library", "timm", "--no-pretrained", "--no-prior", "--trainable-layers", "1",
        "--data", str(data / "train"), "--image-size", "16", "--epochs", "2", "--lr", "0.05", "--allow-failure",
        "--output-dir", str(tmp_path / "run"),
    )  # fmt: skip
    start = {k: v.clone() for k, v in prepare(build_parser().parse_args(argv)).model.state_dict().items()}
    assert main(argv) == 0
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    frozen_bn = [k for k in start if k.startswith("bn1.") and "running" in k]
    assert frozen_bn and all(torch.equal(saved[k], start[k]) for k in frozen_bn)  # the stem is frozen: unchanged
    trained = [k for k in start if k.startswith("layer4.") and k.endswith("running_mean")] or [
        k for k in start if k.endswith("running_mean")
    ][-1:]
    assert any(not torch.equal(saved[k], start[k]) for k in trained)  # the trained block's statistics moved


def test_resume_continues_from_the_last_checkpoint(bert_folder, tmp_path, capsys):
    train = _text_csv(tmp_path / "train.csv", 8, 0)
    common = (str(bert_folder), "--no-prior", "--data", str(train), "--lr", "0.05", "--keep-checkpoints")
    first = _finetune(tmp_path / "run", *common, "--epochs", "2")
    assert [e["step"] for e in first["training"]["map"]["history"]] == [2, 4]
    assert (tmp_path / "run" / "checkpoints" / "map" / "checkpoint-4").is_dir()  # kept by --keep-checkpoints
    capsys.readouterr()
    code = main(_args(*common, "--epochs", "3", "--resume", "--allow-failure", "--output-dir", str(tmp_path / "run")))
    assert code == 0
    assert "resuming from " in capsys.readouterr().out  # (--quiet keeps it: it says what the run is)
    second = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["step"] for e in second["training"]["map"]["history"]] == [6]  # only the third epoch was trained


def test_resume_with_a_learned_scale_restores_sigma(bert_folder, bert_prior_folder, tmp_path, capsys):
    """`--scale learned --resume`: each checkpoint holds σ's state (learned_scale.safetensors), and the resumed run
    reads it (a checkpoint without it is refused rather than σ silently restarted)."""
    from priorzoo.finetune.learned_scale_checkpoint import STATE_FILE

    train = _text_csv(tmp_path / "train.csv", 8, 0)
    common = (str(bert_folder), "--prior", str(bert_prior_folder), "--scale", "learned", "--data", str(train))
    common += ("--lr", "0.05", "--keep-checkpoints", "--allow-failure")
    first = _finetune(tmp_path / "run", *common, "--epochs", "2")
    saved = tmp_path / "run" / "checkpoints" / "map" / "checkpoint-4" / STATE_FILE
    assert saved.is_file() and first["prior"]["learned_scale"]["sigma"] != pytest.approx(1e-3)
    assert main(_args(*common, "--epochs", "3", "--resume", "--output-dir", str(tmp_path / "run"))) == 0
    saved = saved.parents[1] / "checkpoint-6" / STATE_FILE
    assert saved.is_file()
    saved.unlink()
    capsys.readouterr()
    assert main(_args(*common, "--epochs", "4", "--resume", "--output-dir", str(tmp_path / "run"))) != 0
    assert "learned_scale.safetensors` does not exist" in capsys.readouterr().err


def test_a_last_batch_of_one_is_dropped_when_batch_norm_trains(tmp_path):
    """9 images in batches of 4 leave a last batch of one, on which timm's `test_resnet` (1×1 features at 16 px)
    cannot train its batch norm: that batch is dropped in training and in bma's batch-norm refreshes, and
    metrics.json says so; N (κ = D/N) is still 9."""
    pytest.importorskip("timm")
    data = _image_folders(tmp_path / "images", (("train", 5), ("test", 2)))
    (data / "train" / "dog" / "4.png").unlink()
    metrics = _finetune(
        tmp_path / "run", "test_resnet", "--library", "timm", "--no-pretrained", "--l2sp", "learned",
        "--data", str(data / "train"), "--test-data", str(data / "test"), "--image-size", "16", "--method", "bma",
        "--num-samples", "2", "--swag-rank", "2", "--swag-epochs", "2", "--epochs", "2", "--lr", "0.01",
    )  # fmt: skip
    assert metrics["drop_last_batch_of_one"] is True
    assert [e["step"] for e in metrics["training"]["map"]["history"]] == [2, 4]  # 2 batches of 4 per epoch
    assert metrics["training"]["swag"]["snapshots"] == 4 and metrics["training"]["swag"]["steps"] == 4
    learned = metrics["prior"]["learned_scale"]
    assert metrics["num_train_examples"] == 9
    assert learned["kappa"] == pytest.approx(sum(learned["groups"].values()) / 9)
    assert metrics["metrics"]["test"]["num_examples"] == 4


def test_resume_under_other_options_is_refused(bert_folder, bert_prior_folder, tmp_path, capsys):
    """`--resume` continues the checkpoints only under the options that wrote them (--epochs may grow): another
    --scale or --lr would continue the weights, the optimiser and σ under another objective, and metrics.json would
    describe a run that never happened."""
    train = _text_csv(tmp_path / "train.csv", 8, 0)
    out = tmp_path / "run"
    common = (str(bert_folder), "--prior", str(bert_prior_folder), "--data", str(train), "--keep-checkpoints")
    _finetune(out, *common, "--scale", "learned", "--lr", "0.05", "--epochs", "1")
    for changed, message in (
        (("--scale", "10", "--lr", "0.05"), "`--scale` 'learned' there, 10.0 now"),
        (("--scale", "learned", "--lr", "0.01"), "`--lr` 0.05 there, 0.01 now"),
    ):
        capsys.readouterr()
        code = main(_args(*common, *changed, "--epochs", "2", "--resume", "--output-dir", str(out)))
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and "resume with the same options" in err and "Traceback" not in err
    resumed = _finetune(out, *common, "--scale", "learned", "--lr", "0.05", "--epochs", "2", "--resume")
    assert [e["step"] for e in resumed["training"]["map"]["history"]] == [4]  # the same options: continued


def test_learned_scale_with_validation_data_records_the_restored_epochs_scales(
    bert_folder, bert_prior_folder, tmp_path
):
    """`--scale learned --validation-data`: the epoch of lowest validation NLL is restored, and metrics.json's λ and
    σ are that epoch's (they were the last epoch's, which the saved model never had)."""
    train = _text_csv(tmp_path / "train.csv", 16, 0)
    val = _text_csv(tmp_path / "val.csv", 8, 2)
    metrics = _finetune(
        tmp_path / "run", str(bert_folder), "--prior", str(bert_prior_folder), "--scale", "learned",
        "--data", str(train), "--validation-data", str(val), "--epochs", "2", "--lr", "0.01",
    )  # fmt: skip
    run = metrics["training"]["map"]
    assert run["best_epoch"] == 1 and len(run["history"]) == 2  # a restored epoch that is not the last
    first, last = (e["learned_scale"] for e in run["history"])
    assert first["sigma"] != last["sigma"]
    learned = metrics["prior"]["learned_scale"]
    assert learned["epoch"] == 1 and learned["sigma"] == first["sigma"] and learned["scales"] == first["scales"]
    assert sorted(learned["scales"]) == ["backbone", "head"] and learned["kappa"] > 0


def test_bma_with_a_learned_scale_continues_sigma_into_the_swag_phase(bert_folder, bert_prior_folder, tmp_path):
    """`--scale learned --method bma`: the SWAG phase goes on with the data-emphasized ELBO from the σ the MAP run
    learned (it restarted at σ = 1e-3), and records its own λ and σ."""
    train = _text_csv(tmp_path / "train.csv", 8, 0)
    metrics = _finetune(
        tmp_path / "run", str(bert_folder), "--prior", str(bert_prior_folder), "--scale", "learned",
        "--data", str(train), "--method", "bma", "--num-samples", "2", "--swag-rank", "2", "--swag-epochs", "2",
        "--epochs", "2", "--lr", "0.05",
    )  # fmt: skip
    first, swag = metrics["training"]["map"]["learned_scale"], metrics["training"]["swag"]["learned_scale"]
    assert first["sigma_init"] == pytest.approx(1e-3) and first["sigma"] != pytest.approx(1e-3)
    assert swag["sigma_init"] == first["sigma"] and swag["sigma"] != first["sigma"]
    assert metrics["prior"]["learned_scale"] == first and sorted(swag["scales"]) == ["backbone", "head"]


def test_seed_seeds_the_learned_scales_noise(bert_folder, tmp_path, monkeypatch):
    """--seed seeds a learned scale's noise ε (PriorTrainer's `prior_seed`) in every run; it was 0 whatever --seed
    said, so the seeds of a benchmark shared one noise stream."""
    from priorzoo.finetune import trainer

    seen = []
    original = trainer.PriorTrainerMixin.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("prior_seed"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(trainer.PriorTrainerMixin, "__init__", spy)
    train = _text_csv(tmp_path / "train.csv", 8, 0)
    _finetune(tmp_path / "run", str(bert_folder), "--l2sp", "learned", "--data", str(train), "--epochs", "1",
              "--lr-grid", "0.01,0.05", "--seed", "3")  # fmt: skip
    assert seen == [3, 3]  # both runs of the --lr auto search
