"""Summary tables built from summary.json metrics (vLLM field names, DESIGN §8).

The metric definitions live in harness/metrics.py; the run's summary.json holds their values. This module only
arranges those values into tables; it never recomputes a metric from the raw rows.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from harness import metrics as catalogue
from reports.run import Run

LATENCY_NAMES = catalogue.LATENCY_LABELS
_LATENCY_KEY = re.compile(r"^(mean|median|std|p\d+(?:\.\d+)?)_(ttft|tpot|itl|e2el)_ms$")
_STAT_ORDER = ("mean", "std", "median", "p50", "p90", "p95", "p99", "p99.9")

# Run-wide figures shown first, in this order, when the summary has them (labels and units: the catalogue).
HEADLINE = ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
            "request_goodput", "good_requests", "total_input_tokens", "total_output_tokens", "decode_tokens_per_s",
            "load_time_s", "plan_memory_used_pct", "cluster_memory_used_pct")


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[str]]
    text_columns: int = 1      # leading columns of text (left-aligned); the rest are numbers


def fmt(value: Any, digits: int = 3) -> str:
    """A number people can read: a few significant digits, no scientific notation for everyday sizes."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if abs(value) < 1e-9:
            return "0"      # float noise (e.g. the std of identical latencies), not a real figure
        if value == int(value) and abs(value) < 1e9:
            return f"{int(value):,}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def latency_table(metrics: dict[str, Any]) -> Table | None:
    """Rows TTFT/TPOT/ITL/E2E, columns mean/median/p90..., values in ms."""
    cells: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        match = _LATENCY_KEY.match(key)
        if match:
            cells.setdefault(match.group(2), {})[match.group(1)] = value
    if not cells:
        return None
    stats = sorted({s for row in cells.values() for s in row},
                   key=lambda s: _STAT_ORDER.index(s) if s in _STAT_ORDER else len(_STAT_ORDER))
    rows = [[f"{LATENCY_NAMES[name]} (ms)"] + [fmt(cells[name].get(s)) for s in stats]
            for name in LATENCY_NAMES if name in cells]
    return Table(["metric"] + stats, rows)


def headline_table(metrics: dict[str, Any]) -> Table:
    """Run-wide counts and throughputs, then any other scalar the summary carries."""
    rows = [_headline_row(key, metrics[key]) for key in HEADLINE if key in metrics]
    for key, value in sorted(metrics.items()):
        if key in HEADLINE or _LATENCY_KEY.match(key) or isinstance(value, (dict, list)):
            continue
        rows.append(_headline_row(key, value))
    return Table(["figure", "value", "unit"], rows)


def _headline_row(key: str, value: Any) -> list[str]:
    """Label and unit from the catalogue; a figure it does not know keeps its key, so nothing is hidden."""
    known = catalogue.metric(key)
    return [known.label, fmt(value), known.unit] if known else [key, fmt(value), ""]


def comparison_table(runs: list[Run], keys: tuple[str, ...]) -> Table:
    """One row per run, one column per metric key, headed by the catalogue's label and unit."""
    rows = [[run.name, run.strategy, run.source] + [fmt(run.metrics.get(k)) for k in keys] for run in runs]
    return Table(["run", "strategy", "source", *(catalogue.heading(k) for k in keys)], rows, text_columns=3)


def plan_table(run: Run) -> Table | None:
    stages = run.plan.get("stages") or []
    if not stages:
        return None
    rows = []
    for i, stage in enumerate(stages):
        nodes = stage.get("nodes") or [stage.get("node", "?")]
        start, end = stage.get("layer_start"), stage.get("layer_end")
        rows.append([str(i), " + ".join(map(str, nodes)), f"[{start}, {end})",
                     fmt(None if start is None or end is None else end - start), fmt(stage.get("tp_degree", 1)),
                     *_member_memory(stage), fmt(stage.get("decode_ms"))])
    return Table(["stage", "nodes", "layers", "count", "TP", "memory used per node (GB)",
                  "available per node (GB)", "decode (ms, predicted)"], rows, text_columns=2)


def _member_memory(stage: dict) -> list[str]:
    """Used and usable GB of each member node (a TP stage's nodes differ); older plans give one figure."""
    members = stage.get("memory_per_node")
    if not members:
        return [fmt(stage.get("memory_used_gb")), fmt(stage.get("memory_available_gb"))]
    return [" / ".join(fmt(m.get("used_gb")) for m in members), " / ".join(fmt(m.get("usable_gb")) for m in members)]


def _flatten(prefix: str, value: Any, rows: list[list[str]]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, rows)
    elif not isinstance(value, list):
        rows.append([prefix, fmt(value)])


# Labels and units of the plan's predictions (harness.specs.PartitionPlan.predicted), all theoretical.
PREDICTED_LABELS = {
    "objective_ms": ("planner objective", "ms"), "tpot_ms": ("TPOT, one request", "ms"),
    "tokens_per_s": ("decode speed, one request", "tok/s"), "bottleneck_ms": ("slowest stage per token", "ms"),
    "pipeline_tokens_per_s": ("pipeline decode throughput", "tok/s"), "ttft_ms": ("TTFT", "ms"),
    "ceiling_tokens_per_s": ("decode ceiling at peak bandwidth", "tok/s"), "prompt_tokens": ("prompt", "tokens"),
    "context_tokens": ("context", "tokens"), "kv_reserve_tokens": ("KV reserve", "tokens"),
    "memory_used_gb": ("memory used", "GB"), "memory_usable_gb": ("memory usable", "GB"),
    "memory_utilisation": ("memory used, whole cluster", "fraction"), "nodes_used": ("nodes used", ""),
    "load_s": ("model load time", "s"), "output_tokens": ("output", "tokens"),
    "sustainable_rate_rps": ("sustainable request rate", "req/s"),
    "arrival_rate_rps": ("workload arrival rate", "req/s"),
}


def _predicted_row(key: str, value: str) -> list[str]:
    label, unit = PREDICTED_LABELS.get(key, (key, ""))
    return [label, value, unit]


def predicted_table(plan: dict[str, Any]) -> Table | None:
    """The plan's predictions (theoretical), one row each, labelled with units."""
    rows: list[list[str]] = []
    _flatten("", {k: v for k, v in (plan.get("predicted") or {}).items() if k != "source"}, rows)
    rows = [_predicted_row(key, value) for key, value in rows]
    if plan.get("bottleneck"):
        rows.append(["bottleneck", str(plan["bottleneck"]), ""])
    return Table(["prediction", "value", "unit"], rows) if rows else None


# Summary sections shown elsewhere in the report (or pure bookkeeping).
_SHOWN_ELSEWHERE = {"metrics", "targets", "predicted", "slo", "plan"}


def backend_table(summary: dict[str, Any]) -> Table | None:
    """Nested summary sections a backend adds (load per node, cache statistics, ...), flattened to dotted names."""
    rows: list[list[str]] = []
    for key, value in summary.items():
        if isinstance(value, dict) and key not in _SHOWN_ELSEWHERE:
            _flatten(key, value, rows)
    return Table(["figure", "value"], rows) if rows else None
