"""`python -m harness check --baseline runs/baselines/NAME.json RUN_DIR`: the performance-regression gate."""
from __future__ import annotations

HELP = "compare a run's metrics with a committed baseline; non-zero exit when one moved beyond tolerance"
DESCRIPTION = """\
Compare a saved run's summary metrics with a baseline JSON (format: reports/check.py).
Prints a table; exits 0 when every metric is within tolerance, 1 when one regressed, changed or is missing,
or the run is incomplete; 2 when the run's fingerprint (model, cluster, plan, workload) differs from the
baseline's (--allow-mismatch prints the differences and compares anyway). Directions come from the metric
catalogue (harness/metrics.py).

Write or update a baseline from a run instead of checking:
  python -m harness check --baseline runs/baselines/smoke.json --write-baseline RUN_DIR
  [--metric NAME ...] [--tolerance 0.001] [--ratio NAME=NUMERATOR/DENOMINATOR ...]
An existing baseline keeps its metrics, tolerances and directions; only the values are refreshed."""


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="saved run folder, e.g. runs/out/<run-id>")
    parser.add_argument("--baseline", required=True, metavar="FILE",
                        help="baseline JSON, e.g. runs/baselines/smoke.json")
    parser.add_argument("--write-baseline", action="store_true", help="write/update the baseline from RUN_DIR")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="compare even when the run's model, cluster, plan or workload differs from the "
                             "baseline's (the differences are printed)")
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help="with --write-baseline: metric to include (repeat; default: every numeric metric)")
    parser.add_argument("--tolerance", type=float, metavar="REL",
                        help="with --write-baseline: relative tolerance for new entries "
                             "(default 0.001 simulated, 0.2 measured, 0.5 ratios)")
    parser.add_argument("--ratio", action="append", metavar="NAME=NUM/DEN", default=[],
                        help="with --write-baseline: a same-run ratio of two figures, for wall-clock numbers")


def _ratios(specs: list[str]) -> dict[str, tuple[str, str]]:
    from harness.specs import UserError

    out = {}
    for spec in specs:
        name, _, pair = spec.partition("=")
        top, _, bottom = pair.partition("/")
        if not (name and top and bottom):
            raise UserError(f"--ratio {spec!r}: write NAME=NUMERATOR/DENOMINATOR")
        out[name] = (top, bottom)
    return out


def run(args) -> int:
    from reports import check as gate

    if args.write_baseline:
        path = gate.write_baseline(args.run_dir, args.baseline, args.metric, args.tolerance, _ratios(args.ratio))
        print(f"baseline written: {path}")
        print(gate.format_result(gate.check(args.run_dir, path)))
        return 0
    if args.metric or args.ratio or args.tolerance is not None:
        from harness.specs import UserError
        raise UserError("--metric, --tolerance and --ratio only apply with --write-baseline")
    result = gate.check(args.run_dir, args.baseline, allow_mismatch=args.allow_mismatch)
    print(gate.format_result(result))
    return 0 if result.ok else 1
