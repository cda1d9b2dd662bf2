"""hybrid_optimal's search at 4-16 heterogeneous nodes (issue 15 item 4): time, objective, search statistics.

    python benchmarks/planner_scale.py [--model llama-3.1-70b] [--quant 4] [--objective all] [--repeat 3]

The clusters are prefixes of one 16-node list built from the bundled chips: M3 Ultra, M4 Max and M4 Pro nodes
(Thunderbolt 5, RDMA between any two of them, so tensor-parallel groups are in play) and M2 Ultra, M2 Max and
M1 Max nodes (10 GbE to everything). Each prefix contains the smaller ones, so the objective must never rise
down the table (monotone). Times are measured on this machine, the minimum of --repeat runs; the reference in
the same run is the exhaustive search (no bounds) over the same sets, up to --exhaustive-up-to nodes (goodput's
up to --exhaustive-goodput-up-to: its split programme is the costly one): its objective must equal the bounded
one (exact) and its time gives the ratio. Objectives are theoretical (cost model); --objective all (the default)
prints a table for each of latency, throughput and goodput. Then the issue's 8-in-10 comparison for 70B and 405B.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import catalog  # noqa: E402
from harness.cli import text_table  # noqa: E402
from harness.costmodel import OBJECTIVES, PlanOptions, load_profile  # noqa: E402
from harness.planning import quant_arg  # noqa: E402
from strategies.partitioning.hybrid_optimal import search_plan  # noqa: E402

CHIPS = {"M3 Ultra": (80, 256), "M4 Max": (40, 128), "M4 Pro": (20, 64),
         "M2 Ultra": (76, 192), "M2 Max": (38, 96), "M1 Max": (32, 64)}
RDMA = {"M3 Ultra", "M4 Max", "M4 Pro"}
NODES = ("M3 Ultra", "M4 Max", "M4 Max", "M2 Ultra", "M2 Max", "M4 Pro", "M4 Pro", "M1 Max",
         "M4 Pro", "M1 Max", "M3 Ultra", "M4 Max", "M2 Ultra", "M4 Pro", "M2 Max", "M4 Pro")


def lab_cluster(size: int):
    """The first `size` nodes of NODES: RDMA between Thunderbolt 5 nodes, 10 GbE for every other pair."""
    chips = NODES[:size]
    nodes = [{"name": f"n{i:02d}-{c.replace(' ', '').lower()}", "chip": c, "gpu_cores": CHIPS[c][0],
              "memory_gb": CHIPS[c][1]} for i, c in enumerate(chips)]
    links = [{"a": a["name"], "b": b["name"], "kind": "tb5-rdma" if {a["chip"], b["chip"]} <= RDMA else "10gbe"}
             for i, a in enumerate(nodes) for b in nodes[i + 1:]]
    return catalog.parse_cluster({"name": f"lab-{size}", "nodes": nodes, "links": links})


def timed(cluster, model, options, repeat: int, bounds: bool = True):
    best, plan = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        plan = search_plan(cluster, model, options, bounds)
        best = min(best, time.perf_counter() - start)
    return best, plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-70b")
    ap.add_argument("--quant", type=quant_arg, default=4, help="bits: 4, 4.5 or mixed:4/6 (as `harness plan`)")
    ap.add_argument("--objective", default="all", choices=["all", *OBJECTIVES])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--exhaustive-up-to", type=int, default=8)
    ap.add_argument("--exhaustive-goodput-up-to", type=int, default=4)
    args = ap.parse_args(argv)
    model = catalog.load_model(args.model, args.quant)
    for objective in (list(OBJECTIVES) if args.objective == "all" else [args.objective]):
        options = PlanOptions(load_profile(), objective=objective)
        up_to = args.exhaustive_goodput_up_to if objective == "goodput" else args.exhaustive_up_to
        print(f"{model.name} {args.quant}-bit, objective {objective}, profile {options.profile.name}")
        print(text_table(_scale_rows(model, options, args.repeat, up_to)))
        print()
    print("the issue's 8-in-10 case (objective ms, theoretical): the 10-node cluster contains the 8-node one")
    cmp_rows = [("model", "8 nodes", "10 nodes", "10 <= 8")]
    for name in ("llama-3.1-70b", "llama-3.1-405b"):
        m = catalog.load_model(name, 4)
        eight, ten = (search_plan(lab_cluster(n), m, PlanOptions(load_profile())).predicted["objective_ms"]
                      for n in (8, 10))
        cmp_rows.append((name, f"{eight:.2f}", f"{ten:.2f}", str(ten <= eight * (1 + 1e-9))))
    print(text_table(cmp_rows))
    return 0


def _scale_rows(model, options, repeat: int, exhaustive_up_to: int) -> list[tuple[str, ...]]:
    rows = [("nodes", "objective ms (theoretical)", "search s (measured, min)", "exhaustive s (measured)",
             "speed-up", "sets evaluated / cut", "orders tried / cut", "split programmes")]
    last = float("inf")
    for size in (4, 8, 10, 12, 16):  # prefixes of NODES
        cluster = lab_cluster(size)
        seconds, plan = timed(cluster, model, options, repeat)
        objective = plan.predicted["objective_ms"]
        counts = _numbers(plan.notes[-1])   # evaluated, cut, orders tried, orders cut, programmes
        ref = ratio = "-"
        if size <= exhaustive_up_to:
            ref_s, ref_plan = timed(cluster, model, options, 1, bounds=False)
            same = abs(ref_plan.predicted["objective_ms"] - objective) <= 1e-9 * objective
            ref, ratio = f"{ref_s:.3f}{'' if same else ' (DIFFERS)'}", f"{ref_s / seconds:.1f}x"
        rows.append((str(size), f"{objective:.3f}{'' if objective <= last * (1 + 1e-9) else ' (WORSE)'}",
                     f"{seconds:.3f}", ref, ratio, f"{counts[0]} / {counts[1]}", f"{counts[2]} / {counts[3]}",
                     str(counts[4])))
        last = min(last, objective)
    return rows


def _numbers(stats: str) -> list[str]:
    """The figures of hybrid_optimal's statistics note after its class count, in order."""
    words = stats.split("of interchangeable nodes): ", 1)[1].replace(";", " ").replace(",", " ").split()
    return [w for w in words if w.replace(".", "").isdigit()]


if __name__ == "__main__":
    sys.exit(main())
