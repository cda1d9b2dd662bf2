"""`python -m harness simulate` end to end: a complete run folder, metrics recomputable from its rows."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from harness import metrics
from harness.cli import main
from harness.metrics import REQUEST_COLUMNS
from harness.runfolder import read_run


def test_simulate_writes_a_complete_run_folder(tmp_path, capsys):
    rc = main(["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--quant", "4",
               "--strategy", "uniform", "--workload", "poisson,rate=4,n=40,prompt=256,output=32", "--seed", "5",
               "--out", str(tmp_path), "--run-id", "r1", "--slo", "ttft:2000", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "metrics (simulated)" in out
    run = read_run(tmp_path / "r1")
    config, summary = run.config, run.summary
    assert config["workload"]["seed"] == 5 and config["backend"] == "sim"
    assert summary["source"] == "simulated" and summary["metrics"]["completed"] == 40
    req = run.requests()
    assert list(req.columns) == list(REQUEST_COLUMNS) and set(req.source) == {"simulated"}
    again = metrics.compute(req, "ttft:2000")
    assert again["mean_ttft_ms"] == pytest.approx(summary["metrics"]["mean_ttft_ms"])
    steps = run.steps()
    assert {"load", "send"} <= set(steps.kind) and set(steps.source) == {"simulated"}
    assert summary["metrics"]["load_time_s"] > 0
    assert json.loads((tmp_path / "r1" / "plan.json").read_text())["strategy"] == "uniform"


def test_same_seed_same_requests(tmp_path):
    args = ["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--strategy", "uniform",
            "--workload", "poisson,rate=4,n=30,prompt=uniform:64:512,output=16", "--out", str(tmp_path), "--quiet"]
    assert main(args + ["--run-id", "a"]) == 0 and main(args + ["--run-id", "b"]) == 0
    a, b = (read_run(tmp_path / x).requests() for x in "ab")
    pd.testing.assert_frame_equal(a, b)


def test_bad_workload_is_a_clear_error(tmp_path, capsys):
    rc = main(["simulate", "--workload", "sometimes,n=3", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "unknown workload" in capsys.readouterr().err


def test_simulate_all_strategies_writes_one_folder_each(tmp_path, capsys):
    from harness.cli import main
    rc = main(["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--strategy", "all",
               "--workload", "poisson,rate=1,n=5,prompt=128,output=16", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 5 and any("hybrid_optimal" in f for f in folders)
