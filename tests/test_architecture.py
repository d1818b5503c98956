"""ARCHITECTURE.md's import rules, read from the code itself (its AST), so they cannot rot.

- Each stage stands alone: ``infra/``, ``serving/``, ``web/`` and ``remote/jobs/`` import only
  themselves and ``facts.py``; nothing but ``fabfile.py`` imports the control side
  (``remote/`` outside ``remote/jobs/``).
- The control side never imports torch (nor a library that brings it), not even lazily inside a
  function: `fab --list`, `pulumi up` and the operator's laptop must run without it. What the
  control side imports from the jobs is checked too, through those modules' top-level imports.
- No import cycles between modules, counting imports inside functions: a lazy import can hide a
  cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("facts", "fabfile", "infra", "remote", "serving", "web")
HEAVY = ("torch", "transformers", "datasets", "peft", "trl", "accelerate", "matplotlib")


@dataclass(frozen=True)
class Import:
    target: str  # a dotted module name
    top_level: bool  # executed when the importing module is imported
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    files = [ROOT / "facts.py", ROOT / "fabfile.py"]
    for pkg in ("infra", "remote", "serving", "web"):
        files += sorted((ROOT / pkg).rglob("*.py"))
    return {module_name(p): p for p in files}


def imports_of(path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every import in the file, with ``from pkg import mod`` resolved to the module it names."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {
        id(child) for n in tree.body if isinstance(n, ast.If | ast.Try) for child in ast.walk(n)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, id(node) in top, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                target = sub if sub in modules else node.module
                yield Import(target, id(node) in top, node.lineno)


def owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that ``name`` is, or is inside; None for a library."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def stage(module: str) -> str:
    if module.startswith("remote.jobs") or module == "remote.jobs":
        return "jobs"
    if module == "remote" or module.startswith("remote."):
        return "control"
    return module.split(".")[0]


GRAPH_CACHE: dict[str, list[Import]] = {}


def graph() -> tuple[dict[str, Path], dict[str, list[Import]]]:
    modules = our_modules()
    if not GRAPH_CACHE:
        GRAPH_CACHE.update({m: list(imports_of(p, modules)) for m, p in modules.items()})
    return modules, GRAPH_CACHE


def test_the_graph_sees_the_whole_tree():
    modules, edges = graph()
    assert {"facts", "remote.tasks", "remote.jobs.finetune", "serving.server", "web.render"} <= set(
        modules
    )
    assert any(i.target == "remote.tasks" for i in edges["fabfile"])


def test_each_stage_imports_only_itself_and_facts():
    modules, edges = graph()
    allowed = {
        "infra": {"infra", "facts"},
        "serving": {"serving", "facts"},
        "web": {"web", "facts"},
        "jobs": {"jobs", "facts"},
        "facts": set(),
        "control": {"control", "jobs", "infra", "serving", "web", "facts"},
        "fabfile": {"control"},
    }
    wrong = []
    for module, imports in edges.items():
        for imp in imports:
            target = owner(imp.target, modules)
            if target is not None and stage(target) not in allowed[stage(module)]:
                wrong.append(f"{modules[module].relative_to(ROOT)}:{imp.line} imports {target}")
    assert not wrong, "a stage reaches into another:\n" + "\n".join(wrong)


def test_control_side_never_imports_torch():
    """Anything a control module imports (lazily or not) may not bring torch in at import time."""
    modules, edges = graph()
    bad = []
    for module in (m for m in modules if stage(m) in ("control", "fabfile", "infra", "web")):
        for imp in edges[module]:
            chain = heavy_chain(imp.target, modules, edges, (module,))
            if chain:
                bad.append(f"{modules[module].relative_to(ROOT)}:{imp.line}: " + " -> ".join(chain))
    assert not bad, "the control side would import a heavy library:\n" + "\n".join(bad)


def heavy_chain(
    name: str, modules: dict[str, Path], edges: dict[str, list[Import]], path: tuple[str, ...]
) -> tuple[str, ...] | None:
    """The import chain from ``path`` to a heavy library through top-level imports, if any."""
    if name.split(".")[0] in HEAVY:
        return (*path, name)
    ours = owner(name, modules)
    if ours is None or ours in path:
        return None
    for imp in edges[ours]:
        if imp.top_level and (chain := heavy_chain(imp.target, modules, edges, (*path, ours))):
            return chain
    return None


def test_no_import_cycles():
    modules, edges = graph()
    links = {
        m: sorted({t for i in imps if (t := owner(i.target, modules)) and t != m})
        for m, imps in edges.items()
    }
    cycles = [c for c in find_cycles(links)]
    assert not cycles, "import cycles (lazy imports count):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def find_cycles(links: dict[str, list[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in links.get(v, []):
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
                components.append(sorted(component))

    for v in sorted(links):
        if v not in index:
            visit(v)
    return components


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The rules fail on a cycle and on a lazy torch import, so a green run means something."""
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert find_cycles({"a": ["b"], "b": []}) == []
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    import torch\n")
    found = list(imports_of(lazy, {}))
    assert found == [Import("torch", False, 2)]
    assert heavy_chain("torch", {}, {}, ("remote.x",)) == ("remote.x", "torch")
