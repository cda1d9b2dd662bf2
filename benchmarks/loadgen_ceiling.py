"""Load generator ceiling vs a fixed client (issue 15, measured on this machine, all in the same run).

1. Ceiling: `wrk` (a Lua script POSTing a streaming chat completion, the fixed client of
   server_vs_bare.py) and our load generator with 1, 2, ... worker processes, alternating, drive the same
   bare Starlette SSE server (64 chunks per request) closed-loop at the same concurrency. Printed: chunks/s
   of each and the load generator's ratio to wrk (the median of the repeats).
2. Dispatch delay: open-loop constant rates at 20, 40, 60 and 80 % of the ceiling part 1 measured (the
   best load generator figure), against the same bare server. Printed: offered and achieved chunks/s and
   the dispatch delay (start_s - scheduled_s) p50 and p99.
3. The 200 req/s anomaly: the pause of one full garbage collection in a process holding the modules bench
   holds, heap as it is and frozen; then 100, 200, 300 req/s one after another against `serve --backend
   instant`, with the heap frozen out of the collector during each run (run_load's default) and without
   (the old behaviour), the sequence repeated. Printed: dispatch p99 and the full (generation 2)
   collections that fell inside each run, with the longest pause.

Traffic goes to 127.0.0.1 only; every run is bounded in requests and in time. With 2 cores shared by the
server, the client and others, absolute figures say little: compare the ratios.

    python benchmarks/loadgen_ceiling.py [--workers 1,2] [--concurrency 16] [--seconds 2] [--repeat 2]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import server_vs_bare as bare  # noqa: E402  (its bare app, server start and wrk driver)
from harness.serving import loadgen  # noqa: E402
from harness.serving.loadgen import LoadMode, Target, run_load_sync  # noqa: E402
from harness.workloads import build_workload, parse_workload  # noqa: E402

RUN_BOUND_S = 30.0   # no single load generator run may go past this (it is cut and marked, never hangs)


def bare_target(port: int) -> Target:
    return Target(f"http://127.0.0.1:{port}", model="instant", endpoint="chat", pin_output=False)


def loadgen_chunks_per_s(port: int, concurrency: int, requests: int, workers: int) -> float:
    wl = build_workload(parse_workload(f"all_at_once,n={requests},prompt=8,output={bare.TOKENS}"))
    result = run_load_sync(bare_target(port), wl, LoadMode("concurrent", concurrency), warmup=concurrency,
                           workers=workers, max_duration_s=RUN_BOUND_S)
    return sum(len(r["chunk_times_s"]) for r in result.rows) / result.duration_s


def ceiling(port: int, lua: str, args) -> float:
    """Part 1; returns the best load generator chunks/s."""
    requests = max(200, int(args.seconds * 400))   # a few seconds at this machine's rate
    runs: dict[str, list[float]] = {"wrk": [], **{f"workers={w}": [] for w in args.workers}}
    for _ in range(args.repeat):   # alternate, so a noisy neighbour hits every client alike
        runs["wrk"].append(bare.wrk_rps(port, args.concurrency, max(1, round(args.seconds)), lua) * bare.TOKENS)
        for w in args.workers:
            runs[f"workers={w}"].append(loadgen_chunks_per_s(port, args.concurrency, requests, w))
    figures = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n1. ceiling: closed loop, {args.concurrency} streams, {bare.TOKENS} chunks per request, bare SSE server, "
          f"median of {args.repeat} (measured, {os.cpu_count()} cores)")
    print(f"{'client':>12} {'chunks/s':>10} {'vs wrk':>7}")
    for name, value in figures.items():
        print(f"{name:>12} {value:>10.0f} {value / figures['wrk']:>7.2f}")
    return max(v for k, v in figures.items() if k != "wrk")


def dispatch_at_rates(port: int, top_chunks_per_s: float, args) -> None:
    """Part 2."""
    print(f"\n2. dispatch delay, constant rate, bare SSE server, {args.seconds:g} s per rate, workers=1 "
          f"(measured, {os.cpu_count()} cores)")
    print(f"{'% ceiling':>9} {'req/s':>7} {'chunks/s offered':>17} {'chunks/s done':>14} {'p50 ms':>7} {'p99 ms':>7}")
    for share in (0.2, 0.4, 0.6, 0.8):
        rate = share * top_chunks_per_s / bare.TOKENS
        n = max(20, int(rate * args.seconds))
        wl = build_workload(parse_workload(f"all_at_once,n={n},prompt=8,output={bare.TOKENS}"))
        result = run_load_sync(bare_target(port), wl, LoadMode("constant", rate), warmup=4, max_duration_s=RUN_BOUND_S)
        done = sum(len(r["chunk_times_s"]) for r in result.rows) / result.duration_s
        delays = sorted(result.dispatch_delays_s() * 1e3)
        p50, p99 = statistics.median(delays), delays[int(0.99 * (len(delays) - 1))]
        print(f"{share * 100:>8.0f}% {rate:>7.0f} {rate * bare.TOKENS:>17.0f} {done:>14.0f} {p50:>7.2f} {p99:>7.2f}")


class FullCollections:
    """Generation 2 collections and their pauses, from gc.callbacks."""

    def __init__(self):
        self.pauses: list[tuple[float, float]] = []   # (start perf_counter, seconds)
        self._start = 0.0

    def __call__(self, phase, info):
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((self._start, time.perf_counter() - self._start))

    def inside(self, t0: float, t1: float) -> list[float]:
        return [p for at, p in self.pauses if t0 <= at <= t1]


def load_what_bench_loads() -> None:
    """A full collection's pause grows with the heap: import what `bench --backend instant` holds (pandas
    and pyarrow for the run folder, the FastAPI server, the report renderer), so the pauses are bench's."""
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import harness.commands.bench  # noqa: F401
    import harness.recording  # noqa: F401
    import harness.serving.server  # noqa: F401
    import reports  # noqa: F401


def full_collection_ms(frozen: bool, times: int = 5) -> float:
    """Median time of gc.collect() (the pause a full collection puts on the event loop), with the heap as it
    is or frozen out of the collector's reach (what run_load does for the measured part of a run)."""
    pauses = []
    for _ in range(times):
        if frozen:
            gc.freeze()
        start = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - start) * 1e3)
        gc.unfreeze()
    return statistics.median(pauses)


def gc_anomaly(port: int, args) -> None:
    """Part 3: the pause itself, then the same sequence of rates with and without run_load's gc freeze."""
    load_what_bench_loads()
    print(f"\n3. the 200 req/s anomaly: a full garbage collection in a process holding bench's modules "
          f"({len(gc.get_objects())} tracked objects) pauses the event loop {full_collection_ms(False):.1f} ms; "
          f"with the heap frozen {full_collection_ms(True):.1f} ms (median of 5, measured, {os.cpu_count()} cores)")
    print(f"   `serve --backend instant`, 64-token prompts, 16-token outputs (light enough that 2 cores keep up), "
          f"{args.seconds:g} s per "
          f"rate, 100/200/300 one after another {args.repeat} times, workers=1 (measured, {os.cpu_count()} cores)")
    print(f"{'heap':>16} {'req/s':>6} {'p99 dispatch ms':>16} {'full GCs in run':>16} {'longest ms':>11}")
    collections = FullCollections()
    gc.callbacks.append(collections)
    try:
        for label, freeze in (("not frozen (old)", False), ("frozen (now)", True)):
            for rate in (100, 200, 300) * args.repeat:   # the collector's threshold falls where it falls: repeat
                wl = build_workload(parse_workload(f"all_at_once,n={int(rate * args.seconds)},prompt=64,output=16"))
                with contextlib.ExitStack() as stack:
                    if not freeze:   # the old behaviour: whatever the collector does, it does inside the run
                        stack.enter_context(_patched(loadgen, "gc_frozen", contextlib.nullcontext))
                    result = run_load_sync(Target(f"http://127.0.0.1:{port}"), wl, LoadMode("constant", rate),
                                           warmup=4, max_duration_s=RUN_BOUND_S)
                t0 = result.t0_monotonic - time.monotonic() + time.perf_counter()
                pauses = collections.inside(t0, t0 + result.duration_s)
                delays = sorted(result.dispatch_delays_s() * 1e3)
                p99 = delays[int(0.99 * (len(delays) - 1))]
                longest = f"{max(pauses) * 1e3:.1f}" if pauses else "-"
                print(f"{label:>16} {rate:>6} {p99:>16.2f} {len(pauses):>16} {longest:>11}")
    finally:
        gc.callbacks.remove(collections)


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="load generator worker counts to compare (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="streams in flight for part 1 (default %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="about how long each run lasts (default %(default)s)")
    p.add_argument("--repeat", type=int, default=2,
                   help="alternating repeats of part 1, repeats of part 3's sequence (default %(default)s)")
    p.add_argument("--parts", default="1,2,3", help="which parts to run (default %(default)s; 2 needs 1's ceiling)")
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    if shutil.which("wrk") is None:
        print("error: wrk not found on PATH; install it (apt-get install -y wrk)", file=sys.stderr)
        return 2
    from harness.mlx.launcher import free_ports
    bare_port, ours_port = free_ports(2)
    procs = [bare._start("bare", bare_port), bare._start("ours", ours_port)]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(bare.WRK_LUA)
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} cores, load average {load}; server, clients and others share them")
        parts = {int(x) for x in args.parts.split(",")}
        if parts & {1, 2}:
            top = ceiling(bare_port, f.name, args)
            if 2 in parts:
                dispatch_at_rates(bare_port, top, args)
        if 3 in parts:
            gc_anomaly(ours_port, args)
    finally:
        os.unlink(f.name)
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
