"""The prior folder's file names live in one module that saving, loading and the Hub code share."""

from __future__ import annotations

import ast
from pathlib import Path

import priorzoo
from priorzoo import hub, prior
from priorzoo.format import files, serialization

PACKAGE = Path(priorzoo.__file__).parent


def _imports(module) -> set[str]:
    """Every priorzoo module a module imports at run time, at top level or inside functions."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # annotations only: not an import at run time
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("priorzoo"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("priorzoo"))
    return out


def test_hub_and_serialization_do_not_import_prior():
    # the hub.py <-> prior.py cycle is broken: the Hub and the file code never import the model class
    for module in (files, hub, serialization):
        assert "priorzoo.prior" not in _imports(module), module.__name__
    assert _imports(files) == {"priorzoo.errors"}


def test_one_definition_of_the_file_names():
    for name in ("CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME"):
        assert getattr(prior, name) is getattr(files, name)
    texts = [p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py") if p.name != "files.py"]
    assert not any('= "prior.safetensors"' in t or "prior-\\d{5}" in t for t in texts)


def test_is_prior_weights():
    assert files.is_prior_weights("prior.safetensors")
    assert files.is_prior_weights("prior.safetensors.index.json")
    assert files.is_prior_weights("prior-00002-of-00010.safetensors")
    assert not files.is_prior_weights("prior-2-of-10.safetensors")
    assert not files.is_prior_weights("../prior.safetensors")
    assert not files.is_prior_weights("config.json")
