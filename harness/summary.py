"""The one summary.json body every command writes (schema version 2, published as
harness/schemas/summary-v2.schema.json), and the migration of version-1 summaries that readers apply.

Shape (every command, every backend):
    schema_version 2, command, source, backend,
    metrics      the vLLM-named figures of harness.metrics.compute plus run-level figures (load_time_s,
                 plan_memory_used_pct, cluster_memory_used_pct, dispatch lag); numbers or null only
    slo          the goodput SLOs in ms, or null
    plan         strategy, cluster, predicted (theoretical), or null for an outside server
    load         load_s_per_node, memory_bytes_per_node (model weights resident on each node after loading),
                 kv_peak_bytes_per_node (peak KV cache in use), source; or null
    fingerprint  model, cluster, cluster_hash, plan_stages, workload_hash: what `check` compares with a baseline
    run          command-specific bookkeeping (load mode, warm-up, model name, engine counters)
    sim, cache   simulator facts and prefix-cache statistics, when there are any
    saturation   harness.saturation's overload verdict (saturated, reasons, offered / service / sustainable rates,
                 queue growth, preemptions, cancelled_at_bound); absent from summaries written before it
    targets      the target verdicts of reports.targets: status pass | fail | no data | n/a (does not apply to
                 this run, with its reason), the note described from the run's model, nodes and workload
    sweep        `bench --sweep` only: the load kind and unit, and each point's load, label, run folder (under
                 points/) and metrics; the top-level metrics are then over every point's requests together
"""
from __future__ import annotations

import hashlib
import json
import math

SCHEMA_VERSION = 2
SCHEMA_FILE = "schemas/summary-v2.schema.json"


def schema() -> dict:
    """The published JSON Schema of summary.json."""
    from pathlib import Path
    return json.loads((Path(__file__).parent / SCHEMA_FILE).read_text())


def memory_used_bytes(load) -> dict[str, float]:
    """Weights plus peak KV in use, per node of the plan."""
    kv = load.get("kv_peak_bytes_per_node") or {}
    return {n: float(w) + float(kv.get(n, 0.0)) for n, w in load["memory_bytes_per_node"].items()}


def memory_pcts(load: dict | None, cluster) -> dict[str, float | None]:
    """plan_memory_used_pct (over the plan's nodes' usable memory) and cluster_memory_used_pct (over every
    node's); None where the cluster or the bytes are unknown (an outside server)."""
    if not load or cluster is None or not load.get("memory_bytes_per_node"):
        return {"plan_memory_used_pct": None, "cluster_memory_used_pct": None}
    used = memory_used_bytes(load)
    known = {n.name for n in cluster.nodes}
    plan_usable = sum(cluster.node(n).usable_bytes for n in used if n in known)
    total = sum(used.values())
    return {"plan_memory_used_pct": _pct(total, plan_usable),
            "cluster_memory_used_pct": _pct(total, cluster.total_usable_bytes)}


def _pct(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


def load_section(load_report, kv_peak_bytes_per_node: dict | None) -> dict | None:
    if load_report is None:
        return None
    return {"load_s_per_node": dict(load_report.load_s_per_node),
            "memory_bytes_per_node": {n: int(b) for n, b in load_report.memory_bytes_per_node.items()},
            "kv_peak_bytes_per_node": {n: int(b) for n, b in (kv_peak_bytes_per_node or {}).items()},
            "source": load_report.source}


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cluster_hash(cluster) -> str | None:
    """A digest of the cluster's nodes and links: two clusters of one name but other hardware differ."""
    if cluster is None:
        return None
    from dataclasses import asdict
    spec = asdict(cluster)
    # a node not pinned to a core (every Mac) hashes as it did before cpu_core existed: baselines stay valid
    nodes = [{k: v for k, v in n.items() if not (k == "cpu_core" and v is None)} for n in spec["nodes"]]
    return _digest([nodes, spec["links"]])


def fingerprint(plan: dict | None, cluster, workload: dict | None, model: str | None) -> dict:
    """What must match between a run and its baseline for a comparison to mean anything."""
    plan = plan or {}
    if plan.get("model"):
        model = f"{plan['model']} {plan.get('quant_bits', '?')}-bit"
    stages = [f"{'+'.join(s.get('nodes') or [])}[{s.get('layer_start')},{s.get('layer_end')})"
              for s in plan.get("stages") or []]
    return {"model": model, "cluster": plan.get("cluster") or getattr(cluster, "name", None),
            "cluster_hash": cluster_hash(cluster), "plan_stages": stages,
            "workload_hash": _digest(workload) if workload else None}


def _clean(value):
    """JSON has no NaN: an undefined figure is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build(command: str, source: str, backend: str, metrics: dict, *, plan: dict | None = None, cluster=None,
          load_report=None, kv_peak_bytes_per_node: dict | None = None, workload: dict | None = None,
          model: str | None = None, run: dict | None = None, extra: dict | None = None,
          requests=None) -> dict:
    """The summary.json body (without targets, which need the body's metrics first); with the request rows it
    carries the saturation verdict too."""
    figures = {k: _clean(v) for k, v in metrics.items() if not isinstance(v, (dict, list))}
    load = load_section(load_report, kv_peak_bytes_per_node)
    if load is not None:
        figures["load_time_s"] = max(load["load_s_per_node"].values(), default=0.0)
    figures.update(memory_pcts(load, cluster))
    body = {"schema_version": SCHEMA_VERSION, "command": command, "source": source, "backend": backend,
            "metrics": figures, "slo": metrics.get("slo") or None,
            "plan": _plan_section(plan), "load": load,
            "fingerprint": fingerprint(plan, cluster, workload, model), "run": run or {}}
    body.update(extra or {})
    if requests is not None:
        body["saturation"] = saturation_section(requests, body, workload)
    return body


def saturation_section(requests, body: dict, workload: dict | None) -> dict:
    """harness.saturation's verdict, fed the engine's preemption count from the run or sim section."""
    from harness.saturation import assess, is_closed_loop
    preemptions = (body.get("run") or {}).get("preemptions")
    if preemptions is None:
        preemptions = (body.get("sim") or {}).get("preemptions")
    return assess(requests, preemptions, closed_loop=is_closed_loop(workload))


def _plan_section(plan: dict | None) -> dict | None:
    if not plan:
        return None
    return {"strategy": plan.get("strategy"), "cluster": plan.get("cluster"), "predicted": plan.get("predicted")}


# ------------------------------------------------------------------ reading older summaries

# Version-1 names of figures that version 2 renamed. Version 1's single memory figure was taken over the plan's
# nodes (sim/run.py counted weights + peak KV on each of them), so it is the plan figure.
V1_RENAMED = {"memory_utilisation_pct": "plan_memory_used_pct"}
_V1_BOOKKEEPING = {"schema_version", "status", "run_id", "stop_reason"}


def migrate(summary: dict) -> dict:
    """Any summary as version 2: version 1 kept its metrics flat (run, bench) or under "metrics" (simulate)."""
    if summary.get("schema_version", 1) >= SCHEMA_VERSION or not summary:
        return summary
    nested = isinstance(summary.get("metrics"), dict)
    flat = summary["metrics"] if nested else {k: v for k, v in summary.items() if _is_figure(k, v)}
    figures = {V1_RENAMED.get(k, k): v for k, v in flat.items() if not isinstance(v, (dict, list))}
    rest = {k: v for k, v in summary.items() if k != "metrics" and (nested or not _is_figure(k, v))}
    plan = {k: rest.pop(k) for k in ("strategy", "cluster", "predicted") if k in rest}
    return {**rest, "schema_version": SCHEMA_VERSION, "migrated_from": summary.get("schema_version", 1),
            "metrics": figures, "slo": summary.get("slo") or flat.get("slo"), "plan": plan or None,
            "fingerprint": rest.get("fingerprint") or {}}


def _is_figure(key: str, value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _V1_BOOKKEEPING) \
        or key == "slo"


# ------------------------------------------------------------------ sweeps

# What a sweep point's load is, by load-mode kind (harness.serving.loadgen.LoadMode).
SWEEP_LOAD_UNITS = {"concurrent": "concurrency (requests in flight)", "constant": "offered request rate (req/s)",
                    "poisson": "offered request rate (req/s)"}


def sweep_section(kind: str, points) -> dict:
    """summary.json's "sweep" section of `bench --sweep`: points are (load, label, run folder relative to the
    sweep's, that point's metrics); the top-level metrics are over every point's requests together."""
    return {"kind": kind, "load_unit": SWEEP_LOAD_UNITS.get(kind, kind),
            "points": [{"point": k, "label": label, "load": float(load), "run": run,
                        "metrics": {key: _clean(v) for key, v in figures.items() if not isinstance(v, (dict, list))}}
                       for k, (load, label, run, figures) in enumerate(points, 1)]}
