"""The report of a `harness sweep` folder, rendered from its saved sweep.json alone (nothing is re-run).

Plots: each headline metric against the sweep's load axis (`rate` when the grid has it, else its first numeric
key), one line per combination of the grid's other keys; then the table of every point.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import jinja2
from matplotlib.figure import Figure

from harness import metrics as catalogue
from reports.html import write
from reports.plots import Plot, _png

PLOTTED = ("output_throughput", "request_goodput", "p90_ttft_ms", "p90_tpot_ms")

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}td.t{text-align:left}
img{max-width:100%}.wide{overflow-x:auto}.src{color:#666;font-size:12px}</style></head><body>
<h1>{{ title }}</h1>
<p>{{ points|length }} points, {{ complete }} complete. All metrics are <b>simulated</b> (SimPy cluster).
Rendered {{ rendered }} from sweep.json.</p>
{% for plot in plots %}<h3>{{ plot.title }} <span class="src">({{ plot.source }})</span></h3>
<img src="data:image/png;base64,{{ plot.png_base64 }}" alt="{{ plot.title }}"><p class="src">{{ plot.caption }}</p>
{% endfor %}
<h2>Points</h2><div class="wide"><table><tr>{% for h in headings %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for cell, text in row %}<td{% if text %} class="t"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table></div></body></html>"""


def render_sweep(folder: str | Path) -> Path:
    folder = Path(folder)
    saved = json.loads((folder / "sweep.json").read_text())
    grid, points = saved["sweep"]["grid"], saved["points"]
    axis = load_axis(grid)
    plots = [p for key in PLOTTED if (p := metric_plot(points, grid, axis, key)) is not None]
    keys = ["point", *grid, "status", *_metric_keys(points, grid)]
    page = jinja2.Environment(autoescape=True).from_string(PAGE).render(
        title=f"Sweep report: {saved['sweep']['name']}", points=points, plots=plots,
        complete=sum(p["status"] == "complete" for p in points),
        rendered=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        headings=[_heading(k) for k in keys], rows=[[_cell(p.get(k)) for k in keys] for p in points])
    return write(folder / "report.html", page)


def load_axis(grid: dict) -> str | None:
    """The x axis: rate when swept, else the first grid key whose values are all numbers; None for none."""
    numeric = [k for k, vs in grid.items() if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vs)]
    return "rate" if "rate" in numeric else (numeric[0] if numeric else None)


def metric_plot(points: list[dict], grid: dict, axis: str | None, key: str) -> Plot | None:
    done = [p for p in points if p["status"] == "complete" and p.get(key) is not None]
    if not done:
        return None
    others = [k for k in grid if k != axis]
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for label, series in _series(done, others).items():
        xs = [p[axis] for p in series] if axis else list(range(len(series)))
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [series[i][key] for i in order], marker="o", label=label or key)
    ax.set_xlabel(axis or "point")
    ax.set_ylabel(_heading(key))
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize=7)
    return Plot(title=f"{_heading(key)} against {axis or 'point'}", source="simulated", png_base64=_png(fig),
                caption=f"one line per {', '.join(others)}" if others else "")


def _series(points: list[dict], others: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(" ".join(f"{k}={p.get(k)}" for k in others), []).append(p)
    return out


def _metric_keys(points: list[dict], grid: dict) -> list[str]:
    """The metric columns the sweep saved (every key of a row that is not the point, a grid value or status)."""
    names = [k for k in (points[0] if points else {}) if k not in ("point", "status", *grid)]
    return [k for k in names if any(p.get(k) is not None for p in points)]


def _heading(key: str) -> str:
    metric = catalogue.metric(key)
    return metric.heading if metric else key


def _cell(value) -> tuple[str, bool]:
    if isinstance(value, float):
        return f"{value:.4g}", False
    return ("-" if value is None else str(value)), not isinstance(value, int)
