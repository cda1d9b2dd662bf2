"""Reports: re-render saved run folders into tables, figures, target verdicts and one self-contained HTML page,
and compare a run with a committed baseline. Never runs anything.

Public API:
    render(run_dirs, out=None) -> Path      write the HTML report (one run: RUN/report.html)
    render_runs(runs, out=None) -> Path     the same for Run objects already loaded
    load_run(path) -> Run                   read a run folder (complete or not)
    evaluate_targets(run) -> list[TargetResult]
    targets_summary(config, plan, metrics, requests=None, steps=None, source=None) -> list[dict]
                                            the targets section for summary.json, before the folder is finished
    reports.check: check(run_dir, baseline) -> CheckResult, format_result(result) -> str,
                   write_baseline(run_dir, path, names=None, tolerance=None, ratios=None) -> Path
"""
from __future__ import annotations

from pathlib import Path

from reports.run import Run, RunFolderError, load_run
from reports.targets import DEFAULT_TARGETS, evaluate as evaluate_targets, targets_summary


def render(run_dirs, out: str | Path | None = None, with_plots: bool = True) -> Path:
    """Render one report for the given run folders; returns the written path."""
    paths = [Path(p) for p in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    if not paths:
        raise RunFolderError("no run folder given")
    if len(paths) == 1 and (paths[0] / "validation.json").exists() and out is None:   # a `harness validate` folder
        from reports.validation import render_validation
        return render_validation(paths[0])
    return render_runs([load_run(p) for p in paths], out, with_plots)


def render_runs(runs: list[Run], out: str | Path | None = None, with_plots: bool = True) -> Path:
    """Like render(), for runs already loaded with load_run()."""
    from reports import html

    target = Path(out) if out else html.default_output([r.path for r in runs])
    return html.write(target, html.render_html(runs, with_plots))


__all__ = ["DEFAULT_TARGETS", "Run", "RunFolderError", "evaluate_targets", "load_run", "render", "render_runs",
           "targets_summary"]
