"""No import cycles in hpcllm (issue 15): neither between sub-packages nor among modules.

Every module under hpcllm/ is parsed (tests excluded: they may import across packages freely) and every import
statement counts, function-level ones included - a lazy import hides a cycle from Python, not from the design.
`from hpcllm.a import b` is an edge to module hpcllm.a.b when that file exists, else to the package hpcllm.a
(its __init__). Top-level modules (hpcllm.config, hpcllm.errors, ...) are packages of their own here.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # hpcllm/


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_test(path: Path) -> bool:
    rel = path.relative_to(ROOT).parts
    return "tests" in rel or path.name == "conftest.py" or path.name == "pytest_fixtures.py"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if not is_test(p)}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "hpcllm" or target.startswith("hpcllm."):
                resolved = resolve(target, known)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def module_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(subpackage(module), set())
        edges.update(subpackage(t) for t in targets if subpackage(t) != subpackage(module))
    return packages


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        return exc.args[1]
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = module_graph()
    assert "hpcllm.config" in graph["hpcllm.gateway.app"]
    # hpcllm.gateway.server imports the app inside a function (after gunicorn forks).
    assert "hpcllm.gateway.app" in graph["hpcllm.gateway.server"]


def test_no_cycles_between_subpackages():
    cycle = cycle_in(package_graph(module_graph()))
    assert cycle is None, "sub-packages import each other: " + " -> ".join(cycle)


def test_no_cycles_among_modules():
    cycle = cycle_in(module_graph())
    assert cycle is None, "modules import each other: " + " -> ".join(cycle)


# ------------------------------------------------------------------------ the loops issue 15 named, one by one


def test_node_imports_controller_never_the_reverse():
    """The node agent speaks the controller's wire types; the controller reaches agents only over HTTP."""
    packages = package_graph(module_graph())
    assert "hpcllm.node" not in packages["hpcllm.controller"]
    assert "hpcllm.controller" in packages["hpcllm.node"]


def test_slurm_backends_stand_on_base_and_only_the_factory_knows_them():
    graph = module_graph()
    backends = {"hpcllm.slurm.cli_backend", "hpcllm.slurm.rest_backend", "hpcllm.slurm.pyslurm_backend"}
    assert not graph["hpcllm.slurm.base"] & (backends | {"hpcllm.slurm.factory"})
    for backend in backends:
        assert not graph[backend] & (backends | {"hpcllm.slurm.factory"}), f"{backend} imports a sibling backend"
    assert backends <= graph["hpcllm.slurm.factory"]


def private_names_imported(module: str) -> list[str]:
    """`from hpcllm.x import _name` in a module: another module's private helper taken."""
    found = []
    for node in ast.walk(ast.parse(modules()[module].read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hpcllm"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_slurm_modules_take_no_private_helpers_from_each_other():
    taken = {m: private_names_imported(m) for m in modules() if m.startswith("hpcllm.slurm.")}
    assert not {m: names for m, names in taken.items() if names}


def test_the_http_kit_is_a_floor():
    """Every service imports hpcllm.httpkit; it imports no service (only config and errors)."""
    graph = module_graph()
    kit = {m: targets for m, targets in graph.items() if m.startswith("hpcllm.httpkit")}
    reached = {subpackage(t) for targets in kit.values() for t in targets} - {"hpcllm.httpkit"}
    assert reached <= {"hpcllm.config", "hpcllm.errors"}, f"the kit imports {sorted(reached)}"
    packages = package_graph(graph)
    for service in ("hpcllm.controller", "hpcllm.node", "hpcllm.worker", "hpcllm.gateway"):
        assert "hpcllm.httpkit" in packages[service]
