"""`python -m harness report RUN_DIR [RUN_DIR ...]`: re-render saved run folders into one HTML report."""
from __future__ import annotations

HELP = "re-render the HTML report of saved run folders (nothing is re-run)"
DESCRIPTION = """\
Re-render the HTML report from saved run folders: tables, figures, targets pass/fail.
One run folder (or a `harness validate` or `harness sweep` folder): writes RUN_DIR/report.html. Several: writes one comparison page (strategy comparison,
throughput and latency against load when the runs form a sweep) next to the first run, or to --out.
The page is self-contained (images inline, no network)."""


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="saved run folder(s), e.g. runs/out/<run-id>")
    parser.add_argument("--out", metavar="FILE", help="where to write the HTML (default: see above)")


def run(args) -> int:
    from pathlib import Path

    import reports
    if len(args.run_dirs) == 1 and (Path(args.run_dirs[0]) / "sweep.json").exists() and not args.out:
        from reports.sweep import render_sweep
        print(f"report: {render_sweep(args.run_dirs[0])}")       # a `harness sweep` folder
        return 0
    if len(args.run_dirs) == 1 and (Path(args.run_dirs[0]) / "validation.json").exists() and not args.out:
        print(f"report: {reports.render(args.run_dirs[0])}")     # a `harness validate` folder
        return 0
    runs = [reports.load_run(p) for p in args.run_dirs]
    path = reports.render_runs(runs, args.out)
    for r in runs:
        if r.incomplete:
            print(f"warning: {r.path} is incomplete ({r.incomplete_reason}); the report says so")
    print(f"report: {path}")
    return 0
