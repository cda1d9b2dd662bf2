"""Decode speed of the real backend on a ~150M-parameter local model (every figure printed is labelled).

    python benchmarks/mlx_decode.py [--size 150m] [--tokens 64] [--repeats 3]

Prints: the roofline decode rate from the measured fp32 GEMV bandwidth (theoretical), plain mlx-lm in
one process (measured), our backend with 1 rank and with a 2-rank ring pipeline (measured, with the
efficiency against the roofline and the 2-rank/1-process ratio), and the aggregate rate of 4
concurrent requests (continuous batching).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.backends.base import GenerationRequest  # noqa: E402
from harness.mlx import blas, hostbench, modelbuild  # noqa: E402
from harness.backends.mlx import MlxBackend  # noqa: E402


async def _one(backend, prompt, tokens, rid):
    t0 = time.monotonic()
    times = [ev.time_s async for ev in backend.generate(GenerationRequest(rid, prompt, max_tokens=tokens,
                                                                           ignore_eos=True))]
    return times[0] - t0, (len(times) - 1) / (times[-1] - times[0]), times[-1] - t0


async def measure(path, split, prompt, tokens, repeats, concurrent=1):
    backend = MlxBackend(path, split)
    try:
        report = await backend.load()
        await _one(backend, prompt, 8, "warmup")
        runs = []
        for i in range(repeats):
            t0 = time.monotonic()
            res = await asyncio.gather(*[_one(backend, prompt, tokens, f"r{i}-{j}") for j in range(concurrent)])
            wall = time.monotonic() - t0
            runs.append((statistics.median(r[0] for r in res), statistics.median(r[1] for r in res),
                         concurrent * tokens / wall))
        return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                statistics.median(r[2] for r in runs), report)
    finally:
        await backend.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="150m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    built = modelbuild.build(modelbuild.qwen2_config(args.size))
    cfg = built.config
    nbytes = modelbuild.parameter_count(cfg) * 4
    ncpu = len(os.sched_getaffinity(0))
    preload = blas.find_openblas()
    env = blas.blas_env(ncpu, preload)
    print(f"model {built.path.name}: {modelbuild.parameter_count(cfg) / 1e6:.0f}M params, {nbytes / 1e9:.2f} GB fp32, "
          f"{cfg['num_hidden_layers']} layers; BLAS: {preload or 'bundled reference'}; cpus {ncpu}; "
          f"loadavg {os.getloadavg()[0]:.2f}")
    # best of 3: on a shared machine the least-disturbed run is closest to what the memory system gives
    bw = max(hostbench.run_child("gemm", env)["gemv_fp32_gbs"] for _ in range(3))
    roof = bw * 1e9 / nbytes
    print(f"measured     fp32 GEMV bandwidth (best of 3) {bw:5.2f} GB/s")
    print(f"theoretical  roofline decode (weights/bw)  {roof:7.2f} tok/s")
    plain = 1 / hostbench.run_child("decode", env, [str(built.path), str(args.tokens)])["decode_step_s"]
    print(f"measured     plain mlx-lm, 1 process       {plain:7.2f} tok/s  ({plain / roof:5.1%} of roofline)")
    prompt = tuple(range(10, 10 + args.prompt))
    layers = cfg["num_hidden_layers"]
    one = asyncio.run(measure(built.path, None, prompt, args.tokens, args.repeats))
    print(f"measured     MlxBackend 1 rank             {one[1]:7.2f} tok/s  ({one[1] / roof:5.1%} of roofline; "
          f"TTFT {one[0] * 1e3:.0f} ms for {args.prompt} prompt tokens; load {max(one[3].load_s_per_node.values()):.2f} s)")
    half = [layers // 2, layers - layers // 2]
    two = asyncio.run(measure(built.path, half, prompt, args.tokens, args.repeats))
    print(f"measured     MlxBackend 2 ranks {half}    {two[1]:7.2f} tok/s  ({two[1] / one[1]:5.1%} of 1 rank; "
          f"TTFT {two[0] * 1e3:.0f} ms)")
    batched = asyncio.run(measure(built.path, None, prompt, args.tokens, max(1, args.repeats - 1), concurrent=4))
    print(f"measured     MlxBackend 1 rank, 4 concurrent requests: {batched[2]:7.2f} output tok/s aggregate "
          f"({batched[2] / one[1]:.2f}x one request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
