"""Turning one load-generator result into a run folder's tables and summary; shared by `bench` and `run`.

Request rows measured over HTTP against the sim backend carry source "simulated": the latencies are the
simulated cluster's (paced in real time); against real ranks or an outside server they are "measured".
"""
from __future__ import annotations


def row_source(backend) -> str:
    """What the request rows' timings are: the backend's own label, or "measured" for an outside server (None)."""
    return "measured" if backend is None else backend.source


def requests_frame(result, backend):
    df = result.frame()
    df["source"] = row_source(backend)
    return df


def steps_frame(backend, result):
    """The backend's step records on the run's clock (t=0 = the load generator's start), from t=0 on, plus the
    model load: a server that serves several runs (validate's load points) keeps every step since it started,
    and a run's folder must hold only its own. None for an outside server."""
    if backend is None:
        from harness.backends.base import step_frame
        return step_frame()
    df = backend.step_table(result.t0_monotonic, result.wall_start_unix)
    own = (df["kind"] == "load") | (df["start_s"] >= 0)
    return df if own.all() else df[own].reset_index(drop=True)


def fault_clock_zero(backend, result) -> float | None:
    """Where the sim backend's virtual 0 (its load, what fault and failover times count from) is on the run's
    clock, so the report can draw them exactly; None for other backends or a sped-up clock."""
    if not hasattr(backend, "wall_of") or getattr(getattr(backend, "config", None), "speed", None) != 1.0:
        return None
    return float(backend.wall_of(0.0) - result.t0_monotonic)


def summarize(requests, result, backend, load_report=None, slo=None, plan=None, config=None) -> dict:
    """summary.json body (harness.summary, schema 2): vLLM-named metrics of the request rows plus what the
    run-level targets need (load time, memory in use), labelled with their source."""
    from harness import metrics, summary
    config = config or {}
    figures = {**metrics.compute(requests, slo), **result.dispatch_summary()}
    stats = backend.stats() if backend is not None else {}
    run = {"load_mode": result.mode.label, "warmup_requests": result.warmup_requests, "model": result.model,
           **{k: stats[k] for k in ("preemptions", "error", "failovers") if stats.get(k) is not None}}
    zero = fault_clock_zero(backend, result)
    if zero is not None and (stats.get("failovers") or config.get("faults")):
        run["fault_clock_zero_s"] = zero
    return summary.build(config.get("command", "bench"), row_source(backend),
                         getattr(backend, "name", "external"), figures,
                         plan=plan.to_dict() if plan is not None else None, cluster=getattr(backend, "cluster", None),
                         load_report=load_report, kv_peak_bytes_per_node=_kv_peak(backend),
                         workload={"workload": config.get("workload"), "mode": config.get("mode")},
                         model=result.model, run=run, requests=requests,
                         extra={"cache": stats["cache"]} if stats.get("cache") is not None else None)


def _kv_peak(backend) -> dict | None:
    """Peak KV bytes per node, where the backend models its KV (the sim engine); None elsewhere."""
    engine = getattr(backend, "engine", None)
    return engine.kv_peak_bytes() if hasattr(engine, "kv_peak_bytes") else None


def start_run(writer, config: dict, plan, environment_extra: dict) -> dict:
    """What a run folder holds before any request is sent (so an interrupted run still has it); returns the
    plan as saved."""
    from harness import runfolder
    plan_dict = plan.to_dict() if plan is not None else {}
    writer.write_json("config.json", config)
    writer.write_json("environment.json", runfolder.environment(environment_extra))
    writer.write_json("plan.json", plan_dict)
    return plan_dict


def finish_run(writer, config: dict, plan_dict: dict, result, backend, load_report=None, slo=None, plan=None,
               amend=None):
    """Write requests, steps and summary (with target verdicts) into an open RunWriter; returns (path, summary).
    `amend(summary)`, when given, adds to the summary before it is written (a sweep's own section)."""
    from reports.targets import targets_summary
    requests, steps = requests_frame(result, backend), steps_frame(backend, result)
    summary = summarize(requests, result, backend, load_report, slo, plan, config)
    if amend is not None:
        amend(summary)
    writer.write_requests(requests)
    writer.write_steps(steps)
    summary["targets"] = targets_summary(config, plan_dict, summary["metrics"], requests, steps, summary["source"])
    return writer.finish(summary), summary


def keep_finished(writer, exc: BaseException, sink, finish) -> None:
    """After Ctrl-C, SIGTERM or an exception: save the requests that finished (the journal) and a summary over
    them through `finish(partial_result)` (finish_run above); the folder stays marked incomplete with
    the reason. Best effort: when that fails too, the journal keeps the finished requests on disk."""
    from harness import runfolder
    writer.stop(*runfolder.stop_reason(exc))
    rows = writer.journal.rows()
    partial = sink.partial(rows)
    if partial is None or (writer.path / "requests.parquet").exists():   # nothing sent yet, or already saved
        _say(f"\n{writer.stopped[1]}: {writer.path} is marked incomplete")
        return
    try:
        finish(partial)
    except Exception as err:
        _say(f"\n{writer.stopped[1]}: could not summarise it ({type(err).__name__}: {err}); "
             f"{writer.path / runfolder.JOURNAL} keeps its {len(rows)} finished requests")
        return
    _say(f"\n{writer.stopped[1]}: {writer.path} keeps the {len(rows)} requests that finished, "
         f"with a summary over them; it is marked incomplete")


def _say(text: str) -> None:
    print(text, flush=True)
