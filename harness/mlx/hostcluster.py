"""This host as N MLX ranks, written as a cluster file the simulator reads (ONE description for both sides).

Node i runs pipeline stage i (layer order); every node's chip is the `profile-host --ranks N` measurement of one
rank (its own BLAS threads and core pinning); every pair of ranks is joined by the measured loopback ring link.
Ranks beyond the core count share cores; each node names its pinned core (`cpu_core`). mlx-lm's pipeline runs
its stages one after another, so sharing costs little except where every rank works at once: the output head
after the all_gather, which the cost model prices k times over where k ranks share a core (`head_share`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from harness.runfolder import write_json_atomic
from harness.specs import PartitionPlan, Stage, UserError


def node_name(stage: int) -> str:
    return f"rank-stage{stage}"


def host_cluster(profile_path: str | Path, ranks: int, name: str | None = None) -> dict:
    """The cluster JSON dict (harness.catalog.parse_cluster shape); host_profile is referenced by file name, so
    keep the cluster file beside the profile file."""
    profile_path = Path(profile_path)
    prof = json.loads(profile_path.read_text())
    memory = math.floor(float(prof["chip"]["max_mem_gb"]) / ranks * 1000) / 1000   # never above the chip's
    nodes = [{"name": node_name(i), "host_profile": profile_path.name, "memory_gb": memory,
              "usable_fraction": 0.9, **_pinned_core(prof, i, ranks)} for i in range(ranks)]
    link = prof.get("link") or {}
    links = [{"a": node_name(i), "b": node_name(j), "kind": "loopback", **_measured(link)}
             for i in range(ranks) for j in range(i + 1, ranks)]
    rank = prof.get("rank", {})
    about = (f"this host ({prof.get('host', {}).get('cpu', 'cpu')}) as {ranks} MLX rank(s), measured by "
             f"profile-host --ranks {ranks}; {rank.get('ranks_per_core', 1)} rank(s) per core")
    return {"name": name or f"host-{ranks}ranks", "_about": about, "nodes": nodes, "links": links,
            "default_link": "loopback"}


def _pinned_core(prof: dict, rank: int, ranks: int) -> dict:
    """The core the launcher pins rank `rank` of `ranks` to (one process is not pinned): ranks naming the same
    core time-share it, which the cost model prices where every rank works at once (the output head)."""
    from harness.mlx.launcher import compute_env
    cores = int(prof.get("rank", {}).get("cores") or prof.get("host", {}).get("cpus") or 0)
    if cores < 1:
        return {}
    core = compute_env(rank, ranks, None, list(range(cores)), cores).get("HARNESS_CPU_CORE")   # the launcher's rule
    return {} if core is None else {"cpu_core": f"core{core}"}


def _measured(link: dict) -> dict:
    """The ring link's measured figures, where profile-host measured them (else links.json's loopback row)."""
    out = {}
    for key in ("latency_us", "bandwidth_gbps"):
        v = link.get(key)
        if isinstance(v, (int, float)) and v == v and v > 0:
            out[key] = float(v)
    return out


def host_plan(cluster: dict, split: list[int], model: str = "model", quant_bits: int = 16,
              tp: list[int] | None = None) -> PartitionPlan:
    """Stage i runs split[i] layers in layer order on the next tp[i] nodes (one each by default; more make a
    tensor-parallel group): what MlxBackend runs and the simulator prices."""
    nodes = [n["name"] for n in cluster["nodes"]]
    tp = list(tp or [1] * len(split))
    if len(tp) != len(split) or sum(tp) > len(nodes):
        raise UserError(f"split {split} has {len(split)} stages with TP degrees {tp}: {sum(tp)} ranks, but cluster "
                        f"{cluster['name']} has {len(nodes)}")
    if any(not isinstance(c, int) or c < 1 for c in [*split, *tp]):
        raise UserError(f"split {split}, tp {tp}: every stage needs at least one layer and one rank")
    stages, start, used = [], 0, 0
    for count, degree in zip(split, tp):
        members = tuple(nodes[used:used + degree])
        stages.append(Stage(nodes=members, layer_start=start, layer_end=start + count, tp_degree=degree))
        start, used = start + count, used + degree
    return PartitionPlan(strategy="manual", objective="latency", cluster=cluster["name"], model=model,
                         quant_bits=quant_bits, num_layers=start, stages=tuple(stages))


def write_host_files(profile: dict, out_dir: str | Path, ranks: int) -> Path:
    """profile-<N>ranks.json and cluster-<N>ranks.json side by side in out_dir (atomically); returns the cluster."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prof_path = write_json_atomic(out_dir / f"profile-{ranks}ranks.json", profile)
    return write_json_atomic(out_dir / f"cluster-{ranks}ranks.json", host_cluster(prof_path, ranks))
