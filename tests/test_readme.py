"""The README's quick-start snippets run as written (against the local Hub-protocol server)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_four_quick_starts():
    assert len(python_blocks()) == 4


@pytest.mark.slow
def test_quick_starts_run_in_order(hub_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", hub_server.token)  # logged in, as `hf auth login` would do
    for i, block in enumerate(python_blocks(), start=1):
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": f"readme_{i}"})
    assert (tmp_path / "my-prior" / "prior.safetensors").is_file()
    assert hub_server.commit_count("me/resnet18-my-data-swag") >= 1
