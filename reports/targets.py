"""Targets: what a run must achieve, checked against its saved numbers (DESIGN §10).

Format. A run's config.json may carry a "targets" list; each entry is an object
    {"name": "TTFT", "metric": "median_ttft_ms", "op": "<", "value": 100, "unit": "ms", "note": "..."}
- name:   label shown in the report (defaults to the metric name)
- metric: a key of summary.json "metrics" (vLLM names such as mean_ttft_ms, p99_itl_ms, output_throughput),
          or one of the run-level figures below
- op:     one of <, <=, >, >=
- value:  the threshold, in the metric's own unit
- unit:   shown next to numbers (optional)
- note:   free text shown in the table (optional; without it the note is generated from the run: the model,
          the nodes it was placed on, the workload's prompt lengths)
Without a "targets" section the DESIGN §10 defaults (DEFAULT_TARGETS) apply; an empty list means no targets.
DESIGN §10 states the load and decode figures for a 70B model. They are applied unchanged to a model of another
size (scaling them would invent a rule nobody asked for), and the note then says that the figure is the design's
70B one applied to this model, so a lenient pass on an 8B model is not read as a 70B result.

Status: pass | fail | no data (no figure) | n/a (the target does not apply to this run, with the reason):
model load on a backend that loads nothing (instant) or a run that did not simulate loading (--no-load); memory
on a backend that places no model on a cluster (instant, an outside server) or a run without a plan.
validate_targets checks a [[targets]] list when an experiment file is read, before anything runs.

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
import re
from dataclasses import dataclass
from typing import Any, Callable

from harness import metrics as metric_catalogue
from harness.specs import UserError, did_you_mean
from harness.summary import V1_RENAMED
from reports.run import Run

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}

DEFAULT_TARGETS: tuple[dict[str, Any], ...] = (   # notes are generated from the run (describe)
    {"name": "Model load", "metric": "load_time_s", "op": "<", "value": 60, "unit": "s"},
    {"name": "Time to first token", "metric": "median_ttft_ms", "op": "<", "value": 100, "unit": "ms"},
    {"name": "Decode speed", "metric": "decode_tokens_per_s", "op": ">", "value": 10, "unit": "tokens/s"},
    {"name": "Cluster memory utilisation", "metric": "cluster_memory_used_pct", "op": ">=", "value": 80, "unit": "%"},
)
# The DESIGN §10 figures stated for a 70B model: (metric, op, value).
DESIGN_70B_FIGURES = {("load_time_s", "<", 60.0), ("decode_tokens_per_s", ">", 10.0)}
DESIGN_MODEL_BILLIONS = 70.0
NEAR_DESIGN_SIZE = 0.2     # within 20 % of 70B (Qwen 2.5 72B, Llama 3.1 70B) counts as the design's size

LOAD_METRICS = frozenset({"load_time_s"})
MEMORY_METRICS = frozenset({"cluster_memory_used_pct", "plan_memory_used_pct"})
LATENCY_WORDS = ("ttft", "itl", "tpot", "e2el")


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
    note: str = ""                     # the target's own note, or one generated from the run
    not_applicable: str | None = None  # why the target does not apply to this run; None when it does

    @property
    def deciding(self) -> Figure | None:
        return self.observed or self.theoretical

    @property
    def status(self) -> str:
        """pass | fail | no data | n/a."""
        if self.not_applicable:
            return "n/a"
        fig = self.deciding
        if fig is None or not math.isfinite(fig.value):
            return "no data"
        return "pass" if OPS[self.target.op](fig.value, self.target.value) else "fail"

    @property
    def verdict(self) -> str:
        """The status as shown to a reader: a n/a target says why."""
        return f"n/a ({self.not_applicable})" if self.not_applicable else self.status


def targets_of(run: Run) -> list[Target]:
    raw = run.config.get("targets")
    if raw is None:
        raw = DEFAULT_TARGETS
    if not isinstance(raw, (list, tuple)):
        raise TargetError(f"{run.path}/config.json: 'targets' must be a list of objects")
    return [Target.from_dict(entry) for entry in raw]


def known_metrics() -> tuple[str, ...]:
    """What a target may name: the catalogue's figures, and the version-1 names that migrate onto them."""
    return tuple(metric_catalogue.BY_KEY) + tuple(V1_RENAMED)


def validate_targets(raw: Any, origin: str) -> None:
    """Refuse a [[targets]] list that could not be checked, before any run: one line naming the file (origin),
    the target's index, the field, what was found and what is allowed (DESIGN §12)."""
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{origin}: targets must be a list of tables, got {raw!r}")
    for index, entry in enumerate(raw):
        problem = _target_problem(entry)
        if problem:
            raise UserError(f"{origin}: [[targets]][{index}] {problem}")


def _target_problem(entry: Any) -> str:
    """What is wrong with one target entry, or "" when nothing is."""
    if not isinstance(entry, dict):
        return f"must be a table, got {entry!r}"
    for key in ("metric", "value"):
        if key not in entry:
            return f"{key}: missing (a target needs metric and value)"
    metric, op, value = entry["metric"], entry.get("op", "<"), entry["value"]
    if metric not in known_metrics():
        return (f"metric: found {metric!r}{did_you_mean(str(metric), known_metrics())}; allowed: a figure of "
                f"harness.metrics CATALOGUE ({', '.join(metric_catalogue.BY_KEY)})")
    if op not in OPS:
        return f"op: found {op!r}; allowed: {', '.join(OPS)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"value: found {value!r}; allowed: a finite number, in the metric's unit"
    return ""


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
        return Figure(value, "theoretical", f"plan prediction for one stream{at}")
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
    # only latencies depend on prompt length; the model is named by the note (describe), once
    return prompt_conditions(run) if any(word in target.metric for word in LATENCY_WORDS) else ""


# ------------------------------------------------------------------ notes described from the run

def metric_label(key: str) -> str:
    """The metric's human label from the catalogue (its key when the catalogue does not know it)."""
    entry = metric_catalogue.metric(key)
    return entry.label if entry else key


def model_name(run: Run) -> str:
    """The run's model id as its plan (else its config) names it, "" when neither does."""
    model = run.plan.get("model") or run.config.get("model") or ""
    return str(model.get("name", "") if isinstance(model, dict) else model)


def model_billions(name: str) -> float | None:
    """Parameters in billions, read from a name such as llama-3.1-8b or qwen3-235b-a22b (total, not active)."""
    found = re.search(r"(?:^|[-_/ ])(\d+(?:\.\d+)?)[bB](?:$|[-_ ])", name)
    return float(found.group(1)) if found else None


def model_text(run: Run) -> str:
    """"Llama 3.1 8B (4-bit)" from llama-3.1-8b at 4 bits; "the served model" when the run names none."""
    name = model_name(run)
    if not name:
        return "the served model"
    words = [w.upper() if re.fullmatch(r"[a-z]?\d+(\.\d+)?[bm]", w) else w[:1].upper() + w[1:]
             for w in re.split(r"[-_]", name) if w]
    bits = run.plan.get("quant_bits") or run.config.get("quant_bits") or run.config.get("quant")
    high = isinstance(bits, (int, float)) and bits >= 16     # a mixed quant ("mixed:4/6") is a string
    precision = "" if not bits else " (16-bit)" if high else f" ({bits}-bit)"
    return " ".join(words) + precision


def plan_nodes(run: Run) -> list[str]:
    """The distinct nodes of the plan's stages, in stage order."""
    nodes = [n for stage in run.plan.get("stages") or [] for n in stage.get("nodes") or []]
    return list(dict.fromkeys(nodes))


def placement_text(run: Run) -> str:
    """"4 nodes of m2ultra-4x-tb4": where the plan put the model."""
    nodes = plan_nodes(run)
    cluster = run.plan.get("cluster") or run.config.get("cluster") or ""
    counted = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}" if nodes else ""
    return " of ".join(x for x in (counted, str(cluster)) if x) or "an unplanned backend"


def length_text(spec: Any, noun: str) -> str:
    """A workload length distribution (harness.workloads) in words: "512-token prompts", "prompts of about
    192 tokens (lognormal)"; "" when the spec does not say."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return f"{spec:g}-token {noun}"
    if not isinstance(spec, dict):
        return ""
    dist = spec.get("dist", "fixed")
    if dist == "fixed" and "value" in spec:
        return f"{spec['value']:g}-token {noun}"
    if dist == "uniform" and {"low", "high"} <= set(spec):
        return f"{noun} of {spec['low']:g}–{spec['high']:g} tokens (uniform)"
    return f"{noun} of about {spec['mean']:g} tokens ({dist})" if "mean" in spec else ""


def workload_prompt_text(run: Run) -> str:
    """The prompt lengths the experiment asked for, from its workload spec; "" when the spec does not say."""
    workload = run.config.get("workload") or {}
    if not isinstance(workload, dict):
        return ""
    if workload.get("kind") == "conversations":
        turns, system = length_text(workload.get("user"), "turns"), workload.get("system_prompt_tokens")
        return f"conversations of a {system:g}-token system prompt and {turns}" if system and turns else ""
    return length_text(workload.get("prompt"), "prompts")


def _prompt_text(run: Run) -> str:
    # a trace or an unknown workload states no lengths; the conditions beside the note give the measured ones
    return workload_prompt_text(run) or "the run's prompts (lengths under conditions)"


def _generated_note(run: Run, target: Target) -> str:
    """What the target measures on this run, in words."""
    metric, model, where = target.metric, model_text(run), placement_text(run)
    if metric in LOAD_METRICS | MEMORY_METRICS and _no_model_reason(run):
        return ""       # nothing was placed anywhere: the n/a reason says all there is
    if backend_name(run) == "instant":   # it serves tokens without a model, whatever the experiment names
        model, where = "the instant backend (no model)", "this host"
    if metric in LOAD_METRICS:
        return f"{model} loaded on {where}"
    if metric == "cluster_memory_used_pct":
        used = f"; the plan uses {len(plan_nodes(run))} of them" if plan_nodes(run) else ""
        return f"weights + peak KV in use / usable memory of every node of {run.plan.get('cluster') or where}{used}"
    if metric == "plan_memory_used_pct":
        return f"weights + peak KV in use / usable memory of the plan's {where}"
    if metric == "decode_tokens_per_s":
        return f"one request's decode speed, {model} on {where}"
    if any(word in metric for word in LATENCY_WORDS):
        return f"{metric_label(metric)} for {_prompt_text(run)}, {model}"
    return f"{model} on {where}"


def design_caveat(run: Run, target: Target) -> str:
    """For a DESIGN §10 70B figure on a model of another size: a sentence saying the figure was applied as is."""
    if (target.metric, target.op, target.value) not in DESIGN_70B_FIGURES or _no_model_reason(run):
        return ""
    size = model_billions(model_name(run))
    if size is not None and abs(size - DESIGN_MODEL_BILLIONS) <= NEAR_DESIGN_SIZE * DESIGN_MODEL_BILLIONS:
        return ""
    model = f"this {size:g}B model" if size is not None else "this model (its name gives no size)"
    return f"DESIGN §10 states {target.text} for a 70B model; applied unchanged to {model}"


def describe(run: Run, target: Target) -> str:
    """The note shown with a target: its own note or one generated from the run, plus the 70B caveat."""
    return "; ".join(x for x in (target.note or _generated_note(run, target), design_caveat(run, target)) if x)


# ------------------------------------------------------------------ targets that do not apply

def backend_name(run: Run) -> str:
    """sim | mlx | instant | external (an outside server) | "" when the folder does not say."""
    target = run.config.get("target")
    if target not in (None, "embedded"):
        return "external"      # `bench --target URL`: someone else's server
    args = run.config.get("args") if isinstance(run.config.get("args"), dict) else {}
    return str(run.summary.get("backend") or run.config.get("backend") or args.get("backend") or "")


def _no_model_reason(run: Run) -> str | None:
    """Why the run placed no model on a cluster the harness knows, or None when it did."""
    backend = backend_name(run)
    if backend == "instant":
        return "the instant backend loads no model"
    if backend == "external":
        return "an outside server: the harness sees neither its model load nor its memory"
    return None


def _load_not_applicable(run: Run) -> str | None:
    if run.config.get("include_load") is False:
        return "model loading not simulated (--no-load)"
    if reason := _no_model_reason(run):
        return reason
    # a real or simulated load always takes time: exactly 0 s on every node means nothing was loaded
    return "no model was loaded (0 s on every node)" if number(run.metrics.get("load_time_s")) == 0.0 else None


def _memory_not_applicable(run: Run, metric: str) -> str | None:
    if reason := _no_model_reason(run):
        return reason
    # a plan without stages is a broken plan (no data); no plan at all means nothing was placed
    return None if run.plan or _from_summary(run, metric) else "no plan: nothing was placed on a cluster"


def not_applicable(run: Run, target: Target) -> str | None:
    """The reason a target does not apply to this run, or None when it does."""
    if target.metric in LOAD_METRICS:
        return _load_not_applicable(run)
    if target.metric in MEMORY_METRICS:
        return _memory_not_applicable(run, target.metric)
    return None


def _result(run: Run, target: Target) -> TargetResult:
    reason = not_applicable(run, target)
    if reason:   # a figure of a target that does not apply (a 0 s load, a plan never served) would mislead
        return TargetResult(target, None, None, _conditions(run, target), describe(run, target), reason)
    seen = observed(run, target.metric)
    if seen is None and served_nothing(run) and target.metric not in LOAD_METRICS | MEMORY_METRICS:
        # every request failed: the plan's prediction would pass a target the cluster never met
        return TargetResult(target, None, None, _conditions(run, target), describe(run, target))
    return TargetResult(target, seen, theoretical(run, target.metric), _conditions(run, target),
                        describe(run, target))


def served_nothing(run: Run) -> bool:
    """Requests were sent and none completed (a node down, every request refused or timed out)."""
    failed, completed = number(run.metrics.get("failed")), number(run.metrics.get("completed"))
    return bool(failed) and not completed


def evaluate(run: Run) -> list[TargetResult]:
    return [_result(run, t) for t in targets_of(run)]


def as_summary(results: list[TargetResult]) -> list[dict[str, Any]]:
    """The targets section as the run's summary.json can store it."""
    return [{
        "name": r.target.name, "metric": r.target.metric, "op": r.target.op, "value": r.target.value,
        "unit": r.target.unit, "status": r.status,
        "observed": None if r.deciding is None else r.deciding.value,
        "source": None if r.deciding is None else r.deciding.source,
        "conditions": r.conditions, "note": r.note, "reason": r.not_applicable,
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
