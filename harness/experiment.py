"""Experiment files (`runs/NAME.toml`): everything one `harness run` needs, with flags that override it.

Top-level keys: name, backend, cluster, model (a preset, a config.json or parameter counts such as
"params=70b,layers=80"), quant (4, 4.5 bits per weight or "mixed:4/6"), group_size, strategy, objective, cache,
cache_l4_gb (tiered_lru's L4 tier in GB: network storage or a peer Mac's memory), kv_reserve_tokens,
profile (a cost-model profile name or file; default: the fitted one), link (what if every
link were this kind), add_nodes (a list of "CHIP[/CORES]:MEM" Macs added to the cluster) and failover (after
a [[faults]] node_down or permanent link_down in the sim backend, or a rank that dies or stalls on real ranks: plan
again on the nodes left, reload, and serve on); tables: [workload] (harness.workloads dict), [load] (warmup, max_duration_s),
[[targets]] (reports.targets format), [mlx] (options of the real backend), [[faults]] (sim backend only:
{kind = "node_down" | "straggler" | "slow_link" | "link_down", node, peer (slow_link, link_down), at_s (after serving
starts), factor (straggler, slow_link), duration_s (link_down: back after it; without it, dropped for good)}). Unknown keys are errors, so a
typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from harness.backends import BACKEND_NAMES
from harness.specs import (MAX_HEADS, UserError, integer_in, number_in, of_type, parse_file, quant_value,
                           reject_unknown)
from harness.workloads import check_workload

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "runs" / "default.toml"
SCALARS = {"name": str, "backend": str, "cluster": str, "model": str, "quant": (int, float, str),
           "group_size": int, "strategy": str, "objective": str, "cache": str, "cache_l4_gb": (int, float),
           "kv_reserve_tokens": int, "profile": str, "link": str, "failover": bool}
TABLES = {"workload": dict, "load": dict, "targets": list, "mlx": dict, "faults": list, "add_nodes": list}
FAULT_KINDS = ("node_down", "straggler", "slow_link", "link_down")
FAULT_KEYS = ("kind", "node", "peer", "at_s", "factor", "duration_s")
# per kind: (the keys it needs, those it may have); any other key would be silently ignored, so it is refused
FAULT_KIND_KEYS = {"node_down": (("node", "at_s"), ("factor",)),      # factor: tolerated, as it always was
                   "straggler": (("node", "at_s", "factor"), ()),
                   "slow_link": (("node", "peer", "at_s", "factor"), ()),
                   "link_down": (("node", "peer", "at_s"), ("duration_s",))}
MLX_OPTIONS = ("head_dim", "seed", "max_running", "emulate_links", "emulate_latency", "hostfile")
LOAD_KEYS = ("warmup", "max_duration_s")     # what harness.orchestrate reads from [load]
MAX_KV_RESERVE_TOKENS = 1 << 24
MAX_WARMUP = 10_000
MAX_DURATION_S = 7 * 24 * 3600.0             # a week: anything longer is a typo, not an experiment
TARGET_KEYS = ("name", "metric", "op", "value", "unit", "note")   # the fields of reports.targets.Target


def load_experiment(path: str | Path | None = None) -> dict:
    """The experiment as a dict: the default file's values, overlaid with the given file's."""
    base = _read(DEFAULT_FILE)
    if path is None:
        return base
    own = _read(Path(path))
    merged = copy.deepcopy(base)
    for key, value in own.items():
        merged[key] = value     # a table given in the file replaces the default table whole
    return merged


def _read(path: Path) -> dict:
    data = read_toml(path, "experiment")
    check_experiment(data, f"experiment file {path}")
    return data


def read_toml(path: Path, what: str) -> dict:
    """A TOML file as a dict; UserError (one line) for a missing, huge, non-UTF-8, invalid or too deep file."""
    return parse_file(path, what, tomllib.loads, tomllib.TOMLDecodeError, "TOML", "tables")


def check_experiment(data: dict, origin: str) -> None:
    """Unknown keys at any depth and wrongly typed values are errors naming the file and the key path."""
    reject_unknown(data, list(SCALARS) + list(TABLES), origin)
    for key, value in data.items():
        kind = SCALARS.get(key) or TABLES[key]
        if key in ("quant", "cache_l4_gb"):   # 4, 4.5 or "mixed:4/6"; a number: checked with the value below
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{origin}: {key} must be {kind.__name__}, got {value!r}")
    _check_scalar_ranges(data, origin)
    _check_tables(data, origin)
    if data.get("backend", "sim") not in BACKEND_NAMES:   # every backend runs an experiment (instant ignores the plan)
        raise UserError(f"{origin}: backend must be one of {', '.join(BACKEND_NAMES)}, got {data['backend']!r}")


def _check_scalar_ranges(data: dict, origin: str) -> None:
    if "quant" in data:
        quant_value(data["quant"], f"{origin}: quant")
    if "group_size" in data and data["group_size"] not in (32, 64, 128):
        raise UserError(f"{origin}: group_size: found {data['group_size']}; allowed: 32, 64 or 128")
    if "kv_reserve_tokens" in data:
        integer_in(data["kv_reserve_tokens"], f"{origin}: kv_reserve_tokens", 0, MAX_KV_RESERVE_TOKENS)
    if "cache_l4_gb" in data:
        number_in(data["cache_l4_gb"], f"{origin}: cache_l4_gb", 0.0, 1e6, low_open=False)


def _check_load(load: dict, origin: str) -> None:
    """A negative or zero duration would send nothing and still report the run complete: refuse it here."""
    reject_unknown(load, LOAD_KEYS, origin, "[load]")
    if "warmup" in load:
        integer_in(load["warmup"], f"{origin}: [load].warmup", 0, MAX_WARMUP)
    if "max_duration_s" in load:
        number_in(load["max_duration_s"], f"{origin}: [load].max_duration_s", 0.0, MAX_DURATION_S)


def _check_mlx(mlx: dict, origin: str) -> None:
    reject_unknown(mlx, MLX_OPTIONS, origin, "[mlx]")
    ranges = {"head_dim": (1, MAX_HEADS), "seed": (0, 2**32 - 1), "max_running": (1, 4096)}
    for key, (low, high) in ranges.items():
        if key in mlx:
            integer_in(mlx[key], f"{origin}: [mlx].{key}", low, high)
    for key in ("emulate_links", "emulate_latency"):
        if key in mlx:
            of_type(mlx[key], bool, f"{origin}: [mlx].{key}", "true or false")
    if "hostfile" in mlx:
        of_type(mlx["hostfile"], str, f"{origin}: [mlx].hostfile", "the path of an mlx.launch hosts.json")


def _check_faults(faults: list, origin: str) -> None:
    for i, fault in enumerate(faults):
        where = f"{origin}: [[faults]][{i}]"
        of_type(fault, dict, where, "a table")
        reject_unknown(fault, FAULT_KEYS, origin, f"[[faults]][{i}]")
        if fault.get("kind") not in FAULT_KINDS:
            raise UserError(f"{where}.kind: found {fault.get('kind')!r}; allowed: {', '.join(FAULT_KINDS)}")
        _check_fault_keys(fault, where)
        for key in ("node", "peer"):
            if key in fault:
                of_type(fault[key], str, f"{where}.{key}", "a node name")
        if fault.get("peer") is not None and fault["peer"] == fault["node"]:
            raise UserError(f"{where}.peer: found {fault['peer']!r}; allowed: a node other than node (a link's other end)")
        number_in(fault["at_s"], f"{where}.at_s", 0.0, MAX_DURATION_S, low_open=False)
        if "factor" in fault:
            number_in(fault["factor"], f"{where}.factor", 1.0, 1e9, low_open=False)
        if "duration_s" in fault:
            number_in(fault["duration_s"], f"{where}.duration_s", 0.0, MAX_DURATION_S)


def _check_fault_keys(fault: dict, where: str) -> None:
    """The keys a fault's kind needs are there, and none it would ignore."""
    kind = fault["kind"]
    needs, may = FAULT_KIND_KEYS[kind]
    for key in needs:
        if key not in fault:
            raise UserError(f"{where}: {kind} needs {key}")
    for key in fault.keys() - {"kind", *needs, *may}:
        takers = [k for k, (n, m) in FAULT_KIND_KEYS.items() if key in n + m]
        raise UserError(f"{where}: {kind} takes no {key} (it is for {' and '.join(takers)})")


def _check_whatifs(data: dict, origin: str) -> None:
    from harness import catalog
    from harness.whatif import parse_node_spec
    if "link" in data and data["link"] not in catalog.link_kinds():
        raise UserError(f"{origin}: link: found {data['link']!r}; allowed: {', '.join(catalog.link_kinds())}")
    for i, spec in enumerate(data.get("add_nodes", [])):
        parse_node_spec(spec, f"{origin}: add_nodes[{i}]")


def _check_tables(data: dict, origin: str) -> None:
    _check_whatifs(data, origin)
    _check_faults(data.get("faults", []), origin)
    _check_mlx(data.get("mlx", {}), origin)
    _check_load(data.get("load", {}), origin)
    for i, target in enumerate(data.get("targets", [])):
        reject_unknown(target, TARGET_KEYS, origin, f"[[targets]][{i}]")
    from reports.targets import validate_targets   # lazily: reports pulls in pandas, which most commands never need
    validate_targets(data.get("targets", []), origin)
    if "workload" in data:
        check_workload(data["workload"], origin, "[workload]")


def apply_overrides(exp: dict, args) -> dict:
    """Command-line flags that were given win over the file."""
    out = copy.deepcopy(exp)
    for key in SCALARS:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if out["backend"] not in BACKEND_NAMES:
        raise UserError(f"--backend must be one of {', '.join(BACKEND_NAMES)}, got {out['backend']!r}")
    return out
