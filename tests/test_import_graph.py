"""The project's import graph, read statically: no cycles, a Beam-free core, one namespace.

Every ``.py`` file under the four source folders is parsed with `ast` and
named by its installed module name (``keyturn/...`` -> ``keyturn.*``,
``transforms/`` -> ``keyturn.transforms.*``, ``pipelines/`` ->
``keyturn.pipelines.*``, ``schemas/`` -> ``keyturn.schemas.*``). Every
import counts, at module level and inside functions alike; only imports
under ``if TYPE_CHECKING:`` are left out (they never run).
``from package import name`` is an edge to the submodule ``package.name``
when that is a module, else to ``package``.

Checks:

- no cycle among the project's modules (a package and its ``__init__``
  are one module);
- the core (``keyturn.*`` except ``keyturn.transforms.*`` and
  ``keyturn.pipelines.*``) imports neither ``apache_beam`` nor
  ``keyturn.transforms`` nor ``keyturn.pipelines``;
- nothing imports the bare top-level names ``transforms``, ``pipelines``
  or ``schemas``.

`KNOWN_CYCLES` lists cycles waiting for their owner's fix; each is still
reported as a failure (`test_known_cycles_are_fixed`), so the list only
documents them and shrinks as they go.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "keyturn": "keyturn",
    "transforms": "keyturn.transforms",
    "pipelines": "keyturn.pipelines",
    "schemas": "keyturn.schemas",
}
BARE = frozenset({"transforms", "pipelines", "schemas"})
BEAM_SIDE = ("keyturn.transforms", "keyturn.pipelines")



def _module_files() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the project."""
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__pycache__"]
            if len(parts) != len(rel.parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of `tree`, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The absolute module names one import statement in `module` names."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        package = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    yield base
    for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
            yield f"{base}.{alias.name}"


def _owner(name: str) -> str | None:
    """The project module `name` lives in (its longest project prefix), or None for outside code."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> every absolute name it imports)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    raw: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=os.fspath(path))
        for node in _imports(tree):
            for target in _targets(module, node):
                raw[module].add(target)
                owner = _owner(target)
                if owner is not None and owner != module:
                    edges[module].add(owner)
    # importing a.b.c runs a/__init__ and a/b/__init__ first: those are edges too
    for module in MODULES:
        for target in list(edges[module]):
            parent = target.rpartition(".")[0]
            while parent:
                if parent in MODULES and parent != module and not module.startswith(parent + "."):
                    edges[module].add(parent)
                parent = parent.rpartition(".")[0]
    return edges, raw


EDGES, RAW = _graph()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def _path_in(component: list[str]) -> str:
    """One concrete loop through `component`, for the failure message."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in EDGES[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return " -> ".join([*path, start])
        fresh = [w for w in nxt if w not in seen]
        if not fresh:
            return " -> ".join([*path, *(nxt[:1])])
        path.append(fresh[0])
        seen.add(fresh[0])


def _is_core(module: str) -> bool:
    return module.startswith("keyturn") and not module.startswith(BEAM_SIDE)


def test_the_walk_sees_the_whole_project():
    assert {"keyturn.home", "keyturn.lake.layout", "keyturn.transforms.dofns", "keyturn.pipelines.cli"} <= set(MODULES)
    assert "keyturn.transforms.adapters" in EDGES["keyturn.transforms.dofns"]
    # imports inside functions count: `keyturn.keysource` opens backends lazily
    assert "keyturn.kms.local" in EDGES["keyturn.keysource"]


def test_no_import_cycles():
    cycles = _cycles(EDGES)
    assert not cycles, "import cycles:\n" + "\n".join(_path_in(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_the_core_is_beam_free():
    bad = sorted(
        f"{module} imports {target}"
        for module in MODULES
        if _is_core(module)
        for target in RAW[module]
        if target.split(".")[0] == "apache_beam" or target.startswith(BEAM_SIDE)
    )
    assert not bad, "the core must not import Beam or the Beam side:\n" + "\n".join(bad)


def test_nothing_imports_the_bare_folder_names():
    bad = sorted(
        f"{module} imports {target}" for module in MODULES for target in RAW[module] if target.split(".")[0] in BARE
    )
    assert not bad, "import keyturn.transforms / keyturn.pipelines / keyturn.schemas, never the bare names:\n" + "\n".join(bad)
