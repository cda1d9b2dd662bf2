"""Figures for the report, drawn with matplotlib's object API on the Agg canvas (no display, no global state).

Each function takes saved run data and returns a Plot (a PNG as base64 plus the provenance label the report
shows), or None when the run has nothing to draw.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.patches import Circle, FancyArrowPatch, Wedge

from harness import metrics as metric_catalogue
from reports.run import Run

COMPUTE_KINDS = ("prefill", "decode", "mixed", "load")
_DPI = 100


@dataclass(frozen=True)
class Plot:
    title: str
    source: str          # measured | simulated | theoretical, or a combination such as "simulated + theoretical"
    png_base64: str
    caption: str = ""


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _sources(values) -> str:
    found = sorted({str(v) for v in values if isinstance(v, str) and v})
    return " + ".join(found) if found else "unknown"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def latency_distributions(run: Run, per_request: pd.DataFrame | None) -> Plot | None:
    """Histograms of per-request TTFT, TPOT and E2E latency (ms), median and p99 marked."""
    if per_request is None or per_request.empty:
        return None
    columns = [(c, label) for c, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2el_ms", "E2E latency"))
               if c in per_request and per_request[c].notna().any()]
    if not columns:
        return None
    fig = Figure(figsize=(4.2 * len(columns), 3.2))
    for i, (column, label) in enumerate(columns, start=1):
        ax = fig.add_subplot(1, len(columns), i)
        # Rounded to 1 ns: float noise on identical latencies would otherwise become unreadable tick labels.
        values = np.round(per_request[column].dropna().to_numpy(dtype=float), 6)
        scale, unit = (1e3, "s") if np.median(values) >= 10_000 else (1.0, "ms")   # minutes of ms do not read
        values = values / scale
        ax.hist(values, bins=min(50, max(5, int(math.sqrt(len(values))))), color="#4c78a8", alpha=0.85)
        for q, style in ((50, "-"), (99, "--")):
            x = float(np.percentile(values, q))
            ax.axvline(x, color="#e45756", linestyle=style, linewidth=1.2, label=f"p{q} {_num(x)} {unit}")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_xlabel(f"{label} ({unit})")
        ax.set_ylabel("requests" if i == 1 else "")
        ax.legend(fontsize=8, frameon=False)
    return Plot("Latency distributions", run.source, _png(fig),
                f"{len(per_request)} successful requests; solid line median, dashed p99.")


def _busy_fraction(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of each time bin covered by the given intervals (intervals of one node may overlap: >1 is possible).

    Cumulative busy time up to t is sum(t - start | start < t) - sum(t - end | end < t); sorted cumsums make
    this linear in the number of steps, which matters for runs with 10^5 steps.
    """
    def cumulative(points: np.ndarray) -> np.ndarray:
        points = np.sort(points)
        sums = np.concatenate(([0.0], np.cumsum(points)))
        k = np.searchsorted(points, edges, side="left")
        return k * edges - sums[k]
    busy = cumulative(starts) - cumulative(ends)
    return np.diff(busy) / np.diff(edges)


def node_timelines(run: Run, bins: int = 120) -> Plot | None:
    """KV memory in use and busy share per node over time, from steps.parquet."""
    steps = run.steps
    if steps.empty or not {"node", "start_s", "end_s"} <= set(steps.columns):
        return None
    t0, t1 = float(steps["start_s"].min()), float(steps["end_s"].max())
    if not t1 > t0:
        return None
    edges = np.linspace(t0, t1, bins + 1)
    fig = Figure(figsize=(11, 5.6))
    ax_mem, ax_busy = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for node, rows in steps.groupby("node", sort=True):
        rows = rows.sort_values("end_s")
        if "kv_bytes" in rows and rows["kv_bytes"].notna().any():
            which = np.clip(np.searchsorted(edges, rows["end_s"].to_numpy(float), side="right") - 1, 0, bins - 1)
            peak = pd.Series(rows["kv_bytes"].to_numpy(float)).groupby(which).max()
            ax_mem.step(edges[peak.index.to_numpy()], peak.to_numpy() / 1e9, where="post", label=str(node))
        compute = rows[rows["kind"].isin(COMPUTE_KINDS)] if "kind" in rows else rows
        share = _busy_fraction(compute["start_s"].to_numpy(float), compute["end_s"].to_numpy(float), edges)
        ax_busy.plot((edges[:-1] + edges[1:]) / 2, share, label=str(node))
    ax_mem.set_ylabel("KV cache in use (GB)")
    ax_mem.legend(fontsize=8, ncol=4, frameon=False)
    ax_busy.set_ylabel("busy share (compute steps)")
    ax_busy.set_xlabel("time since run start (s)")
    ax_busy.set_ylim(bottom=0)
    return Plot("Per-node memory and busy time", _sources(steps.get("source", [])), _png(fig),
                f"{len(steps):,} steps; KV memory is the peak within each of {bins} time bins, busy share is the "
                f"fraction of each bin spent in {', '.join(COMPUTE_KINDS)} steps.")


def ring_members(plan: dict) -> list[dict]:
    """One entry per node in ring order (stages in layer order, tensor-parallel members side by side).

    Plan memory figures are per member node (harness.specs.Stage), so each node shows its stage's figures.
    """
    members = []
    for index, stage in enumerate(plan.get("stages") or []):
        nodes = list(stage.get("nodes") or [stage.get("node", "?")])
        for node in nodes:
            members.append({"node": str(node), "stage": index, "group": len(nodes),
                            "layer_start": stage.get("layer_start"), "layer_end": stage.get("layer_end"),
                            "used": float(stage.get("memory_used_gb") or 0.0),
                            "available": float(stage.get("memory_available_gb") or 0.0)})
    return members


def _member_label(m: dict) -> str:
    start, end = m["layer_start"], m["layer_end"]
    layers = f"layers {start}–{end - 1} ({end - start})" if isinstance(start, int) and isinstance(end, int) \
        else "layers ?"
    if m["group"] > 1:
        layers += f", TP 1/{m['group']}"
    memory = f"{m['used']:.1f} / {m['available']:.0f} GB" if m["available"] else "memory ?"
    return f"{m['node']}\nstage {m['stage']}: {layers}\n{memory}"


def _arrow(ax, a, b, r, **style):
    """From the rim of circle a to the rim of circle b (centres would hide the arrow heads)."""
    (x0, y0), (x1, y1) = a, b
    dx, dy = x1 - x0, y1 - y0
    cut = r * 1.1 / math.hypot(dx, dy)
    ax.add_patch(FancyArrowPatch((x0 + dx * cut, y0 + dy * cut), (x1 - dx * cut, y1 - dy * cut),
                                 mutation_scale=14, **style))


def partition_ring(run: Run) -> Plot | None:
    """Nodes on a ring in the plan's order; each circle's shaded share is its memory used / available."""
    members = ring_members(run.plan)
    if not members:
        return None
    n = len(members)
    fig = Figure(figsize=(8, 7.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_aspect("equal")
    ax.axis("off")
    radius = 1.0 if n > 1 else 0.0
    r = min(0.3, 2.0 / n) if n > 1 else 0.45
    angles = [math.pi / 2 - 2 * math.pi * i / n for i in range(n)]
    centres = [(radius * math.cos(t), radius * math.sin(t)) for t in angles]
    for m, (x, y), angle in zip(members, centres, angles):
        share = min(1.0, m["used"] / m["available"]) if m["available"] else 0.0
        ax.add_patch(Circle((x, y), r, facecolor="#eef3f8", edgecolor="#4c78a8", linewidth=2))
        ax.add_patch(Wedge((x, y), r, 90, 90 + 360 * share, facecolor="#4c78a8", alpha=0.45))
        ax.text(x, y, f"{share:.0%}", ha="center", va="center", fontsize=9, color="#1d2733")
        out = radius + r + 0.12 if n > 1 else r + 0.12
        cos, sin = (math.cos(angle), math.sin(angle)) if n > 1 else (0.0, -1.0)
        # Anchor each label on the side facing away from the ring so it never covers a circle.
        ha = "left" if cos > 0.3 else "right" if cos < -0.3 else "center"
        va = "bottom" if sin > 0.3 else "top" if sin < -0.3 else "center"
        ax.text(out * cos, out * sin, _member_label(m), ha=ha, va=va, fontsize=8.5,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#ccc"})
    for i in range(n if n > 1 else 0):
        a, b = members[i], members[(i + 1) % n]
        if a["stage"] == b["stage"]:       # tensor-parallel partners exchange partial results both ways
            _arrow(ax, centres[i], centres[(i + 1) % n], r, arrowstyle="<|-|>", color="#e45756", linewidth=2)
        elif (i + 1) % n == 0:             # the last stage sends token ids back to the first
            _arrow(ax, centres[i], centres[0], r, arrowstyle="-|>", color="#999", linestyle="--",
                   connectionstyle="arc3,rad=-0.2")
        else:
            _arrow(ax, centres[i], centres[i + 1], r, arrowstyle="-|>", color="#333",
                   connectionstyle="arc3,rad=-0.2")
    span = radius + r + 0.75
    ax.set_xlim(-span - 0.5, span + 0.5)     # room for the labels at the sides
    ax.set_ylim(-span, span)
    plan = run.plan
    stages = plan.get("stages") or []
    caption = (f"{plan.get('strategy', '?')} plan: {n} node(s) in {len(stages)} stage(s), "
               f"{plan.get('num_layers', sum((s.get('layer_end') or 0) - (s.get('layer_start') or 0) for s in stages))}"
               " layers. Black arrows carry activations in layer order, the dashed arrow returns token ids, red "
               "arrows join tensor-parallel partners. Shaded share and percentage: memory used / available per node.")
    return Plot("Partition ring", "theoretical", _png(fig), caption)


# Bars of the strategy comparison; titles are the catalogue's labels with units (harness.metrics).
COMPARE_METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_e2el_ms")


def strategy_comparison(runs: list[Run], predicted: dict[str, list[float | None]] | None = None) -> Plot | None:
    """Horizontal bars per run for the headline metrics; plan predictions (theoretical) as markers on them."""
    present = [(k, metric_catalogue.heading(k)) for k in COMPARE_METRICS if any(k in r.metrics for r in runs)]
    if len(runs) < 2 or not present:
        return None
    predicted = predicted or {}
    fig = Figure(figsize=(11, 1.2 + 0.38 * len(runs) * 1.0 + 0.6))
    rows = np.arange(len(runs))[::-1]          # first run on top, as in the table above
    drew_theory = False
    axes = []
    for i, (key, label) in enumerate(present, start=1):
        ax = fig.add_subplot(1, len(present), i, sharey=axes[0] if axes else None)
        axes.append(ax)
        ax.barh(rows, [float(r.metrics.get(key, np.nan)) for r in runs], color="#4c78a8", height=0.6)
        guess = predicted.get(key)
        if guess and any(v is not None for v in guess):
            ax.scatter([np.nan if v is None else v for v in guess], rows, marker="D", color="#f58518", zorder=3,
                       label="theoretical (plan)")
            ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.08))
            drew_theory = True
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="y", labelleft=i == 1, labelsize=9)
        ax.set_yticks(rows, [r.name for r in runs])
    source = _sources([r.source for r in runs] + (["theoretical"] if drew_theory else []))
    caption = "Bars: each run's summary metrics."
    if drew_theory:
        caption += " Diamonds: the plan's predicted single-request TPOT (theoretical), for scale."
    return Plot("Strategy comparison", source, _png(fig), caption)


def load_sweep(runs: list[Run], loads: list[float | None], load_label: str) -> Plot | None:
    """Throughput and latency against offered load, one line per strategy."""
    points = [(r, x) for r, x in zip(runs, loads) if x is not None]
    if len({x for _, x in points}) < 2:
        return None
    fig = Figure(figsize=(11, 3.6))
    ax_tp, ax_lat = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    by_strategy: dict[str, list[tuple[float, Run]]] = {}
    for run, x in points:
        by_strategy.setdefault(run.strategy, []).append((x, run))
    for strategy, members in sorted(by_strategy.items()):
        members.sort(key=lambda m: m[0])
        xs = [m[0] for m in members]
        ax_tp.plot(xs, [m[1].metrics.get("output_throughput", np.nan) for m in members], "o-", label=strategy)
        for key, style in (("median_ttft_ms", "o-"), ("p99_ttft_ms", "x--"), ("median_tpot_ms", "s-")):
            ys = [m[1].metrics.get(key, np.nan) for m in members]
            if any(np.isfinite(ys)):
                ax_lat.plot(xs, ys, style, label=f"{strategy} {key}")
    ax_tp.set_xlabel(load_label)
    ax_tp.set_ylabel("output throughput (tok/s)")
    ax_tp.legend(fontsize=8, frameon=False)
    ax_lat.set_xlabel(load_label)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_yscale("log")
    ax_lat.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    return Plot("Throughput and latency against load", _sources([r.source for r, _ in points]), _png(fig),
                f"{len(points)} runs; x is the {load_label}.")
