"""`harness validate`: the same requests on real MLX ranks and in the simulator, from ONE description of the
cluster (this host as N ranks, measured by `profile-host --ranks N`), and the error between them.

Per topology: start the real ranks behind the embedded server; measure the saturation rate (closed loop at
max_running); send Poisson loads at fractions of it and one overload point. Each real point is a run folder
(points/<topology>-<level>/); the simulator then replays that point's requests (the measured send times, the
same token counts, the same plan, batch limit and prefill chunk, mlx-lm's schedule) and the comparison lands in
validation.json at the top. `resimulate` repeats only the simulator side with another profile.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harness.specs import UserError
from harness.validation import compare
from harness.validation.spec import Topology, ValidationSpec

SCHEMA = "harness.validation/1"


# ----------------------------------------------------------------------------------------------- model
def resolve_model(name: str, cache_dir=None) -> Path:
    """A local mlx-lm model folder: a path as given, or a modelbuild size built (once) into the model cache."""
    from harness.mlx import modelbuild
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        return path
    if name in modelbuild.SIZES:
        return modelbuild.build(modelbuild.qwen2_config(name), cache_dir=cache_dir).path
    raise UserError(f"model {name!r}: not a folder with config.json nor a size ({', '.join(modelbuild.SIZES)})")


def model_bits(config: dict) -> int:
    """Bits per weight the cost model should price: the quantization's, else the stored dtype's."""
    q = config.get("quantization") or {}
    if q.get("bits"):
        return int(q["bits"])
    return 32 if str(config.get("torch_dtype", "float16")) == "float32" else 16


# ----------------------------------------------------------------------------------------------- host
def host_files(hosts_dir: Path, ranks: int, reuse: Path | None = None) -> Path:
    """The cluster file of this host as `ranks` ranks (with its per-rank profile beside it): measured now,
    or taken from `reuse` (a folder holding cluster-<N>ranks.json from an earlier validate)."""
    name = f"cluster-{ranks}ranks.json"
    if reuse is not None and (Path(reuse) / name).exists():
        return Path(reuse) / name
    from harness.mlx import hostcluster, profile
    print(f"measuring this host as {ranks} rank(s) (profile-host --ranks {ranks}, about a minute) ...", flush=True)
    return hostcluster.write_host_files(profile.profile_host(ranks=ranks), hosts_dir, ranks)


# ----------------------------------------------------------------------------------------------- real side
def level_label(level) -> str:
    return "saturation" if level == "saturation" else f"{float(level):g}"


def _workload(spec: ValidationSpec, n: int, rate: float, seed: int):
    from harness.workloads import build_workload
    arrival = {"process": "poisson", "rate": rate} if rate > 0 else {"process": "poisson", "rate": 1.0}
    return build_workload({"kind": "synthetic", "num_requests": n, "seed": seed, "arrival": arrival,
                           "prompt": prompt_lengths(spec.prompt_tokens),
                           "output": {"dist": "fixed", "value": spec.output_tokens}})


def prompt_lengths(tokens) -> dict:
    """A fixed prompt length, or uniform over [low, high]."""
    if isinstance(tokens, tuple):
        return {"dist": "uniform", "low": tokens[0], "high": tokens[-1]}
    return {"dist": "fixed", "value": tokens}


def run_topology(spec: ValidationSpec, topo: Topology, model_path: Path, cluster_path: Path, points_dir: Path) -> list[Path]:
    """Every load point of one topology on real ranks; returns the point folders in the order they ran."""
    from harness.backends.mlx import MlxBackend
    from harness.serving.server import EmbeddedServer
    from harness.mlx.hostcluster import host_plan
    cluster_data = json.loads(Path(cluster_path).read_text())
    plan = host_plan(cluster_data, list(topo.split), tp=list(topo.degrees))
    backend = MlxBackend(model_path, plan, max_running=spec.max_running, prefill_step_size=spec.prefill_step_size,
                         model_id=model_path.name)
    vocab = int(backend.config["vocab_size"])
    context = {"topology": topo.name, "cluster": cluster_data, "model_config": backend.config,
               "model_name": model_path.name, "quant_bits": model_bits(backend.config)}
    with EmbeddedServer(backend) as server:
        print(f"{topo.name}: {topo.ranks} real rank(s), split {list(topo.split)}"
              + (f", TP {list(topo.tp)}" if topo.tp else "") + f", server {server.url}", flush=True)
        sat_dir, sat_rate = _saturation(spec, topo, server, vocab, context, points_dir)
        dirs = [sat_dir]
        for k, level in enumerate([*spec.levels, *([spec.overload] if spec.overload else [])]):
            wl = _workload(spec, spec.requests_per_level, level * sat_rate, spec.seed + 1 + k)
            dirs.append(_point(spec, topo, server, vocab, context, points_dir, level, wl, "workload", 0.0, sat_rate))
    return dirs


def _saturation(spec, topo, server, vocab, context, points_dir) -> tuple[Path, float]:
    """The closed-loop point at max_running in flight: its measured request rate is the saturation rate."""
    wl = _workload(spec, spec.saturation_requests, 0.0, spec.seed)
    path = _point(spec, topo, server, vocab, context, points_dir, "saturation", wl, "concurrent",
                  float(spec.max_running), None, warmup=2)
    rate = json.loads((path / "summary.json").read_text())["metrics"]["request_throughput"]
    if not rate or not rate > 0:
        raise UserError(f"{topo.name}: the saturation point completed no request; see {path}")
    print(f"{topo.name}: measured saturation rate {rate:.3f} requests/s (closed loop, {spec.max_running} in flight)",
          flush=True)
    return path, float(rate)


def _point(spec, topo, server, vocab, context, points_dir, level, workload, kind, value, sat_rate, warmup=1) -> Path:
    from harness.commands.bench import record_run
    from harness.serving.loadgen import LoadMode, Target, run_load_sync
    target = Target(server.url, prompt_vocab=vocab)
    mode = LoadMode(kind, value, spec.seed)
    rate = None if sat_rate is None else float(level) * sat_rate
    config = {"command": "validate", "target": "embedded", "strategy": "manual", "mode": {"kind": kind, "value": value},
              "workload": workload.spec,
              "validation": {**context, "level": level_label(level), "rate_rps": rate, "max_running": spec.max_running,
                             "prefill_step_size": spec.prefill_step_size, "split": list(topo.split),
                             "tp": list(topo.degrees)}}
    label = f"{topo.name}-{level_label(level)}"
    print(f"  {label}: {len(workload)} requests" + (f" at {rate:.3f}/s (Poisson)" if rate else f", {value:g} in flight"),
          flush=True)
    path, _ = record_run(points_dir, label, lambda sink: run_load_sync(target, workload, mode, warmup=warmup,
                                                                       seed=spec.seed, sink=sink),
                         config, backend=server_backend(server), load_report=server.load_report, run_id=label)
    return path


def server_backend(server):
    return server.app.state.harness.backend


# ----------------------------------------------------------------------------------------------- simulated side
def simulate_point(real: pd.DataFrame, mode: dict, v: dict, sample: tuple, profile) -> pd.DataFrame:
    """Replay a real point in the simulator: the same requests (measured send times, token counts), the same
    plan, batch limit and prefill chunk, on the host cluster the point recorded (`sample` from fit.load_point)."""
    from sim.engine import EngineConfig
    from sim.run import simulate
    _, plan, model, cluster = sample
    engine = EngineConfig(scheduler="mlx-lm", max_num_seqs=v["max_running"], prefill_step_tokens=v["prefill_step_size"],
                          prefill_batch=8, micro_batches=1)
    result = simulate(cluster, model, plan, profile, replay_workload(real, mode), engine, include_load=False)
    return result.requests.to_pandas()


def node_profile(v: dict, point_dir: Path) -> Path:
    """The measured host profile of the point's first node: the simulator's default profile."""
    from harness.validation import fit
    return Path(fit.resolve_host_profiles(v["cluster"], point_dir)["nodes"][0]["host_profile"])


def replay_workload(real: pd.DataFrame, mode: dict):
    """The real point's requests as a simulator workload, in request-id order: open loop at the measured send
    times, or closed loop at the same concurrency."""
    from harness.workloads import Workload
    real = real.sort_values("request_id")
    start = np.maximum.accumulate(real["start_s"].to_numpy(float))   # send jitter may reorder by microseconds
    closed = mode.get("kind") == "concurrent"
    return Workload(spec={"kind": "replay"}, arrival_s=start - (start[0] if len(start) else 0.0),
                    prompt_tokens=real["prompt_tokens"].to_numpy(np.int64).clip(min=1),
                    output_tokens=np.maximum(real["output_tokens"].to_numpy(np.int64), 1),
                    closed_loop=closed, concurrency=int(mode.get("value") or 0) if closed else 0)


# ----------------------------------------------------------------------------------------------- comparison
def compare_point(point_dir: Path, profile_path: Path | None = None) -> dict:
    """One real point against its replay, plus its per-step components (stage compute, measured vs the cost
    model); the point is read once for both."""
    from harness.costmodel import load_profile
    from harness.validation import components, fit
    v, sample = fit.load_point(point_dir)
    profile = load_profile(profile_path or node_profile(v, point_dir))
    real = pd.read_parquet(point_dir / "requests.parquet")
    mode = json.loads((point_dir / "config.json").read_text())["mode"]
    sim = simulate_point(real, mode, v, sample, profile)
    sim.to_parquet(point_dir / "sim-requests.parquet")
    return {"point": point_dir.name, "topology": v["topology"], "level": v["level"], "rate_rps": v.get("rate_rps"),
            "profile": profile.name, **compare.compare(real, sim),
            "components": components.component_errors(*sample, profile)}


def trained_points(profile_path) -> set[str]:
    """The points a `calibrate --from` profile was fitted on (its fit.trained_points): judging the simulator on
    them would be in-sample."""
    if not profile_path:
        return set()
    try:
        data = json.loads(Path(profile_path).read_text())
    except (OSError, ValueError):
        return set()      # load_profile reports an unreadable profile with the right message
    return set(((data.get("fit") or {}).get("trained_points")) or [])


def point_dirs(top: Path) -> list[Path]:
    dirs = sorted((p for p in (Path(top) / "points").glob("*") if (p / "config.json").exists()),
                  key=lambda p: p.stat().st_mtime)
    if not dirs:
        raise UserError(f"{top}: no validation points under points/; run `python -m harness validate` first")
    return dirs


def gate(result_points: list[dict], spec_gate: dict, ttft_abs_ms: float) -> list[str]:
    """Failures of the fidelity gate: below-saturation points whose |error| exceeds a limit."""
    failures = []
    for p in result_points:
        if p["level"] == "saturation" or float(p["level"]) >= 1:
            continue
        for key, limit in spec_gate.items():
            e = p["errors"][key]
            if math.isnan(e["error_pct"] if e["error_pct"] is not None else math.nan):
                failures.append(f"{p['point']}: {key} has no value on one side")
            elif abs(e["error_pct"]) > limit and not _ttft_close(key, e, ttft_abs_ms):
                failures.append(f"{p['point']}: {key} error {e['error_pct']:+.1f} % (limit ±{limit:g} %; measured "
                                f"{e['measured']:.2f}, simulated {e['simulated']:.2f})")
    return failures


def _ttft_close(key: str, e: dict, abs_ms: float) -> bool:
    return "ttft" in key and e["measured"] < 50 and abs(e["simulated"] - e["measured"]) <= abs_ms


def write_validation(top: Path, spec_dict: dict, points: list[dict], failures: list[str], started: float) -> Path:
    doc = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "wall_s": time.time() - started, "spec": spec_dict, "points": points,
           "gate": {"limits": spec_dict.get("gate"), "failures": failures, "passed": not failures},
           "sources": {"measured": "real mlx-lm ranks on this host, timed at the HTTP client",
                       "simulated": "sim.run.simulate replaying the same requests"}}
    from harness.runfolder import write_json_atomic
    path = top / "validation.json"
    if path.exists():
        path.replace(top / "validation.previous.json")   # the figures before a re-simulation stay readable
    return write_json_atomic(path, doc)


def console_table(points: list[dict]) -> str:
    from harness.cli import text_table
    keys = ("median_ttft_ms", "mean_tpot_ms", "mean_e2el_ms", "p99_e2el_ms", "output_throughput")
    head = ("point", "rate/s", *(f"{k} real|sim|err" for k in keys), "MAPE e2e")
    rows = [head]
    for p in points:
        cells = []
        for k in keys:
            e = p["errors"][k]
            cells.append(_cell(e))
        rate = "-" if p.get("rate_rps") is None else f"{p['rate_rps']:.3f}"
        name = p["point"] + (" (fit)" if p.get("in_fit") else "")
        rows.append((name, rate, *cells, _pct(p["per_request"]["e2el"]["mape_pct"])))
    note = "; (fit) = a point the profile was fitted on (in-sample)" if any(p.get("in_fit") for p in points) else ""
    return ("measured (real MLX ranks) vs simulated (same requests); err = (sim - real) / real" + note + "\n"
            + text_table(rows))


def _cell(e: dict) -> str:
    m, s = e.get("measured"), e.get("simulated")
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"
    return f"{fmt(m)}|{fmt(s)}|{_pct(e.get('error_pct'))}"


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.1f}%"

