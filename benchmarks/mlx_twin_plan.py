"""Run a partitioning strategy's plan for a catalog model on this host, with the model's scaled twin.

    python benchmarks/mlx_twin_plan.py --cluster mixed --model llama-3.1-8b --strategy uniform [--emulate-links]

The twin has the real model's layer count and head layout at a smaller width, so the plan's layer split
applies unchanged. Prints the plan's split (layer order), the measured per-stage compute and network
time per decode step and the measured decode rate. The plan's predicted times are for the real cluster
(theoretical) and are printed only for reference: this host is not that cluster. More stages than
cores oversubscribe the CPU, so treat such runs as functional checks.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.backends.base import GenerationRequest  # noqa: E402
from harness.mlx import modelbuild  # noqa: E402
from harness.backends.mlx import MlxBackend, links_for_plan  # noqa: E402
from harness.planning import add_plan_arguments, make_plan  # noqa: E402


async def run(backend, tokens):
    await backend.load()
    try:
        prompt = tuple(backend.encode("def main():\n    print('hello')\n" * 4))
        times = [ev.time_s async for ev in backend.generate(GenerationRequest("t", prompt, max_tokens=tokens,
                                                                               ignore_eos=True))]
        return (len(times) - 1) / (times[-1] - times[0]), backend.step_records()
    finally:
        await backend.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    add_plan_arguments(ap)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--emulate-links", action="store_true", help="namespaces with tbf rates from the cluster links")
    ap.add_argument("--emulate-latency", action="store_true", help="with --emulate-links: also the links' latency")
    args = ap.parse_args()
    cluster, model, plan = make_plan(args)
    twin = modelbuild.build(modelbuild.twin_config(args.model))
    print(f"plan {plan.strategy} for {plan.model} on {plan.cluster}: split {plan.split()} over "
          f"{[s.nodes for s in plan.stages]}; theoretical (real cluster) {plan.predicted}")
    print(f"twin {twin.path.name}: {modelbuild.parameter_count(twin.config) / 1e6:.0f}M params, "
          f"{twin.config['num_hidden_layers']} layers, hidden {twin.config['hidden_size']}")
    links = links_for_plan(plan, cluster) if args.emulate_links else None
    if links:
        print(f"emulated link rates per rank (Gbit/s): {[l.bandwidth_gbps if l else None for l in links]}; "
              + (f"latency (us): {[l.latency_us if l else None for l in links]}" if args.emulate_latency
                 else "latency not emulated"))
    backend = MlxBackend(twin.path, plan, links=links, emulate_latency=args.emulate_latency)
    rate, steps = asyncio.run(run(backend, args.tokens))
    per = defaultdict(lambda: defaultdict(list))
    for r in steps:
        if r["kind"] == "decode":
            per[(r["stage"], r["node"])]["compute"].append(r["compute_s"])
        elif r["kind"] in ("send", "recv") and r["step"] > 0:
            per[(r["stage"], r["node"])][r["kind"]].append(r["end_s"] - r["start_s"])
    for (stage, node), d in sorted(per.items()):
        parts = "  ".join(f"{k} {statistics.median(v) * 1e3:6.2f} ms" for k, v in d.items() if v)
        print(f"measured  stage {stage} ({node}, layers {plan.stages[stage].layer_start}-"
              f"{plan.stages[stage].layer_end}): median per step  {parts}")
    print(f"measured  decode rate {rate:.2f} tok/s ({len(plan.stages)} ranks on this host)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
