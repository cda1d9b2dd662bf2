"""Collectives over shaped links (issue 12): ring all_sum by message size on 2 ranks, each in its own network
namespace with its link rate-limited (tc), started as the backend starts TP ranks, beside the cost model's ring
all-reduce for the same link (a TP layer waits for two of these). Root and Linux (ip netns, tc).

    .venv/bin/python benchmarks/collectives_shaped.py [--gbps 1,10] [--ranks 2]

Measured: profile-host's collectives (harness.mlx.profile.collectives: the median of the ranks' own timing);
theoretical: the cost model's ring all-reduce over a link of that bandwidth with links.json's loopback latency.
The ratio says how far the TP term is from this host at each size. Two runs here (2 shared cores, 2026-12-03),
measured / model: 1 Gbit/s, 1 MiB 1.17-1.65x and 4 MiB 1.04-1.07x; 10 Gbit/s, where the CPU's reduction
dominates, 1 MiB 8.0-13.2x and 4 MiB 2.4-3.2x; messages up to 64 KiB 0.3-1.9x (the shaper lets a burst through).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measured_and_model(gbps: float, ranks: int) -> dict:
    """profile-host's own collectives measurement, with every rank's link shaped to `gbps` and the cost model
    priced over the same rate: {"median_s": {size: s}, "cost_model_s": {size: s}}."""
    from harness.catalog import link_kinds
    from harness.mlx import profile
    from harness.mlx.launcher import LinkShape
    link = {"latency_us": link_kinds()["loopback"]["latency_us"], "bandwidth_gbps": gbps}
    return profile.collectives(link, True, groups=(ranks,), timeout_s=300, links=[LinkShape(gbps)])[str(ranks)]


def main() -> int:
    from harness.cli import text_table
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gbps", default="1,10", help="link rates to shape, Gbit/s, comma-separated")
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    rows = [("link Gbit/s", "message bytes", "measured ms", "cost model ms", "measured / model")]
    for gbps in (float(x) for x in args.gbps.split(",")):
        print(f"all_sum on {args.ranks} ranks over {gbps:g} Gbit/s links ...", flush=True)
        figures = measured_and_model(gbps, args.ranks)
        for size, seconds in sorted(figures["median_s"].items(), key=lambda kv: int(kv[0])):
            model = figures["cost_model_s"][size]
            rows.append((f"{gbps:g}", size, f"{1e3 * seconds:.3f}", f"{1e3 * model:.3f}", f"{seconds / model:.2f}"))
    print("\nring all_sum, measured (shaped namespaces) vs theoretical (cost model)")
    print(text_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
