"""Layering rules of DESIGN.md: retrieval/ is pure math; engines live only in cluster/."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"ray", "petsc4py", "mpi4py"}
FORMATS = {"pyarrow", "pandas"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_retrieval_imports_no_engine_or_file_format():
    for p in (ROOT / "retrieval").rglob("*.py"):
        bad = _imports(p) & (ENGINES | FORMATS | {"pipelines", "cluster"})
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}"


def test_only_cluster_imports_engines():
    for pkg in ("pipelines", "retrieval"):
        for p in (ROOT / pkg).rglob("*.py"):
            bad = _imports(p) & ENGINES
            assert not bad, f"{p.relative_to(ROOT)} imports {bad}"


PACKAGES = ("retrieval", "pipelines", "cluster")


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages."""
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports anywhere (function-level imports and relative imports
    included; `from pkg import mod` counts as importing pkg.mod)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        deps = set()
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                deps.add(t)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per back edge found by depth-first search."""
    state, stack, found = {}, [], []

    def visit(v: str) -> None:
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                found.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)
    return found


def test_cluster_never_imports_pipelines_except_the_serve_adapter():
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "pipelines")
           for m, deps in _import_graph().items() if m.split(".")[0] == "cluster" and m != "cluster.ray_serve"}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"cluster modules importing pipelines: {bad}"


def test_no_import_cycles():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
