"""Fast BLAS on Linux: fp32 GEMM (prefill) and GEMV (decode) with the bundled reference BLAS vs a preloaded OpenBLAS.

    python benchmarks/mlx_blas.py

Prints measured GFLOP/s and GB/s for each configuration and the speed-up. Each configuration runs in
its own process, because LD_PRELOAD only takes effect at process start.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.mlx import blas, hostbench  # noqa: E402


def main() -> int:
    ncpu = len(os.sched_getaffinity(0))
    preload = blas.find_openblas()
    configs = [("bundled reference BLAS", blas.blas_env(ncpu, None) | {"HARNESS_BLAS": "none"})]
    if preload:
        configs.append((f"OpenBLAS {ncpu} threads ({preload})", blas.blas_env(ncpu, preload)))
        configs.append(("OpenBLAS 1 thread", blas.blas_env(1, preload)))
    else:
        print(f"no OpenBLAS found: apt-get install -y {blas.APT_PACKAGE}")
    base = None
    for label, env in configs:
        env.setdefault("LD_PRELOAD", "")
        r = hostbench.run_child("gemm", env)
        g, bw = r["gemm_fp32_gflops"], r["gemv_fp32_gbs"]
        base = base or (g, bw)
        print(f"measured  fp32 GEMM 128x1024x4096 {g:7.1f} GFLOP/s ({g / base[0]:4.1f}x)   "
              f"fp32 GEMV best shape {bw:5.2f} GB/s ({bw / base[1]:4.1f}x)   {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
