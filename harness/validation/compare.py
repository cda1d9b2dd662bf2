"""The simulator's error against a real run of the same requests: signed % error of each latency statistic and
of throughput, and the per-request error joined on request id.

error = (simulated - measured) / measured, in %: negative means the simulator is optimistic (too fast).
Both sides are request tables with harness.metrics.REQUEST_COLUMNS; statistics come from harness.metrics.compute,
so they are the very figures `bench` and `simulate` print.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness import metrics

LATENCIES = metrics.LATENCIES                       # ttft, tpot, itl, e2el
STATS = ("mean", "median", "p90", "p99")
THROUGHPUTS = ("request_throughput", "output_throughput")
PER_REQUEST = ("ttft", "tpot", "e2el")              # ITL has no single value per request


def signed_error_pct(simulated: float, measured: float) -> float:
    """(sim - real) / real in %; NaN when either is missing or the measured value is 0."""
    if simulated is None or measured is None or not measured or math.isnan(simulated) or math.isnan(measured):
        return math.nan
    return (simulated - measured) / measured * 100.0


def metric_keys() -> list[str]:
    """The summary keys compared, latencies first (vLLM names: mean_ttft_ms, p99_tpot_ms, ...)."""
    return [f"{s}_{m}_ms" for m in LATENCIES for s in STATS] + list(THROUGHPUTS)


def statistic_errors(measured: dict, simulated: dict) -> dict:
    """{key: {"measured", "simulated", "error_pct"}} for every compared statistic of two metrics dicts."""
    return {k: {"measured": measured.get(k), "simulated": simulated.get(k),
                "error_pct": signed_error_pct(simulated.get(k), measured.get(k))} for k in metric_keys()}


def per_request_errors(real: pd.DataFrame, sim: pd.DataFrame) -> dict:
    """Mean absolute % error per request (MAPE) and mean signed % error of TTFT, TPOT and E2E latency, over the
    requests both sides completed, joined on request_id."""
    both = _joined(real, sim)
    out = {"requests_joined": int(len(both))}
    for name in PER_REQUEST:
        m, s = both[f"{name}_ms_real"].to_numpy(float), both[f"{name}_ms_sim"].to_numpy(float)
        ok = ~np.isnan(m) & ~np.isnan(s) & (m > 0)
        err = (s[ok] - m[ok]) / m[ok] * 100.0
        out[name] = {"mape_pct": float(np.mean(np.abs(err))) if err.size else math.nan,
                     "mean_signed_pct": float(np.mean(err)) if err.size else math.nan, "n": int(err.size)}
    return out


def _joined(real: pd.DataFrame, sim: pd.DataFrame) -> pd.DataFrame:
    def side(df):
        ok = df[df["success"].astype(bool)]
        lat = metrics.per_request(ok)
        lat["request_id"] = ok["request_id"].astype(str).to_numpy()
        return lat
    return side(real).merge(side(sim), on="request_id", suffixes=("_real", "_sim"))


def compare(real: pd.DataFrame, sim: pd.DataFrame) -> dict:
    """The whole comparison of one load point: metrics of each side, statistic errors, per-request errors."""
    measured, simulated = metrics.compute(real), metrics.compute(sim)
    return {"measured": _plain(measured), "simulated": _plain(simulated),
            "errors": statistic_errors(measured, simulated), "per_request": per_request_errors(real, sim)}


def _plain(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if isinstance(v, (int, float))}
