"""Agreement benchmark: one seeded workload (a) simulated in virtual time by `sim.simulate` and (b) served over
HTTP by the embedded server with the real-time sim backend, measured by the load generator. Prints the TTFT
and TPOT medians of both and their difference (the quality bar: within 5 %), and the engine's own record of
the HTTP run, which separates the server's overhead from arrival jitter (arrivals over HTTP land a few ms off
their schedule, and a busy continuous-batching engine can batch them differently).

The default workload keeps the cluster busy (requests batch: TPOT is several times the one-stream TPOT), so
its TTFT and TPOT distributions are smooth; a lightly loaded workload has a bimodal TPOT (alone or sharing)
whose median can jump between the modes when one token is delivered a few ms late on a busy machine.

    python tests/server/bench_sim_agreement.py [--workload poisson,rate=2,n=30,prompt=256,output=32,seed=1]

Runs in real time: about as long as the workload's simulated duration (~12 s by default). Exit status 1 when
a median differs by more than --tolerance.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness import metrics  # noqa: E402
from harness.costmodel import load_profile  # noqa: E402
from harness.serving.loadgen import LoadMode, Target, run_load_sync  # noqa: E402
from harness.planning import add_plan_arguments, make_plan  # noqa: E402
from harness.serving.server import EmbeddedServer  # noqa: E402
from harness.backends.sim import SimBackend  # noqa: E402
from harness.workloads import build_workload, parse_workload  # noqa: E402

DEFAULT_WORKLOAD = "poisson,rate=2,n=30,prompt=256,output=32,seed=1"
DEFAULT_PLAN = ["--cluster", "seed-64gb", "--model", "llama-3.1-8b", "--strategy", "uniform"]


def medians(df) -> tuple[float, float]:
    m = metrics.compute(df)
    return m["median_ttft_ms"], m["median_tpot_ms"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default=DEFAULT_WORKLOAD)
    p.add_argument("--tolerance", type=float, default=0.05)
    add_plan_arguments(p)
    args = p.parse_args(DEFAULT_PLAN + (argv if argv is not None else sys.argv[1:]))
    cluster, model, plan = make_plan(args)
    profile = load_profile(args.profile)
    import sim
    workload = build_workload(parse_workload(args.workload))

    direct = sim.simulate(cluster, model, plan, profile, workload, include_load=False).requests.to_pandas()
    backend = SimBackend(cluster, model, plan, profile)
    with EmbeddedServer(backend) as server:
        result = run_load_sync(Target(server.url), workload, LoadMode("workload"))
        engine = backend.requests_table().to_pandas()

    rows = [("simulated, virtual time (sim.simulate)", *medians(direct)),
            ("measured over HTTP (real-time sim backend)", *medians(result.frame())),
            ("simulated, engine record of the HTTP run", *medians(engine))]
    print(f"workload {args.workload}; {model.name} on {cluster.name}, strategy {plan.strategy}")
    print(f"{'':<46}{'median TTFT ms':>16}{'median TPOT ms':>16}")
    for name, ttft, tpot in rows:
        print(f"{name:<46}{ttft:>16.2f}{tpot:>16.2f}")
    d_ttft = rows[1][1] / rows[0][1] - 1
    d_tpot = rows[1][2] / rows[0][2] - 1
    print(f"{'HTTP vs virtual time':<46}{100 * d_ttft:>15.2f}%{100 * d_tpot:>15.2f}%")
    print(f"{'HTTP vs engine record (server overhead)':<46}{100 * (rows[1][1] / rows[2][1] - 1):>15.2f}%"
          f"{100 * (rows[1][2] / rows[2][2] - 1):>15.2f}%")
    lag = result.dispatch_summary()
    print(f"load generator dispatch delay (measured): mean {lag['mean_dispatch_delay_ms']:.2f} ms, "
          f"p99 {lag['p99_dispatch_delay_ms']:.2f} ms")
    ok = abs(d_ttft) <= args.tolerance and abs(d_tpot) <= args.tolerance
    print(f"agreement within {100 * args.tolerance:.0f} %: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
