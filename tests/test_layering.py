"""The package's imports flow one way: data / layers / ssm -> models (and the weight readers) -> engine -> cli.

Every import in ``src/pks4`` counts, also those inside functions (a lazy import is still a dependency); only
``if TYPE_CHECKING:`` blocks, which never run, are left out."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pks4"

# Layer of each top-level part of the package; a module may import its own layer and the ones below.
# pks4.errors (user errors and their one-line messages) uses the standard library only: every layer may raise them.
LAYERS = {
    "data": 0, "layers": 0, "ssm": 0, "errors": 0, "version": 0,
    "models": 1, "weights": 1,
    "engine": 2, "recipes": 2,
    "cli": 3, "api": 3, "web": 3, "__init__": 3, "__main__": 3,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """pks4 modules ``name`` imports (``from a import b`` counts as ``a.b`` where that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    if part not in LAYERS:
        raise AssertionError(f"{module}: give src/pks4/{part} a layer in tests/test_layering.py LAYERS")
    return LAYERS[part]


def test_nothing_imports_upward():
    uphill = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in _graph().items() for b in sorted(targets) if _layer(b) > _layer(a)]
    assert not uphill, "\n".join(uphill)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]] and _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.xfail((SRC / "weights_videomamba.py").is_file(), strict=True,
                   reason="models/videomamba.py and weights_videomamba.py import each other until the weight "
                          "readers are called by the model builder")
def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_only_the_command_line_parses_arguments():
    parsers = [name for name, targets in ((n, _raw_imports(p)) for n, p in _modules().items())
               if "argparse" in targets and not name.startswith("pks4.cli")]
    assert parsers == [], f"argparse outside pks4.cli: {parsers}"


def _raw_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
