"""Assemble the report page: tables, figures and targets of one run or a comparison of several."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from html import escape
from pathlib import Path


import jinja2

from reports import plots, tables, targets
from reports.breakdown import TpotView, tpot_view
from reports.run import SUMMARY_ONLY, Run, per_request_latencies
from reports.template import PAGE

# Columns of the comparison page; headings come from the metric catalogue (harness.metrics).
COMPARE_KEYS = ("completed", "failed", "output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
                "median_tpot_ms", "p99_tpot_ms", "p99_e2el_ms")


@dataclass
class TargetRow:
    name: str
    metric: str
    threshold: str
    value: str
    source: str
    theoretical: str
    status: str
    notes: str

    @property
    def status_class(self) -> str:
        return self.status.split(" (")[0].replace(" ", "").replace("/", "")   # pass | fail | nodata | na


@dataclass
class TargetsView:
    rows: list[TargetRow]
    verdict: str


@dataclass
class RunView:
    name: str
    path: str
    source: str
    strategy: str
    incomplete: bool
    incomplete_reason: str | None
    model: str
    backend: str
    created: str
    commit: str
    missing: tuple[str, ...]
    targets: TargetsView
    latency: tables.Table | None
    headline: tables.Table
    plan_table: tables.Table | None
    predicted: tables.Table | None
    backend_stats: tables.Table | None
    warnings: list[str]
    plan_notes: list[str]
    environment: tables.Table
    plots: list[plots.Plot] = field(default_factory=list)
    plot_notes: list[str] = field(default_factory=list)
    tpot: TpotView | None = None     # "Why TPOT differs from the plan" (issue 9)


def _figure_text(fig: targets.Figure | None, unit: str) -> str:
    return "–" if fig is None else f"{tables.fmt(fig.value)} {unit}".strip()


def targets_view(run: Run) -> TargetsView:
    results = targets.evaluate(run)
    rows = []
    for r in results:
        fig = r.deciding
        theory = f"theoretical: {r.theoretical.how}" if r.theoretical and r.theoretical is not fig else ""
        notes = "; ".join(x for x in (r.conditions, r.note, fig.how if fig else "", theory) if x)
        status = r.verdict if r.observed or fig is None else f"{r.status} (theoretical)"
        rows.append(TargetRow(r.target.name, targets.metric_label(r.target.metric), r.target.text,
                              _figure_text(fig, r.target.unit), fig.source if fig else "",
                              _figure_text(r.theoretical, r.target.unit), status, notes))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "no data", "n/a")}
    # a target that does not apply is neither a pass nor a fail, so it is counted apart
    verdict = (f"{counts['pass']} of {len(results)} targets pass, {counts['fail']} fail"
               + (f", {counts['no data']} without data" if counts["no data"] else "")
               + (f", {counts['n/a']} not applicable" if counts["n/a"] else "") + ".")
    return TargetsView(rows, verdict)


def _model_name(run: Run) -> str:
    model = targets.model_name(run)
    bits = run.plan.get("quant_bits") or run.config.get("quant_bits")
    quant = f"{bits}-bit" if bits else run.plan.get("quant") or run.config.get("quantization") or ""
    return f"{model} ({quant})" if model and quant else str(model)


def _environment_table(run: Run) -> tables.Table:
    rows = []
    for key, value in run.environment.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
        rows.append([key, tables.fmt(value)])
    return tables.Table(["key", "value"], rows, text_columns=2)


def _run_plots(run: Run) -> tuple[list[plots.Plot], list[str]]:
    made, notes = [], []
    drawers = (
        ("latency distributions", lambda: plots.latency_distributions(run, per_request_latencies(run)),
         "no successful requests"),
        ("per-node timelines", lambda: plots.node_timelines(run),
         SUMMARY_ONLY if run.step_records == "summary" else "steps.parquet has no steps"),
        ("partition ring", lambda: plots.partition_ring(run), "plan.json has no stages"),
    )
    for label, draw, why in drawers:
        plot = draw()
        if plot is None:
            notes.append(f"No {label} figure: {why}.")
        else:
            made.append(plot)
    outage = plots.outage_timeline(run)     # only for a run with failures or faults: no note when absent
    return ([outage] if outage else []) + made, notes


def run_view(run: Run, with_plots: bool = True) -> RunView:
    headline = tables.headline_table(run.metrics)
    if run.metrics_recomputed:
        headline.rows.insert(0, ["note", "summary.json had no metrics; recomputed from requests.parquet", ""])
    made, notes = _run_plots(run) if with_plots else ([], [])
    return RunView(
        name=run.name, path=str(run.path), source=run.source, strategy=run.strategy,
        incomplete=run.incomplete, incomplete_reason=run.incomplete_reason, model=_model_name(run),
        backend=str(run.config.get("backend", "")), created=str(run.environment.get("created_utc", "")),
        commit=str(run.environment.get("git_commit") or "")[:12], missing=run.missing,
        targets=targets_view(run), latency=tables.latency_table(run.metrics), headline=headline,
        plan_table=tables.plan_table(run), predicted=tables.predicted_table(run.plan),
        backend_stats=tables.backend_table(run.summary), warnings=[str(w) for w in run.plan.get("warnings") or []],
        plan_notes=[str(n) for n in run.plan.get("notes") or []],
        environment=_environment_table(run), plots=made, plot_notes=notes, tpot=tpot_view(run),
    )


def targets_matrix(runs: list[Run]) -> tables.Table | None:
    """One row per run, one column per target (name and threshold): status and the deciding figure."""
    columns: dict[tuple[str, str], None] = {}
    cells: list[dict[tuple[str, str], str]] = []
    for run in runs:
        row = {}
        for r in targets.evaluate(run):
            key = (r.target.name, r.target.text)
            columns.setdefault(key)
            fig = r.deciding
            row[key] = r.verdict if fig is None else f"{r.status}: {_figure_text(fig, r.target.unit)} ({fig.source})"
        cells.append(row)
    if not columns:
        return None
    rows = [[run.name] + [row.get(key, "–") for key in columns] for run, row in zip(runs, cells)]
    return tables.Table(["run", *(f"{name} {text}" for name, text in columns)], rows, text_columns=len(columns) + 1)


def offered_load(run: Run) -> tuple[float | None, str]:
    """The load a run was offered: request rate, or concurrency when closed-loop.

    A load-generator mode (config "mode": {"kind", "value"}, as `harness bench` writes) overrides the
    workload's own arrivals; otherwise the workload spec says it.
    """
    mode = run.config.get("mode") or {}
    if isinstance(mode, dict) and mode.get("value"):
        if mode.get("kind") == "concurrent":
            return float(mode["value"]), "concurrency (requests in flight)"
        if mode.get("kind") in ("constant", "poisson"):
            return float(mode["value"]), "offered request rate (req/s)"
    workload = run.config.get("workload") or {}
    if not isinstance(workload, dict):
        return None, ""
    closed = workload.get("closed_loop") or {}
    if isinstance(closed, dict) and closed.get("concurrency"):
        return float(closed["concurrency"]), "concurrency (requests in flight)"
    arrival = workload.get("arrival") or {}
    if isinstance(arrival, dict) and arrival.get("rate"):
        return float(arrival["rate"]), "offered request rate (req/s)"
    return None, ""


def _predicted_tpot(run: Run) -> float | None:
    """The plan's single-request TPOT (theoretical), as it predicted it: no conversion from a decode speed."""
    fig = targets.theoretical(run, "median_tpot_ms")
    return None if fig is None else fig.value


def run_labels(runs: list[Run]) -> list[str]:
    """Short names for bars: the strategy, with the offered load (or run number) where a strategy repeats."""
    strategies = [r.strategy for r in runs]
    labels = []
    for i, run in enumerate(runs, start=1):
        if strategies.count(run.strategy) == 1:
            labels.append(run.strategy)
            continue
        value, unit = offered_load(run)
        labels.append(f"{run.strategy} @ {tables.fmt(value)} {unit.split(' (')[-1].rstrip(')')}" if value
                      else f"{run.strategy} (run {i})")
    # two runs of one strategy at one load still need telling apart: fall back to the run number
    return [f"{label} (run {i})" if labels.count(label) > 1 else label for i, label in enumerate(labels, start=1)]


def comparison_plots(runs: list[Run]) -> list[plots.Plot]:
    made = []
    # One request's predicted speed bounds per-request speed, not batched throughput: it is drawn next to TPOT.
    predicted = {"median_tpot_ms": [_predicted_tpot(r) for r in runs]}
    for plot in (plots.strategy_comparison(runs, predicted, run_labels(runs)), _sweep(runs)):
        if plot is not None:
            made.append(plot)
    return made


def _sweep(runs: list[Run]) -> plots.Plot | None:
    loads = [offered_load(r) for r in runs]
    labels = {label for value, label in loads if value is not None}
    if len(labels) != 1:
        return None     # runs offered load in different units (or none): not a sweep
    per_strategy: dict[str, set[float]] = {}
    for run, (value, _) in zip(runs, loads):
        per_strategy.setdefault(run.strategy, set()).add(value)
    if max(len(v) for v in per_strategy.values()) < 2:
        return None     # no strategy was run at two loads: a comparison, not a sweep
    return plots.load_sweep(runs, [v for v, _ in loads], labels.pop())


def render_html(runs: list[Run], with_plots: bool = True) -> str:
    views = [run_view(r, with_plots) for r in runs]
    comparison = None
    if len(runs) > 1:
        comparison = {"table": tables.comparison_table(runs, COMPARE_KEYS), "targets": targets_matrix(runs),
                      "plots": comparison_plots(runs) if with_plots else []}
    title = f"Run report: {runs[0].name}" if len(runs) == 1 else f"Comparison report: {len(runs)} runs"
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = env.from_string(PAGE).render(title=title, runs=views, comparison=comparison, rendered=stamp)
    return with_overload_banners(page, runs)


def with_overload_banners(page: str, runs: list[Run]) -> str:
    """The page with a banner under its title for every run whose summary.json says it was saturated (runs
    written before the verdict existed, with no "saturation" section, get none), and for every run with failed
    requests."""
    banners = []
    for i, run in enumerate(runs, start=1):
        verdict = run.summary.get("saturation") or {}
        if verdict.get("saturated"):
            rate = verdict.get("sustainable_rate_rps")
            sustained = "" if rate is None else f" The run sustained {tables.fmt(rate)} req/s."
            banners.append(f'<div class="banner" id="overloaded-{i}"><strong>OVERLOADED: {escape(run.name)}</strong>'
                           f"<br>{escape('; '.join(verdict.get('reasons') or []))}.{sustained} Its latencies measure "
                           f"the queue, not the cluster.</div>\n")
        banners += _failure_banner(i, run)
    # under the title, above everything else: an overloaded run's figures must not be read without it
    return page.replace("</h1>\n", "</h1>\n" + "".join(banners), 1)


def _failure_banner(i: int, run: Run) -> list[str]:
    """A banner counting the run's failed requests by reason (a fault, a rank that died, the time bound), so
    latency figures computed from the survivors are never read as the whole run."""
    req = run.requests
    if req.empty or "success" not in req:
        return []
    failed = req[~req["success"].astype(bool)]
    if failed.empty:
        return []
    reasons = failed["error"].fillna("").replace("", "unknown").value_counts()
    shown = "; ".join(f"{n} × {reason[:160]}" for reason, n in reasons.head(5).items())
    more = f"; and {len(reasons) - 5} more reasons" if len(reasons) > 5 else ""
    return [f'<div class="banner" id="failed-{i}"><strong>FAILED REQUESTS: {escape(run.name)}: {len(failed)} of '
            f"{len(req)}</strong><br>{escape(shown + more)}. Latency figures cover the {len(req) - len(failed)} "
            f"that finished.</div>\n"]


def default_output(run_dirs: list[Path]) -> Path:
    """report.html inside the run folder for one run; next to the runs for several."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "report.html"
    return run_dirs[0].parent / f"comparison-{'-vs-'.join(p.name for p in run_dirs[:3])[:120]}.html"


def write(path: Path, text: str) -> Path:
    """Write through a temporary name so a half-written report never looks complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


