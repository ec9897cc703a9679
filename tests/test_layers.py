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
