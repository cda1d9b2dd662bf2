"""`python -m harness profile-host --out FILE`: measure this machine as a chip for the simulator."""
from __future__ import annotations

import argparse

HELP = "measure this host (memory bandwidth, GEMM, step overhead, SSD, ring link) as a simulator chip"
DESCRIPTION = """Run micro-benchmarks on this machine and write a JSON profile the simulator can use, so the same plan
can be simulated and run on the same hardware. Every figure in it is measured. Takes about a minute.

The chip fields hold measured rates (fp32 GEMV bandwidth as mem_bw_gbs, fp32 GEMM as fp16_tflops:
on a CPU fp32 is the fast path), so the profile's efficiency factors are 1.0.

example:
  python -m harness profile-host --out runs/out/host-profile.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--no-ring", action="store_true", help="skip the 2-rank ring ping-pong")
    parser.add_argument("--no-blas", action="store_true", help="measure with the bundled reference BLAS")
    parser.add_argument("--cache-dir", default=None, help="model cache for the step-overhead model")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from harness.mlx import profile

    result = profile.profile_host(ring=not args.no_ring, use_blas=not args.no_blas, cache_dir=args.cache_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    chip, link = result["chip"], result["link"]
    print(f"measured: mem_bw {chip['mem_bw_gbs']:.2f} GB/s (fp32 GEMV), compute {chip['fp16_tflops'] * 1e3:.1f} "
          f"GFLOP/s (fp32 GEMM), step overhead {result['profile']['step_overhead_s'] * 1e3:.2f} ms, "
          f"SSD {chip['ssd_gbs']:.2f} GB/s")
    if link.get("latency_us") is not None:
        print(f"measured: ring loopback latency {link['latency_us']:.1f} us, bandwidth {link['bandwidth_gbps']:.2f} Gbit/s")
    print(f"wrote {out}")
    return 0
