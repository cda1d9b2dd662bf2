"""`python -m harness run`: the whole job, from plan to HTML report, on the bundled defaults or an experiment."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from strategies.registry import cache_policy_names, strategy_names

HELP = "plan, serve the simulated (or real MLX) cluster, load-test it, and write a run folder + HTML report"
DESCRIPTION = """Run one experiment end to end: plan the model over the cluster with the strategy, start the
backend (the SimPy cluster paced in real time, or real MLX ranks) behind the embedded OpenAI-compatible
server, drive the workload at it with the load generator, save runs/out/<run-id>/ and render report.html.

Defaults come from runs/default.toml (Llama 3.1 70B 4-bit on the bundled 'mixed' cluster, 16 Poisson
requests, under a minute); --experiment FILE replaces them, and each flag below overrides either.
Timings of a sim run are the simulated cluster's (labelled simulated); of an mlx run, measured.

examples:
  python -m harness run --strategy hybrid_optimal
  python -m harness run --strategy all                       # every strategy on the same workload, compared
  python -m harness run --experiment runs/smoke.toml --out /tmp/runs
  python -m harness run --backend mlx --cluster mini-pair --model qwen2.5-0.5b --quant 16 --strategy uniform"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", default=None, help="experiment TOML file (default runs/default.toml)")
    o = p.add_argument_group("overrides (default: the experiment's value)")
    o.add_argument("--strategy", default=None,
                   help=f"partitioning strategy: {', '.join(strategy_names())}; or 'all' to run and compare each")
    from harness.backends import BACKEND_NAMES
    o.add_argument("--backend", default=None, choices=BACKEND_NAMES,
                   help="what serves the plan; `harness serve --help` describes each backend")
    o.add_argument("--cluster", default=None, help="cluster preset name or JSON file")
    from harness.planning import quant_arg
    o.add_argument("--model", default=None, help="model preset name, config.json, or params=235b,active=22b,...")
    o.add_argument("--quant", type=quant_arg, default=None, help="weight bits: 4, 4.5 (bits per weight) or mixed:4/6")
    o.add_argument("--group-size", type=int, default=None, help="quantization group size")
    from harness.costmodel import OBJECTIVES
    o.add_argument("--objective", default=None, choices=list(OBJECTIVES), help="hybrid_optimal's objective")
    o.add_argument("--cache", default=None, help=f"prefix-cache policy: {', '.join(cache_policy_names())}")
    o.add_argument("--cache-l4-gb", type=float, default=None,
                   help="tiered_lru: an L4 tier of this many GB (network storage or a peer Mac's memory); on real "
                        "ranks it is the folder HARNESS_L4_DIR names (a shared mount), else a temporary one")
    o.add_argument("--kv-reserve-tokens", type=int, default=None, help="KV tokens each stage keeps room for")
    o.add_argument("--failover", action="store_true", default=None,
                   help="after a node failure (sim: an injected one; mlx: a rank that dies or stalls), plan again "
                        "on the nodes left, reload and serve on (requests in flight at the failure fail; new "
                        "ones get 503 while reloading)")
    from harness.planning import add_whatif_arguments
    add_whatif_arguments(o)
    o.add_argument("--hostfile", default=None,
                   help="mlx backend: mlx.launch hosts.json, to start the ranks on those Macs over ssh "
                        "(experiment key [mlx].hostfile)")
    o.add_argument("--requests", type=int, default=None, help="number of requests in the workload")
    o.add_argument("--rate", type=float, default=None, help="Poisson arrival rate of the workload, requests/s")
    p.add_argument("--out", default="runs/out", help="where run folders go (default %(default)s)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report (render later with `harness report`)")


def run(args) -> int:
    from harness.experiment import apply_overrides, load_experiment
    from harness.orchestrate import run_experiment
    from harness.planning import strategies_for
    exp = apply_overrides(load_experiment(args.experiment), args)
    if args.hostfile:
        exp.setdefault("mlx", {})["hostfile"] = args.hostfile
    if args.add_node:    # added to the experiment's own add_nodes, if it has any
        exp["add_nodes"] = exp.get("add_nodes", []) + args.add_node
    if args.requests is not None or args.rate is not None:
        exp["workload"] = _workload_overrides(exp["workload"], args)
    names = strategies_for(exp["strategy"])
    out_root = Path(args.out)
    outcomes = run_experiment(exp, names, out_root, report=not args.no_report)
    print()
    for outcome in outcomes:
        print(_outcome_text(outcome, not args.no_report))
    done = [o for o in outcomes if o.path is not None]
    if len(outcomes) > 1:
        print(_comparison(outcomes))
        if done and not args.no_report:
            from reports import render
            from harness.runfolder import new_run_id
            path = render([o.path for o in done], out_root / f"compare-{new_run_id(exp['name'])}.html")
            print(f"\ncomparison report: {path}")
    return exit_code(outcomes)


def exit_code(outcomes) -> int:
    """1 when nothing ran or any run had failed requests (as `simulate` does: a script must not read a run
    whose requests failed as a success), else 0. A strategy that does not fit, beside one that ran, is a
    planned outcome, not a failure."""
    done = [o for o in outcomes if o.path is not None]
    failed = [(o.strategy, int(o.summary["metrics"].get("failed") or 0)) for o in done if o.summary]
    failed = [(name, n) for name, n in failed if n]
    for name, n in failed:
        print(f"error: {name}: {n} request(s) failed; their reasons are in the run folder and the report's banner",
              file=sys.stderr)
    return 0 if done and not failed else 1


def _workload_overrides(spec: dict, args) -> dict:
    from harness.specs import UserError
    spec = dict(spec)
    if spec.get("kind", "synthetic") != "synthetic":
        raise UserError("--requests and --rate apply to synthetic workloads; edit the experiment file instead")
    if args.requests is not None:
        if args.requests < 1:
            raise UserError(f"--requests must be >= 1, got {args.requests}")
        spec["num_requests"] = args.requests
    if args.rate is not None:
        if not args.rate > 0:
            raise UserError(f"--rate must be > 0, got {args.rate}")
        spec["arrival"] = {"process": "poisson", "rate": args.rate}
    return spec


def _outcome_text(o, with_report: bool) -> str:
    if o.error:
        return f"{o.strategy}: did not run: {o.error}\n"
    s = o.summary
    from harness import metrics
    lines = [f"== {o.strategy} ({s['source']}: {s['backend']} backend) ==",
             metrics.headline(s["metrics"], s["source"])]
    plan = s.get("plan") or {}
    p = plan.get("predicted") or {}
    if p:
        lines.append(f"  plan prediction for {plan['cluster']} (theoretical): {p['tpot_ms']:.2f} ms/token, TTFT {p['ttft_ms']:.0f} ms "
                     f"for {p['prompt_tokens']} prompt tokens; ceiling {p['ceiling_tokens_per_s']:.1f} tokens/s "
                     f"(peak bandwidth, no overheads)")
        if p.get("sustainable_rate_rps") is not None:
            lines.append(f"  plan's sustainable rate (theoretical): {p['sustainable_rate_rps']:.3g} requests/s of "
                         f"{p['prompt_tokens']}+{p.get('output_tokens', '?')} tokens{_offered(p)}")
    lines += [_target_line(t) for t in s.get("targets", [])]
    from harness.saturation import overload_lines
    lines += overload_lines(s)
    lines.append(f"run folder: {o.path}")
    if with_report:
        lines.append(f"report: {o.path / 'report.html'}")
    return "\n".join(lines) + "\n"


def _target_line(t: dict) -> str:
    """One target verdict: PASS/FAIL with the deciding figure, or n/a with the reason it does not apply."""
    head = f"  target {t['name']} {t['op']} {t['value']:g} {t['unit']}".rstrip()
    note = f" — {t['note']}" if t.get("note") else ""
    if t["status"] == "n/a":
        return f"{head}: n/a ({t.get('reason') or 'does not apply'})"
    seen = "no value" if t["observed"] is None else f"{t['observed']:.4g} {t['unit']} ({t['source']})"
    return f"{head}: {str(t['status']).upper()}, {seen}{note}"


# The figures of the strategy comparison, labelled from the metric catalogue.
COMPARISON_KEYS = ("request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_e2el_ms")


def _offered(predicted: dict) -> str:
    rate, cap = predicted.get("arrival_rate_rps"), predicted["sustainable_rate_rps"]
    return f"; the workload offers {rate:.3g} requests/s ({100 * rate / cap:.0f} % of it)" if rate and cap else ""


def _comparison(outcomes) -> str:
    from harness import metrics
    entries = [metrics.BY_KEY[k] for k in COMPARISON_KEYS]
    rows = [("strategy", *(m.heading for m in entries), "source")]
    for o in outcomes:
        if o.error:
            rows.append((o.strategy, *("-" for _ in entries), "does not fit"))
            continue
        figures = o.summary["metrics"]
        rows.append((o.strategy, *(_cell(m, figures.get(m.key)) for m in entries), o.summary["source"]))
    from harness.cli import text_table
    return "strategy comparison (same workload):\n" + text_table(rows)


def _cell(entry, value) -> str:
    return "-" if value is None else entry.format.format(value)
