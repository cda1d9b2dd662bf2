"""Simulator speed: 512-token prompts, 128-token outputs, Poisson arrivals, Llama 3.1 70B 4-bit on a 4-node
M2 Ultra pipeline (uniform split). Prints simulated requests per wall-clock second and peak memory.

    python tests/sim/bench_sim_speed.py                 # table for 1k / 10k / 100k requests, each in a fresh process
    pytest tests/sim/bench_sim_speed.py --benchmark-enable

Figures printed are measured (wall clock and memory of this machine); the simulated workload's own metrics are
not the point here. Not collected by the default test run (file name), since 100k requests take a while.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:            # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
RATES = (0.2, 0.5)        # requests/s: 0.2 is served in steady state; 0.5 overloads this cluster (queues grow)


def setup(n: int, rate: float):
    from harness.catalog import load_cluster, load_model
    from harness.costmodel import load_profile
    from harness.workloads import build_workload
    from harness.costmodel import PlanOptions
    from strategies.registry import get_strategy
    cluster, model, profile = load_cluster("m2ultra-4x-tb4"), load_model("llama-3.1-70b", 4), load_profile()
    plan = get_strategy("uniform")(cluster, model, PlanOptions(profile=profile))
    wl = build_workload({"kind": "synthetic", "num_requests": n, "seed": 0, "prompt": 512, "output": 128,
                         "arrival": {"process": "poisson", "rate": rate}})
    return cluster, model, plan, profile, wl


def one(n: int, rate: float, record_steps: bool) -> dict:
    """Simulate once in this process; returns measured wall time, peak RSS and a few simulated facts."""
    import tempfile

    from harness.runfolder import parquet_writer

    from harness.metrics import STEP_COLUMNS, arrow_schema
    from sim import EngineConfig, simulate
    args = setup(n, rate)
    with tempfile.TemporaryDirectory() as tmp:
        # step records stream to a parquet file, as `python -m harness simulate` does
        sink = parquet_writer(f"{tmp}/steps.parquet", arrow_schema(STEP_COLUMNS)) if record_steps else None
        t0 = time.perf_counter()
        res = simulate(*args, config=EngineConfig(record_steps=record_steps), include_load=False,
                       step_sink=sink.write_table if sink else None)
        if sink:
            sink.close()
        wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return {"requests": n, "rate": rate, "record_steps": record_steps, "wall_s": round(wall, 3),
            "sim_requests_per_wall_s": round(n / wall), "engine_steps": res.stats["engine_steps"],
            "steps_per_wall_s": round(res.stats["engine_steps"] / wall), "peak_rss_mib": round(rss_mib),
            "completed": int(sum(res.requests.column("success").to_pylist()))}


def table(sizes=(1_000, 10_000, 100_000)) -> list[dict]:
    rows = []
    for rate in RATES:
        for record in (True, False):
            for n in sizes:
                out = subprocess.run([sys.executable, __file__, "--one", str(n), str(rate), str(int(record))],
                                     cwd=ROOT, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout))
                print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    return (f"rate {r['rate']:>4} req/s  steps {'on ' if r['record_steps'] else 'off'}  {r['requests']:>7} requests: "
            f"{r['wall_s']:>7.2f} s wall, {r['sim_requests_per_wall_s']:>7,} simulated req per wall s, "
            f"{r['engine_steps']:>9,} engine steps ({r['steps_per_wall_s']:>7,}/s), peak RSS {r['peak_rss_mib']:>5} MiB")


@pytest.mark.parametrize("n", [1_000, 10_000])
def test_bench_simulate(benchmark, n):
    from sim import EngineConfig, simulate
    args = setup(n, RATES[0])
    res = benchmark.pedantic(lambda: simulate(*args, config=EngineConfig(), include_load=False), rounds=1,
                             iterations=1)
    assert res.requests.num_rows == n
    print(f"\n{n} requests: {n / benchmark.stats.stats.mean:,.0f} simulated requests per wall second (measured)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(int(sys.argv[2]), float(sys.argv[3]), bool(int(sys.argv[4])))))
    else:
        print("simulator speed (measured on this machine; workload: 512/128 tokens, Poisson, 70B 4-bit, 4x M2 Ultra)")
        table()
