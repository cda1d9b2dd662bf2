"""The capacity search against a fine sweep (issue 13 goal: the knee within 5 % with 10x fewer simulations).

    python benchmarks/capacity_knee.py [--step 0.01] [--requests 300]

For a few bundled clusters, models and SLOs it runs `harness capacity`'s search (harness.capacity.find_knee)
and a fine sweep over the same seeded workload: every rate from --step to 1.5 times the cost model's
sustainable rate in steps of --step times that rate. The sweep's knee is the highest rate below its first
rate that misses the SLOs. Prints both knees, their relative difference and the simulation counts. Every
rate and knee is simulated; the sweep's grid spacing is a resolution limit of the reference itself (a
difference smaller than one step cannot be told apart).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.capacity import find_knee, first_failure_knee  # noqa: E402
from harness.cli import build_parser, text_table  # noqa: E402
from harness.commands.capacity import length_spec, make_evaluator, prepare  # noqa: E402

# (cluster, model, extra capacity flags): SLOs given in ms, or the default 5x single-stream scale
CASES = (
    ("mini-pair", "llama-3.1-8b", ["--ttft-p90-ms", "8000", "--tpot-p90-ms", "110"]),
    ("mini-pair", "llama-3.1-8b", []),
    ("mixed", "llama-3.1-70b", []),
    ("mixed", "qwen2.5-32b", ["--ttft-p90-ms", "6000", "--tpot-p90-ms", "150"]),
    ("m4pro-8x-mini", "llama-3.1-8b", []),
    ("exo-128-192-128", "qwen2.5-72b", []),
)
GOAL_DIFFERENCE = 0.05
GOAL_RATIO = 10.0


def compare(cluster: str, model: str, flags: list[str], step: float, requests: int) -> dict:
    args = build_parser().parse_args(["capacity", "--cluster", cluster, "--model", model,
                                      "--requests", str(requests), "--quiet", *flags])
    prompt, output = length_spec(None, args.prompt_tokens, "--prompt"), length_spec(None, args.output_tokens, "--output")
    setup = prepare(args, prompt, output)
    evaluate = make_evaluator(setup, prompt, output, args.requests, args.seed)
    start = setup["start_rps"]
    knee = find_knee(evaluate, start, args.tolerance, args.max_simulations)
    grid = [start * step * i for i in range(1, int(round(1.5 / step)) + 1)]
    fine = first_failure_knee([evaluate(r) for r in grid])
    diff = abs(knee.knee_rps - fine) / fine if knee.knee_rps and fine else float("nan")
    return {"case": f"{model} on {cluster}" + (" (SLOs in ms)" if flags else " (5x SLO scale)"),
            "slo": f"{setup['slo'].ttft_p90_ms:,.0f} / {setup['slo'].tpot_p90_ms:,.1f}",
            "search": knee.knee_rps, "fine": fine, "diff": diff, "search_n": knee.search_simulations,
            "fine_n": len(grid), "step_rps": start * step}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", type=float, default=0.01, help="fine sweep step, fraction of the start rate")
    p.add_argument("--requests", type=int, default=300, help="requests per simulated rate")
    a = p.parse_args()
    results = []
    for cluster, model, flags in CASES:
        print(f"simulating {model} on {cluster} ...", file=sys.stderr, flush=True)
        results.append(compare(cluster, model, flags, a.step, a.requests))
    rows = [("case", "SLO p90 TTFT/TPOT ms", "search knee req/s", "fine-sweep knee req/s", "difference",
             "search sims", "sweep sims", "fewer", "sweep step req/s")]
    for r in results:
        rows.append((r["case"], r["slo"], _rate(r["search"]), _rate(r["fine"]), f"{100 * r['diff']:.2f} %",
                     str(r["search_n"]), str(r["fine_n"]), f"{r['fine_n'] / r['search_n']:.1f}x", f"{r['step_rps']:.3g}"))
    print("capacity knee: search vs fine sweep (all rates and knees simulated; counts are simulations run)")
    print(text_table(rows))
    ok = all(r["diff"] <= GOAL_DIFFERENCE and r["fine_n"] / r["search_n"] >= GOAL_RATIO for r in results)
    worst = max(r["diff"] for r in results)
    fewest = min(r["fine_n"] / r["search_n"] for r in results)
    print(f"goal (within {100 * GOAL_DIFFERENCE:.0f} % with {GOAL_RATIO:.0f}x fewer simulations): "
          f"{'met' if ok else 'NOT met'}; worst difference {100 * worst:.2f} %, fewest {fewest:.1f}x fewer")
    return 0 if ok else 1


def _rate(value) -> str:
    return f"{value:.4g}" if value else "none"


if __name__ == "__main__":
    sys.exit(main())
