"""The one definition of serving metrics (DESIGN §8), shared by every backend; field names follow vLLM's
benchmark result files so numbers can be compared side by side.

Input: a requests DataFrame with the columns of `REQUEST_COLUMNS` (below) (times in seconds).
- TTFT = first_token_s - start_s; E2EL = end_s - start_s.
- TPOT = (E2EL - TTFT) / (output_tokens - 1), for requests with more than one output token.
- ITL = every gap between consecutive content chunks of a request, pooled over requests.
- duration = last end_s - first start_s over all requests; throughputs divide by it.
- Latency statistics use successful requests only; failures are counted in `failed`.
- Goodput: a successful request is good when it meets every SLO (`ttft:500 tpot:50 e2el:2000`, in ms).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.specs import UserError

# Column names of the run-folder tables, shared by every backend and by reports (DESIGN §9).
# requests.parquet: one row a request. Times are seconds relative to the run's start (t=0).
# steps.parquet: one row per engine step and stage.
# Every row says where its numbers come from: source = "measured" | "simulated".
REQUEST_COLUMNS = {
    "request_id": "str",
    "source": "str",              # measured | simulated
    "scheduled_s": "float",       # when the workload wanted it sent
    "start_s": "float",           # when it was sent (dispatch delay = start_s - scheduled_s)
    "first_token_s": "float",     # first content chunk; NaN if none
    "end_s": "float",             # last content chunk (or the failure)
    "prompt_tokens": "int",
    "output_tokens": "int",       # usage.completion_tokens
    "cached_tokens": "int",
    "chunk_times_s": "list[float]",  # every content chunk's arrival time, for ITL
    "success": "bool",
    "error": "str",
}

STEP_COLUMNS = {
    "step": "int",
    "stage": "int",               # pipeline stage index in layer order
    "node": "str",
    "kind": "str",                # prefill | decode | mixed | send | recv | load
    "start_s": "float",
    "end_s": "float",
    "batch_size": "int",
    "tokens": "int",
    "kv_bytes": "int",            # KV cache in use on this node after the step
    "compute_s": "float",         # the step's compute alone (its network waits taken out); NaN for send/recv/load
    "source": "str",
}

# step_summary.parquet (simulator, step_records="summary"): the step records above aggregated per window of virtual
# time (a record counts in the window it starts in), stage (a send: its sending stage) and kind.
STEP_SUMMARY_COLUMNS = {
    "window_start_s": "float",
    "window_end_s": "float",
    "stage": "int",
    "node": "str",
    "kind": "str",                # prefill | decode | mixed | send
    "steps": "int",               # records aggregated (micro-batches on the stage, or sends)
    "busy_s": "float",            # summed end_s - start_s
    "min_s": "float",             # shortest record
    "max_s": "float",             # longest record
    "tokens": "int",              # summed tokens
    "sequences": "int",           # summed batch_size
    "kv_bytes_max": "int",        # most KV in use on the node after one of these steps
    "source": "str",
}


def arrow_schema(columns: dict):
    """pyarrow schema from one of the record column tables above."""
    import pyarrow as pa
    types = {"str": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_(),
             "list[float]": pa.list_(pa.float64())}
    return pa.schema([(name, types[kind]) for name, kind in columns.items()])

SLO_METRICS = ("ttft", "tpot", "itl", "e2el")   # the four latencies: SLO names and latency statistics alike
LATENCIES = SLO_METRICS
PERCENTILES = (90, 95, 99)
LATENCY_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
LATENCY_STATS = ("mean", "median", "std") + tuple(f"p{p}" for p in PERCENTILES)
DIRECTIONS = ("lower", "higher", "neither")


@dataclass(frozen=True)
class Metric:
    """One summary figure: its key (vLLM name where vLLM has one), how to show it, and which way is better."""
    key: str
    label: str
    unit: str            # "" for a count
    format: str          # str.format spec for the value alone
    direction: str       # lower | higher | neither
    description: str

    def text(self, value) -> str:
        """The value with its unit, for the terminal."""
        shown = self.format.format(value)
        return f"{shown} {self.unit}" if self.unit else shown

    @property
    def heading(self) -> str:
        """Label with unit, for a table column."""
        return f"{self.label} ({self.unit})" if self.unit else self.label


def _latency_metrics() -> tuple[Metric, ...]:
    words = {"mean": "mean", "median": "median", "std": "std of"}
    out = []
    for name, label in LATENCY_LABELS.items():
        for stat in LATENCY_STATS:
            # a spread is no better when lower in the sense a gate needs: it stays "neither"
            direction = "neither" if stat == "std" else "lower"
            out.append(Metric(f"{stat}_{name}_ms", f"{words.get(stat, stat)} {label}", "ms", "{:.2f}", direction,
                              f"{stat} of the per-request {label} over successful requests"))
    return tuple(out)


CATALOGUE: tuple[Metric, ...] = (
    Metric("completed", "completed requests", "", "{:.0f}", "higher", "successful requests"),
    Metric("failed", "failed requests", "", "{:.0f}", "lower", "requests that ended in an error"),
    Metric("duration", "duration", "s", "{:.2f}", "lower", "last request end - first request start"),
    Metric("total_input_tokens", "input tokens", "", "{:.0f}", "neither", "prompt tokens of successful requests"),
    Metric("total_output_tokens", "output tokens", "", "{:.0f}", "neither",
           "completion tokens of successful requests"),
    Metric("request_throughput", "request throughput", "req/s", "{:.2f}", "higher", "completed / duration"),
    Metric("output_throughput", "output throughput", "tok/s", "{:.1f}", "higher", "output tokens / duration"),
    Metric("total_token_throughput", "total token throughput", "tok/s", "{:.1f}", "higher",
           "(input + output tokens) / duration"),
    *_latency_metrics(),
    Metric("decode_tokens_per_s", "decode speed", "tok/s", "{:.1f}", "higher",
           "one request's decode speed: 1000 / median TPOT"),
    Metric("good_requests", "good requests", "", "{:.0f}", "higher", "successful requests meeting every SLO"),
    Metric("request_goodput", "goodput", "req/s", "{:.2f}", "higher", "good requests / duration"),
    Metric("load_time_s", "model load time", "s", "{:.2f}", "lower", "slowest node's model load"),
    Metric("plan_memory_used_pct", "memory used, plan nodes", "%", "{:.1f}", "neither",
           "weights + peak KV in use on the plan's nodes / those nodes' usable memory"),
    Metric("cluster_memory_used_pct", "memory used, whole cluster", "%", "{:.1f}", "neither",
           "weights + peak KV in use / usable memory of every node of the cluster"),
    Metric("mean_dispatch_delay_ms", "mean dispatch lag", "ms", "{:.3f}", "lower",
           "load generator lag behind its schedule (measured)"),
    Metric("p99_dispatch_delay_ms", "p99 dispatch lag", "ms", "{:.3f}", "lower",
           "load generator lag behind its schedule (measured)"),
    Metric("max_dispatch_delay_ms", "max dispatch lag", "ms", "{:.3f}", "lower",
           "load generator lag behind its schedule (measured)"),
)
BY_KEY = {m.key: m for m in CATALOGUE}


def metric(key: str) -> Metric | None:
    """The catalogue entry of a summary key (the last part of a dotted path), None for an unknown figure."""
    return BY_KEY.get(key.rsplit(".", 1)[-1])


def heading(key: str) -> str:
    """Human label with unit for a key; an unknown key shows as itself, so nothing is silently hidden."""
    found = metric(key)
    return found.heading if found else key


def parse_slo(text: str | dict | None) -> dict[str, float]:
    """`"ttft:500 tpot:50 e2el:2000"` -> {"ttft": 500.0, ...} (milliseconds). A dict passes through checked."""
    if not text:
        return {}
    items = text.items() if isinstance(text, dict) else (_slo_pair(p) for p in text.replace(",", " ").split())
    out = {}
    for name, value in items:
        if name not in SLO_METRICS:
            raise UserError(f"unknown SLO metric {name!r}; known: {', '.join(SLO_METRICS)}")
        value = float(value)
        if not value > 0:
            raise UserError(f"SLO {name} must be > 0 ms, got {value}")
        out[name] = value
    return out


def _slo_pair(part: str) -> tuple[str, str]:
    name, sep, value = part.partition(":")
    if not sep:
        raise UserError(f"bad SLO {part!r}: write metric:milliseconds, e.g. ttft:500")
    try:
        float(value)
    except ValueError:
        raise UserError(f"bad SLO {part!r}: {value!r} is not a number of milliseconds") from None
    return name.strip(), value


def stats(values_ms: np.ndarray, name: str) -> dict[str, float]:
    """mean/median/std/p90/p95/p99 of one latency, in ms, with vLLM's field names; NaN when there is no data."""
    v = np.asarray(values_ms, dtype=float)
    v = v[~np.isnan(v)]
    # one percentile call: a single sort serves the median and the tails (ITL can hold millions of gaps)
    pct = np.percentile(v, (50,) + PERCENTILES) if v.size else [math.nan] * (1 + len(PERCENTILES))
    out = {f"mean_{name}_ms": float(v.mean()) if v.size else math.nan,
           f"median_{name}_ms": float(pct[0]),
           f"std_{name}_ms": float(v.std()) if v.size else math.nan}
    for p, x in zip(PERCENTILES, pct[1:]):
        out[f"p{p}_{name}_ms"] = float(x)
    return out


def flatten_chunks(chunks: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(lengths per request, all chunk times concatenated) from a column of lists/arrays."""
    arrays = [np.asarray(c, dtype=float) if c is not None else np.empty(0) for c in chunks]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if arrays else np.empty(0)
    return lengths, flat


def inter_token_gaps(lengths: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Gaps between consecutive chunks inside each request (none across request boundaries)."""
    if flat.size < 2:
        return np.empty(0)
    gaps = np.diff(flat)
    starts = np.cumsum(lengths)[:-1]          # index in flat where request k+1 begins
    boundary = starts[(starts > 0) & (starts < flat.size)] - 1
    keep = np.ones(gaps.size, dtype=bool)
    keep[boundary] = False
    return gaps[keep]


def per_request(df: pd.DataFrame) -> pd.DataFrame:
    """ttft_ms, tpot_ms, e2el_ms per request (NaN where undefined)."""
    start = df["start_s"].to_numpy(float)
    ttft = (df["first_token_s"].to_numpy(float) - start) * 1e3
    e2el = (df["end_s"].to_numpy(float) - start) * 1e3
    n = df["output_tokens"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(n > 1, (e2el - ttft) / (n - 1), np.nan)
    return pd.DataFrame({"ttft_ms": ttft, "tpot_ms": tpot, "e2el_ms": e2el}, index=df.index)


def good_mask(lat: pd.DataFrame, max_itl_ms: np.ndarray | None, slo: dict[str, float]) -> np.ndarray:
    """Which requests meet every SLO. An undefined TPOT (one output token) cannot violate its SLO."""
    good = np.ones(len(lat), dtype=bool)
    for name, limit in slo.items():
        if name == "itl":
            vals = max_itl_ms if max_itl_ms is not None else np.full(len(lat), np.nan)
        else:
            vals = lat[f"{name}_ms"].to_numpy(float)
        good &= ~(vals > limit)  # NaN compares False, so it passes
    return good


def _max_gap_per_request(lengths: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Largest inter-chunk gap (ms) of each request; NaN for requests with fewer than two chunks."""
    out = np.full(lengths.size, np.nan)
    gaps = inter_token_gaps(lengths, flat) * 1e3
    seg = np.maximum(lengths - 1, 0)
    has = seg > 0
    if has.any():
        # segments are contiguous in `gaps`; empty ones are skipped so reduceat never spans two requests
        offsets = (np.cumsum(seg) - seg)[has]
        out[has] = np.maximum.reduceat(gaps, offsets)
    return out


def compute(df: pd.DataFrame, slo: str | dict | None = None) -> dict:
    """Headline metrics of one run (vLLM field names). `df` has REQUEST_COLUMNS."""
    slo = parse_slo(slo)
    ok = df["success"].to_numpy(bool) if len(df) else np.zeros(0, dtype=bool)
    good_df = df[ok]
    lat = per_request(good_df)
    lengths, flat = flatten_chunks(good_df["chunk_times_s"]) if len(good_df) else (np.zeros(0, int), np.empty(0))
    itl = inter_token_gaps(lengths, flat) * 1e3
    duration = _duration(df)
    out_tokens = int(good_df["output_tokens"].sum())
    in_tokens = int(good_df["prompt_tokens"].sum())
    res: dict = {"completed": int(ok.sum()), "failed": int((~ok).sum()), "duration": duration,
                 "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
                 "request_throughput": _rate(ok.sum(), duration),
                 "output_throughput": _rate(out_tokens, duration),
                 "total_token_throughput": _rate(in_tokens + out_tokens, duration)}
    for name in LATENCIES:
        res.update(stats(itl if name == "itl" else lat[f"{name}_ms"].to_numpy(), name))
    # one request's decode speed, the figure people quote as "tokens/s" for a model on a machine
    res["decode_tokens_per_s"] = 1e3 / res["median_tpot_ms"] if res.get("median_tpot_ms") else math.nan
    if slo:
        max_itl = _max_gap_per_request(lengths, flat) if "itl" in slo else None
        good = int(good_mask(lat, max_itl, slo).sum())
        res.update(slo={k: v for k, v in slo.items()}, good_requests=good, request_goodput=_rate(good, duration))
    return res


def _duration(df: pd.DataFrame) -> float:
    if not len(df):
        return 0.0
    return float(np.nanmax(df["end_s"].to_numpy(float)) - np.nanmin(df["start_s"].to_numpy(float)))


def _rate(count: float, duration: float) -> float:
    return float(count) / duration if duration > 0 else math.nan


# The figures the terminal shows after a run, in this order (labels, units and formats from CATALOGUE).
HEADLINE = ("completed", "failed", "duration", "request_throughput", "output_throughput", "mean_ttft_ms",
            "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "request_goodput",
            "decode_tokens_per_s", "load_time_s", "plan_memory_used_pct", "cluster_memory_used_pct")


def headline(metrics: dict, source: str) -> str:
    """A few aligned lines for the terminal; every figure is labelled with where it comes from."""
    lines = [f"metrics ({source}):"]
    for key in HEADLINE:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            entry = BY_KEY[key]
            lines.append(f"  {entry.label:<28} {entry.text(value)}")
    return "\n".join(lines)
