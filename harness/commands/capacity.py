"""`python -m harness capacity`: the highest arrival rate a plan serves within its SLOs, and what context fits."""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from argparse import Namespace
from pathlib import Path

from harness.planning import add_plan_arguments
from harness.specs import UserError

HELP = "find the highest request rate that meets TTFT/TPOT SLOs (goodput knee) by simulation; max context per node"
DESCRIPTION = """Plan the model over the cluster, then search the Poisson arrival rate for the goodput knee: the
highest rate whose simulated run keeps p90 TTFT and p90 TPOT within the SLOs without saturating (harness.saturation's
verdict). The search starts at the cost model's sustainable rate (theoretical), brackets the knee and narrows it to
--tolerance; every simulation uses the same seeded workload shape, so the answer is reproducible. Prints the
saturation curve (rate, TTFT p50/p90, TPOT p50/p90, goodput, meets SLO) and, per plan stage, how many KV-cache
tokens fit beside its weights (the longest context one request can have, and how many requests of the workload's
shape fit at once). Writes capacity.json, curve.csv, curve.png and capacity.html to --out.

Figures: the curve and the knee are simulated; the start rate, the default SLOs and the memory figures are
theoretical (cost model). Goodput = requests meeting every SLO / run duration (harness.metrics).

SLO defaults: --slo-scale (default 5) times the plan's predicted single-stream TTFT and TPOT, i.e. "latency at
most 5x what one user alone sees"; give --ttft-p90-ms / --tpot-p90-ms for absolute targets.

examples:
  python -m harness capacity --cluster mini-pair --model llama-3.1-8b --ttft-p90-ms 5000 --tpot-p90-ms 80
  python -m harness capacity --cluster mixed --model llama-3.1-70b --prompt uniform:256:1024 --output 200"""

DEFAULT_REQUESTS = 300
DEFAULT_SLO_SCALE = 5.0
LENGTH_HELP = "N, uniform:LOW:HIGH, normal:MEAN:STD or lognormal:MEAN:SIGMA"
MIN_REQUESTS = 20   # harness.saturation compares quarters of the arrivals: a handful of rows cannot show growth


def add_arguments(p) -> None:
    add_plan_arguments(p)
    w = p.add_argument_group("workload shape (Poisson arrivals; the rate is what the search varies)")
    w.add_argument("--prompt", default=None, metavar="LENGTH",
                   help=f"prompt length: {LENGTH_HELP} (default: --prompt-tokens, fixed)")
    w.add_argument("--output", default=None, metavar="LENGTH",
                   help=f"output length: {LENGTH_HELP} (default: --output-tokens, fixed)")
    w.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                   help="requests per simulated rate: enough to see a queue grow (default %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="workload seed, the same at every rate (default %(default)s)")
    w.add_argument("--max-num-seqs", type=int, default=128, help="engine sequences per micro-batch (default %(default)s)")
    s = p.add_argument_group("SLOs and search")
    s.add_argument("--ttft-p90-ms", type=float, default=None,
                   help="p90 time-to-first-token target, ms (default: --slo-scale x predicted single-stream TTFT)")
    s.add_argument("--tpot-p90-ms", type=float, default=None,
                   help="p90 time-per-output-token target, ms (default: --slo-scale x predicted single-stream TPOT)")
    s.add_argument("--slo-scale", type=float, default=DEFAULT_SLO_SCALE,
                   help="multiple of the single-stream prediction used for an SLO not given (default %(default)s)")
    s.add_argument("--tolerance", type=float, default=0.02,
                   help="stop when the bracket's upper / lower rate <= 1 + this (default %(default)s)")
    s.add_argument("--max-simulations", type=int, default=30, help="search budget (default %(default)s)")
    s.add_argument("--curve-points", type=int, default=4,
                   help="extra simulated rates spread below and above the knee for the curve (default %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR",
                   help="folder for capacity.json, curve.csv, curve.png, capacity.html "
                        "(default runs/out/<time>-capacity-<cluster>-<model>-<hex>)")
    o.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    from harness.capacity import curve_rates, find_knee
    check_flags(args)
    prompt, output = length_spec(args.prompt, args.prompt_tokens, "--prompt"), \
        length_spec(args.output, args.output_tokens, "--output")
    setup = prepare(args, prompt, output)
    folder = output_folder(args.out, setup["cluster"].name, setup["model"].name)
    evaluate = make_evaluator(setup, prompt, output, args.requests, args.seed, None if args.quiet else sys.stderr)
    knee = find_knee(evaluate, setup["start_rps"], args.tolerance, args.max_simulations)
    extra = [evaluate(rate) for rate in curve_rates(knee, args.curve_points)]
    report = build_report(args, setup, prompt, output, knee, extra)
    print(console_text(report))
    write_folder(folder, report)
    print(f"capacity folder: {folder}")
    return 0 if knee.knee_rps is not None else 1


def check_flags(args) -> None:
    if args.requests < MIN_REQUESTS:
        raise UserError(f"--requests: found {args.requests}; allowed: an integer >= {MIN_REQUESTS}")
    if not 0 <= args.seed < 2**64:   # numpy's generators take a seed in [0, 2**64)
        raise UserError(f"--seed: found {args.seed}; allowed: an integer from 0 to {2**64 - 1}")
    if args.curve_points < 0:
        raise UserError(f"--curve-points: found {args.curve_points}; allowed: an integer >= 0")
    if args.max_num_seqs < 1:
        raise UserError(f"--max-num-seqs: found {args.max_num_seqs}; allowed: an integer >= 1")
    if not (math.isfinite(args.slo_scale) and args.slo_scale > 0):
        raise UserError(f"--slo-scale: found {args.slo_scale}; allowed: a number > 0")
    for flag in ("prompt_tokens", "output_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: found {getattr(args, flag)}; allowed: an integer >= 1")


def length_spec(text: str | None, default: int, flag: str) -> dict:
    """A workload length dict from the flag's shorthand (or the fixed default), checked by harness.workloads."""
    from harness.workloads import parse_workload
    if text is None:
        return {"dist": "fixed", "value": int(default)}
    try:
        return parse_workload(f"poisson,rate=1,prompt={text}")["prompt"]
    except UserError:
        raise UserError(f"{flag}: found {text!r}; allowed: {LENGTH_HELP} with positive lengths") from None


def workload_spec(prompt: dict, output: dict, rate: float, requests: int, seed: int) -> dict:
    return {"kind": "synthetic", "arrival": {"process": "poisson", "rate": float(rate)}, "num_requests": requests,
            "prompt": prompt, "output": output, "seed": seed}


def mean_lengths(prompt: dict, output: dict, requests: int, seed: int) -> tuple[int, int]:
    """The workload's mean prompt and output lengths: the plan's reference lengths (sustainable rate, SLOs)."""
    from harness.workloads import build_workload
    wl = build_workload(workload_spec(prompt, output, 1.0, requests, seed))
    return max(1, round(float(wl.prompt_tokens.mean()))), max(1, round(float(wl.output_tokens.mean())))


def prepare(args, prompt: dict, output: dict) -> dict:
    """The plan at the workload's mean lengths, its stages, the search's start rate and the SLOs."""
    from dataclasses import replace

    from harness.capacity import Slo
    from harness.costmodel import stage_models, sustainable_rate_rps
    from harness.planning import make_plan, plan_options
    p_mean, o_mean = mean_lengths(prompt, output, args.requests, args.seed)
    shaped = Namespace(**{**vars(args), "prompt_tokens": p_mean, "output_tokens": o_mean})
    cluster, model, plan = make_plan(shaped)
    options = replace(plan_options(shaped), max_num_seqs=args.max_num_seqs)
    stages = stage_models(cluster, model, plan)
    start = sustainable_rate_rps(cluster, model, stages, options)
    if not start > 0:
        raise UserError(f"{plan.strategy} on {cluster.name}: not one {p_mean}+{o_mean}-token request per stage fits "
                        "beside the weights (sustainable rate 0); try a smaller --quant or a larger cluster")
    predicted = plan.predicted
    slo = Slo(args.slo_scale * predicted["ttft_ms"] if args.ttft_p90_ms is None else args.ttft_p90_ms,
              args.slo_scale * predicted["tpot_ms"] if args.tpot_p90_ms is None else args.tpot_p90_ms)
    return {"cluster": cluster, "model": model, "plan": plan, "options": options, "stages": stages,
            "start_rps": start, "slo": slo, "mean_prompt": p_mean, "mean_output": o_mean}


def make_evaluator(setup: dict, prompt: dict, output: dict, requests: int, seed: int, progress=None):
    """evaluate(rate) -> CurvePoint: one simulated run of the seeded workload at `rate` (no model load)."""
    from harness.capacity import judge
    from harness.workloads import build_workload
    from sim.engine import EngineConfig
    from sim.run import simulate
    # the knee is judged on request rows: step records would only be built and thrown away
    config = EngineConfig(max_num_seqs=setup["options"].max_num_seqs, record_steps=False)
    counter = {"n": 0}

    def evaluate(rate: float):
        counter["n"] += 1
        workload = build_workload(workload_spec(prompt, output, rate, requests, seed))
        result = simulate(setup["cluster"], setup["model"], setup["plan"], setup["options"].profile, workload,
                          config, include_load=False)
        point = judge(rate, result.requests.to_pandas(), result.stats.get("preemptions"), setup["slo"])
        if progress is not None:
            print(progress_line(counter["n"], point), file=progress, flush=True)
        return point

    return evaluate


def progress_line(n: int, point) -> str:
    verdict = "meets SLOs" if point.meets else ("saturated" if point.saturated else "misses SLOs")
    return (f"capacity: simulation {n}: {point.rate_rps:.4g} req/s -> p90 TTFT {point.ttft_p90_ms:,.0f} ms, "
            f"p90 TPOT {point.tpot_p90_ms:,.1f} ms, goodput {point.goodput_rps:.3g} req/s: {verdict} (simulated)")


# ------------------------------------------------------------------------------------------ the report

def memory_rows(setup: dict) -> list[dict]:
    """Per plan stage and node: KV tokens that fit beside the weights (theoretical, costmodel.kv_room_tokens)."""
    from harness.costmodel import kv_room_tokens
    cluster, request_tokens = setup["cluster"], setup["mean_prompt"] + setup["mean_output"]
    rows = []
    for st in setup["stages"]:
        room = kv_room_tokens(cluster, st)
        for name in st.nodes:
            node = cluster.node(name)
            rows.append({"stage": st.index, "node": name, "layers": f"{st.start}-{st.end - 1}",
                         "usable_gb": node.usable_bytes / 1e9, "weights_gb": st.weight_bytes_node / 1e9,
                         "kv_tokens": int(room), "requests_at_once": int(room // request_tokens)})
    return rows


def build_report(args, setup: dict, prompt: dict, output: dict, knee, extra: list) -> dict:
    from harness.runfolder import environment
    search_rates = {p.rate_rps for p in knee.points}
    points = [p.to_dict() | {"phase": "search" if p.rate_rps in search_rates else "curve"}
              for p in sorted(knee.points + extra, key=lambda p: p.rate_rps)]
    plan, slo = setup["plan"], setup["slo"]
    config = {"command": "capacity", "cluster": args.cluster, "cluster_name": setup["cluster"].name,
              "link": args.link, "add_nodes": args.add_node, "model": setup["model"].name,
              "quant_bits": setup["model"].quant, "group_size": setup["model"].group_size,
              "strategy": plan.strategy, "objective": args.objective, "profile": setup["options"].profile.name,
              "workload": workload_spec(prompt, output, 0.0, args.requests, args.seed) | {"arrival": {"process": "poisson"}},
              "max_num_seqs": args.max_num_seqs, "tolerance": args.tolerance,
              "max_simulations": args.max_simulations, "curve_points": args.curve_points, "argv": sys.argv[1:]}
    return {"schema": "capacity/1", "source": "simulated (curve, knee); theoretical (start rate, default SLOs, memory)",
            "config": config, "environment": environment({"backend": "sim"}),
            "slo": {"ttft_p90_ms": slo.ttft_p90_ms, "tpot_p90_ms": slo.tpot_p90_ms,
                    "explicit": {"ttft": args.ttft_p90_ms is not None, "tpot": args.tpot_p90_ms is not None},
                    "slo_scale": args.slo_scale},
            "plan": {"strategy": plan.strategy, "stages": [s.label for s in plan.stages],
                     "predicted_single_stream": {k: plan.predicted[k] for k in ("ttft_ms", "tpot_ms")},
                     "sustainable_rate_rps_theoretical": setup["start_rps"],
                     "reference_lengths": [setup["mean_prompt"], setup["mean_output"]]},
            "knee": knee.to_dict() | {"source": "simulated", "simulations_total": len(points)},
            "points": points, "memory": memory_rows(setup)}


def curve_table(points: list[dict]) -> str:
    from harness.cli import text_table
    rows = [("rate req/s", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms", "goodput req/s",
             "good %", "meets SLO", "why not")]
    for p in points:
        why = "; ".join(p["saturation_reasons"]) if p["saturated"] else ("" if p["meets"] else "latency over target")
        rows.append((f"{p['rate_rps']:.4g}", f"{p['ttft_p50_ms']:,.0f}", f"{p['ttft_p90_ms']:,.0f}",
                     f"{p['tpot_p50_ms']:.1f}", f"{p['tpot_p90_ms']:.1f}", f"{p['goodput_rps']:.3g}",
                     f"{100 * p['good_share']:.0f}", "yes" if p["meets"] else "no", why))
    return text_table(rows)


def memory_table(rows: list[dict]) -> str:
    from harness.cli import text_table
    out = [("stage", "node", "layers", "usable GB", "weights GB", "KV tokens that fit", "requests at once")]
    for r in rows:
        out.append((str(r["stage"]), r["node"], r["layers"], f"{r['usable_gb']:.1f}", f"{r['weights_gb']:.1f}",
                    f"{r['kv_tokens']:,}", f"{r['requests_at_once']:,}"))
    return text_table(out)


def knee_line(report: dict) -> str:
    k, slo = report["knee"], report["slo"]
    targets = f"p90 TTFT <= {slo['ttft_p90_ms']:,.0f} ms and p90 TPOT <= {slo['tpot_p90_ms']:,.1f} ms"
    sims = f"{k['search_simulations']} search simulations"
    match k["status"]:
        case "found":
            return (f"goodput knee (simulated): {k['knee_rps']:.4g} req/s meets {targets}; {k['upper_rps']:.4g} "
                    f"req/s does not ({sims})")
        case "budget":
            return (f"goodput knee (simulated): search budget spent after {sims}; best bracket "
                    f"{k['lower_rps']} .. {k['upper_rps']} req/s for {targets}; raise --max-simulations")
        case "above-all":
            return (f"goodput knee (simulated): every rate tried up to {k['knee_rps']:.4g} req/s meets {targets} "
                    f"({sims}); the SLOs are looser than the cluster's saturation")
        case _:
            return (f"no rate down to {k['upper_rps']:.4g} req/s meets {targets} ({sims}); even light load misses "
                    "them: loosen --ttft-p90-ms / --tpot-p90-ms or pick a faster plan")


def console_text(report: dict) -> str:
    plan, slo = report["plan"], report["slo"]
    source = lambda explicit: "given" if explicit else f"{slo['slo_scale']:g}x predicted single stream, theoretical"
    memory = report["memory"]
    longest = min(r["kv_tokens"] for r in memory)
    return "\n".join([
        f"plan {plan['strategy']}: {' | '.join(plan['stages'])}; start rate {plan['sustainable_rate_rps_theoretical']:.4g} "
        f"req/s (cost model's sustainable rate, theoretical) at {plan['reference_lengths'][0]}+"
        f"{plan['reference_lengths'][1]} tokens",
        f"SLOs: p90 TTFT <= {slo['ttft_p90_ms']:,.0f} ms ({source(slo['explicit']['ttft'])}); p90 TPOT <= "
        f"{slo['tpot_p90_ms']:,.1f} ms ({source(slo['explicit']['tpot'])})", "",
        "saturation curve (simulated):", curve_table(report["points"]), "", knee_line(report), "",
        "maximum context within memory (theoretical: KV-cache tokens that fit beside each stage's weights):",
        memory_table(memory),
        f"longest context of one request on this plan: {longest:,} tokens (the tightest stage decides; memory "
        "only: the model's own context limit is not checked)"])


# ------------------------------------------------------------------------------------------ the folder

def output_folder(out: str | None, cluster: str, model: str) -> Path:
    """--out, or a new time-stamped folder under runs/out/; an existing non-empty folder is refused."""
    from harness.runfolder import new_run_id
    folder = Path(out) if out else Path("runs/out") / new_run_id(f"capacity-{cluster}-{model}")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--out {folder}: found an existing {'file' if not folder.is_dir() else 'non-empty folder'}; "
                        "allowed: a new or empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {folder}: cannot create it: {exc.strerror or exc}") from None
    return folder


def write_folder(folder: Path, report: dict) -> None:
    """Every file through a temporary name and os.replace, so each one is whole or absent."""
    from harness.runfolder import write_json_atomic
    png = curve_png(report)
    _write_atomic(folder / "curve.csv", curve_csv(report["points"]).encode())
    _write_atomic(folder / "curve.png", png)
    _write_atomic(folder / "capacity.html", curve_html(report, png).encode())
    write_json_atomic(folder / "capacity.json", report)   # last: its presence says the folder is complete


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


CSV_COLUMNS = ("rate_rps", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "goodput_rps", "good_share",
               "throughput_rps", "saturated", "meets", "phase")


def curve_csv(points: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + ("source",))
    for p in points:
        writer.writerow([p[c] for c in CSV_COLUMNS] + ["simulated"])
    return buffer.getvalue()


def curve_png(report: dict) -> bytes:
    """TTFT, TPOT (p50, p90, target) and goodput against rate, the knee marked."""
    from matplotlib.figure import Figure
    points, slo, knee = report["points"], report["slo"], report["knee"]["knee_rps"]
    rates = [p["rate_rps"] for p in points]
    fig = Figure(figsize=(13, 3.6))
    panels = (("TTFT", "ttft", slo["ttft_p90_ms"]), ("TPOT", "tpot", slo["tpot_p90_ms"]))
    for i, (label, key, target) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 3, i)
        ax.plot(rates, [p[f"{key}_p50_ms"] for p in points], "o-", label="p50")
        ax.plot(rates, [p[f"{key}_p90_ms"] for p in points], "s-", label="p90")
        ax.axhline(target, color="red", linestyle="--", label="p90 target")
        ax.set_yscale("log")
        ax.set(xlabel="arrival rate (req/s)", ylabel=f"{label} (ms)", title=f"{label} (simulated)")
        _mark_knee(ax, knee)
        ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 3)
    ax.plot(rates, [p["goodput_rps"] for p in points], "o-", label="goodput")
    ax.plot(rates, [p["throughput_rps"] for p in points], "x:", label="throughput")
    ax.set(xlabel="arrival rate (req/s)", ylabel="req/s", title="goodput (simulated)")
    _mark_knee(ax, knee)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _mark_knee(ax, knee: float | None) -> None:
    if knee is not None:
        ax.axvline(knee, color="green", linestyle=":", label="knee")


def curve_html(report: dict, png_bytes: bytes) -> str:
    import base64
    import html
    png = base64.b64encode(png_bytes).decode("ascii")
    cfg = report["config"]
    title = html.escape(f"capacity: {cfg['model']} on {cfg['cluster_name']} ({cfg['strategy']})")
    table = html.escape(curve_table(report["points"]))
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body>"
            f"<h1>{title}</h1><p>{html.escape(knee_line(report))}</p>"
            f"<img alt=\"saturation curve (simulated)\" src=\"data:image/png;base64,{png}\">"
            f"<h2>saturation curve (simulated)</h2><pre>{table}</pre>"
            f"<h2>maximum context within memory (theoretical)</h2><pre>{html.escape(memory_table(report['memory']))}</pre>"
            "</body></html>\n")
