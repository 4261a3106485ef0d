"""The package's shape: imports point down the pipeline, no import circle (type-only imports included), no private
module used across subpackages, every ``__all__`` sorted, applications on public names only, no control characters.

Layers, bottom to top (a module imports only from its own layer or lower ones):

=========  =========================================================================================
bottom     ``errors``, ``enums``, ``_version``, ``_validation``, ``gaussian`` (the maths), ``numerics``, ``batches``
format     ``priorzoo.format``: config, file layout, save/load, tensor checks, model cards
hub        ``priorzoo.hub`` (download / upload / list)
binding    ``priorzoo.binding`` and the ``PriorModel`` facade (``priorzoo.prior``, ``priorzoo``)
learn      ``priorzoo.learn``: learning a prior on a source task
finetune   ``priorzoo.finetune``: using a prior downstream
apps       ``backbones``, ``data``, ``convert``, ``inspect``, ``cli``, ``demo``
=========  =========================================================================================
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "priorzoo"
SOURCE_FOLDERS = ("priorzoo", "tests", "benchmarks", "upload_scripts", "tools")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "bottom",
        (
            "priorzoo.validation",
            "priorzoo._version",
            "priorzoo.batches",
            "priorzoo.enums",
            "priorzoo.errors",
            "priorzoo.gaussian",
            "priorzoo.numerics",
        ),
    ),
    ("format", ("priorzoo.format",)),
    ("hub", ("priorzoo.hub", "priorzoo.hub_limits", "priorzoo.hub_list")),
    ("binding", ("priorzoo.binding", "priorzoo.prior", "priorzoo")),
    ("learn", ("priorzoo.learn",)),
    ("finetune", ("priorzoo.finetune",)),
    (
        "apps",
        (
            "priorzoo.backbones",
            "priorzoo.cli",
            "priorzoo.convert",
            "priorzoo.data",
            "priorzoo.demo",
            "priorzoo.inspect",
        ),
    ),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts if path.is_relative_to(ROOT) else (path.stem,)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every import in ``path``: top level, inside functions and under
    ``TYPE_CHECKING`` alike (a type-only import is a dependency in meaning)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, [a.name for a in node.names]))
    return found


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _import_graph() -> dict[str, set[str]]:
    modules = _package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _imports(path):
            targets = [f"{module}.{n}" for n in names] if names else []
            for target in [module, *targets]:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def _layer(module: str) -> int:
    """The index in :data:`LAYERS` of ``module`` (its longest listed prefix decides)."""
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    if found is None:
        raise AssertionError(f"`{module}` is in no layer: add it to LAYERS in tests/test_architecture.py")
    return found


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
        for m, targets in graph.items()
        for t in targets
        if _layer(t) > _layer(m)
    )


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_type_only_imports_count(tmp_path: Path) -> None:
    script = tmp_path / "x.py"
    script.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from priorzoo.prior import PriorModel\n"
    )
    assert ("priorzoo.prior", ["PriorModel"]) in _imports(script)


def test_no_import_cycle_inside_the_package() -> None:
    graph = _import_graph()
    assert "priorzoo.prior" in graph and "priorzoo.hub" in graph
    assert _cycles(graph) == []


def test_every_module_is_in_a_layer() -> None:
    for module in _package_modules():
        _layer(module)


def test_the_layer_check_catches_an_upward_import() -> None:
    assert _upward({"priorzoo.learn.swag": {"priorzoo.finetune.batchnorm"}, "priorzoo.finetune.batchnorm": set()}) == [
        "priorzoo.learn.swag (learn) imports priorzoo.finetune.batchnorm (finetune)"
    ]


def test_imports_point_down_the_pipeline() -> None:
    assert _upward(_import_graph()) == []


def _private_module_uses(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> module`` where ``module`` is private (``a.b._c``) and ``importer`` is not inside ``a.b``."""
    bad = []
    for importer, targets in graph.items():
        for target in targets:
            parts = target.split(".")
            private = [i for i, p in enumerate(parts) if p.startswith("_") and p != "__init__"]
            if not private:
                continue
            owner = ".".join(parts[: private[0]])
            if not (importer == owner or importer.startswith(owner + ".")):
                bad.append(f"{importer} -> {target}")
    return sorted(bad)


def test_the_private_module_check_catches_one() -> None:
    graph = {"priorzoo.inspect": {"priorzoo.learn._common"}, "priorzoo.learn.swag": {"priorzoo.learn._common"}}
    assert _private_module_uses(graph) == ["priorzoo.inspect -> priorzoo.learn._common"]


def test_no_private_module_is_imported_from_outside_its_package() -> None:
    assert _private_module_uses(_import_graph()) == []


def _private_uses(path: Path, own_package: str | None) -> list[str]:
    bad = []
    for module, names in _imports(path):
        if not module.startswith("priorzoo"):
            continue
        parts = module.split(".")
        inside = own_package is not None and (module == own_package or module.startswith(own_package + "."))
        if not inside and any(p.startswith("_") for p in parts):
            bad.append(module)
        bad.extend(f"{module}.{n}" for n in names if n.startswith("_") and n != "__version__" and not inside)
    return bad


@pytest.mark.parametrize(
    ("folder", "own_package"),
    [
        ("benchmarks", None),
        ("upload_scripts", None),
        ("priorzoo/cli", "priorzoo.cli"),
        ("priorzoo/demo", "priorzoo.demo"),
    ],
)
def test_applications_use_only_public_names(folder: str, own_package: str | None) -> None:
    used = {str(p.relative_to(ROOT)): _private_uses(p, own_package) for p in sorted((ROOT / folder).rglob("*.py"))}
    assert {k: v for k, v in used.items() if v} == {}


def test_the_private_name_check_catches_one(tmp_path: Path) -> None:
    script = tmp_path / "x.py"
    script.write_text("from priorzoo.finetune._prefetch import Prefetched\nfrom priorzoo.demo import _x\n")
    assert _private_uses(script, None) == ["priorzoo.finetune._prefetch", "priorzoo.demo._x"]


def _all_of(path: Path) -> list[str] | None:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "__all__" and node.value is not None:
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    return None


def _isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, then Classes, then functions and the rest."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


def test_the_all_order_is_ruffs() -> None:
    assert sorted(["load", "PriorModel", "SGLD", "__version__", "Batch"], key=_isort_key) == [
        "SGLD",
        "Batch",
        "PriorModel",
        "__version__",
        "load",
    ]


def test_every_module_has_a_sorted_all() -> None:
    alls = {name: _all_of(path) for name, path in _package_modules().items() if path.name != "__main__.py"}
    assert [name for name, names in alls.items() if names is None] == []
    assert {name: names for name, names in alls.items() if names != sorted(names or [], key=_isort_key)} == {}


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # everything below space except tab and newline, and DEL


def _control_characters(text: str) -> list[tuple[int, str]]:
    return [(text.count("\n", 0, m.start()) + 1, repr(m.group())) for m in _CONTROL.finditer(text)]


def test_the_control_character_check_catches_a_backspace() -> None:
    assert _control_characters('"""\\big"""\n"""\big, \right"""') == [(2, "'\\x08'"), (2, "'\\r'")]


def test_no_control_characters_in_sources() -> None:
    found = {
        str(p.relative_to(ROOT)): _control_characters(p.read_text(encoding="utf-8"))
        for folder in SOURCE_FOLDERS
        for p in sorted((ROOT / folder).rglob("*.py"))
    }
    assert {k: v for k, v in found.items() if v} == {}
