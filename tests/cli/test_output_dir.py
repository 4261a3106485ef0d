"""`--output-dir` is the one spelling of the output folder across the CLI (old flags stay as aliases); `pull`
spells its copy `--local-dir`, as `hf download` does."""

from __future__ import annotations

import pytest

from priorzoo.cli import build_parser, main


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--output-dir", "out"],
        ["demo", "--output", "out"],
        ["demo", "-o", "out"],
        ["pull", "me/prior", "--local-dir", "out"],  # `hf download`'s spelling (a copy besides the cache)
        ["finetune", "bert", "--no-prior", "--data", "d.csv", "--output-dir", "out"],
        ["learn", "resnet18", "--data", "d", "--output-dir", "out"],
        ["learn", "resnet18", "--data", "d", "--output", "out"],
        ["record-scale", "./prior", "--run", "runs/learned", "--output-dir", "out"],
    ],
)
def test_output_folder_flags(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (getattr(args, "output_dir", None) or getattr(args, "local_dir", None)) == "out"


def test_convert_takes_the_output_folder_once(tmp_path, capsys) -> None:
    args = build_parser().parse_args(["convert", "official", "prefix", "--output-dir", "out"])
    assert (args.output, args.output_dir) == (None, "out")
    assert main(["convert", "official", str(tmp_path / "p"), str(tmp_path / "a"), "--output-dir", "b"]) == 2
    assert "give the output folder once" in capsys.readouterr().err
    assert main(["convert", "official", str(tmp_path / "p")]) == 2
