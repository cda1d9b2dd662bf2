"""Is a run overloaded? A pure verdict over its request rows (harness.metrics REQUEST_COLUMNS) and engine facts.

A cluster offered more than it can serve still finishes every request of a finite workload, only later and
later: its mean TTFT then measures the length of the run, not the cluster. The verdict says so, with numbers.

Definitions (times in seconds, from the request rows):
- offered rate: arrival intervals per second, (arrivals - 1) / (last - first scheduled_s).
- busy time: the union of every request's [start_s, end_s]: the time the cluster had work.
- observed service rate: completed requests / busy time.
- backlog: the union of every request's wait for its first token, [start_s, first_token_s] (end_s when there is
  no first token): the time someone was queued (or prefilling).
- sustainable rate: when the backlog covered at least half the arrival span, the observed service rate (the
  cluster always had someone waiting, so what it completed per busy second is what it can sustain); otherwise the
  offered rate (a queue that keeps emptying shows no limit: the run sustained what it was offered).
- waiting: TTFT (first_token_s - start_s), the queueing delay plus the prefill.

A run is saturated when any of these holds:
- the waiting grew: the mean of the last quarter of arrivals is over GROWTH_FACTOR x that of the first quarter and
  over MIN_WAIT_S (a stable queue keeps its mean wait roughly level; the absolute floor ignores milliseconds);
- the offered rate exceeds RATE_MARGIN x the sustainable rate (the margin absorbs the Poisson noise of a finite
  run's rate estimates, and the drain after the last arrival, which lowers the service rate of a stable run by
  its last latency over the run's length); open-loop arrivals only: a closed loop sends when a request ends, so its arrivals cannot
  outrun the server and its two rates differ by edge effects alone;
- the engine preempted sequences (its KV pool ran out of room for the running batch);
- requests were cancelled or timed out at the run's time bound (they never got their turn).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

GROWTH_FACTOR = 2.0
MIN_WAIT_S = 1.0
RATE_MARGIN = 1.05
MIN_BACKLOG_SHARE = 0.5
MIN_ROWS_FOR_QUARTERS = 8
CANCELLED = re.compile(r"cancel|timeout|timed out", re.IGNORECASE)


def union_length(starts, ends) -> float:
    """Total length covered by the intervals [start, end]."""
    total, reach = 0.0, -np.inf
    for start, end in sorted(zip(starts, ends)):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return float(total)


def offered_rate(scheduled) -> float | None:
    times = np.sort(np.asarray(scheduled, dtype=float))
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return float((len(times) - 1) / span) if span > 0 else None


def _waits(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """When each request stopped waiting (first token, else its end), and how long it waited."""
    until = df["first_token_s"].fillna(df["end_s"])
    return until, until - df["start_s"]


def queue_growth(df: pd.DataFrame) -> dict | None:
    """Mean wait for the first token of the first and of the last quarter of arrivals; None for a run too short."""
    ok = df[df["success"]].sort_values("scheduled_s")
    if len(ok) < MIN_ROWS_FOR_QUARTERS:
        return None
    _, wait = _waits(ok)
    quarter = len(ok) // 4
    return {"first_quarter_wait_s": float(wait.iloc[:quarter].mean()),
            "last_quarter_wait_s": float(wait.iloc[-quarter:].mean())}


def grew(growth: dict | None) -> bool:
    if growth is None:
        return False
    last = growth["last_quarter_wait_s"]
    return last > GROWTH_FACTOR * growth["first_quarter_wait_s"] and last > MIN_WAIT_S


def sustainable_rate(df: pd.DataFrame, offered: float | None, service: float | None) -> float | None:
    """The service rate when the queue stood most of the run; else the offered rate it kept up with."""
    until, _ = _waits(df)
    backlog_s = union_length(df["start_s"], until)
    span = float(df["scheduled_s"].max() - df["scheduled_s"].min())
    if span <= 0 or backlog_s < MIN_BACKLOG_SHARE * span:
        return offered
    return service


def cancelled_at_bound(df: pd.DataFrame) -> int:
    failed = df.loc[~df["success"], "error"].fillna("")
    return int(failed.astype(str).str.contains(CANCELLED).sum())


def is_closed_loop(workload: dict | None) -> bool:
    """Whether the run's arrivals waited for completions: a closed-loop workload spec, or a load-generator mode
    that keeps N in flight (bench and run nest the spec as {"workload": spec, "mode": mode})."""
    workload = workload or {}
    if (workload.get("mode") or {}).get("kind") in ("synchronous", "concurrent"):
        return True
    spec = workload.get("workload", workload)
    return isinstance(spec, dict) and bool(spec.get("closed_loop"))


def assess(requests: pd.DataFrame, preemptions: int | None = None, closed_loop: bool = False) -> dict:
    """The saturation verdict of one run: saturated, reasons (short sentences with numbers) and the figures."""
    df = requests.astype({"success": bool})
    preemptions = preemptions or 0     # an engine that does not count them reported None
    if df.empty:
        return _verdict([], None, None, None, None, preemptions, 0)
    offered = offered_rate(df["scheduled_s"])
    busy_s = union_length(df["start_s"], df["end_s"])
    service = int(df["success"].sum()) / busy_s if busy_s > 0 else None
    sustainable = sustainable_rate(df, offered, service)
    growth, cancelled = queue_growth(df), cancelled_at_bound(df)
    reasons = _reasons(None if closed_loop else offered, sustainable, growth, preemptions, cancelled)
    return _verdict(reasons, offered, service, sustainable, growth, preemptions, cancelled)


def _reasons(offered, sustainable, growth, preemptions: int, cancelled: int) -> list[str]:
    reasons = []
    if offered is not None and sustainable is not None and offered > RATE_MARGIN * sustainable:
        reasons.append(f"arrivals {offered:.3g} req/s exceed the {sustainable:.3g} req/s this cluster sustained")
    if grew(growth):
        reasons.append(f"queueing grew from {growth['first_quarter_wait_s']:.3g} s to "
                       f"{growth['last_quarter_wait_s']:.3g} s (first vs last quarter of arrivals)")
    if preemptions:
        reasons.append(f"{preemptions} preemptions (KV cache full)")
    if cancelled:
        reasons.append(f"{cancelled} requests cancelled at the time bound")
    return reasons


def _verdict(reasons, offered, service, sustainable, growth, preemptions, cancelled) -> dict:
    return {"saturated": bool(reasons), "reasons": reasons, "offered_rate_rps": offered,
            "observed_service_rate_rps": service, "sustainable_rate_rps": sustainable, "queue_growth": growth,
            "preemptions": int(preemptions), "cancelled_at_bound": int(cancelled)}


def console_line(verdict: dict | None) -> str | None:
    """One line for the terminal when the run was overloaded; None when it was not (or was not assessed)."""
    if not verdict or not verdict.get("saturated"):
        return None
    return "OVERLOADED: " + "; ".join(verdict["reasons"]) + _sustained_tail(verdict)


def _sustained_tail(verdict: dict) -> str:
    """The sustainable rate, unless the first reason already names it."""
    rate = verdict.get("sustainable_rate_rps")
    if rate is None or any("sustained" in r for r in verdict["reasons"]):
        return ""
    return f"; sustained {rate:.3g} req/s"


def overload_lines(summary: dict) -> list[str]:
    """The console line of a summary.json body, as a list to append: empty unless the run was overloaded."""
    line = console_line(summary.get("saturation"))
    return [line] if line else []
