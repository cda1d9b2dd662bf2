"""Micro-benchmarks that measure this host as a "chip" for the simulator (all figures: measured).

- memory bandwidth: fp32 GEMV (matrix x vector) over matrices far larger than the caches, as a decode
  step streams its weights (the best of a few shapes);
- compute: fp32 GEMM (fp16 is reported too: on CPU it has no BLAS path and is far slower);
- per-step overhead: one decode step of the tiny local model minus its weight-streaming time;
- SSD read rate: a freshly written file read back after asking the kernel to drop its pages;
- ring link: ping-pong between 2 ranks over message sizes (latency = half the small-message RTT,
  bandwidth from the large messages);
- collectives: all_sum time by message size on rings of 2 and 3 ranks (what a tensor-parallel layer waits
  for twice), beside the cost model's ring all-reduce for the measured link.

Compute benchmarks run in a child process started with the same BLAS preload and thread count a
single rank gets, because LD_PRELOAD only works at process start.

    python -m harness.mlx.hostbench compute     # JSON on stdout (what profile-host runs)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RING_SIZES = (64, 1024, 16 * 1024, 256 * 1024, 1 << 20, 4 << 20, 16 << 20)
ALLSUM_SIZES = (64, 4 * 1024, 64 * 1024, 1 << 20, 4 << 20)


def _times(fn, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _median_time(fn, reps: int, warmup: int = 2) -> float:
    return statistics.median(_times(fn, reps, warmup))


def gemv_bandwidth_gbs(rows: int = 8192, cols: int = 8192, reps: int = 10) -> float:
    import mlx.core as mx
    w = mx.random.normal((rows, cols), dtype=mx.float32)
    x = mx.random.normal((cols,), dtype=mx.float32)
    mx.eval(w, x)
    t = _median_time(lambda: mx.eval(w @ x), reps)
    return rows * cols * 4 / t / 1e9


GEMV_SHAPES = ((8192, 8192), (4096, 8192), (5632, 2048), (2048, 5632))


def best_gemv_bandwidth_gbs(shapes=GEMV_SHAPES, reps: int = 5) -> float:
    """The best fp32 GEMV bandwidth over a few weight shapes: BLAS kernels stream some shapes much
    better than others, and the roofline should use what the memory system can deliver."""
    return max(gemv_bandwidth_gbs(r, c, reps) for r, c in shapes)


def gemm_gflops(m: int = 512, n: int = 4096, k: int = 4096, dtype: str = "float32", reps: int = 5) -> float:
    import mlx.core as mx
    dt = getattr(mx, dtype)
    a = mx.random.normal((m, k)).astype(dt)
    b = mx.random.normal((k, n)).astype(dt)
    mx.eval(a, b)
    t = _median_time(lambda: mx.eval(a @ b), reps, warmup=1)
    return 2 * m * n * k / t / 1e9


def decode_step_s(model_path: str, tokens: int = 64) -> tuple[float, int]:
    """Median seconds per decode step of a model in this process, and its weight bytes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_path))
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    stamps = []
    for _ in generate_step(mx.array([1, 2, 3, 4]), model, max_tokens=tokens, sampler=make_sampler(temp=0.0)):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]   # skip the prefill and first step
    return statistics.median(gaps), nbytes


def ssd_read_gbs(size_mb: int = 256, directory: str | None = None) -> float:
    chunk = os.urandom(1 << 20)
    fd, path = tempfile.mkstemp(prefix="harness-ssd-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(size_mb):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            # evict the just-written pages, so the read below comes from the device
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass
        return size_mb * (1 << 20) / (time.perf_counter() - t) / 1e9
    finally:
        os.unlink(path)


def total_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def measure_compute(model_path: str | None) -> dict:
    """Run inside a process that has the BLAS configuration to measure."""
    out = {"gemv_fp32_gbs": best_gemv_bandwidth_gbs(), "gemm_fp32_gflops": gemm_gflops(),
           "gemm_fp16_gflops": gemm_gflops(m=128, n=1024, k=1024, dtype="float16", reps=3)}
    if model_path:
        step, nbytes = decode_step_s(model_path)
        out.update(decode_step_s=step, decode_model_bytes=nbytes,
                   step_overhead_s=max(0.0, step - nbytes / (out["gemv_fp32_gbs"] * 1e9)))
    return out


def ring_pingpong(sizes=RING_SIZES, reps: int = 20) -> dict:
    """Run on 2 ring ranks: rank 0 sends, rank 1 echoes. Rank 0 returns RTT medians per size."""
    import mlx.core as mx
    group = mx.distributed.init(backend="ring", strict=True)
    rank = group.rank()
    result = {}
    for size in sizes:
        x = mx.zeros((max(1, size // 4),), dtype=mx.float32)
        mx.eval(x)

        def once():
            if rank == 0:
                mx.eval(mx.distributed.send(x, 1, group=group))
                mx.eval(mx.distributed.recv_like(x, 1, group=group))
            else:
                y = mx.distributed.recv_like(x, 0, group=group)
                mx.eval(y)
                mx.eval(mx.distributed.send(y, 0, group=group))
        times = _times(once, reps, warmup=3)
        result[str(size)] = statistics.median(times)
        result[f"min_{size}"] = min(times)
    small = mx.zeros((16,), dtype=mx.float32)
    result["all_sum_64B"] = _median_time(lambda: mx.eval(mx.distributed.all_sum(small, group=group)), reps, 3)
    return result


def all_sum_times(sizes=ALLSUM_SIZES, reps: int = 20) -> dict:
    """Run on every rank of a ring: median and fastest all_sum time per message size (bytes)."""
    import mlx.core as mx
    group = mx.distributed.init(backend="ring", strict=True)
    out = {"ranks": group.size(), "median_s": {}, "min_s": {}}
    for size in sizes:
        x = mx.ones((max(1, size // 4),), dtype=mx.float32)
        mx.eval(x)
        times = _times(lambda: mx.eval(mx.distributed.all_sum(x, group=group)), reps, warmup=3)
        out["median_s"][str(size)] = statistics.median(times)
        out["min_s"][str(size)] = min(times)
    return out


def link_from_rtts(rtts: dict) -> dict:
    """Latency: half the smallest message's fastest RTT (on a busy host the median includes scheduler
    stalls of several ms, which are not a property of the link). Bandwidth: the slope of the median RTT
    between the two largest sizes."""
    sizes = sorted(int(k) for k in rtts if k.isdigit())
    lat = rtts.get(f"min_{sizes[0]}", rtts[str(sizes[0])]) / 2
    s1, s2 = sizes[-2], sizes[-1]
    slope = (rtts[str(s2)] - rtts[str(s1)]) / 2 / (s2 - s1)      # one-way seconds per byte
    return {"latency_us": lat * 1e6, "bandwidth_gbps": 8 / slope / 1e9 if slope > 0 else float("nan"),
            "rtt_s_by_size": {k: v for k, v in rtts.items() if k.isdigit()},
            "median_latency_us": rtts[str(sizes[0])] / 2 * 1e6, "all_sum_64B_s": rtts.get("all_sum_64B")}


def run_child(mode: str, env_extra: dict, args: list[str] = (), timeout: float = 600) -> dict:
    env = dict(os.environ, **env_extra)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-m", "harness.mlx.hostbench", mode, *args], env=env, cwd=root,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"hostbench {mode} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mode = argv[0] if argv else "compute"
    from harness.mlx.worker import pin_core
    pin_core()   # before mlx is imported, exactly as a rank does (HARNESS_CPU_CORE, when the caller set it)
    if mode == "compute":
        print(json.dumps(measure_compute(argv[1] if len(argv) > 1 else None)))
    elif mode == "gemm":
        print(json.dumps({"gemm_fp32_gflops": gemm_gflops(m=128, n=1024, k=4096),
                          "gemv_fp32_gbs": best_gemv_bandwidth_gbs()}))
    elif mode == "decode":
        step, nbytes = decode_step_s(argv[1], tokens=int(argv[2]) if len(argv) > 2 else 64)
        print(json.dumps({"decode_step_s": step, "model_bytes": nbytes}))
    elif mode in ("ring", "allsum"):
        res = ring_pingpong() if mode == "ring" else all_sum_times()
        if os.environ.get("MLX_RANK") == "0":
            print(json.dumps(res))
    else:
        print(f"unknown mode {mode!r}: compute | gemm | decode | ring | allsum", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
