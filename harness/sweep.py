"""Sweeps: a grid of simulations from one TOML file, run by a local process pool or by Ray, into one folder.

A sweep file has a [base] table of `harness simulate` settings (option names with underscores: cluster, model,
quant, strategy, objective, link, add_node, cache, workload, slo, seed, max_num_seqs, ...) and a [grid] table
whose every key is a list of values for one such setting, plus `rate` (the workload's arrival rate); every
combination of the grid's values is one point. Each point is an ordinary `simulate` run folder under
<sweep>/points/<point-id>/, so any point re-renders or is checked like any other run.

A point's id is a digest of its settings, so running the same file again into the same folder resumes it: a
point whose folder is complete is not run again; one that was interrupted is run again from scratch.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import shutil
import time
from pathlib import Path

from harness.specs import UserError, of_type, reject_unknown

SCHEMA = "harness.sweep/1"
FILE_KEYS = ("name", "base", "grid")
MAX_POINTS = 10_000
RESULT_METRICS = ("completed", "failed", "request_throughput", "output_throughput", "median_ttft_ms",
                  "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_e2el_ms", "request_goodput")
# settings a sweep may not set: where each point's folder goes is the sweep's business
RESERVED = ("out", "run_id", "quiet", "timing")


def load_sweep(path: str | Path) -> dict:
    """The sweep file as {name, base, grid}, checked: unknown keys, empty or non-list grid values, bad settings."""
    from harness.experiment import read_toml
    path = Path(path)
    data = read_toml(path, "sweep")
    origin = f"sweep file {path}"
    reject_unknown(data, FILE_KEYS, origin)
    base, grid = data.get("base", {}), data.get("grid", {})
    of_type(base, dict, f"{origin}: [base]", "a table")
    of_type(grid, dict, f"{origin}: [grid]", "a table")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{origin}: [grid].{key}: expected a non-empty list of values, got {values!r}")
    sweep = {"name": str(data.get("name", path.stem)), "base": base, "grid": grid, "origin": origin}
    for point in expand(sweep):
        simulate_args(point["settings"], origin)   # every point's settings parse before anything runs
    return sweep


def expand(sweep: dict) -> list[dict]:
    """Every combination of the grid's values over the base: [{id, values, settings}] in grid order."""
    keys = list(sweep["grid"])
    combos = list(itertools.product(*(sweep["grid"][k] for k in keys)))
    if len(combos) > MAX_POINTS:
        raise UserError(f"{sweep['origin']}: [grid] makes {len(combos)} points; allowed: at most {MAX_POINTS}")
    points = []
    for combo in combos:
        values = dict(zip(keys, combo))
        settings = {**sweep["base"], **values}
        points.append({"id": point_id(settings), "values": values, "settings": settings})
    return points


def point_id(settings: dict) -> str:
    """A stable name for a point's folder: the same settings give the same id in every run of the sweep."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def simulate_args(settings: dict, origin: str = "sweep"):
    """The settings as `harness simulate`'s parsed arguments (its parser checks each value), the workload as
    a dict with the point's rate. Raises UserError naming the setting."""
    from harness.cli import build_parser
    from harness.workloads import parse_workload
    parser = build_parser()
    sim = parser._subparsers._group_actions[0].choices["simulate"]
    known = {a.dest: a for a in sim._actions if a.dest != "help"}
    argv = []
    for key, value in settings.items():
        if key == "rate":
            continue
        if key not in known or key in RESERVED:
            choices = ", ".join(sorted(k for k in known if k not in RESERVED))
            raise UserError(f"{origin}: setting {key!r} is not a `simulate` option; known: rate, {choices}")
        argv += _flag(known[key], value, origin, key)
    try:
        args = sim.parse_args(argv)
    except SystemExit:
        raise UserError(f"{origin}: these settings do not parse as `simulate` options: {' '.join(argv)}") from None
    spec = parse_workload(args.workload) if isinstance(args.workload, str) else args.workload
    if "rate" in settings:
        spec = with_rate(spec, settings["rate"], origin)
    args.workload, args.quiet = spec, True
    return args


def _flag(action, value, origin: str, key: str) -> list[str]:
    """One setting as command-line words: a switch for a boolean, the flag once per value of a repeatable one."""
    import argparse
    flag = action.option_strings[-1]
    if action.nargs == 0:          # store_true: the setting is a boolean
        of_type(value, bool, f"{origin}: {key}", "true or false")
        return [flag] if value else []
    repeatable = isinstance(action, argparse._AppendAction)
    values = value if repeatable and isinstance(value, list) else [value]
    return [part for v in values for part in (flag, str(v))]


def with_rate(spec: dict, rate, origin: str) -> dict:
    """The workload with its arrival rate set (open-loop workloads only: a closed loop has no rate)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise UserError(f"{origin}: rate: expected requests/s > 0, got {rate!r}")
    arrival = spec.get("arrival")
    if not isinstance(arrival, dict) or "rate" not in arrival:
        raise UserError(f"{origin}: rate: the base workload has no arrival rate to set (closed loop or trace); "
                        "use a poisson or constant workload")
    return {**spec, "arrival": {**arrival, "rate": float(rate)}}


# ----------------------------------------------------------------------------------------------- running
def run_point(point: dict, points_dir: str) -> dict:
    """Simulate one point into points_dir/<id>/; its console output goes to points_dir/<id>.log. Returns the
    outcome: {id, status, wall_s, error}. Runs in a worker process (pool or Ray)."""
    from harness.commands.simulate import run_one
    from harness.specs import DoesNotFit
    t0 = time.perf_counter()
    log = io.StringIO()
    status, error = "complete", None
    try:
        args = simulate_args(point["settings"])
        args.out, args.run_id = points_dir, point["id"]
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = run_one(args)
        if code:
            status = "failed requests"
    except (UserError, DoesNotFit) as exc:
        status, error = "error", str(exc)
    Path(points_dir, f"{point['id']}.log").write_text(log.getvalue() + (f"error: {error}\n" if error else ""))
    return {"id": point["id"], "status": status, "wall_s": time.perf_counter() - t0, "error": error}


def point_done(points_dir: Path, pid: str) -> bool:
    """A point counts as done when its run folder is complete (summary.json there, no INCOMPLETE marker)."""
    from harness.runfolder import MARKER
    folder = points_dir / pid
    return (folder / "summary.json").exists() and not (folder / MARKER).exists()


def clear_unfinished(points_dir: Path, pid: str) -> bool:
    """Remove the folder of a point an earlier attempt did not finish, so it runs again; True if there was one."""
    folder = points_dir / pid
    if folder.exists() and not point_done(points_dir, pid):
        shutil.rmtree(folder)
        return True
    return False


def local_map(points: list[dict], points_dir: Path, workers: int):
    """Yield outcomes as points finish, from a pool of `workers` processes (in this process when 1)."""
    if workers == 1:
        for p in points:
            yield run_point(p, str(points_dir))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_point, p, str(points_dir)) for p in points]
        for future in as_completed(futures):
            yield future.result()


def ray_map(points: list[dict], points_dir: Path, address: str | None):
    """Yield outcomes as points finish, each point a Ray task (a local Ray cluster unless `address` names one;
    on several machines the sweep folder must be on storage every node sees)."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'ray>=2.9' (or pip install -e '.[ray]')") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(run_point)
        where = str(points_dir.resolve())   # a Ray worker need not share this process's working directory
        pending = [task.remote(p, where) for p in points]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------- results
def results_rows(sweep: dict, points_dir: Path) -> list[dict]:
    """One row per point of the grid: its grid values, status and the headline metrics (simulated)."""
    rows = []
    for point in expand(sweep):
        row = {"point": point["id"], **{k: _cell(v) for k, v in point["values"].items()}}
        summary_path = points_dir / point["id"] / "summary.json"
        if point_done(points_dir, point["id"]):
            metrics = json.loads(summary_path.read_text()).get("metrics", {})
            row.update(status="complete", **{m: metrics.get(m) for m in RESULT_METRICS})
        else:
            row.update(status=_log_error(points_dir, point["id"]) or "not run", **{m: None for m in RESULT_METRICS})
        rows.append(row)
    return rows


def _cell(value):
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


def _log_error(points_dir: Path, pid: str) -> str | None:
    log = points_dir / f"{pid}.log"
    if not log.exists():
        return None
    errors = [l for l in log.read_text().splitlines() if l.startswith("error: ")]
    return errors[-1] if errors else None
