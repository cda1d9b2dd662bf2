"""Experiment files (`runs/NAME.toml`): everything one `harness run` needs, with flags that override it.

Top-level keys: name, backend, cluster, model, quant, group_size, strategy, objective, cache,
kv_reserve_tokens, profile (a cost-model profile name or file; default: the fitted one); tables: [workload] (harness.workloads dict), [load] (warmup, max_duration_s),
[[targets]] (reports.targets format), [mlx] (options of the real backend). Unknown keys are errors, so a
typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from harness.backends import BACKEND_NAMES
from harness.specs import UserError, reject_unknown
from harness.workloads import check_workload

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "runs" / "default.toml"
SCALARS = {"name": str, "backend": str, "cluster": str, "model": str, "quant": int, "group_size": int,
           "strategy": str, "objective": str, "cache": str, "kv_reserve_tokens": int, "profile": str}
TABLES = {"workload": dict, "load": dict, "targets": list, "mlx": dict}
MLX_OPTIONS = ("head_dim", "seed", "max_running", "emulate_links", "emulate_latency")
LOAD_KEYS = ("warmup", "max_duration_s")     # what harness.orchestrate reads from [load]
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
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"experiment file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"experiment file {path}: not valid TOML: {exc}") from None
    check_experiment(data, f"experiment file {path}")
    return data


def check_experiment(data: dict, origin: str) -> None:
    """Unknown keys at any depth and wrongly typed values are errors naming the file and the key path."""
    reject_unknown(data, list(SCALARS) + list(TABLES), origin)
    for key, value in data.items():
        kind = SCALARS.get(key) or TABLES[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{origin}: {key} must be {kind.__name__}, got {value!r}")
    _check_tables(data, origin)
    if data.get("backend", "sim") not in BACKEND_NAMES:   # every backend runs an experiment (instant ignores the plan)
        raise UserError(f"{origin}: backend must be one of {', '.join(BACKEND_NAMES)}, got {data['backend']!r}")


def _check_tables(data: dict, origin: str) -> None:
    reject_unknown(data.get("mlx", {}), MLX_OPTIONS, origin, "[mlx]")
    reject_unknown(data.get("load", {}), LOAD_KEYS, origin, "[load]")
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
