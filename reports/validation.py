"""The validation report: a `harness validate` folder (validation.json + points/*/) as one self-contained page.

Re-renders from the saved files only. Measured = real mlx-lm ranks on this host, timed at the HTTP client;
simulated = the simulator replaying the same requests. error = (simulated - measured) / measured.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness import metrics
from reports.plots import _png
from reports.run import RunFolderError
from reports.template import PAGE

TABLE_KEYS = ("median_ttft_ms", "mean_tpot_ms", "mean_e2el_ms", "p99_e2el_ms", "output_throughput")
PLOT_KEYS = ("mean_tpot_ms", "mean_e2el_ms", "median_ttft_ms")
OUTSIDE = ' style="background:#fdecec" title="outside the gate limit"'   # an error cell beyond its limit


def load_validation(top: Path) -> dict:
    path = Path(top) / "validation.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{top}: no validation.json; run `python -m harness validate`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
        raise RunFolderError(f"{path}: expected an object with a \"points\" list (schema harness.validation/1)")
    for i, point in enumerate(doc["points"]):
        _check_point(path, i, point)
    return doc


def _check_point(path: Path, i: int, point) -> None:
    """The fields the page is laid out by; a point without them cannot be placed, so say which is wrong."""
    if not isinstance(point, dict) or not all(k in point for k in ("point", "topology", "level")):
        raise RunFolderError(f"{path}: points[{i}] needs \"point\", \"topology\" and \"level\"")
    if point["level"] != "saturation" and _level(point) is None:
        raise RunFolderError(f"{path}: points[{i}] level {point['level']!r} is neither \"saturation\" nor a number")


def _level(p: dict) -> float | None:
    try:
        return float(p["level"])
    except (TypeError, ValueError):
        return None


def render_validation(top: str | Path) -> Path:
    top = Path(top)
    doc = load_validation(top)
    body = "\n".join([_headline(doc), _table(doc), _error_plot(doc), _cdfs(top, doc), _components(doc)])
    out = top / "report.html"
    tmp = out.with_name(".report.html.tmp")
    tmp.write_text(_page(f"Simulator validation {html.escape(top.name)}", body), encoding="utf-8")
    tmp.replace(out)
    return out


def _page(title: str, body: str) -> str:
    style = PAGE[PAGE.index("<style>"):PAGE.index("</style>") + len("</style>")]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>{style}</head>"
            f"<body><main><h1>{title}</h1>\n{body}\n</main></body></html>\n")


def _headline(doc: dict) -> str:
    g = doc.get("gate") or {}
    verdict = ("<span class=\"status pass\">gate passed</span>" if g.get("passed")
               else "<span class=\"status fail\">gate FAILED</span>")
    fails = "".join(f"<li>{html.escape(str(f))}</li>" for f in g.get("failures") or [])
    profiles = sorted({str(p.get("profile")) for p in doc["points"]})
    limits = ", ".join(f"{k} ±{v:g} %" for k, v in (g.get("limits") or {}).items())
    return (f"<p class=\"meta\">{verdict} created {html.escape(str(doc.get('created', 'n/a')))}; simulator profile: "
            f"{html.escape(', '.join(profiles))}; gate limits below saturation: {html.escape(limits or 'none')}</p>"
            f"{'<ul>' + fails + '</ul>' if fails else ''}"
            "<p class=\"meta\">measured = real mlx-lm ranks on this host, timed at the HTTP client; simulated = the "
            "simulator replaying the same requests; error = (simulated - measured) / measured.</p>")


def _num(x, fmt="{:.1f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _table(doc: dict) -> str:
    limits = (doc.get("gate") or {}).get("limits") or {}
    head = "".join(f"<th colspan=3>{html.escape(metrics.BY_KEY[k].label if k in metrics.BY_KEY else k)}</th>"
                   for k in TABLE_KEYS)
    sub = "<th>measured</th><th>simulated</th><th>error</th>" * len(TABLE_KEYS)
    rows = []
    for p in doc["points"]:
        cells = []
        for k in TABLE_KEYS:
            e = (p.get("errors") or {}).get(k) or {}
            err = e.get("error_pct")
            bad = k in limits and err is not None and abs(err) > limits[k] and _below_saturation(p)
            mark = OUTSIDE if bad else ""
            cells.append(f"<td>{_num(e.get('measured'))}</td><td>{_num(e.get('simulated'))}</td>"
                         f"<td{mark}>{_num(err, '{:+.1f} %')}</td>")
        mape = ((p.get("per_request") or {}).get("e2el") or {}).get("mape_pct")
        name = str(p.get("point")) + (" (in fit)" if p.get("in_fit") else "")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_num(p.get('rate_rps'), '{:.3f}')}</td>"
                    f"{''.join(cells)}<td>{_num(mape, '{:.1f} %')}</td></tr>")
    return ("<h2>Measured vs simulated, per load point</h2><div class=\"scroll\"><table><tr><th rowspan=2>point</th>"
            f"<th rowspan=2>rate (req/s)</th>{head}<th rowspan=2>per-request E2E MAPE</th></tr><tr>{sub}</tr>"
            + "".join(rows) + "</table></div>")


def _below_saturation(p: dict) -> bool:
    return p["level"] != "saturation" and _level(p) < 1


def _x(p: dict) -> float:
    return 1.0 if p["level"] == "saturation" else _level(p)


def _error_plot(doc: dict) -> str:
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    styles = ("-o", "--s", ":^", "-.d")
    for i, topo in enumerate(sorted({p["topology"] for p in doc["points"]})):
        pts = sorted((p for p in doc["points"] if p["topology"] == topo), key=_x)
        for j, key in enumerate(PLOT_KEYS):
            y = [((p.get("errors") or {}).get(key) or {}).get("error_pct") for p in pts]
            y = [np.nan if v is None else v for v in y]
            ax.plot([_x(p) for p in pts], y, styles[i % len(styles)], color=f"C{j}", label=f"{topo}: {key}")
    ax.axhline(0, color="#888", lw=0.8)
    ax.axvline(1.0, color="#bbb", lw=0.8, ls=":")
    ax.annotate("saturation", (1.0, 1.0), xycoords=("data", "axes fraction"), ha="right", va="top", fontsize=8)
    ax.set_xlabel("load (fraction of the measured saturation rate; 1.0 = the closed-loop saturation point)")
    ax.set_ylabel("signed error (%)")
    ax.legend(fontsize=7, ncol=2)
    return (f"<h2>Error against load</h2><p class=\"meta\">simulated vs measured</p>"
            f"<img alt=\"error against load\" src=\"data:image/png;base64,{_png(fig)}\">")


def _cdfs(top: Path, doc: dict) -> str:
    parts = ["<h2>Latency distributions, measured vs simulated</h2>"
             "<p class=\"meta\">solid = measured, dashed = simulated; up to three load levels per topology</p>"]
    for topo in sorted({p["topology"] for p in doc["points"]}):
        parts.append(_topology_cdfs(top, topo, _cdf_points(doc, topo)))
    return "\n".join(parts)


def _cdf_points(doc: dict, topo: str) -> list[dict]:
    """The lowest, a middle and the highest load: more lines than three per panel stop being readable."""
    pts = sorted((p for p in doc["points"] if p["topology"] == topo), key=_x)
    return pts if len(pts) <= 3 else [pts[0], pts[len(pts) // 2], pts[-1]]


def _topology_cdfs(top: Path, topo: str, pts: list[dict]) -> str:
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    missing, drawn = [], False
    for k, p in enumerate(pts):
        for side, name, style in (("measured", "requests.parquet", "-"), ("simulated", "sim-requests.parquet", "--")):
            lat = _latencies(top / "points" / str(p["point"]) / name)
            if lat is None:
                missing.append(f"{p['point']} {side}: n/a (no {name})")
                continue
            drawn = _plot_cdf(axes, lat, style, f"C{k}", f"{p['level']} {side}") or drawn
    notes = "".join(f"<p class=\"note\">{html.escape(m)}</p>" for m in missing)
    if not drawn:
        return f"<h3>{html.escape(topo)}</h3><p>n/a (no request latencies)</p>{notes}"
    for ax, title in zip(axes, ("TTFT (ms)", "E2E latency (ms)")):
        ax.set_xlabel(title)
        ax.set_ylabel("share of requests")
    axes[1].legend(fontsize=6)
    return (f"<h3>{html.escape(topo)}</h3><img alt=\"CDFs {html.escape(topo)}\" "
            f"src=\"data:image/png;base64,{_png(fig)}\">{notes}")


def _plot_cdf(axes, lat: pd.DataFrame, style: str, colour: str, label: str) -> bool:
    drawn = False
    for ax, col in zip(axes, ("ttft_ms", "e2el_ms")):
        v = np.sort(lat[col].dropna().to_numpy())
        if v.size:
            ax.plot(v, np.linspace(0, 1, v.size), style, color=colour, label=label)
            drawn = True
    return drawn


def _latencies(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    df = pd.read_parquet(path)
    return metrics.per_request(df[df["success"].astype(bool)])


def _components(doc: dict) -> str:
    rows = [(p["point"], c) for p in doc["points"] for c in p.get("components") or []]
    if not rows:
        return ""
    body = "".join(f"<tr><td>{html.escape(str(pt))}</td><td class=text>{html.escape(str(c.get('kind')))}</td>"
                   f"<td>{c.get('stage')}</td><td>{html.escape(str(c.get('bucket')))}</td><td>{c.get('n')}</td>"
                   f"<td>{_num(c.get('measured_ms'), '{:.2f}')}</td><td>{_num(c.get('predicted_ms'), '{:.2f}')}</td>"
                   f"<td>{_num(c.get('error_pct'), '{:+.1f} %')}</td></tr>" for pt, c in rows)
    return ("<h2>Components: step compute time, measured vs predicted</h2><table><tr><th>point</th><th>kind</th>"
            "<th>stage</th><th>batch / tokens</th><th>steps</th><th>measured ms</th><th>predicted ms</th>"
            f"<th>error</th></tr>{body}</table>")
