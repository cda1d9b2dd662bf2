"""`harness run`: plan -> backend -> embedded OpenAI server -> load generator -> run folder -> HTML report.

One experiment (a dict from harness.experiment) runs once per strategy. Every run folder is written through
harness.runfolder, so an interrupted run stays marked incomplete; the report is rendered from the saved
folder, never from memory.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness import catalog
from harness.costmodel import load_profile
from harness.specs import DoesNotFit, UserError


@dataclass
class Outcome:
    strategy: str
    path: Path | None = None
    summary: dict | None = None
    error: str | None = None


def plan_for(exp: dict, strategy: str):
    from strategies.partitioning._plans import PlanOptions
    from strategies.registry import get_strategy
    cluster = catalog.load_cluster(exp["cluster"])
    model = catalog.load_model(exp["model"], exp["quant"], exp["group_size"])
    profile = load_profile(exp.get("profile"))
    options = PlanOptions(profile=profile, objective=exp["objective"], kv_reserve_tokens=exp["kv_reserve_tokens"])
    return cluster, model, profile, get_strategy(strategy)(cluster, model, options)


def build_backend(exp: dict, cluster, model, profile, plan):
    match exp["backend"]:
        case "sim":
            from harness.sim_backend import SimBackend, SimBackendConfig
            from sim.engine import EngineConfig
            return SimBackend(cluster, model, plan, profile, EngineConfig(), SimBackendConfig(model_id=model.name))
        case "mlx":
            return _mlx_backend(exp, plan)
    raise UserError(f"unknown backend {exp['backend']!r}; choose sim or mlx")


def _mlx_backend(exp: dict, plan):
    """Real MLX ranks on this machine running the plan's split on a locally built scaled twin of the model:
    same layers and head layout, smaller width (harness.mlx.modelbuild), so the plan applies unchanged."""
    from harness.mlx.backend import MlxBackend
    from harness.mlx.modelbuild import build, twin_config
    opts = exp.get("mlx", {})
    model_dir = build(twin_config(exp["model"], head_dim=int(opts.get("head_dim", 16))), seed=int(opts.get("seed", 0)))
    return MlxBackend(model_dir, plan, model_id=f"{exp['model']}-twin", max_running=int(opts.get("max_running", 16)))


def run_experiment(exp: dict, strategies: list[str], out_root: Path, report: bool = True) -> list[Outcome]:
    from harness.workloads import build_workload
    workload = build_workload(exp["workload"])
    outcomes = []
    for i, strategy in enumerate(strategies, 1):
        _say(f"[{i}/{len(strategies)}] {strategy}: planning {exp['model']} ({exp['quant']}-bit) on {exp['cluster']}")
        try:
            cluster, model, profile, plan = plan_for(exp, strategy)
        except DoesNotFit as exc:
            if len(strategies) == 1:
                raise
            _say(f"  does not fit: {exc}")
            outcomes.append(Outcome(strategy, error=str(exc)))
            continue
        backend = build_backend(exp, cluster, model, profile, plan)
        path, summary = run_once(exp, strategy, plan, backend, workload, out_root)
        if report:
            from reports import render
            render([path])
        outcomes.append(Outcome(strategy, path, summary))
    return outcomes


def run_once(exp, strategy, plan, backend, workload, out_root: Path):
    """Serve one plan behind the embedded server, drive the workload at it, and save the run folder."""
    from harness import runfolder
    from harness.loadgen import LoadMode, Target, run_load_sync
    from harness.server import EmbeddedServer
    load = exp.get("load", {})
    config = {"command": "run", "strategy": strategy, **{k: v for k, v in exp.items()}, "run_id": None}
    with runfolder.RunWriter(out_root, f"{exp['name']}-{strategy}") as writer:
        config["run_id"] = writer.run_id
        writer.write_json("config.json", config)
        writer.write_json("plan.json", plan.to_dict())
        writer.write_json("environment.json", runfolder.environment({"backend": exp["backend"]}))
        _say(f"  loading {exp['backend']} backend ...")
        with EmbeddedServer(backend) as server:
            _say(f"  serving at {server.url}; sending {len(workload)} requests "
                 f"(warm-up {load.get('warmup', 0)}) ...")
            with _Progress(backend, len(workload)):
                result = run_load_sync(Target(server.url, send_prefix_id=True), workload, LoadMode(),
                                       warmup=int(load.get("warmup", 0)), seed=int(exp["workload"].get("seed", 0)),
                                       max_duration_s=load.get("max_duration_s"))
            summary = _summary(exp, plan, backend, result, server.load_report)
            requests, steps = _tables(backend, result)
        writer.write_requests(requests)
        writer.write_steps(steps)
        from reports.targets import targets_summary
        summary["targets"] = targets_summary(config, plan.to_dict(), summary, requests, steps, summary["source"])
        path = writer.finish(summary)
    return path, summary


def _summary(exp, plan, backend, result, load_report) -> dict:
    from harness import metrics
    summary = metrics.compute(result.frame())
    summary.update(result.dispatch_summary())
    source = "simulated" if exp["backend"] == "sim" else "measured"
    summary.update(source=source, backend=exp["backend"], strategy=plan.strategy, model=result.model,
                   predicted=plan.predicted)
    if summary.get("median_tpot_ms"):
        summary["decode_tokens_per_s"] = 1e3 / summary["median_tpot_ms"]
    if load_report is not None:
        summary["load_time_s"] = max(load_report.load_s_per_node.values(), default=0.0)
        summary["load"] = {"load_s_per_node": load_report.load_s_per_node,
                           "memory_bytes_per_node": load_report.memory_bytes_per_node, "source": load_report.source}
    stats = backend.stats()
    for key in ("cache", "preemptions", "kv_peak_fraction"):
        if key in stats:
            summary[key] = stats[key]
    return summary


def _tables(backend, result):
    """Request rows (labelled with where their timing comes from) and the backend's step rows."""
    from harness.commands.bench import _steps
    requests = result.frame()
    if getattr(backend, "name", "") == "sim":
        requests["source"] = "simulated"  # the simulated cluster's timing, paced in real time over HTTP
    return requests, _steps(backend, result)


class _Progress:
    """A status line on stderr once a second while the load runs: elapsed, running, waiting."""

    def __init__(self, backend, total: int):
        self.backend, self.total = backend, total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _loop(self):
        tty = sys.stderr.isatty()
        every = 1.0 if tty else 10.0   # a log file gets a line every 10 s, a terminal a live line
        while not self._stop.wait(every):
            s = self.backend.stats()
            line = (f"  {time.monotonic() - self._t0:6.1f} s  running {s.get('num_requests_running', 0):3d}"
                    f"  waiting {s.get('num_requests_waiting', 0):3d}  (of {self.total} requests)")
            sys.stderr.write(f"\r{line}   " if tty else line + "\n")
            sys.stderr.flush()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if sys.stderr.isatty():
            sys.stderr.write("\n")


def _say(text: str) -> None:
    print(text, flush=True)
