"""The report titles a plan's informational notes as notes, apart from its warnings (issue 9)."""
from __future__ import annotations

from harness.cli import main
from reports import render


def test_plan_notes_are_shown_as_notes_not_warnings(tmp_path):
    assert main(["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--strategy", "hybrid_optimal",
                 "--workload", "poisson,rate=1,n=4,prompt=64,output=8", "--seed", "1", "--quiet",
                 "--out", str(tmp_path), "--run-id", "a"]) == 0
    html = render([tmp_path / "a"], tmp_path / "r.html").read_text()
    assert "Plan notes: search (exact over 4 nodes in 1 class of interchangeable nodes)" in html
    assert "Plan warnings:" not in html
