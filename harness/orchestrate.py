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


def load_inputs(exp: dict):
    """The experiment's cluster, model and plan options (with the cost-model profile), read once per run."""
    from strategies.partitioning._plans import PlanOptions
    cluster = catalog.load_cluster(exp["cluster"])
    model = catalog.load_model(exp["model"], exp["quant"], exp["group_size"])
    options = PlanOptions(profile=load_profile(exp.get("profile")), objective=exp["objective"],
                          kv_reserve_tokens=exp["kv_reserve_tokens"])
    return cluster, model, options


def build_backend(exp: dict, cluster, model, profile, plan):
    match exp["backend"]:
        case "sim":
            from harness.backends.sim import SimBackend, SimBackendConfig
            from sim.engine import EngineConfig
            from sim.prefix_cache import make_prefix_cache
            cache = make_prefix_cache(exp.get("cache", "none"), cluster, model, plan, profile)
            return SimBackend(cluster, model, plan, profile, EngineConfig(), SimBackendConfig(model_id=model.name),
                              cache=cache)
        case "mlx":
            return _mlx_backend(exp, cluster, plan)
    raise UserError(f"unknown backend {exp['backend']!r}; choose sim or mlx")


def _mlx_backend(exp: dict, cluster, plan):
    """Real MLX ranks on this machine running the plan's split on a locally built scaled twin of the model:
    same layers and head layout, smaller width (harness.mlx.modelbuild), so the plan applies unchanged.
    [mlx] emulate_links = true puts each rank in its own network namespace with the cluster's link bandwidth
    (root, Linux); emulate_latency = true adds the link latency through delay relays."""
    from harness.backends.mlx import MlxBackend, links_for_plan
    from harness.mlx.modelbuild import build, twin_config
    opts = exp.get("mlx", {})
    model_dir = build(twin_config(exp["model"], head_dim=int(opts.get("head_dim", 16))), seed=int(opts.get("seed", 0))).path
    links = links_for_plan(plan, cluster) if opts.get("emulate_links") else None
    return MlxBackend(model_dir, plan, model_id=f"{exp['model']}-twin", max_running=int(opts.get("max_running", 16)),
                      links=links, emulate_latency=bool(opts.get("emulate_latency")) and links is not None)


def run_experiment(exp: dict, strategies: list[str], out_root: Path, report: bool = True) -> list[Outcome]:
    from harness.workloads import build_workload
    from strategies.registry import get_strategy
    workload = build_workload(exp["workload"])
    cluster, model, options = load_inputs(exp)
    profile = options.profile
    outcomes = []
    for i, strategy in enumerate(strategies, 1):
        _say(f"[{i}/{len(strategies)}] {strategy}: planning {exp['model']} ({exp['quant']}-bit) on {exp['cluster']}")
        try:
            plan = get_strategy(strategy)(cluster, model, options)
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

    Ctrl-C leaves the folder marked INCOMPLETE (harness.runfolder) and still renders its report, which says so.
    """
    from harness import runfolder
    writer = runfolder.RunWriter(out_root, f"{exp['name']}-{strategy}")
    try:
        return _serve_and_measure(writer, exp, strategy, plan, backend, workload)
    except KeyboardInterrupt:
        _say(f"\ninterrupted: {writer.path} is marked incomplete")
        if report:
            from reports import render
            _say(f"report of the incomplete run: {render([writer.path])}")
        raise


def _serve_and_measure(writer, exp, strategy, plan, backend, workload):
    from harness.serving.loadgen import LoadMode, Target, run_load_sync
    from harness.recording import finish_run, start_run
    from harness.serving.server import EmbeddedServer
    load = exp.get("load", {})
    with writer:
        config = {"command": "run", **exp, "strategy": strategy, "run_id": writer.run_id}
        plan_dict = start_run(writer, config, plan, {"backend": exp["backend"]})
        _say(f"  loading {exp['backend']} backend ...")
        with EmbeddedServer(backend) as server:
            _say(f"  serving at {server.url}; sending {len(workload)} requests "
                 f"(warm-up {load.get('warmup', 0)}) ...")
            with _Progress(backend, len(workload)) as progress:
                result = run_load_sync(Target(server.url, send_prefix_id=True), workload, LoadMode(),
                                       warmup=int(load.get("warmup", 0)), seed=int(exp["workload"].get("seed", 0)),
                                       max_duration_s=load.get("max_duration_s"), progress=progress.update)
            return finish_run(writer, config, plan_dict, result, backend, server.load_report, plan=plan)


class _Progress:
    """A status line on stderr while the load runs: elapsed, finished, running, waiting."""

    def __init__(self, backend, total: int):
        self.backend, self.total, self.done = backend, total, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def update(self, done: int, total: int) -> None:
        self.done = done

    def __enter__(self):
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _loop(self):
        tty = sys.stderr.isatty()
        every = 1.0 if tty else 10.0   # a terminal gets a live line, a log file a line every 10 s
        while not self._stop.wait(every):
            s = self.backend.stats()
            line = (f"  {time.monotonic() - self._t0:6.1f} s  finished {self.done}/{self.total}"
                    f"  running {s.get('num_requests_running', 0)}  waiting {s.get('num_requests_waiting', 0)}")
            sys.stderr.write(f"\r{line}   " if tty else line + "\n")
            sys.stderr.flush()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if sys.stderr.isatty():
            sys.stderr.write("\n")


def _say(text: str) -> None:
    print(text, flush=True)
