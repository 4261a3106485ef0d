"""The package's shape: no import cycle, no oversized module, applications use only public names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "priorzoo"
MAX_LINES = 600
# modules still over the limit, with who shrinks them; the test fails if one drops under (then remove it here)
OVER_LIMIT: dict[str, str] = {}
# import cycles still there, with who breaks them; the test fails if one is gone (then remove it here)
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}
# private names still used by an application, with why; the test fails if one is no longer used
KNOWN_PRIVATE: dict[str, set[str]] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts if path.is_relative_to(ROOT) else (path.stem,)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every import in ``path`` (functions included, ``TYPE_CHECKING`` not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, []) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.append((base, [a.name for a in child.names]))
            visit(child)

    visit(tree)
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


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_the_package() -> None:
    graph = _import_graph()
    assert "priorzoo.prior" in graph and "priorzoo.hub" in graph
    cycles = {tuple(c) for c in _cycles(graph)}
    assert cycles - set(KNOWN_CYCLES) == set()
    assert set(KNOWN_CYCLES) - cycles == set(), "these cycles are gone: remove them from KNOWN_CYCLES"


def test_no_package_module_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES and name not in OVER_LIMIT}
    assert over == {}, f"modules over {MAX_LINES} lines: split them by concern"
    back_under = [name for name in OVER_LIMIT if sizes.get(name, 0) <= MAX_LINES]
    assert back_under == [], "these are under the limit now: remove them from OVER_LIMIT"


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
    ("folder", "own_package"), [("benchmarks", None), ("upload_scripts", None), ("priorzoo/cli", "priorzoo.cli")]
)
def test_applications_use_only_public_names(folder: str, own_package: str | None) -> None:
    used = {str(p.relative_to(ROOT)): set(_private_uses(p, own_package)) for p in sorted((ROOT / folder).rglob("*.py"))}
    new = {k: v - KNOWN_PRIVATE.get(k, set()) for k, v in used.items()}
    assert {k: v for k, v in new.items() if v} == {}
    stale = {k: v - used.get(k, set()) for k, v in KNOWN_PRIVATE.items() if k.startswith(folder + "/")}
    assert {k: v for k, v in stale.items() if v} == {}, "no longer used: remove them from KNOWN_PRIVATE"


def test_the_private_name_check_catches_one(tmp_path: Path) -> None:
    script = tmp_path / "x.py"
    script.write_text("from priorzoo.finetune._prefetch import Prefetched\nfrom priorzoo.demo import _x\n")
    assert _private_uses(script, None) == ["priorzoo.finetune._prefetch", "priorzoo.demo._x"]
