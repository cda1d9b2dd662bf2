"""Failover on real ranks, measured: the experiment's plan runs on its twin (the production wiring of `run
--backend mlx --failover`), a stream of requests is served, one rank is killed (or stopped) mid-stream, and this
prints how long the failure took to be found, how long the ranks took to restart on the plan for the nodes
left, how many requests failed or got 503 meanwhile, and the first token time after it.

    python benchmarks/mlx_failover.py [--experiment runs/mini-pair-mlx.toml] [--signal STOP]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.backends.base import BackendUnavailable, GenerationRequest  # noqa: E402
from harness.experiment import load_experiment  # noqa: E402
from harness.orchestrate import build_backend, load_inputs  # noqa: E402
from harness.planning import plan_with  # noqa: E402


def backend_for(path: str):
    exp = load_experiment(path) | {"failover": True}
    cluster, model, options = load_inputs(exp)
    plan = plan_with(exp["strategy"], cluster, model, options)
    return build_backend(exp, cluster, model, options.profile, plan)


async def one(backend, i: int, tokens: int = 16) -> str:
    vocab = backend.config["vocab_size"]
    req = GenerationRequest(f"r{i}", [(7 * i + k) % vocab for k in range(48)], max_tokens=tokens, ignore_eos=True)
    try:
        async for _ in backend.generate(req):
            pass
        return "ok"
    except BackendUnavailable as exc:
        return "503" if "failing over" in str(exc) else "failed"


async def scenario(backend, sig: int, kill_after_s: float, total_s: float) -> dict:
    await backend.load()
    outcomes: list[tuple[float, str]] = []
    t0 = time.monotonic()

    async def client():
        i = 0
        while time.monotonic() - t0 < total_s:
            outcome = await one(backend, i)
            outcomes.append((time.monotonic() - t0, outcome))    # when it ended
            i += 1
            if outcomes[-1][1] != "ok":
                await asyncio.sleep(0.05)
    task = asyncio.gather(client(), client())
    await asyncio.sleep(kill_after_s)
    victim = backend.ranks.ranks[0]
    node = backend.layout.rank_node[0]
    killed, killed_epoch = time.monotonic() - t0, time.time()
    os.kill(victim.proc.pid, sig)
    await task
    stats = backend.stats()
    await backend.close()
    return {"node": node, "killed_s": killed, "outcomes": outcomes, "stats": stats,
            "detected_s": None if not stats.get("failovers") else
            backend.run_start_epoch + stats["failovers"][0]["at_s"] - killed_epoch}


def report(r: dict) -> None:
    fo = (r["stats"].get("failovers") or [{}])[0]
    after = [t for t, o in r["outcomes"] if o == "ok" and t > r["killed_s"]]
    counts = {k: sum(o == k for t, o in r["outcomes"] if t > r["killed_s"]) for k in ("ok", "failed", "503")}
    print(f"killed {r['node']} (rank 0) at {r['killed_s']:.2f} s into the stream (measured)")
    if "reload_s" not in fo:
        print(f"  no failover: {fo.get('error') or r['stats'].get('error')}")
        return
    print(f"  new plan: {fo['plan']}")
    print(f"  failure found {r['detected_s']:.2f} s after the signal; restart on the nodes left (reload_s) "
          f"{fo['reload_s']:.2f} s")
    print(f"  ended after the signal: {counts['failed']} requests failed in flight, {counts['503']} got 503 while reloading, "
          f"{counts['ok']} served; first served one ended {min(after) - r['killed_s']:.2f} s after the kill"
          if after else "  nothing was served after the kill")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="runs/mini-pair-mlx.toml")
    p.add_argument("--signal", default="KILL", choices=["KILL", "STOP"])
    p.add_argument("--kill-after-s", type=float, default=4.0)
    p.add_argument("--total-s", type=float, default=20.0)
    args = p.parse_args()
    backend = backend_for(args.experiment)
    sig = signal.SIGKILL if args.signal == "KILL" else signal.SIGSTOP
    report(asyncio.run(scenario(backend, sig, args.kill_after_s, args.total_s)))


if __name__ == "__main__":
    main()
