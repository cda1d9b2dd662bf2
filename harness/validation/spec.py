"""What `harness validate` runs: one TOML file (runs/validate.toml), read strictly.

    name = "validate"
    model = "150m"                 # a harness.mlx.modelbuild size, or a path to a local mlx-lm model folder
    max_running = 8                # the decode batch limit, the same on both sides
    prefill_step_size = 512        # mlx-lm's prefill chunk, the same on both sides
    [[topologies]]                 # this host as N ranks; split = layers per stage in layer order
    name = "1-rank"
    split = [12]
    # tp = [2]                     # optional: ranks per stage (a tensor-parallel group; default 1 each)
    [workload]
    prompt_tokens = 128            # exact token ids are sent, so both sides see the same lengths; [64, 512]:
                                   # uniform in that range, so a fit sees how prefill grows with the prompt
    output_tokens = 64             # pinned with min_tokens + ignore_eos
    requests_per_level = 24
    seed = 0
    [load]
    saturation_requests = 16       # closed loop at max_running: the MEASURED saturation rate
    levels = [0.25, 0.5, 0.75, 0.9]   # Poisson rates as fractions of it
    overload = 1.3                 # one point above saturation (0: none)
    [gate]                         # max |signed error %| below saturation; `validate` exits 1 beyond them
    mean_tpot_ms = 5
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from harness.specs import UserError, reject_unknown

TOP_KEYS = ("name", "model", "max_running", "prefill_step_size", "topologies", "workload", "load", "gate",
            "ttft_abs_ms")
TOPOLOGY_KEYS = ("name", "split", "tp")
WORKLOAD_KEYS = ("prompt_tokens", "output_tokens", "requests_per_level", "seed")
LOAD_KEYS = ("saturation_requests", "levels", "overload")
DEFAULT_GATE = {"mean_tpot_ms": 5.0, "mean_e2el_ms": 10.0, "p99_e2el_ms": 15.0, "median_ttft_ms": 10.0}


@dataclass(frozen=True)
class Topology:
    name: str
    split: tuple[int, ...]
    tp: tuple[int, ...] = ()       # ranks per stage; () means one each

    @property
    def degrees(self) -> tuple[int, ...]:
        return self.tp or (1,) * len(self.split)

    @property
    def ranks(self) -> int:
        return sum(self.degrees)


@dataclass(frozen=True)
class ValidationSpec:
    name: str
    model: str
    topologies: tuple[Topology, ...]
    max_running: int = 8
    prefill_step_size: int = 512
    prompt_tokens: int | tuple[int, int] = 128
    output_tokens: int = 64
    requests_per_level: int = 24
    seed: int = 0
    saturation_requests: int = 16
    levels: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    overload: float = 1.3
    gate: dict = field(default_factory=lambda: dict(DEFAULT_GATE))
    ttft_abs_ms: float = 5.0    # a TTFT statistic under 50 ms also passes when within this many ms

    def __post_init__(self):
        lengths = self.prompt_tokens if isinstance(self.prompt_tokens, tuple) else (self.prompt_tokens,)
        whole = all(isinstance(x, int) and x >= 1 for x in lengths)
        if not (whole and 1 <= len(lengths) <= 2 and list(lengths) == sorted(lengths)):
            raise UserError(f"validation spec: workload.prompt_tokens must be an integer >= 1 or [low, high], got "
                            f"{self.prompt_tokens!r}")
        for name in ("max_running", "prefill_step_size", "output_tokens", "requests_per_level",
                     "saturation_requests"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"validation spec: {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.levels or any(not 0 < x < 1 for x in self.levels):
            raise UserError(f"validation spec: load.levels must be fractions in (0, 1), got {list(self.levels)}")
        if self.overload and self.overload <= 1:
            raise UserError(f"validation spec: load.overload must be > 1 (or 0 for none), got {self.overload}")
        if not self.topologies:
            raise UserError("validation spec: give at least one [[topologies]] entry")


def read_spec(path: str | Path) -> ValidationSpec:
    path = Path(path)
    origin = f"validation file {path}"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{origin} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{origin}: not valid TOML: {exc}") from None
    return spec_from_dict(data, origin)


def spec_from_dict(data: dict, origin: str) -> ValidationSpec:
    reject_unknown(data, TOP_KEYS, origin)
    work, load = data.get("workload", {}), data.get("load", {})
    reject_unknown(work, WORKLOAD_KEYS, origin, "workload")
    reject_unknown(load, LOAD_KEYS, origin, "load")
    gate = data.get("gate", DEFAULT_GATE)
    reject_unknown(gate, [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p90", "p99")]
                   + ["request_throughput", "output_throughput"], origin, "gate")
    if "model" not in data:
        raise UserError(f"{origin}: give model = a size such as \"150m\" or a local mlx-lm model folder")
    return ValidationSpec(name=str(data.get("name", "validate")), model=str(data["model"]),
                          topologies=tuple(_topology(t, origin, i) for i, t in enumerate(data.get("topologies", []))),
                          max_running=data.get("max_running", 8), prefill_step_size=data.get("prefill_step_size", 512),
                          **{k: (tuple(work[k]) if isinstance(work[k], list) else work[k])
                             for k in WORKLOAD_KEYS if k in work},
                          **{k: (tuple(load[k]) if k == "levels" else load[k]) for k in LOAD_KEYS if k in load},
                          gate={k: float(v) for k, v in gate.items()},
                          ttft_abs_ms=float(data.get("ttft_abs_ms", 5.0)))


def _topology(raw, origin: str, i: int) -> Topology:
    reject_unknown(raw, TOPOLOGY_KEYS, origin, f"topologies[{i}]")
    split = raw.get("split")
    if not isinstance(split, list) or not split or any(not isinstance(x, int) or x < 1 for x in split):
        raise UserError(f"{origin}: topologies[{i}].split must be a list of layer counts >= 1, got {split!r}")
    tp = raw.get("tp", [1] * len(split))
    if not isinstance(tp, list) or len(tp) != len(split) or any(not isinstance(x, int) or x < 1 for x in tp):
        raise UserError(f"{origin}: topologies[{i}].tp must list one TP degree >= 1 per stage of split {split}, "
                        f"got {tp!r}")
    return Topology(name=str(raw.get("name", f"{sum(tp)}-rank")), split=tuple(split),
                    tp=tuple(tp) if max(tp) > 1 else ())
