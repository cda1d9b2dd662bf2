"""The goodput knee: the highest Poisson arrival rate whose simulated run meets the latency SLOs (issue 13).

Pure logic, no I/O: `judge` turns one simulated run's request rows into a `CurvePoint`; `find_knee` searches
the rate axis with a caller's `evaluate(rate) -> CurvePoint` (a simulation) and returns every point it paid for.

Definitions (the project's own, not a second set):
- TTFT, TPOT, their p50/p90 and goodput come from harness.metrics.compute with the SLOs as its `slo` dict
  (goodput = requests meeting every SLO / duration, DESIGN section 8).
- A rate meets the SLOs when the run's p90 TTFT and p90 TPOT are within their targets AND harness.saturation
  does not call the run saturated (an overloaded finite run's percentiles measure its length, not the cluster).
- The search starts from the cost model's sustainable rate (theoretical), brackets the knee by stepping up or
  down, then narrows the bracket by interpolating log(worst SLO ratio) against log(rate) (bisection as a
  safeguard) until hi / lo <= 1 + tolerance. The knee is the highest rate that met the SLOs.
Every simulation of one search uses the same workload seed: the Poisson gaps are the same draws scaled by
1 / rate, so the curve is smooth in rate and a search is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from harness import metrics
from harness.saturation import assess
from harness.specs import UserError

GROW = 1.5           # bracketing step above a rate that met the SLOs
SHRINK = 0.5         # bracketing step below a rate that did not
MAX_BRACKET_STEPS = 12
FLOOR_GAIN = 0.99    # a halved rate whose worst SLO ratio improved by less than 1 % is at the light-load floor
DEFAULT_TOLERANCE = 0.02
DEFAULT_MAX_SIMULATIONS = 30


@dataclass(frozen=True)
class Slo:
    """Latency targets in ms on the run's 90th percentiles."""
    ttft_p90_ms: float
    tpot_p90_ms: float

    def __post_init__(self):
        for name in ("ttft_p90_ms", "tpot_p90_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')}: found {value!r}; allowed: a number of ms > 0")

    def as_metrics_slo(self) -> dict[str, float]:
        """The same targets in harness.metrics' per-request SLO syntax, for its goodput."""
        return {"ttft": float(self.ttft_p90_ms), "tpot": float(self.tpot_p90_ms)}


@dataclass(frozen=True)
class CurvePoint:
    """One simulated rate of the saturation curve (every figure simulated)."""
    rate_rps: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    goodput_rps: float
    good_share: float             # good requests / completed
    throughput_rps: float
    saturated: bool
    saturation_reasons: tuple[str, ...]
    worst_ratio: float            # max(p90 TTFT / target, p90 TPOT / target); <= 1 when the latencies pass
    meets: bool

    def to_dict(self) -> dict:
        return asdict(self) | {"saturation_reasons": list(self.saturation_reasons)}


def judge(rate_rps: float, requests, preemptions: int | None, slo: Slo) -> CurvePoint:
    """The curve point of one run at `rate_rps`: its requests DataFrame (REQUEST_COLUMNS) against `slo`."""
    m = metrics.compute(requests, slo.as_metrics_slo())
    verdict = assess(requests, preemptions)
    ratios = (m["p90_ttft_ms"] / slo.ttft_p90_ms, m["p90_tpot_ms"] / slo.tpot_p90_ms)
    worst = max((r for r in ratios if not math.isnan(r)), default=math.inf)
    completed = m["completed"]
    return CurvePoint(rate_rps=float(rate_rps), ttft_p50_ms=m["median_ttft_ms"], ttft_p90_ms=m["p90_ttft_ms"],
                      tpot_p50_ms=m["median_tpot_ms"], tpot_p90_ms=m["p90_tpot_ms"],
                      goodput_rps=m["request_goodput"], good_share=m["good_requests"] / completed if completed else 0.0,
                      throughput_rps=m["request_throughput"], saturated=verdict["saturated"],
                      saturation_reasons=tuple(verdict["reasons"]), worst_ratio=float(worst),
                      meets=bool(worst <= 1.0 and not verdict["saturated"] and m["failed"] == 0))


@dataclass
class KneeResult:
    knee_rps: float | None        # highest rate that met the SLOs; None when none tried did
    lower_rps: float | None       # the final bracket: lower met, upper did not (None where not found)
    upper_rps: float | None
    status: str                   # found | below-all | above-all | budget
    points: list[CurvePoint] = field(default_factory=list)   # in the order they were simulated
    search_simulations: int = 0

    def curve(self) -> list[CurvePoint]:
        return sorted(self.points, key=lambda p: p.rate_rps)

    def to_dict(self) -> dict:
        return {"knee_rps": self.knee_rps, "lower_rps": self.lower_rps, "upper_rps": self.upper_rps,
                "status": self.status, "search_simulations": self.search_simulations}


class _Search:
    """The points simulated so far, and the bracket they imply."""

    def __init__(self, evaluate: Callable[[float], CurvePoint], max_simulations: int):
        self.evaluate, self.max_simulations = evaluate, max_simulations
        self.points: list[CurvePoint] = []
        self.lo: CurvePoint | None = None
        self.hi: CurvePoint | None = None

    @property
    def exhausted(self) -> bool:
        return len(self.points) >= self.max_simulations

    def probe(self, rate: float) -> CurvePoint:
        point = self.evaluate(rate)
        self.points.append(point)
        if point.meets and (self.lo is None or point.rate_rps > self.lo.rate_rps):
            self.lo = point
        if not point.meets and (self.hi is None or point.rate_rps < self.hi.rate_rps):
            self.hi = point
        return point


def find_knee(evaluate: Callable[[float], CurvePoint], start_rps: float, tolerance: float = DEFAULT_TOLERANCE,
              max_simulations: int = DEFAULT_MAX_SIMULATIONS) -> KneeResult:
    """The highest rate meeting the SLOs to within `tolerance` (relative bracket width), in few simulations."""
    check_search(start_rps, tolerance, max_simulations)
    search = _Search(evaluate, max_simulations)
    status = _bracket(search, start_rps)
    if status == "found":
        status = _narrow(search, 1.0 + tolerance)
    lo, hi = search.lo, search.hi
    return KneeResult(knee_rps=lo.rate_rps if lo else None, lower_rps=lo.rate_rps if lo else None,
                      upper_rps=hi.rate_rps if hi else None, status=status, points=list(search.points),
                      search_simulations=len(search.points))


def check_search(start_rps: float, tolerance: float, max_simulations: int) -> None:
    if not (math.isfinite(start_rps) and start_rps > 0):
        raise UserError(f"capacity search: start rate found {start_rps!r} req/s; allowed: a number > 0 "
                        "(the plan's sustainable rate is 0 when no sequence fits beside the weights)")
    if not (math.isfinite(tolerance) and 0 < tolerance < 1):
        raise UserError(f"--tolerance: found {tolerance!r}; allowed: a fraction in (0, 1), e.g. 0.02")
    if max_simulations < 2:
        raise UserError(f"--max-simulations: found {max_simulations}; allowed: an integer >= 2")


def _bracket(search: _Search, start_rps: float) -> str:
    """Step from the start rate until one rate meets the SLOs and a higher one does not."""
    first = search.probe(start_rps)
    step = GROW if first.meets else SHRINK
    rate, previous = start_rps, first
    for _ in range(MAX_BRACKET_STEPS):
        if search.lo is not None and search.hi is not None:
            return "found"
        if search.exhausted:
            return "budget"
        rate *= step
        point = search.probe(rate)
        if _at_light_load_floor(previous, point):
            break
        previous = point
    if search.lo is not None and search.hi is not None:
        return "found"
    return "above-all" if first.meets else "below-all"


def _at_light_load_floor(previous: CurvePoint, point: CurvePoint) -> bool:
    """Halving the rate no longer lowers the latencies (within FLOOR_GAIN) and they still miss: the SLOs are
    tighter than one request alone gets, so lower rates cannot help."""
    return (not point.meets and not point.saturated and point.rate_rps < previous.rate_rps
            and point.worst_ratio > FLOOR_GAIN * previous.worst_ratio)


def _narrow(search: _Search, width: float) -> str:
    """Shrink [lo, hi] until hi / lo <= width; each probe is aimed so that it can close the bracket."""
    same_side = 0
    last_side = None
    while search.hi.rate_rps / search.lo.rate_rps > width:
        if search.exhausted:
            return "budget"
        rate = _next_rate(search.lo, search.hi, width, bisect=same_side >= 2)
        side = "lo" if search.probe(rate).meets else "hi"
        same_side = same_side + 1 if side == last_side else 0
        last_side = side
    return "found"


def _next_rate(lo: CurvePoint, hi: CurvePoint, width: float, bisect: bool) -> float:
    """Where the SLO ratio crosses 1, interpolated on log-log axes; a probe next to an end is pushed one
    tolerance in, so a good estimate closes the bracket in one or two more simulations."""
    low, high = lo.rate_rps, hi.rate_rps
    estimate = math.sqrt(low * high) if bisect else _interpolated(lo, hi)
    if estimate <= low * width:
        return min(low * width, math.sqrt(low * high))
    if estimate >= high / width:
        return max(high / width, math.sqrt(low * high))
    return estimate


def _interpolated(lo: CurvePoint, hi: CurvePoint) -> float:
    """Rate at which log(worst_ratio) reaches 0 on the line through the two ends; their geometric mean when
    the upper end failed for saturation alone (its latencies give no slope) or a ratio is not usable."""
    a, b = lo.worst_ratio, hi.worst_ratio
    mid = math.sqrt(lo.rate_rps * hi.rate_rps)
    if not (0 < a < 1 < b < math.inf):
        return mid
    x0, x1 = math.log(lo.rate_rps), math.log(hi.rate_rps)
    y0, y1 = math.log(a), math.log(b)
    return math.exp(x0 + (0.0 - y0) * (x1 - x0) / (y1 - y0))


def curve_rates(knee: KneeResult, extra: int) -> list[float]:
    """`extra` evenly spaced rates below (and one above) the knee that the search did not already simulate
    within 5 %, so the printed curve shows its shape from light load to overload."""
    if extra <= 0 or knee.knee_rps is None:   # no knee: the search's points already span the rates tried
        return []
    top = knee.upper_rps or max(p.rate_rps for p in knee.points)
    anchor = knee.knee_rps
    wanted = [anchor * (i + 1) / extra for i in range(extra - 1)] + [max(top, anchor) * 1.25]
    have = [p.rate_rps for p in knee.points]
    return [r for r in wanted if all(abs(r / h - 1) > 0.05 for h in have)]


def first_failure_knee(points: list[CurvePoint]) -> float | None:
    """A sweep's knee: the highest rate below the first rate (in rate order) that missed the SLOs; the reference
    answer of a fine sweep (benchmarks/capacity_knee.py)."""
    best = None
    for point in sorted(points, key=lambda p: p.rate_rps):
        if not point.meets:
            break
        best = point.rate_rps
    return best
