"""Imports go the design's way (../shared/design/architecture.md), checked over the source, imports inside
functions included:

- memory imports no backend, drafter or core module (only the neutral ``paths`` and ``gguf_header``);
- backends import no drafter and no core module;
- runtime drafters (``models/drafting``) import neither training nor the core;
- the package has no import cycle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"edgespec": ROOT / "edgespec", "edgespec.backends": ROOT / "backends", "edgespec.memory": ROOT / "memory",
           "edgespec.models": ROOT / "models"}
NEUTRAL = {"edgespec.paths", "edgespec.gguf_header"}  # import nothing of edgespec: anyone may use them


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


MODULES = modules()


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (``from a import b`` counts a.b when b is a module), leaving
    out imports under ``if TYPE_CHECKING`` and the package's own facade (``edgespec/__init__.py``)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in MODULES else n.module for a in n.names}
    return {m for m in out if m in MODULES and m != "edgespec"}


GRAPH = {m: imports_of(p) - {m} for m, p in MODULES.items()}


def kind(module: str) -> str:
    for prefix in ("edgespec.backends", "edgespec.memory", "edgespec.models.drafting", "edgespec.models.training"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix.rsplit(".", 1)[1]
    return "neutral" if module in NEUTRAL else "core"


FORBIDDEN = {"memory": {"backends", "drafting", "training", "core"}, "backends": {"drafting", "training", "core"},
             "drafting": {"training", "core"}, "neutral": {"backends", "memory", "drafting", "training", "core"}}


def test_the_checker_sees_the_package():
    assert len(MODULES) > 40 and "edgespec.runtime" in MODULES and "edgespec.models.drafting.auto" in MODULES
    assert "edgespec.models.drafting.drafter" in GRAPH["edgespec.speculative"]
    assert kind("edgespec.models.training.collect") == "training" and kind("edgespec.runtime") == "core"


def test_imports_go_the_designs_way():
    wrong = [f"{a} -> {b}" for a, targets in sorted(GRAPH.items()) for b in sorted(targets)
             if kind(b) in FORBIDDEN.get(kind(a), ())]
    assert not wrong, "imports against the design:\n" + "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds one
    assert cycles(GRAPH) == []
