"""The package's layers: every import (module level or inside a function) points down the stack, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mckit"
#: Bottom to top. A module may import its own layer (without cycles) and any layer below it.
LAYERS = ("storage", "world", "models", "merge", "compose", "eval", "experiments", "build", "report")
TOP = ("mckit", "mckit.__main__")         # the package itself and the command line sit above every layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every mckit module ``path`` imports, at any depth of the file (functions included)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def layer(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    parts = module.split(".")
    assert parts[1] in LAYERS, f"module {module} is in no layer; add its package to LAYERS"
    return LAYERS.index(parts[1])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_is_in_a_layer():
    for module in import_graph():
        layer(module)


def test_imports_point_down_the_stack():
    upward = [f"{m} ({LAYERS[layer(m)] if layer(m) < len(LAYERS) else 'top'}) imports {d} "
              f"({LAYERS[layer(d)] if layer(d) < len(LAYERS) else 'top'})"
              for m, deps in import_graph().items() for d in sorted(deps)
              if d not in ("mckit",) and layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_checker_sees_cycles_and_upward_imports_inside_functions(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    fake = tmp_path / "mckit" / "world" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from mckit.report.plots import plot_zoo\n    from ..models import mllm\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "mckit"
    try:
        deps = imported_modules(fake, {"mckit.report.plots", "mckit.models.mllm", "mckit.models"})
    finally:
        PACKAGE = saved
    assert deps == {"mckit.report.plots", "mckit.models", "mckit.models.mllm"}
    assert max(layer(d) for d in deps) > layer("mckit.world.x")


def test_size_limits():
    """No module over 400 lines, no function over 60 lines."""
    limit = 400
    long_modules = [f"{p.relative_to(PACKAGE.parent)}: {n}" for p in PACKAGE.rglob("*.py")
                    if (n := len(p.read_text().splitlines())) > limit]
    long_functions = [f"{p.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}"
                      for p in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 60]
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)
