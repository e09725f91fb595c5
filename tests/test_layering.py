"""The layering: who may import whom, no import cycles, one spec contract everywhere.

cnp_core is the library, cnp_server and cnp_client sit on top of it and never on each
other's side of the wire; the client (and the contract it shares with the server,
``cnp_core.convert``) imports without torch. The import graph is read from the source
with ``ast``, imports inside functions included, so the checks need no torch.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import tomllib
import typing
from functools import cache
from pathlib import Path

from cnp.v1 import spec_pb2
from cnp_core.spec import AuditSpec

REPO = Path(__file__).resolve().parents[1]
TORCH = ("torch", "torchvision", "zennit")


# --- the import graph -------------------------------------------------------------------


@cache
def modules() -> dict[str, Path]:
    """First-party module name -> source file, from pyproject's package-dir mapping."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"]
    found: dict[str, Path] = {}
    for package, directory in package_dirs.items():
        root = REPO / directory
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except under ``if TYPE_CHECKING:`` (never run)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def _imported(module: str, path: Path) -> set[str]:
    """The first-party modules ``module`` imports (a ``from P import name`` counts as
    importing P.name when that is a module, else P)."""
    known = modules()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from . / from .. / from .x
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            child = f"{base}.{alias.name}"
            targets.add(child if child in known else base)
    return {target for target in targets if target in known and target != module}


@cache
def import_graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(_imported(name, path)) for name, path in modules().items()}


def _layer(module: str) -> str:
    return module.split(".")[0]


def imports_across(source: str, target: str) -> list[str]:
    """``a -> b`` for every import of a module of package ``target`` from ``source``."""
    return sorted(
        f"{name} -> {other}"
        for name, targets in import_graph().items()
        if _layer(name) == source
        for other in targets
        if _layer(other) == target
    )


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """One cycle path (first node repeated at the end) per strongly connected component
    that has one (Tarjan's algorithm, then a search for the way back inside it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # recursion depth <= number of modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    found = []
    for component in components:
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        while frontier:  # breadth first: the shortest way from start back to start
            node = frontier.pop(0)
            nexts = sorted(graph[node] & component)
            if start in nexts:
                found.append([*paths[node], start])
                break
            for other in nexts:
                if other not in paths:
                    paths[other] = [*paths[node], other]
                    frontier.append(other)
    return sorted(found)


def test_the_graph_sees_every_package_and_imports_inside_functions():
    names = set(modules())
    assert {"cnp_core.spec", "cnp_server.service", "cnp_client.cli", "cnp.v1.spec_pb2"} <= names
    graph = import_graph()
    assert "cnp_core.convert" in graph["cnp_client.client"]  # module level
    assert "cnp_core.synthetic" in graph["cnp_client.demo"]  # inside main()
    assert "cnp_server.convert" in graph["cnp_server.service"]  # from . import convert
    assert "cnp_server.errors" in graph["cnp_server.convert"]  # from .errors import ...


def test_cycles_are_found_and_reported_as_a_path():
    graph = {
        "a": frozenset({"b"}),
        "b": frozenset({"c"}),
        "c": frozenset({"a"}),
        "d": frozenset({"d"}),
        "e": frozenset({"a"}),
    }
    assert cycles(graph) == [["a", "b", "c", "a"], ["d", "d"]]
    assert cycles({"a": frozenset({"b"}), "b": frozenset()}) == []


def test_the_library_imports_neither_the_server_nor_the_client():
    assert imports_across("cnp_core", "cnp_server") == []
    assert imports_across("cnp_core", "cnp_client") == []


def test_client_and_server_meet_only_in_the_library_and_the_api():
    assert imports_across("cnp_client", "cnp_server") == []
    assert imports_across("cnp_server", "cnp_client") == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_contract_converter_stays_torch_free():
    """cnp_core.convert may import only the API and cnp_core's torch-free modules."""
    allowed = {"cnp_core", "cnp_core.spec", "cnp_core.results", "cnp_core.errors"}
    first_party = import_graph()["cnp_core.convert"]
    assert {m for m in first_party if not m.startswith("cnp.")} <= allowed


# --- one spec, three spellings ----------------------------------------------------------


def spec_fields(cls: type = AuditSpec, prefix: str = "") -> list[str]:
    """Dotted names of every field of the spec dataclasses, nested ones spelled out."""
    hints = typing.get_type_hints(cls)
    names = []
    for field in dataclasses.fields(cls):
        kinds = [hints[field.name], *typing.get_args(hints[field.name])]
        nested = next((k for k in kinds if dataclasses.is_dataclass(k)), None)
        if nested is not None:
            names += spec_fields(nested, f"{prefix}{field.name}.")
        else:
            names.append(prefix + field.name)
    return names


def test_every_spec_field_is_in_the_proto():
    missing = []
    for name in spec_fields():
        descriptor = spec_pb2.AuditSpec.DESCRIPTOR
        *parents, leaf = name.split(".")
        for parent in parents:
            descriptor = descriptor.fields_by_name[parent].message_type
        if leaf not in descriptor.fields_by_name:
            missing.append(name)
    assert not missing, f"spec fields missing from cnp.v1.AuditSpec: {missing}"


# --- the client without torch ---------------------------------------------------------------

BLOCK_TORCH = f"""
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TORCH!r}:
            raise ImportError(f"{{name}} is blocked: the client must import without it")
        return None

sys.meta_path.insert(0, NoTorch())
"""


def test_the_client_imports_without_torch():
    imports = [
        "cnp_client",
        "cnp_client.cli",
        "cnp_client.client",
        "cnp_client.gates",
        "cnp_client.reports",
        "cnp_client.demo",
        "cnp_core.convert",
    ]
    script = BLOCK_TORCH + "\n".join(f"import {name}" for name in imports)
    script += f"\nassert not any(m.split('.')[0] in {TORCH!r} for m in sys.modules)\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_torch_blocker_blocks():
    script = BLOCK_TORCH + "import torch\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode != 0 and "torch is blocked" in result.stderr


# --- the architecture picture ------------------------------------------------------------


def test_the_readme_diagram_shows_every_library_module_and_only_real_ones():
    """The README's architecture diagram is kept next to the code: a module added to or
    removed from cnp_core without updating the picture fails here."""
    readme = (REPO / "README.md").read_text()
    diagram = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"cnp_(?:core|server|client)(?:\.\w+)+", diagram))
    known = set(modules())
    assert named <= known, f"the diagram names modules that do not exist: {named - known}"
    library = {m for m in known if m.startswith("cnp_core.")} - {"cnp_core.pruning"}
    assert library <= named, f"modules missing from the README diagram: {library - named}"
