"""`python -m harness bench`: measure an OpenAI-compatible server (the embedded one or any URL) with a
workload, write a run folder and print the vLLM-style summary."""
from __future__ import annotations

import argparse

HELP = "load-test an OpenAI-compatible server (embedded or --target URL) and write a run folder"
DESCRIPTION = """Send a workload to an OpenAI-compatible server and record every request's client-side timestamps
(send, each content chunk, end), then write runs/out/<run-id>/ and print vLLM-style metrics. Figures are
measured on this machine's clock; with the embedded sim backend they are a simulated cluster's timings
paced in real time (labelled so).

The target is the embedded server (default; pick its backend with --backend and the backend options) or
any OpenAI-compatible URL: mlx-lm's server, exo (port 52415), vLLM.

load modes (override the workload's own arrival times):
  --mode workload       send at the workload's arrival times (closed-loop if the workload says so)
  --mode synchronous    one request at a time
  --mode concurrent -c N      keep N requests in flight
  --mode constant --rate R    R requests/s, evenly spaced
  --mode poisson --rate R     Poisson arrivals at R requests/s
  --sweep 1,2,4         one run per value (rates for constant/poisson, concurrencies for concurrent)

examples:
  python -m harness bench --backend sim --cluster mixed --model llama-3.1-8b --workload poisson,rate=0.5,n=20,prompt=256,output=64
  python -m harness bench --backend instant --mode concurrent --sweep 1,16,64 --workload all_at_once,n=500,prompt=64,output=64
  python -m harness bench --target http://127.0.0.1:52415 --endpoint chat --served-model llama-3.2-1b --mode synchronous --workload all_at_once,n=20"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from harness.backends import BACKEND_NAMES
    from harness.commands.serve import add_backend_arguments, add_limit_arguments
    p.add_argument("--target", default="embedded",
                   help="'embedded' (default: start the server here) or a server URL such as http://127.0.0.1:8000")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="sim", help="embedded server's backend (default %(default)s)")
    p.add_argument("--workload", default="poisson,rate=0.25,n=10,prompt=128,output=64",
                   help="workload shorthand or .json/.toml file (default %(default)s)")
    lg = p.add_argument_group("load")
    lg.add_argument("--mode", default="workload", choices=["workload", "synchronous", "concurrent", "constant", "poisson"],
                    help="how requests are sent (default %(default)s)")
    lg.add_argument("--rate", type=float, default=None, help="requests/s for constant and poisson modes")
    lg.add_argument("-c", "--concurrency", type=int, default=None, help="requests in flight for concurrent mode")
    lg.add_argument("--sweep", default=None, help="comma-separated rates or concurrencies: one run each")
    lg.add_argument("--warmup", type=int, default=1, help="warm-up requests before each run, not recorded (default 1)")
    lg.add_argument("--seed", type=int, default=0, help="seed of prompts and Poisson arrivals (default 0)")
    lg.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                    help="which API to call (default %(default)s: exact prompt lengths)")
    lg.add_argument("--served-model", default=None, help="model name to request (default: the first /v1/models lists)")
    lg.add_argument("--target-api-key", default=None, help="Bearer key for the target")
    lg.add_argument("--no-pin-output", action="store_true",
                    help="do not send min_tokens/ignore_eos (for servers that reject vLLM's extensions)")
    lg.add_argument("--max-duration-s", type=float, default=None,
                    help="stop sending after this many seconds; cancel what still runs at twice that")
    lg.add_argument("--slo", default=None, help='goodput SLOs in ms, e.g. "ttft:500 tpot:50"')
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/out", help="where run folders go (default %(default)s)")
    out.add_argument("--label", default="bench", help="run-id label (default %(default)s)")
    srv = p.add_argument_group("embedded server")
    add_limit_arguments(srv)
    add_backend_arguments(p)


def run(args) -> int:
    from harness import metrics
    from harness.workloads import build_workload, parse_workload
    slo = metrics.parse_slo(args.slo)
    workload_spec = parse_workload(args.workload)
    workload = build_workload(workload_spec)
    modes = _modes(args)
    if args.target == "embedded":
        return _bench_embedded(args, workload, workload_spec, modes, slo)
    return _bench(args, args.target, workload, workload_spec, modes, slo, backend=None)


def _modes(args) -> list:
    from harness.serving.loadgen import LoadMode, sweep_modes
    from harness.specs import UserError
    if args.sweep:
        if args.mode not in ("concurrent", "constant", "poisson"):
            raise UserError("--sweep needs --mode concurrent, constant or poisson")
        try:
            values = [float(v) for v in args.sweep.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--sweep {args.sweep!r}: give numbers like 1,2,4") from None
        return sweep_modes(args.mode, values, args.seed)
    value = {"concurrent": args.concurrency, "constant": args.rate, "poisson": args.rate}.get(args.mode, 0.0)
    if args.mode in ("concurrent", "constant", "poisson") and value is None:
        raise UserError(f"--mode {args.mode} needs {'--concurrency' if args.mode == 'concurrent' else '--rate'}")
    return [LoadMode(args.mode, float(value or 0.0), args.seed)]


def _bench_embedded(args, workload, workload_spec, modes, slo) -> int:
    from harness.commands.serve import build_backend, limits_from_args
    from harness.serving.server import EmbeddedServer
    backend = build_backend(args)
    with EmbeddedServer(backend, limits=limits_from_args(args)) as server:
        print(f"embedded server at {server.url} ({args.backend} backend, model {backend.model_id})", flush=True)
        return _bench(args, server.url, workload, workload_spec, modes, slo, backend=backend,
                      load_report=server.load_report)


def _bench(args, url, workload, workload_spec, modes, slo, backend, load_report=None) -> int:
    from harness.serving.loadgen import Target, run_load_sync
    target = Target(url, model=args.served_model, api_key=args.target_api_key, endpoint=args.endpoint,
                    pin_output=not args.no_pin_output, send_prefix_id=backend is not None)
    rows = []
    for mode in modes:
        print(f"running {mode.label}: {len(workload)} requests to {target.base} ...", flush=True)
        config = _config(args, url, workload_spec, mode)
        measure = lambda sink, mode=mode: run_load_sync(target, workload, mode, warmup=args.warmup, seed=args.seed,
                                                        max_duration_s=args.max_duration_s, sink=sink)
        path, summary = record_run(args.out, f"{args.label}-{mode.label}", measure, config, slo=slo,
                                   backend=backend, load_report=load_report)
        rows.append((mode.label, summary))
        print(summary_text(summary, backend))
        print(f"run folder: {path}\n", flush=True)
    if len(rows) > 1:
        print(sweep_table(rows))
    return 0


def _config(args, url, workload_spec, mode) -> dict:
    skip = {"_run", "_parser", "command"}   # the CLI's own plumbing is no part of the config
    return {"command": "bench", "target": url if args.target != "embedded" else "embedded",
            "args": {k: v for k, v in vars(args).items() if k not in skip},
            "workload": workload_spec, "mode": {"kind": mode.kind, "value": mode.value, "seed": mode.seed}}


def record_run(out_root, label, measure, config, *, slo=None, backend=None, load_report=None):
    """Run `measure(sink)` (the load generator, handing each finished request to `sink`) into a new run folder
    (harness.runfolder); returns (path, summary). The folder exists before the first request: Ctrl-C, SIGTERM
    or an exception keep the finished requests and a summary over them (harness.orchestrate.keep_finished).

    With an embedded backend, steps.parquet holds its step records (`Backend.step_table`) and plan.json its
    plan (`Backend.plan`, when it serves one); against an outside server (backend None) both are empty.
    """
    from harness import runfolder
    from harness.recording import finish_run, start_run
    plan = backend.plan if backend is not None else None
    from harness.orchestrate import keep_finished
    from harness.serving.loadgen import LoadSink
    with runfolder.RunWriter(out_root, label) as run:
        plan_dict = start_run(run, config, plan, {"load_generator": "harness.serving.loadgen", "target": config.get("target")})
        finish = lambda result: finish_run(run, config, plan_dict, result, backend, load_report, slo, plan)
        sink = LoadSink(run.journal.append)
        try:
            return finish(measure(sink))
        except (KeyboardInterrupt, Exception) as exc:
            keep_finished(run, exc, sink, finish)
            raise


# Figures bench prints besides the headline, and the columns of a sweep (labels from the metric catalogue).
EXTRA_KEYS = ("median_ttft_ms", "median_tpot_ms", "p99_dispatch_delay_ms")
SWEEP_KEYS = ("request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_dispatch_delay_ms")


def summary_text(summary: dict, backend) -> str:
    from harness import metrics
    name = getattr(backend, "name", "external")
    source = "measured over HTTP" + (" (backend: simulated cluster, paced in real time)" if name == "sim" else "")
    figures = summary["metrics"]
    lines = [metrics.headline(figures, source)]
    for key in EXTRA_KEYS:
        if figures.get(key) is not None:
            entry = metrics.BY_KEY[key]
            lines.append(f"  {entry.label:<28} {entry.text(figures[key])}")
    from harness.saturation import overload_lines
    return "\n".join(lines + overload_lines(summary))


def sweep_table(rows) -> str:
    """One line per load mode of a sweep; rows are (mode label, summary)."""
    from harness import metrics
    from harness.cli import text_table
    entries = [metrics.BY_KEY[k] for k in SWEEP_KEYS]
    table = [("mode", *(m.heading for m in entries))]
    for label, s in rows:
        figures = s["metrics"]
        table.append((label, *("-" if figures.get(m.key) is None else m.format.format(figures[m.key])
                               for m in entries)))
    return "sweep (measured):\n" + text_table(table)
