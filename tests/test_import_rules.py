"""DESIGN §3's import rules, checked on the source: each floor imports only what it may (issue 16: sim/ used to
import harness.backend and harness.runfolder)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("harness", "sim", "strategies", "reports")
ALLOWED = {
    "strategies": {"harness.specs", "harness.costmodel", "strategies"},
    "sim": {"harness.specs", "harness.costmodel", "harness.workloads", "harness.metrics", "strategies", "sim"},
    # the run schema: record columns and metric catalogue, the summary schema, the folder format, UserError
    "reports": {"harness.metrics", "harness.summary", "harness.runfolder", "harness.specs", "reports"},
}


def imported_modules(path: Path) -> set[str]:
    """Every project module a file imports (absolute imports, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.add(max((n for n in names if n.split(".")[0] in PROJECT), key=len, default=""))
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PROJECT}
    return found - {""}


def allowed(module: str, rules: set[str]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rules)


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_each_floor_imports_only_what_design_allows(floor):
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / floor).rglob("*.py")
           for m in imported_modules(p) if not allowed(m, ALLOWED[floor])}
    assert not bad, sorted(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from harness.runfolder import RunWriter\n")
    assert imported_modules(bad) == {"harness.runfolder.RunWriter"}
    assert not allowed("harness.runfolder.RunWriter", ALLOWED["sim"])
