"""Simulator speed (issue 15): microseconds of wall time per simulated request and per engine step, for one and
four pipeline stages at 0.2 and 1 request/s (Llama 3.1 70B 4-bit, 512-token prompts, 128-token outputs, Poisson,
step records streamed to parquet as `harness simulate` writes them), each beside a fixed SimPy reference workload
timed in the same run (sim.run.reference_work_s), so the ratio is what to compare across machines.

    .venv/bin/python benchmarks/sim_speed.py [--requests 10000] [--reps 3]

All figures are measured on this machine (min of --reps); the simulated metrics are not the point.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = (("1 stage", "min_latency", 0.2), ("1 stage", "min_latency", 1.0),
         ("4 stages", "uniform", 0.2), ("4 stages", "uniform", 1.0))


def inputs(strategy: str, rate: float, n: int):
    from harness import catalog
    from harness.costmodel import PlanOptions, load_profile
    from harness.workloads import build_workload
    from strategies.registry import get_strategy
    cluster, model, profile = catalog.load_cluster("m2ultra-4x-tb4"), catalog.load_model("llama-3.1-70b", 4), load_profile()
    plan = get_strategy(strategy)(cluster, model, PlanOptions(profile=profile))
    workload = build_workload({"kind": "synthetic", "num_requests": n, "seed": 0, "prompt": 512, "output": 128,
                               "arrival": {"process": "poisson", "rate": rate}})
    return cluster, model, plan, profile, workload


def timed(strategy: str, rate: float, n: int) -> tuple[float, int]:
    """(wall seconds, engine steps) of one simulation with its step records streamed to a parquet file."""
    import pyarrow.parquet as pq
    from harness.metrics import STEP_COLUMNS, arrow_schema
    from sim.run import simulate
    args = inputs(strategy, rate, n)
    with tempfile.TemporaryDirectory() as tmp:
        sink = pq.ParquetWriter(f"{tmp}/steps.parquet", arrow_schema(STEP_COLUMNS))
        start = time.perf_counter()
        result = simulate(*args, include_load=False, step_sink=sink.write_table)
        sink.close()
        wall = time.perf_counter() - start
    return wall, int(result.stats["engine_steps"])


def main() -> int:
    from harness.cli import text_table
    from sim.run import reference_work_s
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    rows = [("case", "strategy", "rate req/s", "wall s", "us per request", "engine steps", "us per step",
             "x reference")]
    for label, strategy, rate in CASES:
        runs = [timed(strategy, rate, args.requests) for _ in range(args.reps)]
        ref = min(reference_work_s() for _ in range(args.reps))
        wall, steps = min(runs)
        rows.append((label, strategy, f"{rate:g}", f"{wall:.2f}", f"{1e6 * wall / args.requests:.0f}", f"{steps:,}",
                     f"{1e6 * wall / steps:.1f}", f"{wall / ref:.1f}"))
        print(f"  {label} {strategy} {rate:g} req/s: {wall:.2f} s", file=sys.stderr, flush=True)
    print(f"simulator speed (measured, min of {args.reps}), {args.requests:,} requests, step records on:")
    print(text_table(rows))
    print("x reference = wall time / a fixed SimPy workload timed in the same run (sim.run.reference_work_s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
