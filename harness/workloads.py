"""Workloads: which requests arrive when, how long their prompts are and how many tokens they must produce.

One workload object drives every backend: the simulator reads its columns directly, the HTTP load generator
iterates over its `RequestSpec`s. Output lengths are pinned (the load generator sends
`max_tokens = min_tokens = output_tokens` with `ignore_eos`), so the same workload is the same work everywhere.

A workload is described by a small dict (stored in config.json, written in TOML experiment files) and rebuilt
from it with `build_workload(spec)`; the same seed gives the same requests. Shapes of the dict:

    {"kind": "synthetic", "num_requests": 1000, "seed": 0,
     "arrival": {"process": "poisson", "rate": 5.0},          # all_at_once | constant | poisson | bursts
     "prompt": {"dist": "fixed", "value": 512},                # fixed | uniform | normal | lognormal
     "output": {"dist": "uniform", "low": 64, "high": 256},
     "closed_loop": {"concurrency": 8}}                        # optional: ignore arrival times, keep N in flight
    {"kind": "conversations", "conversations": 50, "turns": 4, "system_prompt_tokens": 1000,
     "user": {...length...}, "output": {...length...}, "think_time_s": 5.0, "arrival": {...}, "seed": 0}
    {"kind": "trace", "path": "traces/day1.jsonl", "time_scale": 1.0}

`parse_workload("poisson,rate=5,n=1000,prompt=512,output=128")` turns the CLI shorthand into such a dict.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from harness.specs import (UserError, integer_in, join_key, number_in, of_type, read_json, read_text,
                           reject_unknown, shown)

ARRIVAL_PROCESSES = ("all_at_once", "constant", "poisson", "bursts")
LENGTH_DISTS = ("fixed", "uniform", "normal", "lognormal")
KINDS = ("synthetic", "conversations", "trace")
# Every key each builder reads; anything else in a workload dict is a typo and an error. "seed" is allowed
# everywhere because the load generator also seeds prompt text with it.
WORKLOAD_KEYS = {
    "synthetic": ("kind", "num_requests", "seed", "arrival", "prompt", "output", "closed_loop"),
    "conversations": ("kind", "conversations", "turns", "system_prompt_tokens", "user", "output", "think_time_s",
                      "arrival", "seed", "closed_loop"),
    "trace": ("kind", "path", "time_scale", "seed", "closed_loop"),
}
ARRIVAL_KEYS = {"all_at_once": (), "constant": ("rate",), "poisson": ("rate",), "bursts": ("burst_size", "interval_s")}
LENGTH_KEYS = {"fixed": ("value",), "uniform": ("low", "high"), "normal": ("mean", "std"),
               "lognormal": ("mean", "sigma")}
LENGTH_BOUNDS = ("min", "max")
LENGTH_FIELDS = ("prompt", "output", "user")
TRACE_ROW_KEYS = ("arrival_s", "prompt_tokens", "output_tokens", "prefix_id", "prefix_tokens")
MAX_TOKENS = 1 << 30              # one request's prompt or output; also the default upper clip of a length
MAX_REQUESTS = 10_000_000         # requests in one workload (its columns stay under a GB)
MAX_SEED = 2**64 - 1              # numpy's generators take a seed in [0, 2**64)
# The integer fields of a workload dict and their ranges; the float fields and theirs (low, open at low).
WORKLOAD_INTS = {"num_requests": (1, MAX_REQUESTS), "seed": (0, MAX_SEED), "conversations": (1, MAX_REQUESTS),
                 "turns": (1, 10_000), "system_prompt_tokens": (0, MAX_TOKENS)}
WORKLOAD_FLOATS = {"think_time_s": (0.0, False), "time_scale": (0.0, True)}


@dataclass(frozen=True)
class RequestSpec:
    """One request as the workload wants it sent."""
    request_id: str
    arrival_s: float              # seconds after the workload starts (ignored in closed-loop mode)
    prompt_tokens: int
    output_tokens: int            # pinned: exactly this many tokens are generated
    prefix_id: str | None = None  # requests sharing a prefix id share their first `prefix_tokens` tokens
    prefix_tokens: int = 0


@dataclass(frozen=True, eq=False)
class Workload:
    """Column form of a list of requests (cheap for 100k requests); iterate for `RequestSpec`s."""
    spec: dict
    arrival_s: np.ndarray         # float64, non-decreasing
    prompt_tokens: np.ndarray     # int64 >= 1
    output_tokens: np.ndarray     # int64 >= 1
    prefix_id: tuple = ()         # per request: str or None (empty tuple: no prefixes)
    prefix_tokens: np.ndarray | None = None
    closed_loop: bool = False
    concurrency: int = 0          # closed loop: requests kept in flight

    def __post_init__(self):
        for name in ("arrival_s", "prompt_tokens", "output_tokens", "prefix_tokens"):
            arr = getattr(self, name)
            if arr is not None:
                arr.flags.writeable = False  # frozen means frozen: columns are shared with backends

    def __len__(self) -> int:
        return len(self.arrival_s)

    def request_id(self, i: int) -> str:
        return f"req-{i:06d}"

    def __iter__(self) -> Iterator[RequestSpec]:
        for i in range(len(self)):
            yield self.request(i)

    def request(self, i: int) -> RequestSpec:
        pid = self.prefix_id[i] if self.prefix_id else None
        ptok = int(self.prefix_tokens[i]) if self.prefix_tokens is not None else 0
        return RequestSpec(self.request_id(i), float(self.arrival_s[i]), int(self.prompt_tokens[i]),
                           int(self.output_tokens[i]), pid, ptok)


# ---------------------------------------------------------------- lengths and arrivals

def sample_lengths(spec: dict | int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n token counts from a length spec; results are rounded and clipped to [min, max] (min defaults to 1)."""
    if isinstance(spec, (int, np.integer)):
        spec = {"dist": "fixed", "value": int(spec)}
    dist = spec.get("dist", "fixed")
    match dist:
        case "fixed":
            raw = np.full(n, float(_req(spec, "value")))
        case "uniform":
            raw = rng.integers(int(_req(spec, "low")), int(_req(spec, "high")) + 1, size=n).astype(float)
        case "normal":
            raw = rng.normal(float(_req(spec, "mean")), float(_req(spec, "std")), size=n)
        case "lognormal":
            # parametrised by the mean of the lengths, which is what people know about their traffic
            sigma = float(_req(spec, "sigma"))
            mu = math.log(float(_req(spec, "mean"))) - sigma * sigma / 2
            raw = rng.lognormal(mu, sigma, size=n)
        case _:
            raise UserError(f"unknown length distribution {dist!r}; known: {', '.join(LENGTH_DISTS)}")
    lo, hi = int(spec.get("min", 1)), int(spec.get("max", 1 << 30))
    if lo < 1 or hi < lo:
        raise UserError(f"length bounds must satisfy 1 <= min <= max, got min={lo} max={hi}")
    return np.clip(np.rint(raw), lo, hi).astype(np.int64)


def sample_arrivals(spec: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """n non-decreasing arrival times (s) from an arrival-process spec."""
    process = spec.get("process", "poisson")
    match process:
        case "all_at_once":
            return np.zeros(n)
        case "constant":
            return np.arange(n) / _positive(spec, "rate")
        case "poisson":
            gaps = rng.exponential(1.0 / _positive(spec, "rate"), size=n)
            return np.cumsum(gaps) - gaps[0] if n else gaps  # first request at t=0
        case "bursts":
            size = int(_positive(spec, "burst_size"))
            interval = _positive(spec, "interval_s")
            return (np.arange(n) // size) * interval
        case _:
            raise UserError(f"unknown arrival process {process!r}; known: {', '.join(ARRIVAL_PROCESSES)}")


def _req(spec: dict, key: str):
    if key not in spec:
        raise UserError(f"{spec.get('dist') or spec.get('process') or 'workload'} needs {key!r} (got {spec})")
    return spec[key]


def _positive(spec: dict, key: str) -> float:
    value = float(_req(spec, key))
    if not value > 0:
        raise UserError(f"{key} must be > 0, got {value}")
    return value


# ---------------------------------------------------------------- strict keys

def check_workload(spec, origin: str = "workload", path: str = "") -> None:
    """Unknown keys, wrong types and out-of-range values at any depth of a workload dict are errors naming
    `origin` (the file), the key path, what was found and what is allowed."""
    kind = spec.get("kind", "synthetic") if isinstance(spec, dict) else "synthetic"
    _check_choice(kind, KINDS, origin, join_key(path, "kind"))
    reject_unknown(spec, WORKLOAD_KEYS[kind], origin, path)
    _check_scalars(spec, origin, path)
    if "arrival" in spec:
        _check_arrival(spec["arrival"], origin, join_key(path, "arrival"))
    for key in LENGTH_FIELDS:
        if key in spec:
            _check_length(spec[key], origin, join_key(path, key))
    if "closed_loop" in spec:
        _check_closed_loop(spec["closed_loop"], origin, join_key(path, "closed_loop"))


def _check_scalars(spec: dict, origin: str, path: str) -> None:
    for key, (low, high) in WORKLOAD_INTS.items():
        if key in spec:
            integer_in(spec[key], f"{origin}: {join_key(path, key)}", low, high)
    for key, (low, low_open) in WORKLOAD_FLOATS.items():
        if key in spec:
            number_in(spec[key], f"{origin}: {join_key(path, key)}", low, low_open=low_open)
    if "path" in spec:
        of_type(spec["path"], str, f"{origin}: {join_key(path, 'path')}", "a trace file path")
    total = spec.get("conversations", 10) * spec.get("turns", 3)
    if spec.get("kind") == "conversations" and total > MAX_REQUESTS:
        raise UserError(f"{origin}: {join_key(path, 'conversations')} x turns: found {total} requests; "
                        f"allowed: at most {MAX_REQUESTS}")


def _check_arrival(spec, origin: str, path: str) -> None:
    process = spec.get("process", "poisson") if isinstance(spec, dict) else "poisson"
    _check_choice(process, ARRIVAL_PROCESSES, origin, join_key(path, "process"))
    reject_unknown(spec, ("process", *ARRIVAL_KEYS[process]), origin, path)
    _require(spec, ARRIVAL_KEYS[process], origin, path)
    for key in ("rate", "interval_s"):
        if key in spec:
            number_in(spec[key], f"{origin}: {join_key(path, key)}")
    if "burst_size" in spec:
        integer_in(spec["burst_size"], f"{origin}: {join_key(path, 'burst_size')}", 1, MAX_REQUESTS)


def _check_length(spec, origin: str, path: str) -> None:
    """A length is a token count >= 1 (0 or -5 used to become 1 silently) or a distribution of them."""
    if not isinstance(spec, dict):
        integer_in(spec, f"{origin}: {path}", 1, MAX_TOKENS, " (a token count) or a table with dist")
        return
    dist = spec.get("dist", "fixed")
    _check_choice(dist, LENGTH_DISTS, origin, join_key(path, "dist"))
    reject_unknown(spec, ("dist", *LENGTH_KEYS[dist], *LENGTH_BOUNDS), origin, path)
    _require(spec, LENGTH_KEYS[dist], origin, path)
    where = lambda key: f"{origin}: {join_key(path, key)}"   # noqa: E731 (a one-line label maker)
    for key in ("value", "low", "high", "min", "max"):
        if key in spec:
            integer_in(spec[key], where(key), 1, MAX_TOKENS)
    if "mean" in spec:
        number_in(spec["mean"], where("mean"), 0.0, float(MAX_TOKENS))
    for key in ("std", "sigma"):
        if key in spec:
            number_in(spec[key], where(key), 0.0, float(MAX_TOKENS), low_open=False)
    for low, high in (("low", "high"), ("min", "max")):
        if spec.get(low, 1) > spec.get(high, MAX_TOKENS):
            raise UserError(f"{where(low)}: found {spec[low]} above {high} {spec.get(high, MAX_TOKENS)}; "
                            f"allowed: {low} <= {high}")


def _check_closed_loop(value, origin: str, path: str) -> None:
    if isinstance(value, dict):
        reject_unknown(value, ("concurrency",), origin, path)
        integer_in(value.get("concurrency", 0), f"{origin}: {join_key(path, 'concurrency')}", 1, MAX_REQUESTS)
    elif value is not False:    # `closed_loop = false` means open loop
        integer_in(value, f"{origin}: {path}", 1, MAX_REQUESTS, " (the concurrency) or {concurrency = N}")


def _require(spec: dict, keys: tuple, origin: str, path: str) -> None:
    missing = [k for k in keys if k not in spec]
    if missing:
        raise UserError(f"{origin}: {join_key(path, missing[0])}: missing; {spec.get('dist') or spec.get('process')} "
                        f"needs {', '.join(keys)}")


def _check_choice(value, choices: tuple, origin: str, path: str) -> None:
    if value not in choices:
        raise UserError(f"{origin}: {path} {value!r} is not one of {', '.join(choices)}")


# ---------------------------------------------------------------- builders

def build_workload(spec: dict, base_dir: str | Path | None = None) -> Workload:
    """Build a workload from its describing dict (see module docstring). Same dict, same requests."""
    check_workload(spec)
    kind = spec.get("kind", "synthetic")
    match kind:
        case "synthetic":
            wl = _synthetic(spec)
        case "conversations":
            wl = _conversations(spec)
        case "trace":
            wl = _trace(spec, base_dir)
        case _:
            raise UserError(f"unknown workload kind {kind!r}; known: {', '.join(KINDS)}")
    return _with_closed_loop(wl, spec)


def _synthetic(spec: dict) -> Workload:
    n = int(spec.get("num_requests", 100))
    if n < 1:
        raise UserError("num_requests must be >= 1")
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    # separate streams per column, so changing the arrival process does not change the lengths
    r_arr, r_in, r_out = rng.spawn(3)
    return Workload(spec=dict(spec),
                    arrival_s=sample_arrivals(spec.get("arrival", {"process": "all_at_once"}), n, r_arr),
                    prompt_tokens=sample_lengths(spec.get("prompt", 512), n, r_in),
                    output_tokens=sample_lengths(spec.get("output", 128), n, r_out))


def _conversations(spec: dict) -> Workload:
    """Multi-turn chats: turn k's prompt is the system prompt, all earlier turns, and a new user message.

    Turns are open-loop: turn k arrives k * think_time_s after the conversation starts (a client that waits
    for each answer is the closed-loop mode). The prefix shared with the previous turn is recorded so caching
    policies can reuse it.
    """
    convs, turns = int(spec.get("conversations", 10)), int(spec.get("turns", 3))
    if convs < 1 or turns < 1:
        raise UserError("conversations and turns must be >= 1")
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    r_arr, r_user, r_out = rng.spawn(3)
    starts = sample_arrivals(spec.get("arrival", {"process": "poisson", "rate": 1.0}), convs, r_arr)
    user = sample_lengths(spec.get("user", 100), convs * turns, r_user).reshape(convs, turns)
    out = sample_lengths(spec.get("output", 128), convs * turns, r_out).reshape(convs, turns)
    system = int(spec.get("system_prompt_tokens", 0))
    history = np.cumsum(user + out, axis=1) - out       # prompt of turn k without the system prompt
    prompts = system + history
    shared = np.concatenate([np.full((convs, 1), system), (prompts + out)[:, :-1]], axis=1)
    arrivals = starts[:, None] + np.arange(turns)[None, :] * float(spec.get("think_time_s", 5.0))
    order = np.argsort(arrivals.ravel(), kind="stable")
    ids = np.repeat(np.arange(convs), turns)[order]
    return Workload(spec=dict(spec), arrival_s=arrivals.ravel()[order], prompt_tokens=prompts.ravel()[order],
                    output_tokens=out.ravel()[order], prefix_id=tuple(f"conv-{c}" for c in ids),
                    prefix_tokens=shared.ravel()[order])


def _trace(spec: dict, base_dir: str | Path | None) -> Workload:
    path = Path(_req(spec, "path"))
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise UserError(f"trace file not found: {path}")
    rows = []
    for lineno, line in enumerate(read_text(path, "trace").splitlines(), 1):
        if line.strip():
            rows.append(_trace_row(line, path, lineno))
    if not rows:
        raise UserError(f"trace file {path} has no requests")
    rows.sort(key=lambda r: r[0])
    scale = float(spec.get("time_scale", 1.0))
    arr = np.array([r[0] for r in rows]) * scale
    has_prefix = any(r[3] is not None for r in rows)
    return Workload(spec=dict(spec), arrival_s=arr - arr[0],
                    prompt_tokens=np.array([r[1] for r in rows], dtype=np.int64),
                    output_tokens=np.array([r[2] for r in rows], dtype=np.int64),
                    prefix_id=tuple(r[3] for r in rows) if has_prefix else (),
                    prefix_tokens=np.array([r[4] for r in rows], dtype=np.int64) if has_prefix else None)


def _trace_row(line: str, path: Path, lineno: int) -> tuple:
    try:
        obj = json.loads(line)
        if isinstance(obj, dict):   # a row that is not an object is reported as a bad line below
            reject_unknown(obj, TRACE_ROW_KEYS, f"{path}:{lineno}")
        # token counts must be whole numbers (64.0 is one): int() would silently turn 1.5 into 1
        counts = [integer_in(_whole(obj.get(k, 0) if k == "prefix_tokens" else obj[k]), f"{path}:{lineno}: {k}",
                             low, MAX_TOKENS)
                  for k, low in (("prompt_tokens", 1), ("output_tokens", 1), ("prefix_tokens", 0))]
        row = (float(obj["arrival_s"]), counts[0], counts[1],
               None if obj.get("prefix_id") is None else str(obj["prefix_id"]), counts[2])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UserError(f"{path}:{lineno}: bad trace line ({shown(exc)}); need arrival_s, prompt_tokens, "
                        "output_tokens") from None
    if not math.isfinite(row[0]) or row[1] < 1 or row[2] < 1 or row[0] < 0:
        raise UserError(f"{path}:{lineno}: token counts must be >= 1 and arrival_s >= 0")
    return row


def _whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _with_closed_loop(wl: Workload, spec: dict) -> Workload:
    cl = spec.get("closed_loop")
    if not cl:
        return wl
    conc = int(cl.get("concurrency", 0)) if isinstance(cl, dict) else int(cl)
    if conc < 1:
        raise UserError("closed_loop.concurrency must be >= 1")
    return replace(wl, arrival_s=np.zeros(len(wl)), closed_loop=True, concurrency=conc)


def write_trace(workload: Workload, path: str | Path) -> None:
    """Save a workload as a JSONL trace (the format `kind: trace` replays)."""
    lines = []
    for r in workload:
        row = {"arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens}
        if r.prefix_id is not None:
            row.update(prefix_id=r.prefix_id, prefix_tokens=r.prefix_tokens)
        lines.append(json.dumps(row))
    Path(path).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- CLI shorthand

_SHORT_KEYS = {"n": "num_requests", "requests": "num_requests", "seed": "seed"}
_SYNTHETIC_SHORT = ("prompt", "output", *_SHORT_KEYS)
SHORTHAND_KEYS = {   # the options each shorthand head reads; any other option is an error
    "trace": ("path", "time_scale", "seed"),
    "conversations": ("process", "rate", "conversations", "turns", "system_prompt_tokens", "think_time_s", "user",
                      "output", "seed"),
    "closed": ("concurrency", *_SYNTHETIC_SHORT),
    **{p: (*ARRIVAL_KEYS[p], *_SYNTHETIC_SHORT) for p in ARRIVAL_PROCESSES},
}


def parse_workload(text: str) -> dict:
    """CLI shorthand -> workload dict, or load a .json/.toml file holding one (a TOML file may nest it under
    [workload]). Shorthand: `<process>,key=value,...`, e.g.

        poisson,rate=5,n=1000,prompt=512,output=128
        bursts,burst_size=32,interval_s=10,n=320,prompt=uniform:128:2048,output=lognormal:200:0.6
        closed,concurrency=8,n=200,prompt=normal:512:64,output=128
        trace,path=traces/day1.jsonl
        conversations,conversations=20,turns=4,system_prompt_tokens=1000,user=100,output=200,rate=0.5
    """
    if text.endswith((".json", ".toml")):
        return _load_workload_file(Path(text))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError("empty workload; give e.g. poisson,rate=5,n=100 or a .json/.toml file")
    head, *rest = parts
    kv = {}
    for part in rest:
        if "=" not in part:
            raise UserError(f"workload option {part!r} is not key=value")
        k, v = part.split("=", 1)
        kv[k.strip()] = v.strip()
    if head in SHORTHAND_KEYS:   # an unknown head is reported by _shorthand_to_dict, with the choices
        reject_unknown(kv, SHORTHAND_KEYS[head], f"workload {text!r}")
    origin = f"workload {text!r}"
    spec = _shorthand_to_dict(head, _Options(kv, origin))
    check_workload(spec, origin)    # the same ranges as a file: a length of 0 or -5 is refused, not made 1
    return spec


class _Options:
    """The key=value options of a shorthand, each taken once and converted, or refused naming the shorthand."""

    def __init__(self, kv: dict, origin: str):
        self.kv, self.origin = kv, origin

    def __contains__(self, key: str) -> bool:
        return key in self.kv

    def take(self, key: str, convert, default=None):
        if key not in self.kv:
            return default
        text = self.kv.pop(key)
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            kind = "an integer" if convert is int else "a finite number"
            raise UserError(f"{self.origin}: {key}: found {text!r}; allowed: {kind}")
        return value

    def length(self, key: str):
        return _short_length(self.kv.pop(key), f"{self.origin}: {key}")


def _shorthand_to_dict(head: str, kv: _Options) -> dict:
    spec: dict = {}
    if head == "trace":
        spec = {"kind": "trace", "path": kv.take("path", str, "")}
        if "time_scale" in kv:
            spec["time_scale"] = kv.take("time_scale", float)
    elif head == "conversations":
        spec = {"kind": "conversations", "arrival": {"process": kv.take("process", str, "poisson"),
                                                      "rate": kv.take("rate", float, 1.0)}}
        for key in ("conversations", "turns", "system_prompt_tokens"):
            if key in kv:
                spec[key] = kv.take(key, int)
        if "think_time_s" in kv:
            spec["think_time_s"] = kv.take("think_time_s", float)
        if "user" in kv:
            spec["user"] = kv.length("user")
    elif head == "closed":
        spec = {"kind": "synthetic", "closed_loop": {"concurrency": kv.take("concurrency", int, 1)}}
    elif head in ARRIVAL_PROCESSES:
        arrival: dict = {"process": head}
        for key, convert in (("rate", float), ("burst_size", int), ("interval_s", float)):
            if key in kv:
                arrival[key] = kv.take(key, convert)
        spec = {"kind": "synthetic", "arrival": arrival}
    else:
        raise UserError(f"unknown workload {head!r}; start with one of "
                        f"{', '.join(ARRIVAL_PROCESSES + ('closed', 'trace', 'conversations'))}")
    for key in ("prompt", "output"):
        if key in kv:
            spec[key] = kv.length(key)
    for short, key in _SHORT_KEYS.items():
        if short in kv:
            spec[key] = kv.take(short, int)
    return spec


def _short_length(text: str, where: str = "length") -> dict:
    """`512` | `uniform:LOW:HIGH` | `normal:MEAN:STD` | `lognormal:MEAN:SIGMA`."""
    parts = text.split(":")
    try:
        match parts:
            case [v]:
                return {"dist": "fixed", "value": int(v)}
            case ["uniform", lo, hi]:
                return {"dist": "uniform", "low": int(lo), "high": int(hi)}
            case ["normal", mean, std]:
                return {"dist": "normal", "mean": float(mean), "std": float(std)}
            case ["lognormal", mean, sigma]:
                return {"dist": "lognormal", "mean": float(mean), "sigma": float(sigma)}
    except ValueError:
        pass
    raise UserError(f"{where}: found {text!r}; allowed: N, uniform:LOW:HIGH, normal:MEAN:STD or lognormal:MEAN:SIGMA")


def _load_workload_file(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"workload file not found: {path}")
    data = _read_workload_file(path)
    nested = isinstance(data.get("workload"), dict)
    data = data["workload"] if nested else data
    check_workload(data, f"workload file {path}", "[workload]" if nested else "")
    if data.get("kind") == "trace" and "path" in data and not Path(data["path"]).is_absolute():
        data = {**data, "path": str(path.parent / data["path"])}
    return data


def _read_workload_file(path: Path) -> dict:
    if path.suffix == ".json":
        data = read_json(path, "workload")
    else:
        from harness.experiment import read_toml   # lazily: experiment imports this module
        data = read_toml(path, "workload")
    if not isinstance(data, dict):
        raise UserError(f"workload file {path}: expected an object describing a workload, got {type(data).__name__}")
    return data
