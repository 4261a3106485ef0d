"""The README's quick-start snippets run as written (against the local Hub-protocol server)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_five_quick_starts():
    assert len(python_blocks()) == 5


@pytest.mark.slow
def test_quick_starts_run_in_order(hub_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", hub_server.token)  # logged in, as `hf auth login` would do
    for i, block in enumerate(python_blocks(), start=1):
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": f"readme_{i}"})
    assert (tmp_path / "my-prior" / "prior.safetensors").is_file()
    assert hub_server.commit_count("me/resnet18-my-data-swag") >= 1


def _code_map() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index("## Where things live") : text.index("## Benchmarks")]


def test_the_code_map_lists_every_module_once():
    root = README.parent
    table = "\n".join(line for line in _code_map().splitlines() if line.startswith("|"))
    listed = re.findall(r"`(priorzoo/[\w/]+(?:\.py|/))`", table)
    folders = [p for p in listed if p.endswith("/")]  # an application folder stands for its modules
    modules = sorted(
        str(p.relative_to(root))
        for p in (root / "priorzoo").rglob("*.py")
        if p.name != "__init__.py" and not any(str(p.relative_to(root)).startswith(f) for f in folders)
    )
    files = [p for p in listed if p.endswith(".py")]
    assert sorted(set(files)) == sorted(files), "a module is listed twice"
    assert sorted(files) == modules


def test_the_code_map_lists_the_finetune_surface():
    import priorzoo.finetune as ft

    surface = _code_map().split("whose whole surface is", 1)[1].split("Applications", 1)[0]
    assert sorted(re.findall(r"`(\w+)`", surface)) == sorted(ft.__all__)


def test_the_complete_cli_commands_in_the_text_parse_as_written():
    """Every inline `priorzoo … --output-dir …` command of the README (a whole command, not an excerpt) is accepted
    by the parser as written."""
    import shlex

    from priorzoo.cli import build_parser

    text = README.read_text(encoding="utf-8")
    commands = [c for c in re.findall(r"`(priorzoo [^`]+)`", text) if "--output-dir" in c and "…" not in c]
    assert any(c.startswith("priorzoo record-scale ") for c in commands)
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert args.output_dir and callable(args.func), command
