"""Collectives over shaped links (issue 12): ring all_sum by message size on 2 ranks, each in its own network
namespace with its link rate-limited (tc), started as the backend starts TP ranks, beside the cost model's ring
all-reduce for the same link (a TP layer waits for two of these). Root and Linux (ip netns, tc).

    .venv/bin/python benchmarks/collectives_shaped.py [--gbps 1,10] [--ranks 2]

Measured: the median of the ranks' own timing (harness.mlx.hostbench allsum); theoretical: costmodel.allreduce_time
over a link of that bandwidth with links.json's loopback latency. The ratio says how far the TP term is from this
host at each size. Measured here (2 cores, 2026-12-03): at 1 Gbit/s, 1-4 MiB within 7-17 % of the model; at 10
Gbit/s the CPU's reduction dominates (3-8x the model at 1-4 MiB); under the shaper's burst (64 KiB at 1 Gbit/s)
faster than the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(gbps: float, ranks: int) -> dict:
    from harness.mlx import profile
    from harness.mlx.launcher import LinkShape
    return profile._ring_bench("allsum", ranks, True, 300, [LinkShape(gbps)] * ranks, False)["median_s"]


def predicted(gbps: float, ranks: int, size: int) -> float:
    from harness.catalog import make_link
    from harness.costmodel import allreduce_time, load_profile
    return allreduce_time(make_link("a", "b", "loopback", bandwidth_gbps=gbps), size, ranks, load_profile())


def main() -> int:
    from harness.cli import text_table
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gbps", default="1,10", help="link rates to shape, Gbit/s, comma-separated")
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    rows = [("link Gbit/s", "message bytes", "measured ms", "cost model ms", "measured / model")]
    for gbps in (float(x) for x in args.gbps.split(",")):
        print(f"all_sum on {args.ranks} ranks over {gbps:g} Gbit/s links ...", flush=True)
        for size, seconds in sorted(measure(gbps, args.ranks).items(), key=lambda kv: int(kv[0])):
            model = predicted(gbps, args.ranks, int(size))
            rows.append((f"{gbps:g}", size, f"{1e3 * seconds:.3f}", f"{1e3 * model:.3f}", f"{seconds / model:.2f}"))
    print("\nring all_sum, measured (shaped namespaces) vs theoretical (cost model)")
    print(text_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
