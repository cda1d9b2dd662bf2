"""`python -m harness calibrate`: fit the cost-model profile to public single-device tokens/s figures."""
from __future__ import annotations

import json
import sys

HELP = "fit the cost model (bandwidth, compute, overheads) to public Apple Silicon tok/s data; write a profile"
DESCRIPTION = """Fit the cost model's efficiency factors (decode bandwidth efficiency eta_bw, prefill compute
efficiency mu_compute, per-step and per-layer overheads, and per-chip overrides) to the public single-device table in
harness/catalog/calibration/, then print predicted vs published tokens/s for every usable row with the error.
Published figures are measured (by their sources); predictions are theoretical (the fitted cost model).

With --from it fits THIS host's profile instead, from the measured step records of real runs (the points of a
`harness validate` folder): decode bandwidth and prefill compute efficiency, the per-step, per-layer and
per-sequence overheads, the memory/compute overlap and the prefill ramp, globally and per host chip. Points matching
--hold-out stay out of the fit; their error is reported apart, and `validate --from DIR --profile FILE` gates on
them only.

examples:
  python -m harness calibrate                      # writes harness/profiles/fitted.json
  python -m harness calibrate --from runs/out/<id>-validate --hold-out level=0.7 --out host-fitted.json
  python -m harness calibrate --no-per-chip --out /tmp/global.json
  python -m harness calibrate --dry-run --json
  python -m harness calibrate --with-public --out harness/profiles/fitted-proposed.json

Every run also reports leave-one-source-out error: each publication (the first URL of a row's source) is held
out in turn, the profile is refitted on the others and the held-out rows are predicted; the median |error| is
broken down by engine, chip generation, dense/MoE, single/multi-node and plan (strategy x nodes over link),
printed and written under fit.leave_one_source_out of the profile JSON. The multi-node rows
(public_mac_multinode.csv) are never in the roofline fit: they are priced as the planner prices a pipeline or
tensor-parallel group of identical Macs, held out by source, and listed row by row (fit.multinode_rows). They fit
one term only: the per-step cost of an engine seen only on clusters (exo: engines.exo.step_overhead_s, paid once
per stage per engine step), from its one-stream zero-depth rows over RDMA (and TCP with the transport term); the
table shows each row held out before and after it, and fit.multinode_engines its rows, sources and the value each
held-out fit used."""


def add_arguments(p) -> None:
    p.add_argument("--data", nargs="+", default=None, metavar="CSV",
                   help="calibration CSV(s) in the bundled table's columns (default: the bundled public table)")
    p.add_argument("--with-public", action="store_true",
                   help="also fit the published M3/M4-era rows in harness/catalog/calibration/"
                        "public_mac_measurements.csv (propose the result with --out, e.g. "
                        "harness/profiles/fitted-proposed.json)")
    p.add_argument("--out", default=None, help="profile to write (default harness/profiles/fitted.json)")
    p.add_argument("--no-per-chip", action="store_true", help="fit one set of factors for every chip")
    p.add_argument("--terms", default=None, metavar="LIST",
                   help="optional terms fitted beside the roofline, comma-separated from moe, engine, generation, "
                        "attention, transport (default moe,engine,generation: what the committed fitted.json "
                        "carries; attention and transport move dense plans, so propose them with --out)")
    p.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")
    p.add_argument("--json", action="store_true", help="print the per-row table and fit as JSON")
    p.add_argument("--show-skipped", action="store_true", help="list rows that could not be used and why")
    p.add_argument("--from", dest="from_dirs", nargs="+", default=None, metavar="RUN_DIR",
                   help="fit this host's profile to real runs (validate folders or their points)")
    p.add_argument("--hold-out", nargs="*", default=None, metavar="KEY=VALUE",
                   help="with --from: leave points out of the fit, e.g. level=0.7 or topology=2-rank")


def run(args) -> int:
    import dataclasses

    from harness import calibrate as cal
    from harness.costmodel import PROFILE_DIR
    if args.from_dirs:
        return _from_runs(args)

    paths = list(args.data or [cal.DATA]) + ([cal.PUBLIC] if args.with_public else [])
    terms = cal.DEFAULT_TERMS if args.terms is None else tuple(t.strip() for t in args.terms.split(",") if t.strip())
    obs, skipped = cal.load_observations(paths)
    # the multi-node rows are never in the roofline fit: predicted with the planner's pipeline / tensor-parallel
    # pricing, held out by source like every other row (the transport term, when fitted, leaves their source out);
    # an engine seen only on clusters (exo) gets its per-step cost from them (the engine term)
    multi, multi_skipped = cal.load_observations([cal.MULTINODE])
    skipped = skipped + [f"{cal.MULTINODE.name} {s}" for s in multi_skipped]
    profile = cal.fit_profile(obs + multi, per_chip=not args.no_per_chip, terms=terms)
    if len(paths) > 1 or args.data:
        names = ", ".join(str(p) for p in paths)
        profile = dataclasses.replace(profile, source=f"fitted: python -m harness calibrate on {names}")
    table = cal.error_table(obs, profile)
    summary = cal.error_summary(table)
    # the global factors do not depend on the per-chip ones: the same profile without them
    summary_global = cal.error_summary(cal.error_table(obs, dataclasses.replace(profile, per_chip={}, per_generation={})))
    # in-sample error flatters the model: each source is also predicted by a fit that never saw it
    held_rows, held_notes = cal.leave_one_source_out(obs + multi, per_chip=not args.no_per_chip, terms=terms)
    loso = cal.loso_summary(held_rows, held_notes)
    gens = cal.generation_table(profile, obs) if "generation" in terms else None
    data = cal.profile_json(profile, summary, summary_global, len(skipped), loso, gens)
    data["fit"]["transport"] = cal.fit_transport()   # the published link-only pairs (multi-node rows)
    held_multi = {(r["line"], r["kind"]): r["predicted_tok_s"] for r in held_rows if r["nodes"] > 1}
    # before/after the multi-node engine step cost: the same held-out fits without it (only the multi-node sources)
    without, _ = cal.leave_one_source_out(obs + multi, per_chip=not args.no_per_chip, terms=terms,
                                          multinode_engines=False, sources={o.source for o in multi})
    held_without = {(r["line"], r["kind"]): r["predicted_tok_s"] for r in without if r["nodes"] > 1}
    data["fit"]["multinode_rows"] = [{**r, "held_out_predicted_tok_s": held_multi.get((r["line"], r["kind"])),
                                      "held_out_without_engine_step_tok_s": held_without.get((r["line"], r["kind"]))}
                                     for r in cal.error_table(multi, profile)]
    data["fit"]["multinode_engines"] = cal.multinode_engine_fits(obs, multi, terms, not args.no_per_chip)
    data["fit"]["multinode_engines"]["leave_one_source_out"] = {
        "before": cal._medians([r for r in without if r["nodes"] > 1]),
        "after": cal._medians([r for r in held_rows if r["nodes"] > 1])}
    if not (args.with_public or args.data):   # the public rows the default fit never sees: a true held-out check
        public, _ = cal.load_observations([cal.PUBLIC])
        # the multi-node rows now fit the exo step cost: theirs are the held-out predictions, not this fit's
        held = [r for r in cal.error_table(public, profile) if r["batch"] == 1] + \
            [r for r in held_rows if r["nodes"] > 1]
        data["fit"]["public_rows_never_fitted"] = cal.loso_summary(held, [])
    if args.json:
        json.dump({"profile": data, "rows": table, "held_out_rows": held_rows, "skipped": skipped},
                  sys.stdout, indent=2)
        print()
    else:
        print(render(table, data, skipped if args.show_skipped else None))
    if not args.dry_run:
        path = cal.write_profile(data, args.out or PROFILE_DIR / "fitted.json")
        print(f"wrote {path}", file=sys.stderr)
    return 0


def render(table: list[dict], data: dict, skipped: list[str] | None) -> str:
    head = (f"{'line':>4} {'kind':<4} {'model':<30} {'quant':<7} {'chip':<13} {'B':>3} {'ctx':>7} "
            f"{'published':>10} {'predicted':>10} {'error':>7}")
    lines = ["published tok/s: measured by the cited sources; predicted: theoretical (fitted cost model)", head]
    for r in table:
        mark = "" if r["fitted"] else "  (check, not fitted)"
        lines.append(f"{r['line']:>4} {r['kind']:<4} {r['model'][:30]:<30} {r['quant'][:7]:<7} {r['chip'][:13]:<13} "
                     f"{r['batch']:>3} {r['context']:>7.0f} {r['published_tok_s']:>10.2f} "
                     f"{r['predicted_tok_s']:>10.2f} {r['error_pct']:>6.1f}%{mark}")
    lines.append("")
    lines.append(f"fitted: eta_bw={data['eta_bw']} mu_compute={data['mu_compute']} "
                 f"step_overhead_s={data['step_overhead_s']} layer_overhead_s={data['layer_overhead_s']}")
    from harness.calibrate import NAMED_TERMS
    named = [k for k in NAMED_TERMS if k in data]
    if named:
        lines.append("named terms: " + " ".join(f"{k}={data[k]}" for k in named))
    for gen, entry in data.get("per_generation", {}).items():
        lines.append(f"  generation {gen:<4} " + " ".join(f"{k}={v}" for k, v in entry.items() if k != "basis")
                     + f"  ({entry['basis']})")
    for name, entry in data.get("engines", {}).items():
        lines.append(f"  engine {name:<10} " + " ".join(f"{k}={v}" for k, v in entry.items() if k != "basis"))
    for chip, entry in data["per_chip"].items():
        lines.append(f"  {chip:<10} " + " ".join(f"{k}={v}" for k, v in entry.items()))
    for label, key in (("with per-chip factors", "errors_with_per_chip"), ("global factors only", "errors_global_only")):
        lines.append(f"error {label}:")
        for name, s in data["fit"][key].items():
            lines.append(f"  {name:<20} rows {s['rows']:>3}  mean |err| {s['mean_abs_error_pct']:>5.1f}%  "
                         f"median {s['median_abs_error_pct']:>5.1f}%  max {s['max_abs_error_pct']:>5.1f}%")
    lines.extend(render_loso(data["fit"]["leave_one_source_out"]))
    if "public_rows_never_fitted" in data["fit"]:
        lines.extend(render_loso(data["fit"]["public_rows_never_fitted"],
                                 f"{PUBLIC_NAME} rows, never fitted (newer chips, mlx-lm, MoE; predicted by this "
                                 "fit: theoretical, published: measured):"))
    lines.extend(render_multinode(data["fit"]["multinode_rows"], data["fit"].get("multinode_engines")))
    lines.extend(render_transport(data["fit"]["transport"], data.get("tcp_hop_latencies")))
    lines.append(f"rows skipped: {data['fit']['rows_skipped']}")
    if skipped:
        lines.extend(f"  {s}" for s in skipped)
    return "\n".join(lines)


PUBLIC_NAME = "public_mac_measurements.csv"
LOSO_TITLE = ("leave-one-source-out (each source held out, refit on the rest; predicted: theoretical, "
              "published: measured):")


def render_loso(loso: dict, title: str = LOSO_TITLE) -> list[str]:
    """The leave-one-source-out table: median |error| of predictions for sources the fit did not see."""
    from harness.calibrate import BREAKDOWN

    def line(dim: str, value: str, m: dict) -> str:
        cells = []
        for label in ("decode", "prefill"):
            med = m[f"{label}_median_abs_error_pct"]
            cells.append(f"{m[f'{label}_rows']:>4} {('-' if med is None else f'{med:.1f}%'):>7}")
        value = value.replace("https://", "").replace("github.com/", "")
        return f"  {dim:<16} {value[:56]:<56} " + "  ".join(cells)

    lines = ["", title,
             f"  {'dimension':<16} {'value':<56} {'n':>4} {'decode':>7}  {'n':>4} {'prefill':>7}",
             line("all", "all held-out rows", loso["overall"])]
    for title, key in BREAKDOWN + (("source", "source"),):
        lines.extend(line(title, value, m) for value, m in loso[key].items())
    lines.extend(f"  {n}" for n in loso["not_held_out"])
    return lines


def render_multinode(rows: list[dict], engines: dict | None = None) -> list[str]:
    """Each multi-node row: published, predicted by this fit, and predicted by the fit without its source, with
    and without the engine step cost fitted on multi-node rows (before/after); then that term's provenance and the
    held-out median |error| before and after it."""
    lines = ["", f"{MULTINODE_NAME} rows, never in the roofline fit (published: measured; predicted: theoretical, "
             "by this fit and by the fit without the row's source, before and after the engine step cost "
             "fitted on multi-node rows):",
             f"{'line':>4} {'kind':<4} {'model':<14} {'plan':<26} {'B':>3} {'ctx':>7} {'published':>10} "
             f"{'predicted':>10} {'error':>7} {'held out':>9} {'before':>7} {'held out':>9} {'after':>7}"]

    def held(value, published) -> str:
        if value is None:
            return f"{'(B>1)':>9} {'':>7}"
        return f"{value:>9.2f} {100 * (value - published) / published:>6.1f}%"

    for r in rows:
        pub = r["published_tok_s"]
        lines.append(f"{r['line']:>4} {r['kind']:<4} {r['model'][:14]:<14} {r['plan'][:26]:<26} {r['batch']:>3} "
                     f"{r['context']:>7.0f} {pub:>10.2f} {r['predicted_tok_s']:>10.2f} {r['error_pct']:>6.1f}% "
                     f"{held(r.get('held_out_without_engine_step_tok_s'), pub)} "
                     f"{held(r['held_out_predicted_tok_s'], pub)}")
    if not engines:
        return lines
    for name, fit in engines.get("engines", {}).items():
        used = ", ".join(f"{s.replace('https://github.com/', '')} {1e3 * v:.2f} ms" if v is not None else
                         f"{s.replace('https://github.com/', '')} none"
                         for s, v in fit["held_out_step_overhead_s"].items())
        lines.append(f"  engine {name} step_overhead_s={fit['step_overhead_s']} per stage per step, from lines "
                     f"{', '.join(str(r['line']) for r in fit['rows'])} (residual ms per stage: "
                     f"{', '.join(str(r['residual_ms_per_stage']) for r in fit['rows'])}); "
                     f"held out, fitted on the other source: {used}")
    loso = engines.get("leave_one_source_out")
    if loso:
        def med(m, label):
            v = m[f"{label}_median_abs_error_pct"]
            return "-" if v is None else f"{v:.1f} %"
        b, a = loso["before"], loso["after"]
        lines.append(f"  multi-node leave-one-source-out median |error|, before -> after the engine step cost: "
                     f"decode {med(b, 'decode')} -> {med(a, 'decode')} ({a['decode_rows']} rows), "
                     f"prefill {med(b, 'prefill')} -> {med(a, 'prefill')} ({a['prefill_rows']} rows)")
    return lines


def render_transport(fit: dict, in_profile) -> list[str]:
    """The per-hop transport term from published pairs that differ only in the link."""
    lines = ["", f"{MULTINODE_NAME} pipeline pairs differing only in the link (published: measured; the term: "
             "theoretical):"]
    for p in fit["pairs"]:
        lines.append(f"  {p['source'].replace('https://github.com/', '')}: {p['model']}, {p['nodes']} nodes, "
                     f"{p['slow_link']} {p['slow_tok_s']} vs {p['fast_link']} {p['fast_tok_s']} tok/s -> a TCP hop "
                     f"costs {p['tcp_hop_latencies']} one-way latencies")
    if fit["tcp_hop_latencies"] is None:
        return lines + ["  none usable: tcp_hop_latencies stays 1"]
    where = "in this profile" if in_profile else "not in this profile (calibrate --terms ...,transport)"
    lines.append(f"  tcp_hop_latencies={fit['tcp_hop_latencies']} ({where}); implied Thunderbolt-bridge TCP hop "
                 f"{fit['implied_tb_tcp_hop_us']:.0f} us")
    return lines


MULTINODE_NAME = "public_mac_multinode.csv"


def _from_runs(args) -> int:
    from pathlib import Path

    from harness import calibrate as cal
    from harness.costmodel import load_profile
    from harness.validation import components, fit
    points = fit.expand_point_dirs(args.from_dirs)
    base = load_profile(_host_profile(points[0]))
    profile, report = fit.fit_per_chip(args.from_dirs, base, fit.parse_hold_out(args.hold_out))
    print("measured: real step compute times; predicted: the fitted cost model (theoretical)")
    print(components.format_components(report["in_sample"], "in-sample (points used by the fit):"))
    if report["held_out"]:
        print(components.format_components(report["held_out"], "held out (not used by the fit):"))
    terms = " ".join(f"{k}={getattr(profile, k)}" for k in fit.FITTED_KEYS)
    print(f"fitted: {terms}\nper chip: {json.dumps(profile.per_chip)}\nrms relative step error "
          f"{report['rms_relative_error_pct']:.1f} % over {report['rows']} steps")
    if not args.dry_run:
        out = Path(args.out) if args.out else Path(args.from_dirs[0]) / "fitted-profile.json"
        print(f"wrote {cal.write_profile(fit.profile_json(profile, report), out)}", file=sys.stderr)
    return 0


def _host_profile(point_dir):
    """The measured profile the fit starts from: the first node's host profile of a real point."""
    from harness.validation import fit
    from harness.validation.run import node_profile
    v, _ = fit.load_point(point_dir)
    return node_profile(v, point_dir)
