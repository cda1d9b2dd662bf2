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

from harness.specs import UserError

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "runs" / "default.toml"
SCALARS = {"name": str, "backend": str, "cluster": str, "model": str, "quant": int, "group_size": int,
           "strategy": str, "objective": str, "cache": str, "kv_reserve_tokens": int, "profile": str}
TABLES = {"workload": dict, "load": dict, "targets": list, "mlx": dict}
BACKENDS = ("sim", "mlx")
MLX_OPTIONS = ("head_dim", "seed", "max_running", "emulate_links", "emulate_latency")


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
    for key, value in data.items():
        kind = SCALARS.get(key) or TABLES.get(key)
        if kind is None:
            raise UserError(f"experiment file {path}: unknown key {key!r}; known keys: "
                            f"{', '.join(list(SCALARS) + list(TABLES))}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"experiment file {path}: {key} must be {kind.__name__}, got {value!r}")
    unknown = sorted(set(data.get("mlx", {})) - set(MLX_OPTIONS))
    if unknown:
        raise UserError(f"experiment file {path}: [mlx] has unknown keys {unknown}; known: {', '.join(MLX_OPTIONS)}")
    if data.get("backend", "sim") not in BACKENDS:
        raise UserError(f"experiment file {path}: backend must be one of {', '.join(BACKENDS)}, got {data['backend']!r}")
    return data


def apply_overrides(exp: dict, args) -> dict:
    """Command-line flags that were given win over the file."""
    out = copy.deepcopy(exp)
    for key in SCALARS:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if out["backend"] not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {out['backend']!r}")
    return out
