"""Simulator speed (issue 15): microseconds of wall time per simulated request and per scheduler iteration (engine
step: one micro-batch through the pipeline), for one and four pipeline stages at 0.2 and 1 request/s (Llama 3.1 70B
4-bit, 512-token prompts, 128-token outputs, Poisson, step records streamed to parquet as `harness simulate` writes
them), each beside a fixed SimPy reference workload timed in the same run (sim.run.reference_work_s), so the ratio
is what to compare across machines.

    .venv/bin/python benchmarks/sim_speed.py [--requests 10000] [--reps 3] [--step-by-step] [--slow-100k]

Each case is also timed with summary step records (EngineConfig step_records="summary", `simulate --step-records
summary`: per-window aggregates written to step_summary.parquet instead of a row per micro-batch and stage), and
its wall time printed as a ratio to the full records' in the same run.

--step-by-step also times each case with the several-scheduler fast-forward off (EngineConfig
fast_forward_schedulers=False: one event per micro-batch, what the simulator did before sim.steady) and prints the
speed-up. --slow-100k times 100,000 requests of the slow case (4 stages, 0.2 req/s) once.
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


def timed(strategy: str, rate: float, n: int, steady: bool = True, records: str = "full") -> tuple[float, int, int]:
    """(wall seconds, engine steps, steps taken in steady windows) of one simulation with its step records
    streamed to a parquet file (records="summary": the per-window summary written to one at the end)."""
    import pyarrow.parquet as pq
    from harness.runfolder import parquet_writer
    from harness.metrics import STEP_COLUMNS, arrow_schema
    from sim import EngineConfig
    from sim.run import simulate
    args = inputs(strategy, rate, n)
    with tempfile.TemporaryDirectory() as tmp:
        sink = parquet_writer(f"{tmp}/steps.parquet", arrow_schema(STEP_COLUMNS))
        start = time.perf_counter()
        result = simulate(*args, EngineConfig(fast_forward_schedulers=steady, step_records=records),
                          include_load=False, step_sink=sink.write_table)
        sink.close()
        if result.step_summary is not None:
            pq.write_table(result.step_summary, f"{tmp}/step_summary.parquet")
        wall = time.perf_counter() - start
    return wall, int(result.stats["engine_steps"]), int(result.stats["steady_window_steps"])


def main() -> int:
    from harness.cli import text_table
    from sim.run import reference_work_s
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--step-by-step", action="store_true", help="also time each case without sim.steady")
    p.add_argument("--slow-100k", action="store_true", help="also time 100,000 requests of the slow case once")
    args = p.parse_args()
    head = ["case", "strategy", "rate req/s", "wall s", "us per request", "engine steps", "in steady windows",
            "us per step", "x reference", "summary us per request", "summary / full"]
    rows = [tuple(head + (["step-by-step us per request", "speed-up"] if args.step_by_step else []))]
    for label, strategy, rate in CASES:
        wall, steps, steady = min(timed(strategy, rate, args.requests) for _ in range(args.reps))
        summary = min(timed(strategy, rate, args.requests, records="summary")[0] for _ in range(args.reps))
        ref = min(reference_work_s() for _ in range(args.reps))
        row = [label, strategy, f"{rate:g}", f"{wall:.2f}", f"{1e6 * wall / args.requests:.0f}", f"{steps:,}",
               f"{steady / steps:.0%}", f"{1e6 * wall / steps:.1f}", f"{wall / ref:.1f}",
               f"{1e6 * summary / args.requests:.0f}", f"{summary / wall:.2f}"]
        if args.step_by_step:
            slow = min(timed(strategy, rate, args.requests, steady=False)[0] for _ in range(args.reps))
            row += [f"{1e6 * slow / args.requests:.0f}", f"{slow / wall:.1f}x"]
        rows.append(tuple(row))
        print(f"  {label} {strategy} {rate:g} req/s: {wall:.2f} s", file=sys.stderr, flush=True)
    print(f"simulator speed (measured, min of {args.reps}), {args.requests:,} requests, full step records "
          "(summary: per-window step summaries instead):")
    print(text_table(rows))
    print("x reference = wall time / a fixed SimPy workload timed in the same run (sim.run.reference_work_s)")
    if args.slow_100k:
        for records in ("full", "summary"):
            wall, steps, _ = timed("uniform", 0.2, 100_000, records=records)
            ref = min(reference_work_s() for _ in range(args.reps))
            print(f"slow case (4 stages uniform, 0.2 req/s), 100,000 requests, {records} step records: {wall:.1f} s "
                  f"wall, {1e6 * wall / 100_000:.0f} us per request, {1e6 * wall / steps:.1f} us per step, "
                  f"{wall / ref:.0f}x reference", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
