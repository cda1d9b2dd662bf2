"""Assemble the host profile (`python -m harness profile-host`) from `hostbench` measurements."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

from harness.mlx import blas, hostbench, launcher, modelbuild


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ring_link(use_blas: bool, timeout_s: float = 120, links=None, emulate_latency: bool = False) -> dict:
    """Ping-pong between 2 ranks, started like the backend's ranks: on loopback, or in namespaces
    shaped by `links` (one `launcher.LinkShape` per rank)."""
    return hostbench.link_from_rtts(_ring_bench("ring", 2, use_blas, timeout_s, links, emulate_latency))


def collectives(link: dict, use_blas: bool, groups=(2, 3), timeout_s: float = 180, links=None) -> dict:
    """all_sum by message size on rings of each size in `groups`, started like the backend's TP ranks, and the
    cost model's ring all-reduce for the same sizes over `link` (the measured 2-rank link): measured vs
    theoretical, so the TP term's error on this host is on record."""
    from harness.costmodel import allreduce_time, load_profile
    from harness.specs import Link
    model_link = Link("rank-a", "rank-b", "loopback", latency_us=link["latency_us"], bandwidth_gbps=link["bandwidth_gbps"])
    profile = load_profile()
    out = {}
    for n in groups:
        shapes = None if links is None else [links[0]] * n
        measured = _ring_bench("allsum", n, use_blas, timeout_s, shapes, False)
        predicted = {size: allreduce_time(model_link, int(size), n, profile) for size in measured["median_s"]}
        out[str(n)] = {"median_s": measured["median_s"], "min_s": measured["min_s"], "cost_model_s": predicted}
    return out


def _ring_bench(mode: str, n: int, use_blas: bool, timeout_s: float, links, emulate_latency: bool) -> dict:
    group = launcher.launch("-", [1] * n, use_blas=use_blas, links=links, emulate_latency=emulate_latency,
                            command=[sys.executable, "-m", "harness.mlx.hostbench", mode])
    try:
        rank0 = group.ranks[0].proc
        out, _ = rank0.communicate(timeout=timeout_s)
        if rank0.returncode != 0:
            raise RuntimeError(f"ring benchmark {mode} failed: {group.ranks[0].log_tail()}")
        return json.loads(out.decode().strip().splitlines()[-1])
    finally:
        group.close(grace_s=1.0)


def chip_name(ranks: int) -> str:
    """host-cpu for one process on every core; host-cpu-1core for a rank pinned to one core (N > 1 ranks)."""
    return "host-cpu" if ranks == 1 else "host-cpu-1core"


def profile_host(ring: bool = True, use_blas: bool = True, cache_dir=None, ranks: int = 1,
                 with_collectives: bool = True) -> dict:
    """This host measured as ONE of `ranks` ranks: the compute child gets exactly the BLAS threads and core
    pinning rank 0 of such a group gets from the launcher (all cores for one rank, one pinned core each for more)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    blas_path = blas.find_openblas() if use_blas else None
    cores = launcher.host_cores()
    ncpu = len(cores)
    tiny = modelbuild.build(modelbuild.qwen2_config("tiny"), cache_dir=cache_dir).path
    env = launcher.compute_env(0, ranks, blas_path, cores, ncpu)
    compute = hostbench.run_child("compute", env, [str(tiny)])
    rank_info = {"ranks": ranks, "blas_threads": int(env["OPENBLAS_NUM_THREADS"]),
                 "pinned_core": int(env["HARNESS_CPU_CORE"]) if "HARNESS_CPU_CORE" in env else None,
                 "cores": ncpu, "ranks_per_core": -(-ranks // ncpu)}
    ssd = hostbench.ssd_read_gbs()
    link = ring_link(use_blas) if ring else {"latency_us": None, "bandwidth_gbps": None}
    if ring and with_collectives:
        compute["all_sum"] = collectives(link, use_blas)
    return {
        # the name says how the rank runs: per-chip factors fitted for one rank must not apply to a pinned rank
        "chip": {"name": chip_name(ranks), "gpu_bin": "cpu", "gpu_cores": 0, "mem_bw_gbs": compute["gemv_fp32_gbs"],
                 "fp16_tflops": compute["gemm_fp32_gflops"] / 1e3, "max_mem_gb": hostbench.total_memory_gb(),
                 "thunderbolt": "none", "ssd_gbs": ssd},
        "profile": {"name": "host-cpu", "eta_bw": 1.0, "mu_compute": 1.0,
                    "step_overhead_s": compute.get("step_overhead_s", 0.0), "layer_overhead_s": 0.0,
                    "link_overhead_us": 0.0, "ssd_gbs": ssd, "per_chip": {},
                    "source": "measured: python -m harness profile-host"},
        "link": {"kind": "loopback", **link},
        "source": "measured",
        "measurements": compute,
        "rank": rank_info,
        "host": {"cpu": _cpu_name(), "cpus": ncpu, "machine": platform.machine(), "system": platform.system(),
                 "blas": blas_path or "bundled reference BLAS", "loadavg": os.getloadavg(),
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "notes": [f"measured as one of {ranks} rank(s): {rank_info['blas_threads']} BLAS thread(s)"
                  + (f", pinned to core {rank_info['pinned_core']}" if rank_info["pinned_core"] is not None else ", not pinned"),
                  "mem_bw_gbs is fp32 GEMV bandwidth; fp16_tflops holds the fp32 GEMM rate (the CPU's fast "
                  "path; fp16 GEMM is in measurements.gemm_fp16_gflops)",
                  "step_overhead_s: tiny-model decode step minus its weight-streaming time at mem_bw_gbs",
                  "link: 2 ring ranks on loopback; latency_us = half the fastest 64-byte RTT (median_latency_us: the median)",
                  "measurements.all_sum: ring all_sum seconds by message bytes for 2 and 3 ranks (measured), beside "
                  "cost_model_s, the cost model's ring all-reduce over the measured link (theoretical)"],
    }
