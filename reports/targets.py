"""Targets: what a run must achieve, checked against its saved numbers (DESIGN §10).

Format. A run's config.json may carry a "targets" list; each entry is an object
    {"name": "TTFT", "metric": "median_ttft_ms", "op": "<", "value": 100, "unit": "ms", "note": "..."}
- name:   label shown in the report (defaults to the metric name)
- metric: a key of summary.json "metrics" (vLLM names such as mean_ttft_ms, p99_itl_ms, output_throughput),
          or one of the run-level figures below
- op:     one of <, <=, >, >=
- value:  the threshold, in the metric's own unit
- unit:   shown next to numbers (optional)
- note:   free text shown in the table (optional)
Without a "targets" section the DESIGN §10 defaults (DEFAULT_TARGETS) apply; an empty list means no targets.

Run-level figures a target may name besides the summary metrics (first source found wins):
- load_time_s:            summary metric, else the span of the "load" steps in steps.parquet, else the plan's prediction
- decode_tokens_per_s:    summary metric (harness.metrics defines it), else the plan's prediction
- cluster_memory_used_pct: summary metric, else the plan's predicted memory utilisation (whole cluster)
- plan_memory_used_pct:   summary metric, else 100 x sum(memory_used_gb) / sum(memory_available_gb) over plan stages
Units and labels come from the metric catalogue (harness.metrics.CATALOGUE) when a target gives none.
Every value says where it comes from: measured or simulated (from the run's rows) or theoretical (plan predictions).
A theoretical figure is shown next to a measured/simulated one, and only decides pass/fail when nothing else exists.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from harness import metrics as metric_catalogue
from harness.summary import V1_RENAMED
from reports.run import Run

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}

DEFAULT_TARGETS: tuple[dict[str, Any], ...] = (
    {"name": "Model load", "metric": "load_time_s", "op": "<", "value": 60, "unit": "s",
     "note": "70B model loaded on every node"},
    {"name": "Time to first token", "metric": "median_ttft_ms", "op": "<", "value": 100, "unit": "ms",
     "note": "at the prompt length stated beside it"},
    {"name": "Decode speed", "metric": "decode_tokens_per_s", "op": ">", "value": 10, "unit": "tokens/s",
     "note": "one request's decode speed on a 70B model"},
    {"name": "Cluster memory utilisation", "metric": "cluster_memory_used_pct", "op": ">=", "value": 80,
     "unit": "%", "note": "weights + peak KV in use / usable memory, all nodes"},
)


class TargetError(ValueError):
    """A target entry that does not follow the format above."""


@dataclass(frozen=True)
class Target:
    name: str
    metric: str
    op: str
    value: float
    unit: str = ""
    note: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Target":
        if not isinstance(raw, dict) or "metric" not in raw or "value" not in raw:
            raise TargetError(f"a target needs at least 'metric' and 'value': {raw!r}")
        op = str(raw.get("op", "<"))
        if op not in OPS:
            raise TargetError(f"target {raw.get('name') or raw['metric']}: op {op!r} is not one of {', '.join(OPS)}")
        try:
            value = float(raw["value"])
        except (TypeError, ValueError) as exc:
            raise TargetError(f"target {raw['metric']}: value {raw['value']!r} is not a number") from exc
        metric = V1_RENAMED.get(str(raw["metric"]), str(raw["metric"]))   # targets written for schema 1
        entry = metric_catalogue.metric(metric)
        return cls(name=str(raw.get("name") or (entry.label if entry else metric)), metric=metric, op=op,
                   value=value, unit=str(raw.get("unit", entry.unit if entry else "")), note=str(raw.get("note", "")))

    @property
    def text(self) -> str:
        return f"{self.op} {self.value:g} {self.unit}".strip()


@dataclass(frozen=True)
class Figure:
    """One number and where it comes from."""
    value: float
    source: str          # measured | simulated | theoretical
    how: str = ""        # how it was obtained, when not read straight from the summary


@dataclass(frozen=True)
class TargetResult:
    target: Target
    observed: Figure | None      # measured or simulated
    theoretical: Figure | None   # plan prediction, shown beside
    conditions: str

    @property
    def deciding(self) -> Figure | None:
        return self.observed or self.theoretical

    @property
    def status(self) -> str:
        """pass | fail | no data."""
        fig = self.deciding
        if fig is None or not math.isfinite(fig.value):
            return "no data"
        return "pass" if OPS[self.target.op](fig.value, self.target.value) else "fail"


def targets_of(run: Run) -> list[Target]:
    raw = run.config.get("targets")
    if raw is None:
        raw = DEFAULT_TARGETS
    if not isinstance(raw, (list, tuple)):
        raise TargetError(f"{run.path}/config.json: 'targets' must be a list of objects")
    return [Target.from_dict(entry) for entry in raw]


def number(value: Any) -> float | None:
    """A finite float from a JSON value (bools count as 0/1), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _from_summary(run: Run, metric: str) -> Figure | None:
    value = number(run.metrics.get(metric))
    return None if value is None else Figure(value, run.source)


def _load_span(run: Run) -> Figure | None:
    steps = run.steps
    if steps.empty or "kind" not in steps:
        return None
    load = steps[steps["kind"] == "load"]
    if load.empty:
        return None
    source = str(load["source"].iloc[0]) if "source" in load else run.source
    return Figure(float(load["end_s"].max() - load["start_s"].min()), source, "span of the load steps")


def _cluster_memory_pct(run: Run) -> Figure | None:
    predicted = number((run.plan.get("predicted") or {}).get("memory_utilisation"))
    if predicted is None:      # the planner's own figure covers the whole cluster, idle nodes included
        return None
    return Figure(100.0 * predicted, "theoretical", "plan: memory used / usable over the cluster")


def _plan_memory_pct(run: Run) -> Figure | None:
    stages = run.plan.get("stages") or []
    # Stage memory figures are per member node, so a tensor-parallel stage counts once per node.
    width = [len(s.get("nodes") or [None]) for s in stages]
    used = sum(w * (number(s.get("memory_used_gb")) or 0.0) for w, s in zip(width, stages))
    available = sum(w * (number(s.get("memory_available_gb")) or 0.0) for w, s in zip(width, stages))
    if available <= 0:
        return None
    return Figure(100.0 * used / available, "theoretical", "plan: memory used / available over its nodes")


def _plan_decode_speed(run: Run) -> Figure | None:
    stages = run.plan.get("stages") or []
    total_ms = sum((number(s.get("decode_ms")) or 0.0) + (number(s.get("link_ms")) or 0.0) for s in stages)
    if total_ms <= 0:
        return None
    return Figure(1000.0 / total_ms, "theoretical", "plan: 1000 / sum of stage decode and link times")


_OBSERVED_FALLBACKS: dict[str, Callable[[Run], Figure | None]] = {
    "load_time_s": _load_span,
}
_THEORETICAL_FALLBACKS: dict[str, Callable[[Run], Figure | None]] = {
    "cluster_memory_used_pct": _cluster_memory_pct,
    "plan_memory_used_pct": _plan_memory_pct,
    "decode_tokens_per_s": _plan_decode_speed,
}


def observed(run: Run, metric: str) -> Figure | None:
    fig = _from_summary(run, metric)
    if fig is None and metric in _OBSERVED_FALLBACKS:
        fig = _OBSERVED_FALLBACKS[metric](run)
    return fig


# Summary metric -> the plan's prediction of the same quantity (harness.specs.PartitionPlan.predicted).
PREDICTED_AS = {
    "median_ttft_ms": "ttft_ms", "mean_ttft_ms": "ttft_ms",
    "median_tpot_ms": "tpot_ms", "mean_tpot_ms": "tpot_ms",
    "decode_tokens_per_s": "tokens_per_s", "load_time_s": "load_s",
}


def theoretical(run: Run, metric: str) -> Figure | None:
    predicted = run.plan.get("predicted") or {}
    key = metric if metric in predicted else PREDICTED_AS.get(metric, metric)
    value = number(predicted.get(key))
    if value is not None:
        prompt = predicted.get("prompt_tokens")
        at = f" at a {prompt}-token prompt" if "ttft" in key and prompt else ""
        return Figure(value, "theoretical", f"plan prediction {key}{at}")
    fallback = _THEORETICAL_FALLBACKS.get(metric)
    return fallback(run) if fallback else None


def prompt_conditions(run: Run) -> str:
    """The prompt length behind latency figures, which DESIGN §10 asks to state."""
    ok = run.successful_requests()
    if ok.empty or "prompt_tokens" not in ok:
        return "prompt length unknown"
    tokens = ok["prompt_tokens"].astype(float)
    lo, mid, hi = tokens.min(), tokens.median(), tokens.max()
    if lo == hi:
        return f"prompt {mid:.0f} tokens, {len(tokens)} requests"
    return f"prompt median {mid:.0f} tokens ({lo:.0f}–{hi:.0f}), {len(tokens)} requests"


def _conditions(run: Run, target: Target) -> str:
    parts = []
    if any(key in target.metric for key in ("ttft", "itl", "tpot", "e2el")):
        parts.append(prompt_conditions(run))
    model = run.plan.get("model") or run.config.get("model")
    if isinstance(model, dict):
        model = model.get("name")
    if model:
        parts.append(f"model {model}")
    return "; ".join(parts)


def evaluate(run: Run) -> list[TargetResult]:
    return [TargetResult(t, observed(run, t.metric), theoretical(run, t.metric), _conditions(run, t))
            for t in targets_of(run)]


def as_summary(results: list[TargetResult]) -> list[dict[str, Any]]:
    """The targets section as the run's summary.json can store it."""
    return [{
        "name": r.target.name, "metric": r.target.metric, "op": r.target.op, "value": r.target.value,
        "unit": r.target.unit, "status": r.status,
        "observed": None if r.deciding is None else r.deciding.value,
        "source": None if r.deciding is None else r.deciding.source,
        "conditions": r.conditions,
    } for r in results]


def targets_summary(config: dict, plan: dict, metrics: dict, requests=None, steps=None,
                    source: str | None = None) -> list[dict[str, Any]]:
    """The targets section for a summary.json that is about to be written (the run is still in memory).

    Same evaluation as the report uses on the saved folder, so the two can never disagree.
    """
    from pathlib import Path

    run = Run(path=Path("."), config=config or {}, plan=plan or {}, metrics=metrics or {},
              summary={"source": source} if source else {})
    if requests is not None:
        run.requests = requests
    if steps is not None:
        run.steps = steps
    return as_summary(evaluate(run))
