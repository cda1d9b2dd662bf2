"""Benchmarks of the report's hot paths on a 100k-request run (not collected by a plain `pytest`).

    .venv/bin/python -m pytest tests/reports/bench_report.py --benchmark-enable --benchmark-autosave
    .venv/bin/python -m pytest tests/reports/bench_report.py --benchmark-enable --benchmark-compare

Timings are wall-clock on whatever machine runs them: compare only runs saved on the same machine.
"""
import numpy as np
import pandas as pd
import pytest

import reports
from harness import metrics
from harness.runfolder import RunWriter
from report_runs import PLAN, request_rows

N_REQUESTS = 100_000
N_STEPS = 300_000


def steps_table(n: int, end_s: float) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    start = np.sort(rng.uniform(0.0, end_s, n))
    return pd.DataFrame({"step": np.arange(n), "stage": np.arange(n) % 3,
                         "node": np.array(["studio-1", "mini-1", "mini-2"])[np.arange(n) % 3], "kind": "decode",
                         "start_s": start, "end_s": start + 0.01, "batch_size": 8, "tokens": 8,
                         "kv_bytes": rng.integers(0, 10**10, n), "compute_s": 0.01, "source": "simulated"})


@pytest.fixture(scope="module")
def requests_100k():
    return request_rows(N_REQUESTS, rate=200.0)


@pytest.fixture(scope="module")
def big_run(tmp_path_factory, requests_100k):
    writer = RunWriter(tmp_path_factory.mktemp("bench"), run_id="big")
    writer.write_json("config.json", {"strategy": PLAN["strategy"]})
    writer.write_json("environment.json", {})
    writer.write_json("plan.json", PLAN)
    writer.write_requests(requests_100k)
    writer.write_steps(steps_table(N_STEPS, float(requests_100k["end_s"].max())))
    return writer.finish({"source": "simulated", "metrics": metrics.compute(requests_100k)})


def test_metrics_on_100k_requests(benchmark, requests_100k):
    result = benchmark(metrics.compute, requests_100k)
    assert result["completed"] == N_REQUESTS


def test_load_run_100k(benchmark, big_run):
    run = benchmark(reports.load_run, big_run)
    assert len(run.requests) == N_REQUESTS and len(run.steps) == N_STEPS


def test_render_100k(benchmark, big_run, tmp_path):
    out = benchmark.pedantic(reports.render, args=([big_run], tmp_path / "r.html"), rounds=3, iterations=1)
    assert "Latency distributions" in out.read_text()
