"""``priorzoo push / pull / list / inspect`` through ``priorzoo.cli.main`` against a local Hub server (no mocks)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, set_hf_offline
from huggingface_hub import ModelCard

from priorzoo import PriorModel
from priorzoo.cli import main

REPO = "org/tiny-swag"


def make_prior(folder: Path, *, seed: int = 0, max_shard_size: int | str = "2GB") -> Path:
    g = torch.Generator().manual_seed(seed)
    shapes = {"features.0.weight": (8, 3, 3, 3), "features.0.bias": (8,), "features.2.weight": (4, 8)}
    prior = PriorModel.from_tensors(
        {n: torch.randn(s, generator=g) for n, s in shapes.items()},
        {n: torch.rand(s, generator=g) * 1e-2 for n, s in shapes.items()},
        {n: 1e-2 * torch.randn(4, *s, generator=g) for n, s in shapes.items()},
        backbone={"library": "torch", "architecture": "TinyNet"},
        source={"dataset": "toy", "objective": "supervised"},
        learning={"method": "swag", "snapshots": 6},
        exclude=["head.*"],
        license="mit",
    )
    return prior.save_pretrained(folder, max_shard_size=max_shard_size)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def token(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    return hub_server.token


def test_push_pull_inspect_round_trip(
    hub_server: HubServer, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = make_prior(tmp_path / "prior")
    assert main(["push", str(local), REPO, "--message", "first prior"]) == 0
    out = capsys.readouterr().out
    assert f"pushed {local} to {hub_server.url}/{REPO} (main): commit" in out
    assert re.search(rf"  {re.escape(hub_server.url)}/{REPO}/commit/[0-9a-f]{{40}}\n", out)
    assert hub_server.commit_count(REPO) == 2  # the repo's initial commit + the prior

    # the generated card was re-rendered for the repo: snippets and model-index name it
    remote = hub_server.files(REPO)
    card = remote["README.md"].decode()
    assert f'PriorModel.from_pretrained("{REPO}")' in card and "path/to/this-prior" not in card
    assert ModelCard(card).data.library_name == "priorzoo"
    assert remote["prior.safetensors"] == (local / "prior.safetensors").read_bytes()
    assert (local / "README.md").read_text() != card  # the local folder itself was not modified

    # pushing the same folder again: no new commit
    assert main(["push", str(local), REPO]) == 0
    assert "no new commit" in capsys.readouterr().out
    assert hub_server.commit_count(REPO) == 2

    dest = tmp_path / "pulled"
    assert main(["pull", REPO, "--local-dir", str(dest)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"pulled {REPO} @ [0-9a-f]{{40}}: valid prior", out)
    assert "kind swag, rank K = 4, 3 tensors, 256 weights" in out
    pulled = files_of(dest)
    assert pulled == {name: remote[name] for name in ("README.md", "config.json", "prior.safetensors")}
    original = PriorModel.from_pretrained(local)
    again = PriorModel.from_pretrained(dest)
    assert all(torch.equal(original.cov_factor[n], again.cov_factor[n]) for n in original.names)

    plot = tmp_path / "scales.png"
    assert main(["inspect", REPO, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("priorzoo prior: kind swag, rank K = 4, λ = 1, eps = 0")
    assert "features.0.weight" in out and f"wrote the per-layer prior scale plot to {plot}" in out
    assert plot.read_bytes().startswith(b"\x89PNG")

    assert main(["inspect", str(dest), "--json", "--scale", "100"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_parameters"] == 256 and summary["evaluated_scale"] == 100.0
    assert [layer["name"] for layer in summary["layers"]] == original.names


def test_pull_works_offline_after_one_download(
    hub_server: HubServer,
    token: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["push", str(make_prior(tmp_path / "p", max_shard_size=1000)), REPO])  # sharded
    assert main(["pull", REPO]) == 0
    capsys.readouterr()
    served = len(hub_server.requests)

    set_hf_offline(monkeypatch)
    assert main(["pull", REPO]) == 0
    assert "valid prior" in capsys.readouterr().out
    assert main(["inspect", REPO]) == 0
    assert len(hub_server.requests) == served  # nothing was asked from the server
    capsys.readouterr()

    assert main(["pull", "org/never-downloaded"]) == 2
    err = capsys.readouterr().err
    assert "you are offline (HF_HUB_OFFLINE=1) and it is not in the cache" in err


def test_revision_subfolder_private_and_keep_card(
    hub_server: HubServer, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = make_prior(tmp_path / "a", seed=1), make_prior(tmp_path / "b", seed=2)
    (b / "README.md").write_text("---\nlibrary_name: priorzoo\n---\n# hand-written card\n")
    assert main(["push", str(a), "me/zoo", "--private", "--subfolder", "swag/a"]) == 0
    assert main(["push", str(b), "me/zoo", "--revision", "dev", "--subfolder", "swag/b"]) == 0
    capsys.readouterr()
    assert hub_server.files("me/zoo", revision="dev")["swag/b/README.md"] == (b / "README.md").read_bytes()

    b2 = str(tmp_path / "b2")
    assert main(["pull", "me/zoo", "--revision", "dev", "--subfolder", "swag/b", "--local-dir", b2]) == 0
    assert "(subfolder swag/b): valid prior" in capsys.readouterr().out
    assert files_of(tmp_path / "b2") == files_of(b)

    # the repo is private: without the token it does not exist
    assert main(["pull", "me/zoo", "--subfolder", "swag/a", "--token", "hf_not_a_valid_token"]) == 2
    assert "Can't find 'config.json' at 'me/zoo'" in capsys.readouterr().err

    keep = make_prior(tmp_path / "keep", seed=3)
    assert main(["push", str(keep), "org/kept", "--keep-card"]) == 0
    assert hub_server.files("org/kept")["README.md"] == (keep / "README.md").read_bytes()


def test_clear_errors(hub_server: HubServer, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "org/missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("priorzoo pull: error: Can't find 'config.json' at 'org/missing': repository not found")

    main(["push", str(make_prior(tmp_path / "p")), REPO])
    capsys.readouterr()
    assert main(["pull", REPO, "--revision", "v9"]) == 2
    assert "revision not found" in capsys.readouterr().err

    assert main(["push", str(tmp_path / "nowhere"), REPO]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), REPO]) == 2
    assert "no config.json" in capsys.readouterr().err

    assert main(["inspect", "org/missing"]) == 2
    assert "priorzoo inspect: error: Can't find 'config.json'" in capsys.readouterr().err

    clutter = tmp_path / "clutter"
    clutter.mkdir()
    (clutter / "notes.txt").write_text("mine")
    assert main(["pull", REPO, "--local-dir", str(clutter)]) == 2
    assert "non-empty folder that holds no prior" in capsys.readouterr().err
    assert sorted(p.name for p in clutter.iterdir()) == ["notes.txt"]

    # a folder that holds only a hidden side folder is not empty either: nothing of it is followed or replaced
    side = tmp_path / "side"
    (side / ".priorzoo-commit").mkdir(parents=True)
    (side / ".priorzoo-commit" / "manifest.json").write_text('{"files": ["../outside.txt"]}')
    assert main(["pull", REPO, "--local-dir", str(side)]) == 2
    assert "non-empty folder that holds no prior (no config.json; it has '.priorzoo-commit')" in capsys.readouterr().err
    assert not (tmp_path / "outside.txt").exists() and not (side / "config.json").exists()

    with pytest.raises(SystemExit):  # hf's spelling only: no alias, and no abbreviation of `--token`
        main(["pull", REPO, "--to", str(tmp_path / "old-spelling")])
    assert "unrecognized arguments: --to" in capsys.readouterr().err


def test_list_shows_the_priors(
    hub_server: HubServer, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list"]) == 0
    assert f"no priors found at {hub_server.url}" in capsys.readouterr().out

    main(["push", str(make_prior(tmp_path / "p")), "org/one-prior"])
    main(["push", str(make_prior(tmp_path / "q", seed=1)), "other/two-prior"])
    capsys.readouterr()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "org/one-prior" in out and "other/two-prior" in out and "2 prior(s)" in out
    assert re.search(r"repo\s+kind\s+base model\s+architecture\s+license", out)
    assert re.search(r"org/one-prior\s+swag\s+-\s+\S+\s+mit", out)

    assert main(["list", "--author", "other", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["other/two-prior"]
    assert rows[0]["kind"] == "swag" and rows[0]["license"] == "mit" and "priorzoo" in rows[0]["tags"]
    assert main(["list", "--search", "one"]) == 0
    assert "other/two-prior" not in capsys.readouterr().out


def test_list_by_backbone(
    hub_server: HubServer, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = torch.Generator().manual_seed(0)
    r18 = PriorModel.from_tensors(
        {"fc.weight": torch.randn(2, 3, generator=g)},
        variance=1.0,
        backbone={
            "library": "timm",
            "name": "resnet18.a1_in1k",
            "hub_id": "timm/resnet18.a1_in1k",
            "pretrained": True,
            "architecture": "resnet18",
        },
    )
    main(["push", str(r18.save_pretrained(tmp_path / "r18")), "zoo/r18-swag"])
    main(["push", str(make_prior(tmp_path / "tiny")), "zoo/tiny-swag"])
    hand = make_prior(tmp_path / "hand", seed=1)  # a card that records the architecture, as priorzoo's cards do
    (hand / "README.md").write_text("---\nlibrary_name: priorzoo\npriorzoo:\n  architecture: ConvNeXt\n---\n# hand\n")
    main(["push", str(hand), "zoo/hand-swag", "--keep-card"])
    capsys.readouterr()

    for name in ("timm/resnet18.a1_in1k", "resnet18.a1_in1k", "RESNET18"):
        assert main(["list", "--backbone", name]) == 0
        out = capsys.readouterr().out
        assert "zoo/r18-swag" in out and "zoo/tiny-swag" not in out and "1 prior(s)" in out, (name, out)
        assert re.search(r"zoo/r18-swag\s+\S+\s+timm/resnet18\.a1_in1k\s", out)
    assert main(["list", "--backbone", "convnext", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["architecture"]) for r in rows] == [("zoo/hand-swag", ["ConvNeXt"])]
    assert main(["list", "--backbone", "tinynet", "--json"]) == 0  # the architecture a generated card records
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["zoo/tiny-swag"]
    assert main(["list", "--backbone", "vit_base_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "no priors found" in out and "backbone 'vit_base_patch16_224'" in out


def test_push_create_pr(hub_server: HubServer, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(make_prior(tmp_path / "a")), REPO]) == 0
    head = hub_server.files(REPO)
    assert main(["push", str(make_prior(tmp_path / "b", seed=1)), REPO, "--create-pr"]) == 0
    out = capsys.readouterr().out
    assert f"opened a pull request on {hub_server.url}/{REPO} (main): {hub_server.url}/{REPO}/discussions/1" in out
    assert hub_server.files(REPO) == head  # main is untouched
    assert (
        hub_server.files(REPO, revision="refs/pr/1")["prior.safetensors"]
        == (tmp_path / "b" / "prior.safetensors").read_bytes()
    )
