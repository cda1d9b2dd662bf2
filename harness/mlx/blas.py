"""Finding an optimised BLAS for rank processes on Linux.

The `mlx[cpu]` wheel links the netlib reference BLAS, about 20-30x slower for fp32 GEMM than an
optimised one. libmlx resolves `cblas_sgemm` at load time, so preloading Debian's OpenBLAS
(`apt-get install -y libopenblas0-pthread`) makes MLX use it without rebuilding anything.
On macOS MLX uses Accelerate and the GPU: nothing to do there.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# Debian/Ubuntu multiarch locations of the pthread OpenBLAS, first match wins.
CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
APT_PACKAGE = "libopenblas0-pthread"


def find_openblas() -> str | None:
    """Path of an OpenBLAS shared library, or None. $HARNESS_BLAS overrides ('none' disables)."""
    override = os.environ.get("HARNESS_BLAS")
    if override:
        return None if override.lower() == "none" else override
    if platform.system() != "Linux":
        return None
    arch = platform.machine()
    for pattern in CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).exists():
            return path
    return None


def blas_env(threads: int, preload: str | None) -> dict[str, str]:
    """Environment for a process that should use `preload` with `threads` BLAS threads."""
    env = {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    if preload:
        existing = os.environ.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{preload}:{existing}" if existing else preload
    return env
