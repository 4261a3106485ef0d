"""CI runs what the README promises: `make test` lints (ruff check, ruff format --check) before the suite, and the
pre-commit hooks contributors run are the same ruff, at the version constraints.txt pins."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _recipe(target: str) -> tuple[list[str], str]:
    """``(prerequisites, recipe text)`` of a Makefile target."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    m = re.search(rf"^{target}:([^\n]*)\n((?:\t[^\n]*\n)*)", text, flags=re.M)
    assert m, f"no `{target}` target in the Makefile"
    return m.group(1).split(), m.group(2)


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_make_test_lints_before_the_suite() -> None:
    prerequisites, recipe = _recipe("test")
    assert "lint" in prerequisites and "pytest" in recipe
    _, lint = _recipe("lint")
    assert "ruff check ." in lint and "ruff format --check ." in lint


def test_pre_commit_runs_the_pinned_ruff() -> None:
    config = (ROOT / ".pre-commit-config.yaml").read_text(encoding="utf-8")
    assert "astral-sh/ruff-pre-commit" in config and "id: ruff-check" in config and "id: ruff-format" in config
    rev = re.search(r"rev:\s*v?([\d.]+)", config).group(1)
    pin = re.search(r"^ruff==([\d.]+)$", (ROOT / "constraints.txt").read_text(encoding="utf-8"), flags=re.M).group(1)
    assert rev == pin


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_lint_passes_on_the_tree() -> None:
    proc = subprocess.run(["make", "-s", "lint"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
