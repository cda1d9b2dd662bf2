"""`python -m harness validate`: the simulator's error against real MLX runs of the same requests."""
from __future__ import annotations

HELP = "run the same requests on real MLX ranks and in the simulator; report and gate the simulator's error"
DESCRIPTION = """Measure how far the simulator is from real MLX serving on this host.

For each topology in the validation file (this host as N ranks, with a layer split), it measures the host as
N ranks (profile-host --ranks N), starts the real mlx-lm ranks behind the embedded server, measures the
saturation rate (closed loop at max_running requests in flight), then sends Poisson loads at fractions of it
plus one overload point. Every real point is a run folder; the simulator replays its requests (same send
times, same token counts, same plan, batch limit and prefill chunk, mlx-lm's schedule) and the error
(simulated - measured) / measured of mean, p50, p90 and p99 TTFT, TPOT, ITL, E2E latency and throughput, plus
the per-request error (MAPE, joined on request id), goes to validation.json, a console table and report.html.
Exit code 1 when a below-saturation point is outside the file's [gate] limits.

examples:
  python -m harness validate                                    # runs/validate.toml (takes ~10 minutes)
  python -m harness validate --experiment runs/validate-ci.toml # the small CI validation
  python -m harness calibrate --from runs/out/<id>-validate --hold-out level=0.9 --out host-fitted.json
  python -m harness validate --from runs/out/<id>-validate --profile host-fitted.json   # re-simulate only"""


def add_arguments(p) -> None:
    p.add_argument("--experiment", default="runs/validate.toml", help="validation file (default %(default)s)")
    p.add_argument("--out", default="runs/out", help="where the validation folder goes (default %(default)s)")
    p.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="re-simulate the real points of an earlier validation folder (no real runs)")
    p.add_argument("--profile", default=None,
                   help="cost-model profile for the simulator side (default: the measured host profile)")
    p.add_argument("--hosts", default=None, metavar="DIR",
                   help="reuse host measurements (cluster-<N>ranks.json) from this folder instead of measuring")
    p.add_argument("--model-cache", default=None, help="where built models are cached")
    p.add_argument("--no-gate", action="store_true", help="report the error but always exit 0")
    p.add_argument("--no-report", action="store_true", help="skip report.html")


def run(args) -> int:
    import dataclasses
    import json
    import time
    from pathlib import Path

    from harness.validation import run as vr
    from harness.validation.spec import read_spec, spec_from_dict
    started = time.time()
    if args.from_dir:
        top = Path(args.from_dir)
        spec = spec_from_dict(json.loads((top / "validation.json").read_text())["spec"], f"{top}/validation.json") \
            if (top / "validation.json").exists() else read_spec(args.experiment)
    else:
        spec = read_spec(args.experiment)
        top = _measure(spec, args)
    spec_dict = _spec_dict(dataclasses.asdict(spec))
    trained = vr.trained_points(args.profile)
    points = [{**vr.compare_point(d, Path(args.profile) if args.profile else None), "in_fit": d.name in trained}
              for d in vr.point_dirs(top)]
    failures = vr.gate([p for p in points if not p["in_fit"]], spec.gate, spec.ttft_abs_ms)
    if trained:
        print(f"profile {args.profile} was fitted on {len(trained)} of these points: the gate judges the others "
              "(held out) only")
    path = vr.write_validation(top, spec_dict, points, failures, started)
    print(vr.console_table(points))
    _report(args, top)
    print(f"wrote {path}")
    return _verdict(failures, args.no_gate)


def _measure(spec, args):
    from harness import runfolder
    from harness.validation import run as vr
    from pathlib import Path
    top = Path(args.out) / runfolder.new_run_id(spec.name)
    (top / "points").mkdir(parents=True)
    model_path = vr.resolve_model(spec.model, args.model_cache)
    for topo in spec.topologies:
        cluster_path = vr.host_files(top / "hosts", topo.ranks, Path(args.hosts) if args.hosts else None)
        if cluster_path.parent != top / "hosts":   # reused: copy beside the points so the folder stands alone
            _copy_host(cluster_path, top / "hosts")
            cluster_path = top / "hosts" / cluster_path.name
        vr.run_topology(spec, topo, model_path, cluster_path, top / "points")
    return top


def _copy_host(cluster_path, hosts_dir) -> None:
    import json
    import shutil
    hosts_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(cluster_path, hosts_dir / cluster_path.name)
    for node in json.loads(cluster_path.read_text())["nodes"]:
        ref = node.get("host_profile")
        if ref and not (hosts_dir / ref).exists():
            shutil.copy(cluster_path.parent / ref, hosts_dir / ref)


def _spec_dict(d: dict) -> dict:
    """The spec in the validation file's own shape, so --from can read it back."""
    work = ("prompt_tokens", "output_tokens", "requests_per_level", "seed")
    load = ("saturation_requests", "levels", "overload")
    return {"name": d["name"], "model": d["model"], "max_running": d["max_running"],
            "prefill_step_size": d["prefill_step_size"], "ttft_abs_ms": d["ttft_abs_ms"],
            "topologies": [{"name": t["name"], "split": list(t["split"]), **({"tp": list(t["tp"])} if t["tp"] else {})}
                           for t in d["topologies"]],
            "workload": {k: (list(d[k]) if isinstance(d[k], (tuple, list)) else d[k]) for k in work},
            "load": {k: (list(d[k]) if k == "levels" else d[k]) for k in load},
            "gate": d["gate"]}


def _report(args, top) -> None:
    if args.no_report:
        return
    from reports.validation import render_validation
    print(f"report: {render_validation(top)}")


def _verdict(failures: list[str], no_gate: bool) -> int:
    if not failures:
        print("fidelity gate: passed")
        return 0
    head = "fidelity gate (not enforced: --no-gate): outside the limits" if no_gate else "fidelity gate: FAILED"
    print(head + "\n" + "\n".join(f"  {f}" for f in failures))
    return 0 if no_gate else 1
