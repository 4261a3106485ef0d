"""`priorzoo record-scale` end to end: a real tiny `priorzoo finetune --scale learned` run of a timm prior, recorded
on a copy of the prior (same tensors, measured recommended λ, results on the card, no local path), and its
refusals (another prior, a fixed-λ run, a folder that is not a prior, no metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_finetune_cli import _args, _image_folders

from priorzoo import PriorModel
from priorzoo.cli import main
from priorzoo.format.content_id import content_id

pytest.importorskip("timm")
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def prior_folder(tmp_path_factory) -> Path:
    """A diagonal-kind prior (with batch-norm statistics) over timm's `test_resnet`, its head `fc.*` excluded."""
    import timm

    torch.manual_seed(0)  # a seed whose run ends above chance (status ok), checked by `learned_run`
    net = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    g = torch.Generator().manual_seed(3)
    mean = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}
    variance = {n: 1e-3 * (1 + torch.rand(m.shape, generator=g)) for n, m in mean.items()}
    buffers = {n: b.clone() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))}
    prior = PriorModel.from_tensors(
        mean, variance, exclude=["fc.*"], buffers=buffers, backbone={"library": "timm", "name": "test_resnet"}
    )
    return prior.save_pretrained(tmp_path_factory.mktemp("prior") / "resnet-prior")


@pytest.fixture(scope="module")
def learned_run(prior_folder, tmp_path_factory) -> Path:
    """`priorzoo finetune --prior P --scale learned` on a learnable 2-class image task (dark vs bright), test data."""
    root = tmp_path_factory.mktemp("record-scale")
    data = _image_folders(root / "tiny-images", (("train", 8), ("test", 4)))
    out = root / "run"
    argv = _args(
        "test_resnet", "--library", "timm", "--no-pretrained", "--prior", str(prior_folder), "--scale", "learned",
        "--data", str(data / "train"), "--test-data", str(data / "test"), "--image-size", "16", "--epochs", "3",
        "--lr", "0.1", "--output-dir", str(out),
    )  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "ok"
    return out


def test_finetune_records_the_priors_content_id(learned_run, prior_folder):
    metrics = json.loads((learned_run / "metrics.json").read_text())
    assert metrics["prior"]["content_id"] == content_id(PriorModel.from_pretrained(prior_folder))


def test_record_scale_writes_a_copy_with_the_measured_scale_and_results(
    learned_run,
    prior_folder,
    tmp_path,
    capsys,
):
    before = {f.name: f.read_bytes() for f in prior_folder.iterdir() if f.is_file()}
    out = tmp_path / "measured"
    code = main(["record-scale", str(prior_folder), "--run", str(learned_run), "--output-dir", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    metrics = json.loads((learned_run / "metrics.json").read_text())
    learned = metrics["prior"]["learned_scale"]
    d, n = sum(learned["groups"].values()), metrics["num_train_examples"]
    expected = learned["scales"]["backbone"] * d / n

    original, updated = PriorModel.from_pretrained(prior_folder), PriorModel.from_pretrained(out)
    assert updated.config.recommended_scale == pytest.approx(expected, rel=1e-12)
    assert content_id(updated) == content_id(original)  # same density and tensors
    for name in original.names:
        assert torch.equal(updated.mean[name], original.mean[name])
        assert torch.equal(updated.variance[name], original.variance[name])
    assert all(torch.equal(updated.buffers[n], b) for n, b in original.buffers.items()) and original.buffers
    assert [r["metric"] for r in updated.config.results] == ["accuracy", "nll", "ece"]
    assert updated.config.results[0]["value"] == metrics["metrics"]["test"]["accuracy"]
    assert updated.config.results[0]["dataset"] == "train"  # the data's name, not its path

    card = (out / "README.md").read_text()
    assert "The recommended **λ = " in card and "was measured: on train (N = 16" in card
    assert "SGD + this prior, λ learned (DE-ELBO)" in card and "data-emphasized ELBO" in card
    published = (out / "config.json").read_text() + card
    assert str(tmp_path.parent) not in published and str(learned_run) not in published
    assert "recommended λ =" in printed.out and "results on train (test): accuracy" in printed.out
    # the input prior is untouched
    assert {f.name: f.read_bytes() for f in prior_folder.iterdir() if f.is_file()} == before

    # a second record (another task name) onto the updated prior: the run still names its content
    code = main(["record-scale", str(out), "--run", str(learned_run), "--task", "again", "--output-dir", str(out)])
    assert code == 0
    assert [r["dataset"] for r in PriorModel.from_pretrained(out).config.results][-1] == "again"


def test_record_scale_refusals(learned_run, prior_folder, tmp_path, capsys):
    prior = str(prior_folder)
    # a folder of other files, unless --overwrite
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    assert main(["record-scale", prior, "--run", str(learned_run), "--output-dir", str(notes)]) == 2
    assert "holds no prior" in capsys.readouterr().err
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert main(["record-scale", prior, "--run", str(learned_run), "--output-dir", str(notes), "--overwrite"]) == 0
    assert (notes / "todo.txt").is_file() and (notes / "config.json").is_file()

    # another prior (same shapes, other mean)
    other_prior = PriorModel.from_pretrained(prior_folder)
    other_prior.mean = {n: m + 1.0 for n, m in other_prior.mean.items()}
    other = other_prior.save_pretrained(tmp_path / "other-prior")
    assert main(["record-scale", str(other), "--run", str(learned_run), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "another prior" in err and content_id(other_prior) in err
    assert not (tmp_path / "o").exists()

    # a fixed-λ run
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    metrics = json.loads((learned_run / "metrics.json").read_text())
    metrics["prior"]["scale"] = 1000.0
    (fixed / "metrics.json").write_text(json.dumps(metrics))
    assert main(["record-scale", prior, "--run", str(fixed), "--output-dir", str(tmp_path / "f")]) == 2
    assert "fixed λ" in capsys.readouterr().err

    # no metrics.json
    assert main(["record-scale", prior, "--run", str(tmp_path / "none"), "--output-dir", str(tmp_path / "n")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_record_scale_reads_a_hub_prior_and_leaves_the_cache_alone(
    learned_run, prior_folder, hub_server, monkeypatch, tmp_path, capsys
):
    """PRIOR as a Hub repo id (the local Hub-protocol server): read through the cache, recorded into --output-dir
    only; the card's snippets name the repo."""
    import os

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo = "me/resnet-prior"
    assert main(["push", str(prior_folder), repo]) == 0
    out = tmp_path / "measured"
    assert main(["record-scale", repo, "--run", str(learned_run), "--output-dir", str(out)]) == 0, capsys.readouterr()
    assert f'PriorModel.from_pretrained("{repo}")' in (out / "README.md").read_text()
    assert PriorModel.from_pretrained(out).config.learning["recommended_scale_measured"].startswith("on train (")
    cached = list(Path(os.environ["HF_HUB_CACHE"]).rglob("config.json"))
    assert cached and all("recommended_scale_measured" not in p.read_text() for p in cached)
