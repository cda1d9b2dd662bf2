"""`python -m harness bench`: measure an OpenAI-compatible server (the embedded one or any URL) with a
workload, write a run folder and print the vLLM-style summary."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

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
  --sweep 1,2,4         one point per value (rates for constant/poisson, concurrencies for concurrent), written
                        as ONE run folder: points/<k>-.../ per point, the whole sweep's requests on one clock,
                        summary.json with a "sweep" section and one report with the load-sweep plot

examples:
  python -m harness bench --backend sim --cluster mixed --model llama-3.1-8b --workload poisson,rate=0.5,n=20,prompt=256,output=64
  python -m harness bench --backend instant --mode concurrent --sweep 1,16,64 --workload all_at_once,n=500,prompt=64,output=64
  python -m harness bench --target http://127.0.0.1:52415 --endpoint chat --served-model llama-3.2-1b --mode synchronous --workload all_at_once,n=20"""


def _positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0 (a negative duration used to send nothing and pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"found {text!r}; allowed: a number of seconds > 0") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"found {text}; allowed: a finite number of seconds > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"found {text!r}; allowed: a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"found {value}; allowed: a whole number >= 1")
    return value


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
    lg.add_argument("--sweep", default=None,
                    help="comma-separated rates or concurrencies: one point each, all in one run folder")
    lg.add_argument("--workers", type=_positive_int, default=1,
                    help="load generator processes on one clock (default 1); more lets one bench saturate a "
                         "fast server: open-loop request i goes to worker i %% N, a closed loop's concurrency is split")
    lg.add_argument("--warmup", type=int, default=1, help="warm-up requests before each run, not recorded (default 1)")
    lg.add_argument("--seed", type=int, default=0, help="seed of prompts and Poisson arrivals (default 0)")
    lg.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                    help="which API to call (default %(default)s: exact prompt lengths)")
    lg.add_argument("--served-model", default=None, help="model name to request (default: the first /v1/models lists)")
    lg.add_argument("--target-api-key", default=None, help="Bearer key for the target")
    lg.add_argument("--no-pin-output", action="store_true",
                    help="do not send min_tokens/ignore_eos (for servers that reject vLLM's extensions)")
    lg.add_argument("--max-duration-s", type=_positive_seconds, default=None,
                    help="stop sending after this many seconds; cancel what still runs at twice that")
    lg.add_argument("--slo", default=None, help='goodput SLOs in ms, e.g. "ttft:500 tpot:50"')
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/out", help="where run folders go (default %(default)s)")
    out.add_argument("--label", default="bench", help="run-id label (default %(default)s)")
    out.add_argument("--no-report", action="store_true", help="skip the HTML report (render later with `harness report`)")
    out.add_argument("--progress-every", type=float, default=None, metavar="S",
                     help="seconds between status lines on stderr (default: 1 on a terminal, 10 otherwise)")
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
    from harness.serving.loadgen import Target
    target = Target(url, model=args.served_model, api_key=args.target_api_key, endpoint=args.endpoint,
                    pin_output=not args.no_pin_output, send_prefix_id=backend is not None)
    bench = _Bench(args, target, url, workload, workload_spec, slo, backend, load_report)
    if len(modes) > 1:
        return _sweep(bench, modes)
    path, _, _ = bench.measure(modes[0], args.out, f"{args.label}-{modes[0].label}")
    _report(args, [path], path / "report.html")
    return 0


@dataclass
class _Bench:
    """One bench invocation's fixed inputs, shared by every point of a sweep."""
    args: argparse.Namespace
    target: object
    url: str
    workload: object
    workload_spec: dict
    slo: dict | None
    backend: object = None
    load_report: object = None

    def measure(self, mode, out_root, label, run_id=None):
        """Drive the workload at the target in `mode` into a new run folder, with the status line on stderr;
        returns (path, summary, LoadResult)."""
        from harness.serving.loadgen import run_load_sync
        from harness.serving.progress import LoadProgress
        print(f"running {mode.label}: {len(self.workload)} requests to {self.target.base} ...", flush=True)
        results = []

        def measure(sink):
            with LoadProgress(self.backend, len(self.workload), every_s=self.args.progress_every) as progress:
                progress.follow(sink)
                results.append(run_load_sync(self.target, self.workload, mode, warmup=self.args.warmup,
                                             seed=self.args.seed, max_duration_s=self.args.max_duration_s, sink=sink,
                                             workers=getattr(self.args, "workers", 1)))
            return results[-1]
        config = _config(self.args, self.url, self.workload_spec, self.backend,
                         {"kind": mode.kind, "value": mode.value, "seed": mode.seed})
        path, summary = record_run(out_root, label, measure, config, slo=self.slo, backend=self.backend,
                                   load_report=self.load_report, run_id=run_id)
        print(summary_text(summary, self.backend))
        print(dispatch_line(results[-1]))
        print(f"run folder: {path}\n", flush=True)
        return path, summary, results[-1]


def _sweep(bench: _Bench, modes) -> int:
    """Every load mode as one point of ONE run folder: points/<k>-<mode>/ each a complete run folder, and at
    the top the whole sweep's requests on one clock, a summary with a "sweep" section and one report."""
    from harness import runfolder
    from harness.recording import start_run
    args, plan = bench.args, getattr(bench.backend, "plan", None)
    points = []
    with runfolder.RunWriter(args.out, f"{args.label}-sweep-{modes[0].kind}") as top:
        mode = {"kind": modes[0].kind, "values": [m.value for m in modes], "seed": modes[0].seed}
        config = {**_config(args, bench.url, bench.workload_spec, bench.backend, mode), "run_id": top.run_id}
        plan_dict = start_run(top, config, plan, {"load_generator": "harness.serving.loadgen", "target": config["target"]})
        for k, m in enumerate(modes, 1):
            points.append((m, *bench.measure(m, top.path / "points", m.label, run_id=f"{k}-{m.kind}-{m.value:g}")))
        _finish_sweep(top, config, plan_dict, points, bench)
    print(sweep_table([(m.label, s) for m, _, s, _ in points]))
    print(f"sweep folder: {top.path} ({len(points)} points under points/)", flush=True)
    _report(args, [path for _, path, _, _ in points], top.path / "report.html")
    return 0


def _finish_sweep(top, config, plan_dict, points, bench: _Bench) -> dict:
    """requests.parquet and steps.parquet of the whole sweep, and its summary.json: the metrics over every
    point's requests together, plus the "sweep" section (each point's load and metrics)."""
    from harness.recording import finish_run
    from harness.summary import sweep_section

    def add_sweep(summary: dict) -> None:
        summary["run"]["load_mode"] = "sweep " + ",".join(m.label for m, _, _, _ in points)
        summary["sweep"] = sweep_section(config["mode"]["kind"], [
            (m.value, m.label, f"points/{path.name}", s["metrics"]) for m, path, s, _ in points])
    whole = whole_sweep([result for _, _, _, result in points])
    _, summary = finish_run(top, config, plan_dict, whole, bench.backend, bench.load_report, bench.slo,
                            getattr(bench.backend, "plan", None), amend=add_sweep)
    return summary


# The request-row columns that are times on the load generator's clock (t=0 = the point's start).
TIME_COLUMNS = ("scheduled_s", "start_s", "first_token_s", "end_s")


def whole_sweep(results):
    """The points' LoadResults as one, on the first point's clock (the points ran one after another, so
    shifting by each point's start keeps their true order); request ids are prefixed "p<k>/" to name the
    point they belong to."""
    from dataclasses import replace
    first, last = results[0], results[-1]
    rows = [_shifted(row, r.t0_monotonic - first.t0_monotonic, f"p{k}/")
            for k, r in enumerate(results, 1) for row in r.rows]
    return replace(first, rows=rows, duration_s=last.t0_monotonic + last.duration_s - first.t0_monotonic,
                   notes=[*first.notes, f"sweep of {len(results)} points"])


def _shifted(row: dict, offset_s: float, prefix: str) -> dict:
    moved = {k: row[k] + offset_s for k in TIME_COLUMNS if row.get(k) is not None}
    chunks = [t + offset_s for t in row.get("chunk_times_s") or []]
    return {**row, **moved, "chunk_times_s": chunks, "request_id": prefix + str(row["request_id"])}


def _report(args, run_dirs, out) -> None:
    """report.html (a comparison of the points for a sweep), unless --no-report."""
    if args.no_report:
        return
    from reports import render
    print(f"report: {render(run_dirs, out=out)}", flush=True)


def _config(args, url, workload_spec, backend, mode: dict) -> dict:
    skip = {"_run", "_parser", "command"}   # the CLI's own plumbing is no part of the config
    return {"command": "bench", "target": url if args.target != "embedded" else "embedded",
            "args": {k: v for k, v in vars(args).items() if k not in skip},
            "workload": workload_spec, "mode": mode, "strategy": strategy_name(backend)}


def strategy_name(backend) -> str:
    """What reports call the run: the plan's strategy, else the backend's name, or "external" for an outside
    server (no backend here)."""
    if backend is None:
        return "external"
    plan = getattr(backend, "plan", None)
    return getattr(plan, "strategy", None) or backend.name


def record_run(out_root, label, measure, config, *, slo=None, backend=None, load_report=None, run_id=None):
    """Run `measure(sink)` (the load generator, handing each finished request to `sink`) into a new run folder
    (harness.runfolder); returns (path, summary). The folder exists before the first request: Ctrl-C, SIGTERM
    or an exception keep the finished requests and a summary over them (harness.recording.keep_finished).

    With an embedded backend, steps.parquet holds its step records (`Backend.step_table`) and plan.json its
    plan (`Backend.plan`, when it serves one); against an outside server (backend None) both are empty.
    """
    from harness import runfolder
    from harness.recording import finish_run, keep_finished, start_run
    from harness.serving.loadgen import LoadSink
    plan = backend.plan if backend is not None else None
    with runfolder.RunWriter(out_root, label, run_id=run_id) as run:
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


def dispatch_line(result) -> str:
    """The load generator's own lag behind its schedule (start_s - scheduled_s of every request), p50 and p99:
    a figure that grows means the generator, not the server, set the pace."""
    import numpy as np
    delays = result.dispatch_delays_s() * 1e3
    workers = next((n for n in result.notes if "worker process" in n), "1 load generator process")
    if not delays.size:
        return f"  {'dispatch lag (measured)':<28} - ({workers})"
    p50, p99 = np.percentile(delays, [50, 99])
    return f"  {'dispatch lag (measured)':<28} p50 {p50:.3f} ms, p99 {p99:.3f} ms ({workers})"


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
