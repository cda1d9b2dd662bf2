"""`harness run`: plan -> backend -> embedded OpenAI server -> load generator -> run folder -> HTML report.

One experiment (a dict from harness.experiment) runs once per strategy. Every run folder is written through
harness.runfolder, so an interrupted run stays marked incomplete; the report is rendered from the saved
folder, never from memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness import catalog
from harness.costmodel import load_profile
from harness.planning import load_cluster
from harness.serving.progress import LoadProgress, backend_stats
from harness.specs import DoesNotFit


@dataclass
class Outcome:
    strategy: str
    path: Path | None = None
    summary: dict | None = None
    error: str | None = None


def load_inputs(exp: dict, workload=None):
    """The experiment's cluster, model and plan options (with the cost-model profile), read once per run; the
    plan is judged at the experiment's workload (`workload`, built from exp when not given): its mean prompt and
    output lengths and its arrival rate."""
    from harness.costmodel import PlanOptions
    from harness.workloads import build_workload
    workload = workload if workload is not None else build_workload(exp["workload"])
    cluster = load_cluster(exp["cluster"], exp.get("link"), exp.get("add_nodes"))
    model = catalog.load_model(exp["model"], exp["quant"], exp["group_size"])
    options = PlanOptions(profile=load_profile(exp.get("profile")), objective=exp["objective"],
                          kv_reserve_tokens=exp["kv_reserve_tokens"], **workload_shape(workload))
    return cluster, model, options


def workload_shape(workload) -> dict:
    """PlanOptions' view of a workload: mean prompt and output tokens and its arrival rate (requests/s): the
    declared rate when the spec has one (a short sample's mean is noisy), else the mean over its arrivals;
    0 when every request arrives at once or the load is closed-loop, where no rate applies."""
    if not len(workload):   # nothing to average: the cost model's reference request
        return {"prompt_tokens": 512, "output_tokens": 128, "arrival_rate_rps": _arrival_rate(workload)}
    return {"prompt_tokens": max(round(float(workload.prompt_tokens.mean())), 1),
            "output_tokens": max(round(float(workload.output_tokens.mean())), 1),
            "arrival_rate_rps": _arrival_rate(workload)}


def _arrival_rate(workload) -> float:
    if workload.closed_loop:
        return 0.0
    declared = (workload.spec.get("arrival") or {}).get("rate") if isinstance(workload.spec, dict) else None
    if declared:
        return float(declared)
    span = float(workload.arrival_s[-1] - workload.arrival_s[0]) if len(workload) else 0.0
    return (len(workload) - 1) / span if span > 0 else 0.0


def build_backend(exp: dict, cluster, model, profile, plan):
    """The experiment's backend serving `plan` (harness.backends.make_backend). The mlx backend runs the plan on
    a locally built twin of the model; [mlx] emulate_links = true puts each rank in its own network namespace
    with the cluster's link bandwidth (root, Linux), emulate_latency = true adds the link latency."""
    from harness.backends import BackendOptions, Planned, make_backend
    planned = Planned(cluster, model, plan, profile, model_source=exp["model"])
    mlx = exp.get("mlx", {})
    options = BackendOptions(planned=lambda: planned, cache=exp.get("cache", "none"),
                             cache_l4_gb=float(exp.get("cache_l4_gb", 0.0)),
                             max_running=int(mlx.get("max_running", 16)), twin_head_dim=int(mlx.get("head_dim", 16)),
                             twin_seed=int(mlx.get("seed", 0)), emulate_links=bool(mlx.get("emulate_links")),
                             emulate_latency=bool(mlx.get("emulate_latency")), hostfile=mlx.get("hostfile"),
                             faults=tuple(exp.get("faults", ())),
                             replan=failover_planner(exp, cluster, model, plan) if exp.get("failover") else None)
    return make_backend(exp["backend"], options)


def failover_planner(exp: dict, cluster, model, plan):
    """failed nodes -> Planned on the nodes left, by the plan's own strategy and options (DoesNotFit if none)."""
    from harness.backends import Planned
    from harness.planning import plan_with
    from harness.specs import Cluster
    _, _, options = load_inputs(exp)

    def replan(failed: frozenset) -> Planned:
        left = Cluster(name=f"{cluster.name}-without-{'-'.join(sorted(failed))}",
                       nodes=tuple(n for n in cluster.nodes if n.name not in failed),
                       links=tuple(l for l in cluster.links if l.a not in failed and l.b not in failed))
        if not left.nodes:
            raise DoesNotFit("no node is left")
        return Planned(left, model, plan_with(plan.strategy, left, model, options), options.profile,
                       model_source=exp["model"])
    return replan


def run_experiment(exp: dict, strategies: list[str], out_root: Path, report: bool = True) -> list[Outcome]:
    from harness.workloads import build_workload
    from harness.planning import plan_with
    workload = build_workload(exp["workload"])
    cluster, model, options = load_inputs(exp, workload)
    profile = options.profile
    outcomes = []
    for i, strategy in enumerate(strategies, 1):
        _say(f"[{i}/{len(strategies)}] {strategy}: planning {exp['model']} ({exp['quant']}-bit) on {exp['cluster']}")
        try:
            plan = plan_with(strategy, cluster, model, options)
        except DoesNotFit as exc:
            if len(strategies) == 1:
                raise
            _say(f"  does not fit: {exc}")
            outcomes.append(Outcome(strategy, error=str(exc)))
            continue
        backend = build_backend(exp, cluster, model, profile, plan)
        path, summary = run_once({**exp, "profile": profile.name}, strategy, plan, backend, workload, out_root, report)
        if report:
            from reports import render
            render([path])
        outcomes.append(Outcome(strategy, path, summary))
    return outcomes


def run_once(exp, strategy, plan, backend, workload, out_root: Path, report: bool = True):
    """Serve one plan behind the embedded server, drive the workload at it, and save the run folder.

    Ctrl-C, SIGTERM or an exception keep the requests that finished and a summary over them in the folder,
    which stays marked INCOMPLETE (harness.runfolder); its report is still rendered, and says so.
    """
    from harness import runfolder
    writer = runfolder.RunWriter(out_root, f"{exp['name']}-{strategy}")
    try:
        return _serve_and_measure(writer, exp, strategy, plan, backend, workload)
    except (KeyboardInterrupt, Exception):
        if report:
            from reports import render
            _say(f"report of the incomplete run: {render([writer.path])}")
        raise


def _serve_and_measure(writer, exp, strategy, plan, backend, workload):
    from harness.serving.loadgen import LoadMode, LoadSink, Target, run_load_sync
    from harness.recording import finish_run, keep_finished, start_run
    from harness.serving.server import EmbeddedServer
    load = exp.get("load", {})
    with writer:
        config = {"command": "run", **exp, "strategy": strategy, "run_id": writer.run_id}
        plan_dict = start_run(writer, config, plan, {"backend": exp["backend"]})
        sink, served = LoadSink(writer.journal.append), {}
        _say(f"  loading {exp['backend']} backend ...")
        try:
            with EmbeddedServer(backend) as server:
                served["load_report"] = server.load_report
                _say(f"  serving at {server.url}; sending {len(workload)} requests "
                     f"(warm-up {load.get('warmup', 0)}) ...")
                with LoadProgress(backend, len(workload)) as progress:
                    progress.follow(sink)
                    result = run_load_sync(Target(server.url, send_prefix_id=True), workload, LoadMode(),
                                           warmup=int(load.get("warmup", 0)), seed=int(exp["workload"].get("seed", 0)),
                                           max_duration_s=load.get("max_duration_s"), sink=sink)
                stop_if_backend_failed(writer, backend)
                return finish_run(writer, config, plan_dict, result, backend, server.load_report, plan=plan)
        except (KeyboardInterrupt, Exception) as exc:
            keep_finished(writer, exc, sink, lambda partial: finish_run(
                writer, config, plan_dict, partial, backend, served.get("load_report"), plan=plan))
            raise


def stop_if_backend_failed(writer, backend) -> None:
    """A backend that died during the load (its requests failed from then on) makes the run "failed", not
    complete: its figures describe a broken server."""
    stats = backend_stats(backend)   # a failing stats() must not stop the run
    if stats.get("healthy", True) is False:
        writer.stop("failed", f"failed: backend unhealthy after the load ({stats.get('error') or 'no detail'})")
        _say(f"  {writer.stopped[1]}: the run folder is marked incomplete")


def _say(text: str) -> None:
    print(text, flush=True)
