"""Turning one load-generator result into a run folder's tables and summary; shared by `bench` and `run`.

Request rows measured over HTTP against the sim backend carry source "simulated": the latencies are the
simulated cluster's (paced in real time); against real ranks or an outside server they are "measured".
"""
from __future__ import annotations

from harness.metrics import REQUEST_COLUMNS, STEP_COLUMNS


def row_source(backend) -> str:
    return "simulated" if getattr(backend, "name", "") == "sim" else "measured"


def requests_frame(result, backend):
    df = result.frame()
    df["source"] = row_source(backend)
    return df


def steps_frame(backend, result):
    """The backend's step records on the run's clock (t=0 = the load generator's start)."""
    import pandas as pd
    if getattr(backend, "engine", None) is not None and hasattr(backend, "steps_table"):
        df = backend.steps_table().to_pandas()
        for col in ("start_s", "end_s"):   # virtual time -> monotonic -> this run's clock
            df[col] = df[col].map(backend.wall_of) - result.t0_monotonic
        return df
    if hasattr(backend, "step_records"):
        rows = backend.step_records(t0_unix=result.wall_start_unix)
        if rows:
            return pd.DataFrame(rows, columns=list(STEP_COLUMNS))
    types = {"str": "object", "float": "float64", "int": "int64", "bool": "bool"}
    return pd.DataFrame({c: pd.Series(dtype=types[t]) for c, t in STEP_COLUMNS.items()})


def summarize(requests, result, backend, load_report=None, slo=None, plan=None) -> dict:
    """vLLM-named metrics of the request rows plus what the run-level targets need (load time), labelled with
    their source."""
    from harness import metrics
    summary = metrics.compute(requests, slo)
    summary.update(result.dispatch_summary())
    summary.update(source=row_source(backend), backend=getattr(backend, "name", "external"),
                   load_mode=result.mode.label, warmup_requests=result.warmup_requests, model=result.model)
    if plan is not None:
        summary.update(strategy=plan.strategy, cluster=plan.cluster, predicted=plan.predicted)
    if load_report is not None:
        summary["load_time_s"] = max(load_report.load_s_per_node.values(), default=0.0)
        summary["load"] = {"load_s_per_node": load_report.load_s_per_node,
                           "memory_bytes_per_node": load_report.memory_bytes_per_node, "source": load_report.source}
    if getattr(backend, "engine", None) is not None and hasattr(backend, "memory_utilisation_pct"):
        summary["memory_utilisation_pct"] = backend.memory_utilisation_pct()
    stats = backend.stats() if backend is not None else {}
    for key in ("cache", "preemptions", "error"):
        if stats.get(key) is not None:
            summary[key] = stats[key]
    return summary


def start_run(writer, config: dict, plan, environment_extra: dict) -> dict:
    """What a run folder holds before any request is sent (so an interrupted run still has it); returns the
    plan as saved."""
    from harness import runfolder
    plan_dict = plan.to_dict() if plan is not None else {}
    writer.write_json("config.json", config)
    writer.write_json("environment.json", runfolder.environment(environment_extra))
    writer.write_json("plan.json", plan_dict)
    return plan_dict


def finish_run(writer, config: dict, plan_dict: dict, result, backend, load_report=None, slo=None, plan=None):
    """Write requests, steps and summary (with target verdicts) into an open RunWriter; returns (path, summary)."""
    from reports.targets import targets_summary
    requests, steps = requests_frame(result, backend), steps_frame(backend, result)
    summary = summarize(requests, result, backend, load_report, slo, plan)
    writer.write_requests(requests)
    writer.write_steps(steps)
    summary["targets"] = targets_summary(config, plan_dict, summary, requests, steps, summary["source"])
    return writer.finish(summary), summary
