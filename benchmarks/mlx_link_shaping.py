"""Link emulation check: ring ping-pong between 2 ranks on loopback, in plain namespaces, and in namespaces
shaped with tc tbf. Needs root and iproute2 for the namespace rows.

    python benchmarks/mlx_link_shaping.py [--rates 1,0.1]

Prints measured one-way latency and bandwidth per configuration next to the configured rate and delay.
This kernel has no netem: latency comes from userspace delay relays (`harness.mlx.relay`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.mlx.launcher import LinkShape  # noqa: E402
from harness.mlx.profile import ring_link  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1,0.1", help="Gbit/s rates to emulate, comma separated")
    args = ap.parse_args()
    configs = [("loopback", None), ("namespaces, unshaped", [None, None])]
    configs += [(f"namespaces, tbf {r} Gbit/s", [LinkShape(float(r))] * 2) for r in args.rates.split(",")]
    configs += [(f"tbf 1 Gbit/s + relay {ms} ms", [LinkShape(1.0, ms * 1e3)] * 2) for ms in (1, 5)]
    for label, links in configs:
        res = ring_link(use_blas=False, links=links, emulate_latency=True)
        print(f"measured  {label:28s} latency {res['latency_us']:8.1f} us (median {res['median_latency_us']:7.1f})   bandwidth {res['bandwidth_gbps']:7.3f} Gbit/s"
              f"   RTT 16 MB {res['rtt_s_by_size']['16777216'] * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
