"""The architecture, checked: layers import only downward, no cycles, no hidden imports.

Every module of ``src/ampfn`` names its layer in its docstring ("Layer N, ..."); see
docs/architecture.md. The imports are read with ``ast``, ``if TYPE_CHECKING:`` blocks
included, so nothing here imports ampfn.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ampfn"
# "about 400 lines" (the structure issue); a module that grows past this is split
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(name: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The ampfn modules an import statement in module ``name`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "ampfn"]
    base = node.module or ""
    if node.level:  # relative: from the module's package
        package = name if is_package(name) else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    if base.split(".")[0] != "ampfn":
        return []
    # `from ampfn import _distributed` loads the submodule; `from ampfn import x` a name
    return [
        f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
        for a in node.names
    ]


def imports(
    name: str, source: str | None = None
) -> tuple[set[str], list[tuple[int, str]]]:
    """(ampfn modules imported at module level, (line, module) imported inside functions)."""
    tree = ast.parse(MODULES[name].read_text() if source is None else source)
    top: set[str] = set()
    nested: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, child):
                    if in_function:
                        nested.append((child.lineno, target))
                    else:
                        top.add(target)
            inner = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            visit(child, inner)

    visit(tree, False)
    return top, nested


def layer(name: str, source: str | None = None) -> int:
    doc = ast.get_docstring(
        ast.parse(MODULES[name].read_text() if source is None else source)
    )
    found = re.search(r"\bLayer (\d)\b", doc or "")
    return int(found.group(1)) if found else 0


def graph() -> dict[str, set[str]]:
    edges = {}
    for name in MODULES:
        top, _ = imports(name)
        # importing ampfn.a.b runs ampfn.a too, but ampfn/__init__ is the namespace layer:
        # a submodule's own `from ampfn._x import y` loads ampfn._x, not the public names
        edges[name] = {t for t in top if t != name}
    return edges


def test_every_module_names_its_layer() -> None:
    missing = [str(MODULES[n]) for n in MODULES if not 1 <= layer(n) <= 7]
    assert not missing, f"no 'Layer N, ...' in the docstring of {missing}"


def test_layers_import_only_downward() -> None:
    upward = [
        f"{name} (layer {layer(name)}) imports {t} (layer {layer(t)})"
        for name, targets in graph().items()
        for t in targets
        if layer(t) > layer(name)
    ]
    assert not upward, "\n".join(upward)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, as a path that ends where it starts."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for t in sorted(edges.get(node, ())):
            if state.get(t) == 1:
                cycles.append([*path[path.index(t) :], t])
            elif t not in state:
                walk(t, [*path, t])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            walk(name, [name])
    return cycles


def test_no_import_cycles() -> None:
    cycles = find_cycles(graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_ampfn_import_inside_a_function() -> None:
    # optional backends (apex, torch_xla, torchao, matplotlib, hypothesis) are imported
    # lazily in functions; ampfn's own modules never are
    nested = [
        f"{MODULES[name]}:{line} imports {t}"
        for name in MODULES
        for line, t in imports(name)[1]
    ]
    assert not nested, "\n".join(nested)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]}: {lines} lines; split it"


# --- the checker itself, on code made to break each rule -----------------------------


def test_the_checker_sees_a_nested_and_a_type_checking_import() -> None:
    source = (
        '"""Layer 3, made up."""\n'
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ampfn._transform import Transform\n"
        "def f():\n"
        "    from ampfn import _plan\n"
        "    import ampfn\n"
        "    g = lambda: __import__('os')\n"
        "from . import _types\n"
    )
    top, nested = imports("ampfn._effects", source)
    assert top == {"ampfn._transform", "ampfn._types"}
    assert nested == [(6, "ampfn._plan"), (7, "ampfn")]
    assert layer("ampfn._effects", source) == 3
    assert layer("ampfn._effects", '"""No layer."""') == 0
