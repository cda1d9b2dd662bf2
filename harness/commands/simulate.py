"""`python -m harness simulate`: serve a workload on a simulated cluster and write a run folder."""
from __future__ import annotations

import dataclasses
import math
import sys
import time

from harness.planning import add_plan_arguments
from harness.specs import UserError
from strategies.registry import cache_policy_names

HELP = "simulate serving a workload on a cluster (SimPy, virtual time) and write runs/out/<run-id>/"
DESCRIPTION = """Plan the model over the cluster with a partitioning strategy, load it (SSD or peer), then serve a
workload with continuous batching over the pipeline in virtual time. Writes config.json, environment.json,
plan.json, requests.parquet, steps.parquet (--step-records summary: step_summary.parquet too) and summary.json
to <out>/<run-id>/ (an interrupted run leaves the folder marked INCOMPLETE) and prints the headline metrics.
Every figure it prints is simulated, except the wall-clock timing of the simulator itself (measured).

workload shorthand (or a .json/.toml file holding a workload table):
  poisson,rate=0.2,n=200,prompt=512,output=128
  bursts,burst_size=16,interval_s=60,n=64,prompt=uniform:128:2048,output=lognormal:200:0.6
  closed,concurrency=8,n=100,prompt=512,output=128
  conversations,conversations=20,turns=4,system_prompt_tokens=1000,user=100,output=200,rate=0.05
  trace,path=my-trace.jsonl          (JSONL lines: arrival_s, prompt_tokens, output_tokens[, prefix_id])

examples:
  python -m harness simulate --cluster m2ultra-4x-tb4 --model llama-3.1-70b --quant 4 --strategy uniform \\
      --workload poisson,rate=0.2,n=200,prompt=512,output=128 --seed 1
  python -m harness simulate --workload closed,concurrency=4,n=50 --slo "ttft:2000 tpot:100" --timing"""


def parse_faults(args, cluster) -> list[dict]:
    """--fail NODE@S, --straggler NODE@S:FACTOR, --slow-link A,B@S:FACTOR and --link-down A,B@S[:DURATION] as
    sim.Engine.inject faults."""
    from sim.engine import Engine
    faults = []
    for spec in args.fail:
        node, at, _ = _fault_spec(spec, "--fail", factor=False)
        faults.append(dict(kind="node_down", node=node, at_s=at))
    for spec in args.straggler:
        node, at, factor = _fault_spec(spec, "--straggler")
        faults.append(dict(kind="straggler", node=node, at_s=at, factor=factor))
    for spec in args.slow_link:
        pair, at, factor = _fault_spec(spec, "--slow-link")
        a, _, b = pair.partition(",")
        faults.append(dict(kind="slow_link", node=a, peer=b, at_s=at, factor=factor))
    for spec in args.link_down:
        faults.append(_link_down_spec(spec))
    Engine.check_fault_nodes(faults, cluster)
    return faults


def _fault_spec(spec: str, flag: str, factor: bool = True) -> tuple[str, float, float]:
    """WHAT@SECONDS[:FACTOR] -> (what, seconds >= 0, factor >= 1)."""
    shape = "WHAT@SECONDS:FACTOR" if factor else "NODE@SECONDS"
    what, sep, rest = spec.rpartition("@")
    at, _, fac = rest.partition(":") if factor else (rest, "", "1")
    try:
        at_s, f = float(at), float(fac)
    except ValueError:
        at_s, f = float("nan"), float("nan")
    if not (sep and math.isfinite(at_s) and at_s >= 0 and math.isfinite(f) and f >= 1):
        raise UserError(f"{flag} {spec!r}: expected {shape} with SECONDS >= 0" + (" and FACTOR >= 1" if factor else ""))
    return what, at_s, f


def _link_down_spec(spec: str) -> dict:
    """A,B@SECONDS[:DURATION] -> a link_down fault (a flap with DURATION > 0, else dropped for good)."""
    pair, sep, rest = spec.rpartition("@")
    at, _, duration = rest.partition(":")
    a, _, b = pair.partition(",")
    try:
        at_s, duration_s = float(at), float(duration) if duration else None
    except ValueError:
        at_s, duration_s = float("nan"), None
    if not (sep and a and b and math.isfinite(at_s) and at_s >= 0
            and (duration_s is None or (math.isfinite(duration_s) and duration_s > 0))):
        raise UserError(f"--link-down {spec!r}: expected A,B@SECONDS[:DURATION] with SECONDS >= 0 and DURATION > 0")
    return dict(kind="link_down", node=a, peer=b, at_s=at_s, **({"duration_s": duration_s} if duration_s else {}))


def add_arguments(p) -> None:
    add_plan_arguments(p)
    g = p.add_argument_group("workload and run")
    g.add_argument("--workload", default="poisson,rate=0.2,n=100,prompt=512,output=128",
                   help="workload shorthand or .json/.toml file (default %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="workload seed (overrides the workload's own)")
    g.add_argument("--out", default="runs/out", help="folder that receives the run folder (default %(default)s)")
    g.add_argument("--run-id", default=None, help="name of the run folder (default: time stamp + strategy)")
    g.add_argument("--slo", default=None, help='goodput SLOs in ms, vLLM syntax: "ttft:500 tpot:50 e2el:2000"')
    g.add_argument("--no-load", action="store_true", help="skip simulating model loading")
    g.add_argument("--weights-local", default=None,
                   help="comma-separated nodes holding the weights on SSD (others receive them from a peer); "
                        "default: all")
    g.add_argument("--timing", action="store_true",
                   help="print the simulator's own speed (measured wall time, requests per wall second, peak memory) "
                        "and time a fixed reference workload, saved as sim.reference_s for regression checks")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--fail", action="append", default=[], metavar="NODE@SECONDS",
                   help="fault injection: NODE fails SECONDS after the workload starts; unfinished requests fail "
                        "with the reason recorded, later ones are refused, and the command exits 1 (repeatable)")
    g.add_argument("--straggler", action="append", default=[], metavar="NODE@SECONDS:FACTOR",
                   help="fault injection: NODE's stage computes FACTOR times slower from SECONDS on (repeatable)")
    g.add_argument("--slow-link", action="append", default=[], metavar="A,B@SECONDS:FACTOR",
                   help="fault injection: the link between nodes A and B keeps 1/FACTOR of its bandwidth from "
                        "SECONDS on (repeatable)")
    g.add_argument("--link-down", action="append", default=[], metavar="A,B@SECONDS[:DURATION]",
                   help="fault injection: the link between nodes A and B carries nothing from SECONDS on; with "
                        "DURATION it is back after that many seconds (transfers wait, nothing fails), without it "
                        "requests crossing it fail and later ones are refused (repeatable)")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default=None, metavar="NAME",
                   help="serving engine to price: the profile's engines entry (per-step and per-request costs, "
                        "prefill chunk); default mlx-lm, the profile's own factors")
    e.add_argument("--max-num-seqs", type=int, default=128, help="sequences per micro-batch (default %(default)s)")
    e.add_argument("--max-batched-tokens", type=int, default=4096,
                   help="token budget per micro-batch step (default %(default)s)")
    e.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt in one step")
    e.add_argument("--micro-batches", type=int, default=0,
                   help="micro-batches in flight (default 0 = one per pipeline stage)")
    e.add_argument("--kv-block-tokens", type=int, default=16, help="KV block size in tokens (default %(default)s)")
    e.add_argument("--kv-tokens", type=int, default=0, help="cap the KV pool in tokens (default: memory decides)")
    e.add_argument("--step-records", choices=("full", "summary"), default="full",
                   help="full (default): steps.parquet holds one row per micro-batch and stage; summary: only "
                        "per-window aggregates (steps, busy/min/max seconds, tokens, peak KV per stage and kind) in "
                        "step_summary.parquet, faster on long runs. Lost with summary: the individual steps, so the "
                        "report's TPOT breakdown and per-node timelines are not drawn and validate/fit cannot use the run")
    e.add_argument("--step-window-s", type=float, default=1.0,
                   help="--step-records summary: virtual seconds per window (default %(default)s)")
    e.add_argument("--cache", default="none",
                   help=f"prefix-KV cache policy: {', '.join(cache_policy_names())} (default %(default)s); "
                        "requests with a shared prefix (conversations, traces with prefix_id) reuse its KV")
    e.add_argument("--cache-l4-gb", type=float, default=0.0,
                   help="tiered_lru: add an L4 tier of this many GB (network storage or a peer Mac's memory, "
                        "read over the cluster's slowest link); default none")


def engine_config(args):
    from harness.specs import UserError
    from sim.engine import EngineConfig
    for name in ("max_num_seqs", "max_batched_tokens", "kv_block_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.micro_batches < 0 or args.kv_tokens < 0:
        raise UserError("--micro-batches and --kv-tokens must be >= 0")
    records = dict(step_records=getattr(args, "step_records", "full"),    # a sweep point's args may not carry them
                   step_window_s=getattr(args, "step_window_s", 1.0))
    return EngineConfig(max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                        chunked_prefill=not args.no_chunked_prefill, micro_batches=args.micro_batches,
                        kv_block_tokens=args.kv_block_tokens, kv_tokens=args.kv_tokens, **records)


def run(args) -> int:
    """One strategy, or with --strategy all each strategy on the same seeded workload, one run folder each."""
    from argparse import Namespace
    from harness.planning import strategies_for
    names = strategies_for(args.strategy)
    if len(names) == 1:
        return run_one(args)
    if args.run_id:
        from harness.specs import UserError
        raise UserError("--run-id names one folder; with --strategy all each strategy gets its own")
    from harness.specs import DoesNotFit
    codes = []
    for name in names:
        print(f"== {name}")
        try:
            codes.append(run_one(Namespace(**{**vars(args), "strategy": name})))
        except DoesNotFit as exc:   # the other strategies may still fit
            print(f"does not fit: {exc}")
            codes.append(1)
    return max(codes)


def run_one(args) -> int:
    import resource

    from harness import metrics
    from harness.costmodel import DEFAULT_PROFILE
    from harness.planning import load_inputs, plan_options, plan_with
    from harness.runfolder import RunWriter, environment
    from harness.workloads import build_workload, parse_workload
    from sim.run import simulate

    cfg = engine_config(args)
    slo = metrics.parse_slo(args.slo)
    spec = dict(args.workload) if isinstance(args.workload, dict) else parse_workload(args.workload)   # dict: a sweep point
    if args.seed is not None:
        spec["seed"] = args.seed
    workload = build_workload(spec)
    engine = getattr(args, "engine", None)   # a sweep point's args may not carry it
    cluster, model = load_inputs(args)
    options = plan_options(args)
    profile = options.profile.for_engine(engine)   # the plan is chosen on the engine's costs too
    plan = plan_with(args.strategy, cluster, model, dataclasses.replace(options, profile=profile))
    local = set(args.weights_local.split(",")) if args.weights_local else None
    faults = parse_faults(args, cluster)
    config = {"command": "simulate", "backend": "sim", "cluster": args.cluster, "link": args.link,
              "add_nodes": args.add_node, "model": model.name,
              "quant_bits": model.quant, "group_size": model.group_size, "strategy": plan.strategy,
              "objective": args.objective, "profile": args.profile or DEFAULT_PROFILE, "workload": spec,
              "engine": cfg.to_dict(), "include_load": not args.no_load, "cache": args.cache,
              "cache_l4_gb": args.cache_l4_gb,
              "weights_local": sorted(local) if local else None, "slo": slo or None, "faults": faults,
              "argv": sys.argv[1:]}
    from sim.prefix_cache import make_prefix_cache
    if engine:
        config["cost_engine"] = profile.engine
    cache = make_prefix_cache(args.cache, cluster, model, plan, profile, kv_cap_tokens=args.kv_tokens,
                              l4_gb=args.cache_l4_gb)
    bar = None if args.quiet else Progress(len(workload))
    with RunWriter(args.out, label=f"sim-{plan.strategy}", run_id=args.run_id) as writer:
        writer.write_json("config.json", config)
        writer.write_json("environment.json", environment({"backend": "sim"}))
        writer.write_json("plan.json", plan.to_dict())
        from harness.metrics import STEP_COLUMNS
        steps = writer.table_stream("steps.parquet", STEP_COLUMNS)   # streamed: long runs stay small in memory
        try:
            result = simulate(cluster, model, plan, profile, workload, cfg,
                              include_load=not args.no_load, weights_local=local, progress=bar,
                              step_sink=steps.write, cache=cache, faults=faults)
        except BaseException:
            steps.abort()
            raise
        steps.close()
        if result.step_summary is not None:    # --step-records summary: steps.parquet keeps the load rows only
            from harness.metrics import STEP_SUMMARY_COLUMNS
            writer.write_table("step_summary.parquet", result.step_summary, STEP_SUMMARY_COLUMNS)
        if bar:
            bar.close()
        writer.write_requests(result.requests)
        summary = summarise(result, slo, config, plan, cluster)
        if cache is not None:
            summary["cache"] = cache.stats()
        if args.timing:   # for wall-clock regression checks: sim.wall_s / sim.reference_s (same run, same machine)
            from sim.run import reference_work_s
            summary["sim"]["reference_s"] = reference_work_s()
        writer.finish(summary)
    print(f"run folder: {writer.path}")
    print(metrics.headline(summary["metrics"], "simulated"))
    print(f"  {'preemptions':<28} {result.stats['preemptions']}")
    from harness.saturation import overload_lines
    for line in overload_lines(summary):
        print(line)
    if args.timing:
        wall = result.stats["wall_s"]
        print(f"simulator speed (measured): {len(workload)} requests in {wall:.3f} s wall = "
              f"{len(workload) / wall:,.0f} simulated requests per wall second; "
              f"peak resident memory of the whole process {_max_rss_mib(resource):.0f} MiB")
    return 0 if summary["metrics"]["failed"] == 0 else 1


def _max_rss_mib(resource) -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10   # bytes on macOS, KiB on Linux


def summarise(result, slo: dict, config: dict, plan, cluster) -> dict:
    """summary.json body (harness.summary, schema 2): the metrics (simulated), run-level figures for targets,
    engine facts."""
    from harness import metrics, summary
    from reports.targets import targets_summary
    requests = result.requests.to_pandas()
    plan_dict = plan.to_dict()
    body = summary.build("simulate", "simulated", "sim", metrics.compute(requests, slo or None), plan=plan_dict,
                         cluster=cluster, load_report=result.load,
                         kv_peak_bytes_per_node=result.stats.get("kv_peak_bytes_per_node"),
                         workload=config["workload"], run={"preemptions": result.stats.get("preemptions")},
                         extra={"sim": result.stats}, requests=requests)
    body["targets"] = targets_summary(config, plan_dict, body["metrics"], requests, None, "simulated")
    return body


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal or explicitly wanted)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.t0 = total, stream, time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int, virtual_s: float) -> None:
        now = time.perf_counter()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        width = 30
        fill = int(width * done / max(total, 1))
        self.stream.write(f"\rsimulating [{'#' * fill}{'.' * (width - fill)}] {done}/{total} requests, "
                          f"virtual {virtual_s:,.1f} s, wall {now - self.t0:.1f} s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
