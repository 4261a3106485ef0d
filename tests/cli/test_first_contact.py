"""What a new user sees first: help for every option, "did you mean" for backbone names and flags (with the
subcommand's usage), the offline hint, one line per local dataset read, one `warning:` line per warning, the
result lines under --quiet, σ² of an L2-SP run."""

from __future__ import annotations

import argparse

import pytest

from priorzoo.cli import build_parser, main


def _all_parsers(parser: argparse.ArgumentParser, name: str = "priorzoo"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_subcommand_has_help():
    missing = [
        (name, action.option_strings or action.dest)
        for name, parser in _all_parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction))
        and not action.help
    ]
    assert missing == []


def test_a_mistyped_flag_names_the_subcommand_usage_and_the_flag_meant(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["learn", "resnet18", "--data", "d", "--output-dir", "o", "--rnak", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: priorzoo learn ")
    assert "priorzoo learn: error: unrecognized arguments: --rnak (did you mean --rank?)" in err


def test_a_mistyped_backbone_name_gets_did_you_mean(monkeypatch):
    from priorzoo.backbones import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"Unknown model resnet181; did you mean resnet18 \(torchvision\)"):
        load_backbone("resnet181", library="torchvision", pretrained=False)
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"Unknown model \(resnet181\); did you mean resnet18 \(timm\)"):
        load_backbone("resnet181", library="timm", pretrained=False)
    pytest.importorskip("transformers")
    with pytest.raises(ValueError) as err:  # not reported as a failed transformers download
        load_backbone("resnet181", pretrained=False)
    assert str(err.value).startswith("unknown backbone 'resnet181': not a timm model, a torchvision model")
    assert "did you mean resnet18 (timm)" in str(err.value)


def test_offline_with_pretrained_weights_says_what_to_pass(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    from priorzoo.backbones import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: the weights cannot be there
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE is set.*pass --no-pretrained .*--checkpoint FILE"):
        load_backbone("resnet18", library="timm", pretrained=True)


def test_a_local_image_run_prints_what_it_reads_and_the_result_lines_under_quiet(tmp_path, capsys, monkeypatch):
    pytest.importorskip("timm")
    from test_finetune_cli import _image_folders

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = _image_folders(tmp_path / "images")
    common = ["finetune", "test_resnet", "--library", "timm", "--no-pretrained", "--data", str(data / "train"),
              "--test-data", str(data / "test"), "--image-size", "16", "--epochs", "1", "--lr", "0.01",
              "--allow-failure", "--rank", "2"]  # fmt: skip
    with pytest.raises(SystemExit):  # (a flag of `learn`, not of `finetune`)
        main([*common, "--no-prior", "--output-dir", str(tmp_path / "x")])
    common = common[:-2]
    assert main([*common, "--l2sp", "0.01", "--output-dir", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert f"reading 8 images from {data / 'train'} (2 class folders)" in out
    assert "σ² = 0.01" in out and "λ = 1" not in out  # L2-SP is announced by its variance
    assert "Generating train split" not in err and "Downloading" not in err
    assert main([*common, "--no-prior", "--quiet", "--output-dir", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "reading" not in out and "epoch" not in out
    assert "test: accuracy" in out and "wrote " in out  # --quiet keeps the result lines


def test_warnings_print_as_one_line(tmp_path, capsys):
    pytest.importorskip("timm")
    from test_learn_cli import random_images

    random_images(tmp_path / "d", 3, 0, size=8)
    argv = ["learn", "test_resnet", "--no-pretrained", "--data", str(tmp_path / "d"), "--epochs", "2",
            "--rank", "5", "--image-size", "16", "--batch-size", "3", "--output-dir", str(tmp_path / "p"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0  # 2 snapshots for rank 5: the collector warns
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "fewer than the requested rank" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: SWAGCollector") and ".py:" not in err
