"""`python -m harness size`: the cheapest cluster of Macs (list prices) that meets a model's targets."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from harness.cli import text_table
from harness.specs import UserError

HELP = "find the cheapest Mac cluster (public list prices) that meets tok/s and TTFT targets for a model"
DESCRIPTION = """Search clusters built from the priced Mac configurations (harness/catalog/apple_silicon_prices.csv,
Apple US list prices with sources) and the link kinds of harness/catalog/links.json for the cheapest that meets
the targets. Every multiset of up to --max-nodes Macs under every --links kind is screened with the cost model
(theoretical: exo's memory-weighted pipeline split, batched decode of the users' streams), then the best
--simulate candidates are served in the simulator (simulated: a closed loop of `users` streams).

Targets: tok_s = per-stream decode tokens/s each user gets (required); users = concurrent streams (default 1);
ttft_ms = time to first token of a request arriving while the others decode (optional).

Writes to --out: size.json (every figure, with its source), pareto.png (matplotlib, when installed) and
pareto.html (cost vs tok/s vs TTFT of the Pareto-optimal candidates).

examples:
  python -m harness size --model llama-3.1-70b --quant 4 --targets tok_s=10,users=4
  python -m harness size --model llama-3.1-70b --targets tok_s=10,users=4,ttft_ms=8000 --budget 6000 \\
      --max-nodes 4 --links tb5-rdma,10gbe --out runs/out/size-70b"""


def add_arguments(p) -> None:
    from harness.planning import DEFAULT_MODEL, QUANT_HELP, model_help, quant_arg
    g = p.add_argument_group("what to size for")
    g.add_argument("--model", default=DEFAULT_MODEL, help=model_help())
    g.add_argument("--quant", type=quant_arg, default=4, metavar="BITS", help=QUANT_HELP)
    g.add_argument("--group-size", type=int, default=64, help="quantization group size (default %(default)s)")
    g.add_argument("--targets", required=True, metavar="tok_s=N[,users=N][,ttft_ms=N]",
                   help="per-stream decode tok/s (required), concurrent users, TTFT bound in ms")
    g.add_argument("--prompt-tokens", type=int, default=512, help="prompt length per request (default %(default)s)")
    g.add_argument("--output-tokens", type=int, default=128, help="output length per request (default %(default)s)")
    g.add_argument("--kv-reserve-tokens", type=int, default=8192,
                   help="KV-cache tokens each Mac keeps room for (default %(default)s)")
    s = p.add_argument_group("search")
    s.add_argument("--budget", type=float, default=None, metavar="USD", help="most the cluster may cost (default: any)")
    s.add_argument("--max-nodes", type=int, default=4, help="most Macs in a cluster, 1 to 12 (default %(default)s)")
    s.add_argument("--links", default=None, metavar="KIND,...",
                   help="link kinds to try between the Macs (default: all but loopback); TB5 kinds fall back to "
                        "tb4-tcp for a pair where a Mac lacks Thunderbolt 5")
    s.add_argument("--simulate", type=int, default=5, metavar="N",
                   help="confirm the N cheapest meeting candidates in the simulator (default %(default)s; 0: none)")
    s.add_argument("--prices", default=None, help="price list CSV (default: the bundled one)")
    s.add_argument("--profile", default=None, help="cost-model profile (default: fitted)")
    s.add_argument("--top", type=int, default=5, help="choices to print (default %(default)s)")
    s.add_argument("--out", default="runs/out/size", help="folder for size.json and the plots (default %(default)s)")


MAX_NODES_SEARCHED = 12   # multisets grow as C(P + n - 1, n): beyond a dozen Macs the search is not the tool


def run(args) -> int:
    from harness import catalog, sizing
    from harness.costmodel import PlanOptions, load_profile
    targets = sizing.parse_targets(args.targets)
    _check_numbers(args)
    offers = sizing.load_offers(args.prices or sizing.PRICES_CSV)
    links = sizing.parse_links(args.links)
    model = catalog.load_model(args.model, args.quant, args.group_size)
    options = PlanOptions(profile=load_profile(args.profile), objective="throughput",
                          kv_reserve_tokens=args.kv_reserve_tokens, prompt_tokens=args.prompt_tokens,
                          output_tokens=args.output_tokens)
    print(f"sizing {model.name} ({args.quant}-bit) for {targets.describe()}; {len(offers)} priced Macs, "
          f"up to {args.max_nodes} nodes, links {', '.join(links)}", file=sys.stderr)
    screener = sizing.Screener(model, options, targets)
    screened, seconds = screen_all(screener, offers, links, args)
    started = time.perf_counter()
    faster = sizing.refine_with_planner(screened, model, options, targets)
    seconds += time.perf_counter() - started
    print(f"  re-planned the {sizing.TP_REFINED} cheapest RDMA candidates with hybrid_optimal: {faster} faster "
          "on its plan", file=sys.stderr)
    ranked = sizing.rank(screened)
    if not ranked:
        raise UserError(nothing_meets(screened, targets, args.budget))
    simulated, sim_s = confirm(ranked[:args.simulate], model, options, targets)
    print_choices(ranked[:args.top], targets)
    best = ranked[0]
    print(f"\nwhy: {why(best, screened, targets)}")
    print(f"\none more node or a link upgrade for the best choice ({best.candidate.label}); theoretical:")
    extra = sizing.one_more(best, offers, links, screener, max(args.max_nodes, len(best.candidate.offers) + 1))
    print(one_more_table(best, extra, targets))
    front = sizing.pareto(screened)
    out = Path(args.out)
    write_outputs(out, model, targets, screened, ranked, front, extra, {"screen_s": seconds, "simulate_s": sim_s,
                                                                         "simulated": simulated})
    png = ", pareto.png" if (out / "pareto.png").exists() else ""
    print(f"\nscreened {len(screened)} candidates in {seconds:.2f} s and simulated {simulated} in {sim_s:.2f} s "
          f"(measured wall time); wrote {out}/size.json, pareto.html{png}")
    return 0


def _check_numbers(args) -> None:
    if not 1 <= args.max_nodes <= MAX_NODES_SEARCHED:
        raise UserError(f"--max-nodes: found {args.max_nodes}; allowed: 1 to {MAX_NODES_SEARCHED}")
    if args.budget is not None and not args.budget > 0:
        raise UserError(f"--budget: found {args.budget:g}; allowed: a positive number of US dollars")
    for name in ("simulate", "prompt_tokens", "kv_reserve_tokens"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}: found {getattr(args, name)}; allowed: 0 or more")
    if args.output_tokens < 2 or args.top < 1:
        raise UserError("--output-tokens must be >= 2 (a decode rate needs two tokens) and --top >= 1")


def screen_all(screener, offers, links, args):
    """Screen every candidate; a progress line on stderr every 5,000."""
    from harness import sizing
    total = sizing.count_candidates(offers, args.max_nodes, links)
    start, screened = time.perf_counter(), []
    for cand in sizing.candidates(offers, args.max_nodes, links, args.budget):
        screened.append(screener.screen(cand))
        if len(screened) % 5000 == 0:
            print(f"  screened {len(screened)} of at most {total} ...", file=sys.stderr)
    return screened, time.perf_counter() - start


def confirm(top, model, options, targets):
    from harness import sizing
    start = time.perf_counter()
    for i, s in enumerate(top):
        print(f"  simulating {i + 1}/{len(top)}: {s.candidate.label}", file=sys.stderr)
        s.simulated = sizing.simulate_candidate(s, model, options, targets)
    return len(top), time.perf_counter() - start


def nothing_meets(screened, targets, budget) -> str:
    fitting = [s for s in screened if s.fits]
    within = f" within ${budget:,.0f}" if budget is not None else ""
    if not screened:
        return f"nothing meets {targets.describe()}: no cluster of the priced Macs costs{within or ' anything'}; raise --budget"
    if not fitting:
        return (f"nothing meets {targets.describe()}: none of the {len(screened)} clusters{within} holds the model; "
                f"raise --budget or --max-nodes, or use fewer bits")
    fastest = max(fitting, key=lambda s: (s.tok_s, -s.candidate.usd))
    return (f"nothing meets {targets.describe()}{within}: the fastest of {len(fitting)} fitting clusters, "
            f"{fastest.candidate.label} (${fastest.candidate.usd:,.0f}), reaches {fastest.tok_s:.1f} tok/s per "
            f"stream and TTFT {fastest.ttft_ms:.0f} ms (theoretical); raise --budget or --max-nodes, or relax the targets")


def print_choices(top, targets) -> None:
    rows = [("#", "cluster", "plan", "USD", "tok/s/stream theor.", "TTFT ms theor.", "tok/s/stream sim.", "TTFT ms sim.",
             "burst TTFT ms sim.")]
    for i, s in enumerate(top, 1):
        sim = s.simulated
        plan = ("TP" if s.tp else "pipeline") + (" (hybrid_optimal)" if s.strategy == "hybrid_optimal" else "")
        rows.append((str(i), s.candidate.label, plan, f"{s.candidate.usd:,.0f}", f"{s.tok_s:.1f}", f"{s.ttft_ms:.0f}",
                     f"{sim['tok_s']:.1f}" if sim else "-", f"{sim['ttft_ms']:.0f}" if sim else "-",
                     f"{sim['burst_ttft_ms']:.0f}" if sim else "-"))
    print(f"cheapest clusters meeting {targets.describe()}:")
    print(text_table(rows))
    print("theor. = cost-model screening (theoretical); sim. = simulated closed loop of the users' streams; TTFT "
          "sim. is the median after the first wave, burst TTFT the first wave's (every user starting at once)")


def why(best, screened, targets) -> str:
    """The best choice against the cheapest clusters it beats."""
    cheaper = [s for s in screened if s.candidate.usd < best.candidate.usd]
    cheaper_fit = [s for s in cheaper if s.fits]
    reason = f"{best.candidate.label} is the cheapest of the clusters meeting the targets (${best.candidate.usd:,.0f})"
    if cheaper_fit:
        top = max(cheaper_fit, key=lambda s: s.tok_s)
        reason += (f"; the {len(cheaper)} cheaper clusters either do not hold the model or miss a target, the best "
                   f"of them {top.candidate.label} at {top.tok_s:.1f} tok/s ({top.reason})")
    elif cheaper:
        reason += f"; none of the {len(cheaper)} cheaper clusters holds the model with its KV reserve"
    return reason


def one_more_table(best, extra, targets) -> str:
    rows = [("change", "USD", "tok/s/stream", "TTFT ms", "meets targets")]
    rows.append(("(best choice)", f"{best.candidate.usd:,.0f}", f"{best.tok_s:.1f}", f"{best.ttft_ms:.0f}", "yes"))
    for label, s in extra:
        if not s.fits:
            rows.append((label, f"{s.candidate.usd:,.0f}", "does not fit", "-", "no"))
            continue
        rows.append((label, f"{s.candidate.usd:,.0f}", f"{s.tok_s:.1f} ({s.tok_s - best.tok_s:+.1f})",
                     f"{s.ttft_ms:.0f} ({s.ttft_ms - best.ttft_ms:+.0f})", "yes" if s.meets else f"no: {s.reason}"))
    return text_table(rows)


def write_outputs(out: Path, model, targets, screened, ranked, front, extra, timing) -> None:
    from harness.sizing import write_pareto
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model.name, "quant_bits": model.quant, "targets": targets.__dict__,
              "screened": len(screened), "fitting": sum(s.fits for s in screened), "meeting": len(ranked),
              "timing_s": timing, "timing_source": "measured",
              "choices": [_row(s) for s in ranked[:20]], "pareto": [_row(s) for s in front],
              "one_more": [dict(change=label, **_row(s)) for label, s in extra]}
    (out / "size.json").write_text(json.dumps(record, indent=2, default=str))
    write_pareto(out, front, [s for s in screened if s.fits], targets)


def _row(s) -> dict:
    c = s.candidate
    return {"cluster": c.label, "usd": c.usd, "macs": [o.label for o in c.offers], "link": c.link,
            "fits": s.fits, "meets": s.meets, "reason": s.reason,
            "theoretical": {"tok_s_per_stream": s.tok_s, "ttft_ms": s.ttft_ms if s.fits else None},
            "simulated": s.simulated or None,
            "prices": [{"product": o.product, "usd": o.usd, "date": o.date, "source": o.source,
                        "confidence": o.confidence} for o in c.offers]}
