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
from matplotlib.ticker import FuncFormatter, MaxNLocator
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


def clock_zero(run: Run) -> float:
    """t=0 of the time axes: the first request sent. Steps before it (model loading) are clipped, not shifted in.

    A run without requests keeps its steps' own start as t=0.
    """
    starts = run.requests["start_s"].dropna() if "start_s" in run.requests else pd.Series(dtype=float)
    if not starts.empty:
        return float(starts.min())
    return float(run.steps["start_s"].min()) if not run.steps.empty else 0.0


def stage_labels(plan: dict) -> dict[str, str]:
    """node -> the name of its stage, e.g. "stage 1: studio-m3u + mbp-m4max (TP2)": partners share one label."""
    labels = {}
    for index, stage in enumerate(plan.get("stages") or []):
        nodes = [str(n) for n in (stage.get("nodes") or [stage.get("node", "?")])]
        tp = f" (TP{len(nodes)})" if len(nodes) > 1 else ""
        for node in nodes:
            labels[node] = f"stage {index}: {' + '.join(nodes)}{tp}"
    return labels


@dataclass(frozen=True)
class Timelines:
    """Per-series (a node, or a tensor-parallel stage) figures over time bins from t=0 = first request sent."""
    labels: list[str]
    edges: np.ndarray
    kv_gb: np.ndarray          # series x bins: peak KV in use, carried forward between steps
    busy: np.ndarray           # series x bins: busy share of the busiest node of the series
    clipped_s: float           # how long before t=0 the first step began (model loading), not drawn
    loading_until: float       # end of loading steps that reach past t=0 (0.0 when none)


def _kv_per_bin(rows: pd.DataFrame, edges: np.ndarray) -> np.ndarray:
    bins = len(edges) - 1
    if "kv_bytes" not in rows or not rows["kv_bytes"].notna().any():
        return np.full(bins, np.nan)
    which = np.clip(np.searchsorted(edges, rows["end_s"].to_numpy(float), side="right") - 1, 0, bins - 1)
    peak = pd.Series(rows["kv_bytes"].to_numpy(float)).groupby(which).max()
    # KV stays allocated between a node's steps: carry the last figure forward rather than leave gaps
    return pd.Series(peak, index=range(bins)).ffill().fillna(0.0).to_numpy() / 1e9


def _busy_per_bin(rows: pd.DataFrame, edges: np.ndarray) -> np.ndarray:
    compute = rows[rows["kind"].isin(COMPUTE_KINDS)] if "kind" in rows else rows
    shares = [_busy_fraction(g["start_s"].to_numpy(float), g["end_s"].to_numpy(float), edges)
              for _, g in compute.groupby("node")]
    # TP partners compute in lockstep (and a simulator may log a stage's steps on one member): take the busiest
    return np.max(shares, axis=0) if shares else np.zeros(len(edges) - 1)


def timeline_data(run: Run, bins: int = 120) -> Timelines | None:
    steps = run.steps
    if run.step_records == "summary" or steps.empty or not {"node", "start_s", "end_s"} <= set(steps.columns):
        return None   # a summary-only run's steps are its load rows alone: no timeline to draw from them
    t0 = clock_zero(run)
    shifted = steps.assign(start_s=steps["start_s"] - t0, end_s=steps["end_s"] - t0)
    clipped_s = max(0.0, -float(shifted["start_s"].min()))
    shifted = shifted[shifted["end_s"] > 0].assign(start_s=lambda s: s["start_s"].clip(lower=0.0))
    t1 = float(shifted["end_s"].max()) if not shifted.empty else 0.0
    if not t1 > 0:
        return None
    edges = np.linspace(0.0, t1, bins + 1)
    names = stage_labels(run.plan)
    series = shifted.assign(series=shifted["node"].astype(str).map(lambda n: names.get(n, n)))
    groups = sorted(series.groupby("series"), key=lambda g: _series_order(g[0]))
    load = shifted[shifted["kind"] == "load"] if "kind" in shifted else shifted.iloc[0:0]
    return Timelines([label for label, _ in groups], edges,
                     np.array([_kv_per_bin(rows.sort_values("end_s"), edges) for _, rows in groups]),
                     np.array([_busy_per_bin(rows, edges) for _, rows in groups]),
                     clipped_s, float(load["end_s"].max()) if not load.empty else 0.0)


def _series_order(label: str) -> tuple:
    """Stages in layer order ("stage 10" after "stage 9"), then nodes outside the plan by name."""
    head = label.split(":")[0]
    return (0, int(head.split()[1]), label) if head.startswith("stage ") and head.split()[1].isdigit() else (1, 0, label)


def _lines(fig: Figure, data: Timelines) -> list:
    ax_mem, ax_busy = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    centres = (data.edges[:-1] + data.edges[1:]) / 2
    for label, kv, busy in zip(data.labels, data.kv_gb, data.busy):
        if np.isfinite(kv).any():
            ax_mem.step(data.edges[:-1], kv, where="post", label=label)
        ax_busy.plot(centres, busy, label=label)
    ax_mem.set_ylabel("KV cache in use (GB)")
    ax_busy.set_ylabel("busy share (compute steps)")
    ax_busy.set_ylim(bottom=0)
    ax_mem.legend(fontsize=8, ncol=2, frameon=False)
    return [ax_mem, ax_busy]


def _heatmaps(fig: Figure, data: Timelines) -> list:
    """One row per series: at 4+ nodes, overlaid lines hide each other; a heatmap row per node stays legible."""
    rows = np.arange(len(data.labels) + 1)
    axes = [fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)]
    # a busy share lives on 0..1, so its colours keep that scale; KV memory scales to its own peak
    busy_top = max(1.0, float(np.nanmax(data.busy)))
    for ax, values, label, cmap, top in ((axes[0], data.kv_gb, "KV cache in use (GB)", "Blues", None),
                                         (axes[1], data.busy, "busy share (compute steps)", "Oranges", busy_top)):
        mesh = ax.pcolormesh(data.edges, rows, np.nan_to_num(values), cmap=cmap, shading="flat", vmin=0, vmax=top)
        ax.set_yticks(rows[:-1] + 0.5, data.labels, fontsize=8)
        ax.invert_yaxis()                      # first stage on top, as in the plan table
        fig.colorbar(mesh, ax=ax, label=label, pad=0.01)
    return axes


def node_timelines_figure(run: Run, bins: int = 120) -> tuple[Figure, Timelines] | None:
    """KV memory in use and busy share per node (TP partners as one stage) over time since the first request."""
    data = timeline_data(run, bins)
    if data is None:
        return None
    many = len(data.labels) > 3
    fig = Figure(figsize=(11, 1.6 + 0.62 * len(data.labels) if many else 5.6))
    axes = _heatmaps(fig, data) if many else _lines(fig, data)
    for ax in axes:
        ax.set_xlim(0.0, data.edges[-1])
        if data.loading_until > 0:
            ax.axvspan(0.0, data.loading_until, color="#bbb", alpha=0.35, label="model loading")
    axes[-1].set_xlabel(_time_axis_label(data))
    if data.loading_until > 0 and not many:
        axes[-1].legend(fontsize=8, ncol=2, frameon=False)
    return fig, data


def _time_axis_label(data: Timelines) -> str:
    label = "time since the first request was sent (s)"
    if data.clipped_s > 0:
        label += f"; model loading before it ({data.clipped_s:.3g} s) is clipped"
    return label


def node_timelines(run: Run, bins: int = 120) -> Plot | None:
    drawn = node_timelines_figure(run, bins)
    if drawn is None:
        return None
    fig, data = drawn
    layout = "one heatmap row per stage" if len(data.labels) > 3 else "one line per stage"
    return Plot("Per-node memory and busy time", _sources(run.steps.get("source", [])), _png(fig),
                f"{len(run.steps):,} steps, {layout} (tensor-parallel partners share a row); KV memory is the peak "
                f"within each of {bins} time bins, carried forward; busy share is the fraction of each bin its busiest "
                f"node spent in {', '.join(COMPUTE_KINDS)} steps. t=0 is the first request sent.")


def ring_members(plan: dict) -> list[dict]:
    """One entry per node in ring order (stages in layer order, tensor-parallel members side by side).

    Plan memory figures are per member node (harness.specs.Stage); a plan that lists each member's own figures
    (memory_per_node: TP partners may differ in usable memory) gives each node its own.
    """
    members = []
    for index, stage in enumerate(plan.get("stages") or []):
        nodes = list(stage.get("nodes") or [stage.get("node", "?")])
        own = {str(m.get("node")): m for m in stage.get("memory_per_node") or [] if isinstance(m, dict)}
        for node in nodes:
            mine = own.get(str(node), {})
            members.append({"node": str(node), "stage": index, "group": len(nodes),
                            "layer_start": stage.get("layer_start"), "layer_end": stage.get("layer_end"),
                            "used": float(mine.get("used_gb", stage.get("memory_used_gb")) or 0.0),
                            "available": float(mine.get("usable_gb", stage.get("memory_available_gb")) or 0.0)})
    return members


def _share(m: dict) -> float:
    return min(1.0, m["used"] / m["available"]) if m["available"] else 0.0


def _member_label(m: dict) -> str:
    """Short on purpose: it sits inside a bar as wide as the node's layer share (one of eight is ~50 px)."""
    start, end = m["layer_start"], m["layer_end"]
    layers = f"{start}–{end - 1}" if isinstance(start, int) and isinstance(end, int) else "?"
    return layers + (f", TP 1/{m['group']}" if m["group"] > 1 else "")


def _arrow(ax, a, b, r, **style):
    """From the rim of circle a to the rim of circle b (centres would hide the arrow heads)."""
    (x0, y0), (x1, y1) = a, b
    dx, dy = x1 - x0, y1 - y0
    cut = r * 1.1 / math.hypot(dx, dy)
    ax.add_patch(FancyArrowPatch((x0 + dx * cut, y0 + dy * cut), (x1 - dx * cut, y1 - dy * cut),
                                 mutation_scale=14, **style))


def _ring_arrows(ax, members: list[dict], centres: list, r: float) -> None:
    n = len(members)
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


def _draw_ring(ax, members: list[dict]) -> None:
    """Nodes on a ring in plan order, named; the shaded share of each circle is its memory used / available."""
    n = len(members)
    ax.set_aspect("equal")
    ax.axis("off")
    radius, r = (1.0, min(0.3, 2.0 / n)) if n > 1 else (0.0, 0.45)
    angles = [math.pi / 2 - 2 * math.pi * i / n for i in range(n)]
    centres = [(radius * math.cos(t), radius * math.sin(t)) for t in angles]
    for m, (x, y), angle in zip(members, centres, angles):
        ax.add_patch(Circle((x, y), r, facecolor="#eef3f8", edgecolor=_stage_colour(m["stage"]), linewidth=2.5))
        ax.add_patch(Wedge((x, y), r, 90, 90 + 360 * _share(m), facecolor="#4c78a8", alpha=0.45))
        ax.text(x, y, f"{_share(m):.0%}", ha="center", va="center", fontsize=9 if n <= 6 else 7.5,
                color="#1d2733")
        cos, sin = (math.cos(angle), math.sin(angle)) if n > 1 else (0.0, -1.0)
        out = radius + r + 0.1
        # Anchor each name on the side facing away from the ring so it never covers a circle.
        ax.text(out * cos, out * sin, m["node"], fontsize=9, ha="left" if cos > 0.3 else "right" if cos < -0.3
                else "center", va="bottom" if sin > 0.3 else "top" if sin < -0.3 else "center")
    _ring_arrows(ax, members, centres, r)
    span = radius + r + 0.45
    ax.set_xlim(-span - 0.6, span + 0.6)     # room for the names at the sides
    ax.set_ylim(-span, span)


def _stage_colour(stage: int) -> str:
    palette = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d")
    return palette[stage % len(palette)]


def _draw_layer_map(ax, members: list[dict], num_layers: int, labels: dict[str, str]) -> None:
    """One bar per node over the layers it holds, coloured by stage; memory used / available at the right."""
    rows = np.arange(len(members))
    for row, m in zip(rows, members):
        start, end = m["layer_start"] or 0, m["layer_end"] or 0
        first_of_stage = row == 0 or members[row - 1]["stage"] != m["stage"]
        ax.barh(row, end - start, left=start, color=_stage_colour(m["stage"]), alpha=0.8, height=0.7,
                label=labels.get(m["node"]) if m["group"] > 1 and first_of_stage else None)
        ax.text((start + end) / 2, row, _member_label(m), ha="center", va="center", fontsize=8, color="white")
        memory = f"{m['used']:.1f} / {m['available']:.0f} GB" if m["available"] else "memory ?"
        ax.text(num_layers * 1.02, row, memory, va="center", fontsize=8.5)
    ax.set_yticks(rows, [f"{m['node']} (stage {m['stage']})" for m in members], fontsize=9)
    ax.invert_yaxis()                         # ring order top to bottom, as in the plan table
    ax.set_xlim(0, num_layers * 1.2)
    ax.set_xticks(np.linspace(0, num_layers, 5).round().astype(int))
    ax.set_xlabel("layers held (memory used / available per node at the right)")
    ax.set_title("layers per node", fontsize=10, loc="right")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if any(m["group"] > 1 for m in members):
        ax.legend(fontsize=8, frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2,
                  title="tensor-parallel stages", title_fontsize=8, alignment="left")


def partition_figure(run: Run) -> Figure | None:
    """The ring (order and memory share) beside a layer map (who holds which layers), filling the page width."""
    members = ring_members(run.plan)
    if not members:
        return None
    stages = run.plan.get("stages") or []
    num_layers = int(run.plan.get("num_layers") or max((s.get("layer_end") or 0) for s in stages) or 1)
    fig = Figure(figsize=(11, max(3.0, 0.42 * len(members) + 1.6)))
    grid = fig.add_gridspec(1, 2, width_ratios=(1.0, 1.5), wspace=0.4)   # room for the bar names
    _draw_ring(fig.add_subplot(grid[0, 0]), members)
    _draw_layer_map(fig.add_subplot(grid[0, 1]), members, num_layers, stage_labels(run.plan))
    return fig


def partition_ring(run: Run) -> Plot | None:
    fig = partition_figure(run)
    if fig is None:
        return None
    plan = run.plan
    stages = plan.get("stages") or []
    caption = (f"{plan.get('strategy', '?')} plan: {len(ring_members(plan))} node(s) in {len(stages)} stage(s), "
               f"{plan.get('num_layers', sum((s.get('layer_end') or 0) - (s.get('layer_start') or 0) for s in stages))}"
               " layers. Left: the ring; black arrows carry activations in layer order, the dashed arrow returns "
               "token ids, red arrows join tensor-parallel partners; shaded share and percentage: memory used / "
               "available per node. Right: the layers each node holds, coloured by stage.")
    return Plot("Partition ring", "theoretical", _png(fig), caption)


def _short_tick(value: float, _position) -> str:
    """Axis ticks of at most ~5 characters: 350000 ms becomes 350k, as full figures ran into each other."""
    return f"{value / 1000:g}k" if abs(value) >= 10_000 else f"{value:g}"


# Bars of the strategy comparison; titles are the catalogue's labels with units (harness.metrics).
COMPARE_METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_e2el_ms")


def _metric_bars(ax, rows: np.ndarray, values: list[float], guess: list[float | None] | None) -> bool:
    """One metric's bars, each labelled with its value; True when theoretical markers were drawn."""
    bars = ax.barh(rows, values, color="#4c78a8", height=0.6)
    # each bar says its value, so a reader need not estimate it from the axis
    ax.bar_label(bars, [_num(v) if np.isfinite(v) else "–" for v in values], padding=2, fontsize=8)
    ax.margins(x=0.25)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
    ax.xaxis.set_major_formatter(FuncFormatter(_short_tick))
    if not guess or all(v is None for v in guess):
        return False
    ax.scatter([np.nan if v is None else v for v in guess], rows, marker="D", color="#f58518", zorder=3,
               label="theoretical (plan)")
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return True


def strategy_comparison_figure(runs: list[Run], predicted: dict[str, list[float | None]] | None = None,
                               labels: list[str] | None = None) -> tuple[Figure, bool] | None:
    """Horizontal bars per run for the headline metrics, named by strategy (or the given labels), and whether
    plan predictions (theoretical) were drawn on them as markers."""
    present = [(k, metric_catalogue.heading(k)) for k in COMPARE_METRICS if any(k in r.metrics for r in runs)]
    if len(runs) < 2 or not present:
        return None
    fig = Figure(figsize=(11, 1.8 + 0.38 * len(runs)))
    rows = np.arange(len(runs))[::-1]          # first run on top, as in the table above
    drew_theory = False
    for i, (key, label) in enumerate(present, start=1):
        ax = fig.add_subplot(1, len(present), i, sharey=fig.axes[0] if fig.axes else None)
        values = [float(r.metrics.get(key, np.nan)) for r in runs]
        drew_theory |= _metric_bars(ax, rows, values, (predicted or {}).get(key))
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="y", labelleft=i == 1, labelsize=9)
        ax.set_yticks(rows, labels or [r.strategy for r in runs])
    return fig, drew_theory


def strategy_comparison(runs: list[Run], predicted: dict[str, list[float | None]] | None = None,
                        labels: list[str] | None = None) -> Plot | None:
    drawn = strategy_comparison_figure(runs, predicted, labels)
    if drawn is None:
        return None
    fig, drew_theory = drawn
    source = _sources([r.source for r in runs] + (["theoretical"] if drew_theory else []))
    caption = "Bars: each run's summary metrics, labelled by strategy."
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


def outage_timeline(run: Run, bins: int = 60) -> Plot | None:
    """Requests finishing and failing over time, with the run's injected faults marked: when the cluster went
    wrong and what it did to the traffic. None for a run with neither failures nor faults."""
    req, faults = run.requests, list(run.config.get("faults") or []) or lost_ranks(run)
    if req.empty or "success" not in req or "end_s" not in req:
        return None
    ok = req["success"].astype(bool)
    if ok.all() and not faults:
        return None
    t0 = clock_zero(run)
    ends = (req["end_s"].astype(float) - t0).fillna(0.0).to_numpy()
    edges = np.linspace(0.0, max(float(ends.max()), 1e-9), bins + 1)
    width = edges[1] - edges[0]
    fig = Figure(figsize=(9, 2.8))
    ax = fig.subplots()
    done = np.histogram(ends[ok.to_numpy()], edges)[0]
    failed = np.histogram(ends[~ok.to_numpy()], edges)[0]
    ax.bar(edges[:-1], done, width, align="edge", color="#4c8c4a", label="finished")
    ax.bar(edges[:-1], failed, width, bottom=done, align="edge", color="#c0392b", label="failed")
    zero = ((run.summary or {}).get("run") or {}).get("fault_clock_zero_s")
    # the backend's recorded clock is exact; else the first request a fault failed dates it
    shift = float(zero) - t0 if zero is not None else fault_clock_shift(req[~ok], faults, t0)
    for fault in faults if shift is not None else ():
        at = float(fault.get("at_s", 0.0)) + shift
        ax.axvline(at, color="black", linestyle="--", linewidth=1)
        if fault.get("duration_s"):     # a link flap: shade the time it was down
            ax.axvspan(at, at + float(fault["duration_s"]), color="black", alpha=0.08)
        ax.annotate(fault_label(fault), (at, ax.get_ylim()[1] * 0.9), fontsize=8,
                    xytext=(3, 0), textcoords="offset points")
    failovers = [f for f in ((run.summary or {}).get("run") or {}).get("failovers") or [] if "serving_again_s" in f]
    for f in failovers if shift is not None else ():
        again = float(f["serving_again_s"]) + shift
        ax.axvline(again, color="#2e7d32", linestyle=":", linewidth=1.5)
        ax.annotate(f"serving again ({float(f['serving_again_s']) - float(f['at_s']):.1f} s later)",
                    (again, ax.get_ylim()[1] * 0.75), fontsize=8, xytext=(3, 0), textcoords="offset points")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel(f"requests per {_num(width)} s")
    ax.legend(fontsize=8, loc="upper right")
    return Plot("Outage timeline", _sources(req.get("source", [])), _png(fig),
                f"{int((~ok).sum())} of {len(req)} requests failed; bars count requests by when they ended. "
                + ("Dashed lines: the faults (injected, or a rank lost on real ranks), placed on the backend's recorded "
                   "clock or by the first request a node or link failure failed (fault "
                   "times count from the backend's start, before warm-up)." if shift is not None else
                   "Fault times count from the backend's start and no request failure dates them on this clock, "
                   "so they are not drawn." if faults else ""))


def lost_ranks(run: Run) -> list[dict]:
    """A real-rank run's failovers as faults to mark (none is injected there: a rank died or stalled), at the
    time the backend found the failure."""
    failovers = ((run.summary or {}).get("run") or {}).get("failovers") or []
    return [{"kind": "rank_lost", "node": f["failed_node"], "at_s": f["at_s"]} for f in failovers if "at_s" in f]


def fault_label(fault: dict) -> str:
    """"node_down NODE", or "link_down A-B" for the faults on a link."""
    where = "-".join(fault[k] for k in ("node", "peer") if fault.get(k))
    return f"{fault.get('kind')} {where}"


def fault_clock_shift(failed: pd.DataFrame, faults: list, t0: float) -> float | None:
    """Seconds to add to a fault's at_s to put it on the requests' axis: the first request that a node_down
    (or a link_down for good) failed ended when that node (link) went down. None when no failure names one."""
    # a lost rank's error names it "rank R (stage S, node N...)"
    reasons = {"node_down": "node {node} failed", "link_down": "link {node}-{peer} down", "rank_lost": "node {node}"}
    for fault in faults:
        if fault.get("kind") not in reasons or fault.get("duration_s") or "error" not in failed:
            continue           # a flap fails nothing: only a drop for good dates the faults
        reason = reasons[fault["kind"]].format(node=fault.get("node"), peer=fault.get("peer"))
        named = failed[failed["error"].fillna("").str.contains(reason, regex=False)]
        if not named.empty:
            return float(named["end_s"].min()) - t0 - float(fault.get("at_s", 0.0))
    return None
