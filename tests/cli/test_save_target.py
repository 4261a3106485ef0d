"""Every command that saves a prior refuses a folder that holds something else with the save's own check
(`PriorTargetError`), worded with the command's own option: `--overwrite` where the user names the prior's folder
(learn, convert, pull), another `--output-dir` where the prior goes into a sub-folder of the results (finetune's
posterior/, demo's prior/). Never the library's `overwrite=True`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from priorzoo import PriorModel
from priorzoo.cli import main


def _notes(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("my notes")
    return folder


def _refusal(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"priorzoo {command}: error: "), err
    assert "non-empty folder that holds no prior" in err and "overwrite=True" not in err, err
    return err


def test_learn_names_its_overwrite_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = _notes(tmp_path / "notes")
    base = ["learn", "test_resnet", "--no-pretrained", "--data", str(tmp_path / "no-data"), "--output-dir", str(notes)]
    assert main(base) == 2
    err = _refusal(capsys, "learn")
    assert f"`--output-dir` {str(notes)!r}" in err and "pass `--overwrite`" in err
    assert main([*base, "--overwrite"]) == 2  # past the folder check: it fails at the missing data instead
    assert "no-data" in capsys.readouterr().err
    assert [p.name for p in notes.iterdir()] == ["README.md"]


@pytest.mark.parametrize("spelling", ["positional", "--output-dir"])
def test_convert_names_its_overwrite_option(tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str) -> None:
    notes = _notes(tmp_path / "notes")
    base = ["convert", "official", str(tmp_path / "missing-prefix")]
    base += [str(notes)] if spelling == "positional" else ["--output-dir", str(notes)]
    assert main(base) == 2
    err = _refusal(capsys, "convert")
    option = "OUTPUT" if spelling == "positional" else "--output-dir"
    assert f"`{option}` {str(notes)!r}" in err and "pass `--overwrite`" in err
    assert main([*base, "--overwrite"]) == 2  # past the folder check: the release's files are missing
    assert "missing" in capsys.readouterr().err


def test_pull_names_its_overwrite_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = PriorModel.from_tensors({"w": torch.zeros(3)}, variance=1.0).save_pretrained(tmp_path / "prior")
    notes = _notes(tmp_path / "notes")
    assert main(["pull", str(source), "--local-dir", str(notes)]) == 2
    err = _refusal(capsys, "pull")
    assert f"`--local-dir` {str(notes)!r}" in err and "pass `--overwrite`" in err
    assert main(["pull", str(source), "--local-dir", str(notes), "--overwrite"]) == 0
    assert (notes / "README.md").read_text() != "my notes"  # the card replaced it, as --overwrite's help says
    assert PriorModel.from_pretrained(notes).num_parameters == 3


def test_finetune_bma_names_its_output_dir_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _notes(out / "posterior")
    argv = ["finetune", "no-such-backbone", "--no-prior", "--data", str(tmp_path / "no.csv"), "--output-dir", str(out)]
    assert main([*argv, "--method", "bma"]) == 2  # refused before the backbone or the data is read
    err = _refusal(capsys, "finetune")
    assert f"`--output-dir/posterior` {str(out / 'posterior')!r}" in err
    assert "Choose another `--output-dir`" in err and "--overwrite" not in err
    assert main([*argv, "--method", "map"]) == 2  # map saves no posterior: its folder is not checked
    assert "non-empty folder" not in capsys.readouterr().err


def test_demo_names_its_output_dir_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    _notes(out / "prior")
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
    err = _refusal(capsys, "demo")
    assert f"`--output-dir/prior` {str(out / 'prior')!r}" in err
    assert "Choose another `--output-dir`" in err and "--overwrite" not in err
    assert sorted(p.name for p in out.iterdir()) == ["prior"]
