"""TTFT saved by each prefix-cache policy, measured on real mlx-lm ranks and simulated, for the same requests on
the same plan (issue 12): this host as N ranks (`profile-host --ranks N`, as `harness validate` measures it), a
local model, multi-turn chats whose turns share their history, sent one at a time (closed loop, 1 in flight) so
TTFT is the prefill a hit saves and not queueing. The same policy object decides on both sides.

    .venv/bin/python benchmarks/cache_ttft_parity.py [--model 40m] [--split 8] [--profile FITTED.json]
        [--hosts DIR] [--policies none,lru,s3_fifo,tiered_lru] [--conversations 4 --turns 3 --system 256]

`--reps`: real runs of the trace per policy (fresh ranks, cold cache each); each request's fastest counts.
`--profile`: the simulator's profile (default: the measured host profile; a `calibrate --from` fit of a
`validate` run is closer). `--hosts`: a folder with cluster-<N>ranks.json from an earlier run (else measured).
Prints, per policy: requests that hit and tokens served from cache on each side (and whether every request got
the same decision), mean TTFT measured and simulated, and the TTFT saved against `none`, measured vs simulated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def setup(args):
    """(model folder, cluster dict, parsed cluster, plan, model spec, profile) for this host as len(split) ranks."""
    from harness.catalog import parse_cluster
    from harness.costmodel import load_profile
    from harness.mlx.hostcluster import host_plan
    from harness.specs import model_from_config
    from harness.validation import fit
    from harness.validation.run import host_files, model_bits, resolve_model
    model_path = resolve_model(args.model)
    config = json.loads((model_path / "config.json").read_text())
    hosts = Path(args.hosts or tempfile.mkdtemp(prefix="cache-parity-hosts-"))
    cluster_path = host_files(hosts, len(args.split), reuse=hosts)
    if not args.hosts:
        print(f"host files in {hosts}: pass --hosts {hosts} to measure again without profiling", flush=True)
    cluster_data = fit.resolve_host_profiles(json.loads(cluster_path.read_text()), cluster_path.parent)
    bits = model_bits(config)
    plan = host_plan(cluster_data, list(args.split), model=model_path.name, quant_bits=bits)
    model = model_from_config(config, model_path.name, quant_bits=bits)
    profile = load_profile(args.profile or cluster_data["nodes"][0]["host_profile"])
    return model_path, parse_cluster(cluster_data, origin=str(cluster_path)), plan, model, profile


def chats(args):
    from harness.workloads import build_workload
    return build_workload({"kind": "conversations", "conversations": args.conversations, "turns": args.turns,
                           "system_prompt_tokens": args.system, "user": {"dist": "fixed", "value": args.user},
                           "output": {"dist": "fixed", "value": args.output}, "think_time_s": 1.0,
                           "arrival": {"process": "poisson", "rate": 1.0}, "seed": args.seed})


def measured(policies, *setup, args) -> dict:
    """policy -> request id -> (TTFT s, cached tokens) on real ranks: the fastest of --reps runs of the trace
    (each from a cold cache on fresh ranks), since on a shared machine noise only ever adds time. The policies
    take turns within each repetition, so a busy spell on the machine does not land on one policy alone.
    Decisions must not vary between repetitions."""
    runs = {policy: [] for policy in policies}
    for rep in range(args.reps):
        for policy in policies:
            print(f"  {policy}: repetition {rep + 1} of {args.reps} on real ranks", flush=True)
            runs[policy].append(measured_once(policy, *setup, args))
    return {policy: fastest(policy, r) for policy, r in runs.items()}


def fastest(policy, runs) -> dict:
    if any({k: c for k, (_, c) in r.items()} != {k: c for k, (_, c) in runs[0].items()} for r in runs):
        raise SystemExit(f"{policy}: cached tokens differ between repetitions of the same trace")
    return {k: (min(r[k][0] for r in runs if k in r), c) for k, (_, c) in runs[0].items()}


def measured_once(policy, model_path, cluster, plan, model, profile, workload, args) -> dict:
    """request id -> (TTFT s, cached tokens) on real ranks behind the embedded server, one request at a time."""
    from harness.backends.mlx import MlxBackend
    from harness.serving.loadgen import LoadMode, Target, run_load_sync
    from harness.serving.server import EmbeddedServer
    from sim.prefix_cache import make_prefix_cache
    backend = MlxBackend(model_path, plan, max_running=args.max_running, prefill_step_size=args.prefill_step,
                         cache=make_prefix_cache(policy, cluster, model, plan, profile), model_id=model_path.name)
    with EmbeddedServer(backend) as server:
        target = Target(server.url, prompt_vocab=int(backend.config["vocab_size"]))
        run_load_sync(target, warm_up(args), LoadMode("concurrent", 1, args.seed), seed=args.seed + 1)
        rows = run_load_sync(target, workload, LoadMode("concurrent", 1, args.seed), seed=args.seed).rows
    return {r["request_id"]: (r["first_token_s"] - r["start_s"], r["cached_tokens"]) for r in rows if r["success"]}


def warm_up(args):
    """Requests shorter than one cache block (nothing kept), so the first measured request pays no compile."""
    from harness.workloads import build_workload
    return build_workload({"kind": "synthetic", "num_requests": 2, "seed": args.seed, "prompt": 8, "output": 4,
                           "arrival": {"process": "poisson", "rate": 1.0}})


def simulated(policy, cluster, plan, model, profile, workload, args) -> dict:
    """request id -> (TTFT s, cached tokens) in the simulator: the same requests in the same order, one at a time,
    mlx-lm's schedule with the real side's batch limit and prefill chunk."""
    from dataclasses import replace
    from sim.engine import EngineConfig
    from sim.prefix_cache import make_prefix_cache
    from sim.run import simulate
    engine = EngineConfig(scheduler="mlx-lm", max_num_seqs=args.max_running, prefill_step_tokens=args.prefill_step,
                          prefill_batch=8, micro_batches=1)
    closed = replace(workload, closed_loop=True, concurrency=1)
    result = simulate(cluster, model, plan, profile, closed, engine, include_load=False,
                      cache=make_prefix_cache(policy, cluster, model, plan, profile))
    df = result.requests.to_pandas()
    return {r.request_id: (r.first_token_s - r.start_s, r.cached_tokens) for r in df.itertuples() if r.success}


def row(policy, real, sim, base) -> tuple:
    ids = sorted(set(real) & set(sim))
    mean = lambda d: sum(d[i][0] for i in ids) / len(ids)   # noqa: E731
    same = all((real[i][1] > 0) == (sim[i][1] > 0) for i in ids)
    saved = [1 - mean(d) / base[k] for k, d in (("real", real), ("sim", sim))]
    err = (saved[1] - saved[0]) / saved[0] if policy != "none" and saved[0] else float("nan")
    return (policy, f"{sum(real[i][1] > 0 for i in ids)}/{sum(sim[i][1] > 0 for i in ids)}",
            f"{sum(real[i][1] for i in ids)}/{sum(sim[i][1] for i in ids)}", "yes" if same else "NO",
            f"{1e3 * mean(real):.1f}", f"{1e3 * mean(sim):.1f}", f"{100 * saved[0]:.1f}", f"{100 * saved[1]:.1f}",
            f"{100 * err:+.1f}")


def main() -> int:
    from harness.cli import text_table
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="40m", help="a harness.mlx.modelbuild size or a local mlx-lm model folder")
    p.add_argument("--split", type=lambda s: [int(x) for x in s.split(",")], default=[8],
                   help="layers per rank in layer order (default 8: one process)")
    p.add_argument("--profile", help="the simulator's profile (default: the measured host profile)")
    p.add_argument("--hosts", help="folder holding cluster-<N>ranks.json from an earlier run (else measured)")
    p.add_argument("--policies", default="none,lru,s3_fifo,tiered_lru")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system", type=int, default=256, help="system prompt tokens")
    p.add_argument("--user", type=int, default=32, help="tokens of each new user message")
    p.add_argument("--output", type=int, default=16)
    p.add_argument("--max-running", type=int, default=4)
    p.add_argument("--prefill-step", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3, help="real runs per policy; each request's fastest counts")
    args = p.parse_args()
    policies = args.policies.split(",")
    if policies[0] != "none":
        policies.insert(0, "none")     # the baseline every saving is measured against
    model_path, cluster, plan, model, profile = setup(args)
    workload = chats(args)
    print(f"{len(workload)} requests per run, policies {', '.join(policies)}", flush=True)
    real = measured(policies, model_path, cluster, plan, model, profile, workload, args=args)
    results = {policy: (real[policy], simulated(policy, cluster, plan, model, profile, workload, args))
               for policy in policies}
    real0, sim0 = results["none"]
    base = {"real": sum(t for t, _ in real0.values()) / len(real0), "sim": sum(t for t, _ in sim0.values()) / len(sim0)}
    print(f"\n{model_path.name}, split {args.split}, profile {profile.name}, min of {args.reps} real runs; "
          f"TTFT measured (real ranks) vs simulated; load average {os.getloadavg()[1]:.1f} on {os.cpu_count()} cores "
          "(other work on the machine lengthens the real side)")
    print(text_table([("policy", "hits real/sim", "cached tok real/sim", "same decisions", "TTFT real ms",
                       "TTFT sim ms", "saved real %", "saved sim %", "error of saved")]
                     + [row(p, *results[p], base) for p in policies]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
