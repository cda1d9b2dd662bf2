"""`python -m harness sweep FILE`: a grid of simulations (strategy x cluster x link x rate x cache x model ...)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from harness.specs import UserError

HELP = "run a grid of simulations from a TOML file (process pool or Ray), resumable, with one report"
DESCRIPTION = """Run every point of a sweep file's grid as a `harness simulate` run, by a local process pool
(default) or by Ray (--executor ray: a local Ray cluster, or --ray-address for an existing one), into one
folder: <out>/<name>/points/<point-id>/ (ordinary run folders), results.csv and results.parquet (one row per
point), sweep.json (schema harness.sweep/1: the file, the environment, each point's outcome) and report.html
(the sweep's plots and table). Every metric is simulated.

Running the same file into the same folder again resumes it: finished points are not run again (an
interrupted point is run again from scratch). Progress is printed as points finish.

sweep file:
  name = "links-and-rates"
  [base]                      # `harness simulate` options, underscores for dashes
  cluster = "mixed"
  model = "llama-3.1-70b"
  workload = "poisson,rate=0.1,n=100,prompt=512,output=128"
  slo = "ttft:5000 tpot:150"
  [grid]                      # each a list; every combination is a point; rate sets the workload's arrival rate
  strategy = ["uniform", "hybrid_optimal"]
  link = ["tb5-rdma", "10gbe"]
  rate = [0.05, 0.1, 0.2]

examples:
  python -m harness sweep runs/sweeps/links.toml
  python -m harness sweep runs/sweeps/links.toml --executor ray --workers 2"""


def add_arguments(p) -> None:
    p.add_argument("file", help="sweep TOML file (see above)")
    p.add_argument("--out", default="runs/out", help="folder that receives <name>/ (default %(default)s)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: a process pool on this machine; ray: Ray tasks (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes of the local pool (default %(default)s: this machine's cores, at most 4)")
    p.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (e.g. ray://head:10001); default: start a local one")
    p.add_argument("--no-report", action="store_true", help="skip report.html (render later with `harness report`)")


def run(args) -> int:
    from harness import sweep as sw
    if args.workers < 1:
        raise UserError(f"--workers: found {args.workers}; allowed: 1 or more")
    spec = sw.load_sweep(args.file)
    folder = Path(args.out) / spec["name"]
    points_dir = folder / "points"
    check_same_sweep(folder, spec)
    points_dir.mkdir(parents=True, exist_ok=True)
    points = sw.expand(spec)
    todo = [p for p in points if not sw.point_done(points_dir, p["id"])]
    again = sum(sw.clear_unfinished(points_dir, p["id"]) for p in todo)
    print(f"sweep {spec['name']}: {len(points)} points, {len(points) - len(todo)} already done"
          + (f", {again} interrupted earlier and run again" if again else "") + f"; folder {folder}")
    outcomes: dict = {}
    try:
        run_points(sw, todo, points_dir, args, outcomes)
    finally:   # after Ctrl-C too: the table lists what finished, and the same command resumes the rest
        write_results(sw, spec, folder, points_dir, outcomes)
    if not args.no_report:
        from reports.sweep import render_sweep
        print(f"report: {render_sweep(folder)}")
    failed = [o for o in outcomes.values() if o["status"] != "complete"]
    return 1 if failed else 0


def check_same_sweep(folder: Path, spec: dict) -> None:
    """Resuming into a folder that holds another sweep would mix two grids' points: refuse it."""
    saved = folder / "sweep.json"
    if not saved.exists():
        return
    old = json.loads(saved.read_text()).get("sweep", {})
    if (old.get("base"), old.get("grid")) != (spec["base"], spec["grid"]):
        raise UserError(f"{folder} holds a sweep with other settings; give another --out, or remove the folder")


def run_points(sw, todo: list[dict], points_dir: Path, args, outcomes: dict) -> None:
    """Fill `outcomes` with every point's outcome by id, printing a line as each finishes."""
    mapper = sw.ray_map(todo, points_dir, args.ray_address) if args.executor == "ray" \
        else sw.local_map(todo, points_dir, args.workers)
    values = {p["id"]: p["values"] for p in todo}
    t0 = time.perf_counter()
    for i, outcome in enumerate(mapper, 1):
        outcomes[outcome["id"]] = outcome
        shown = " ".join(f"{k}={v}" for k, v in values[outcome["id"]].items())
        tail = f": {outcome['error']}" if outcome["error"] else ""
        print(f"[{i}/{len(todo)}] {shown}: {outcome['status']} in {outcome['wall_s']:.1f} s "
              f"(elapsed {time.perf_counter() - t0:.0f} s){tail}", flush=True)


def write_results(sw, spec: dict, folder: Path, points_dir: Path, outcomes: dict) -> None:
    """results.csv / results.parquet and sweep.json, each written whole (a temporary file, then renamed)."""
    import pandas as pd
    from harness.runfolder import environment, write_json_atomic
    rows = sw.results_rows(spec, points_dir)
    table = pd.DataFrame(rows)
    _replace(folder / "results.csv", lambda tmp: table.to_csv(tmp, index=False))
    _replace(folder / "results.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    body = {"schema_version": sw.SCHEMA, "source": "simulated", "argv": sys.argv[1:],
            "sweep": {k: spec[k] for k in ("name", "base", "grid")}, "environment": environment({"backend": "sim"}),
            "points": rows, "last_outcomes": list(outcomes.values())}
    write_json_atomic(folder / "sweep.json", body)
    done = sum(r["status"] == "complete" for r in rows)
    print(f"results: {done} of {len(rows)} points complete; {folder / 'results.csv'}")


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
