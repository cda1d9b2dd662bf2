"""`python -m harness profile-host --out FILE`: measure this machine as a chip for the simulator."""
from __future__ import annotations

import argparse

HELP = "measure this host (memory bandwidth, GEMM, step overhead, SSD, ring link) as a simulator chip"
DESCRIPTION = """Run micro-benchmarks on this machine and write a JSON profile the simulator can use, so the same plan
can be simulated and run on the same hardware. Every figure in it is measured. Takes about a minute.

The chip fields hold measured rates (fp32 GEMV bandwidth as mem_bw_gbs, fp32 GEMM as fp16_tflops:
on a CPU fp32 is the fast path), so the profile's efficiency factors are 1.0.

--ranks N measures ONE rank of an N-rank group exactly as the mlx backend starts it (one BLAS thread pinned to a
core when N > 1, all cores for one rank); --cluster-out also writes this host as N ranks as a cluster file
(nodes rank-stage0.., the measured loopback link between them) that simulate, plan and validate read.

examples:
  python -m harness profile-host --out runs/out/host-profile.json
  python -m harness profile-host --ranks 2 --out runs/out/host/profile-2ranks.json --cluster-out runs/out/host/cluster-2ranks.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--no-ring", action="store_true", help="skip the 2-rank ring ping-pong")
    parser.add_argument("--no-blas", action="store_true", help="measure with the bundled reference BLAS")
    parser.add_argument("--cache-dir", default=None, help="model cache for the step-overhead model")
    parser.add_argument("--ranks", type=int, default=1, help="measure one rank of this many (default %(default)s)")
    parser.add_argument("--cluster-out", default=None,
                        help="also write this host as --ranks ranks as a cluster file (beside --out)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from harness.mlx import profile

    from harness.specs import UserError
    if args.ranks < 1:
        raise UserError(f"--ranks {args.ranks}: give 1 or more ranks")
    out = Path(args.out)
    if args.cluster_out and Path(args.cluster_out).resolve().parent != out.resolve().parent:
        raise UserError("--cluster-out must be in the same folder as --out: the cluster names the profile by file name")
    result = profile.profile_host(ring=not args.no_ring, use_blas=not args.no_blas, cache_dir=args.cache_dir,
                                  ranks=args.ranks)
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
    if args.cluster_out:
        from harness.mlx.hostcluster import host_cluster
        cluster = Path(args.cluster_out)
        cluster.write_text(json.dumps(host_cluster(out, args.ranks), indent=2) + "\n")
        print(f"wrote {cluster} (this host as {args.ranks} rank(s))")
    return 0
