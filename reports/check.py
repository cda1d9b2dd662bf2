"""Compare a run's metrics with a committed baseline: the CI performance-regression gate.

Baseline file (JSON), e.g. runs/baselines/smoke.json:
    {
      "schema_version": 1,
      "run": "the run id it was taken from",
      "metrics": {
        "median_ttft_ms":    {"value": 48.2, "tolerance": 0.001, "direction": "lower_is_better"},
        "output_throughput": {"value": 931.0, "tolerance": 0.001, "direction": "higher_is_better"},
        "completed":         {"value": 200, "tolerance": 0, "direction": "two_sided"},
        "sim_speedup":       {"ratio": ["wall.simulated_s", "wall.wall_s"], "value": 35.0, "tolerance": 0.5,
                              "direction": "higher_is_better"}
      }
    }
- value: the baseline figure. tolerance: relative (0.05 = 5 %); for a baseline of 0 it is an absolute bound.
- direction: lower_is_better | higher_is_better fail only when the figure moves the wrong way beyond the
  tolerance (a move the right way is reported as "improved"); two_sided fails on any move beyond it.
- An entry's key names a metric of summary.json "metrics" (vLLM names), a dotted path into summary.json
  (e.g. "wall.sim_s"), or a run-level figure of reports.targets (load_time_s, memory_utilisation_pct, ...).
- ratio [numerator, denominator]: compare numerator / denominator taken from the same run. Wall-clock figures
  (simulator speed, server overhead) vary between machines; their ratio to a reference timed in the same run
  does not, much.
Simulated metrics of a seeded run are deterministic, so their tolerance can be tight.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.specs import UserError
from reports import targets
from reports.run import Run, load_run
from reports.tables import fmt

SCHEMA_VERSION = 1
DIRECTIONS = ("lower_is_better", "higher_is_better", "two_sided")
# Default relative tolerances when a baseline is first written: seeded simulations repeat exactly (the slack
# absorbs float differences between library versions); measurements and wall-clock ratios are noisy.
DEFAULT_TOLERANCE = {"simulated": 0.001, "measured": 0.2, "ratio": 0.5}


class BaselineError(UserError):
    """A baseline file that cannot be used."""


@dataclass(frozen=True)
class Comparison:
    name: str
    baseline: float
    current: float | None
    tolerance: float
    direction: str
    status: str           # ok | improved | REGRESSED | CHANGED | MISSING

    @property
    def failed(self) -> bool:
        return self.status in ("REGRESSED", "CHANGED", "MISSING")

    @property
    def change(self) -> float | None:
        if self.current is None or self.baseline == 0:
            return None
        return (self.current - self.baseline) / abs(self.baseline)


@dataclass(frozen=True)
class CheckResult:
    run: str
    baseline: str
    rows: list[Comparison]
    incomplete_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.incomplete_reason is None and not any(r.failed for r in self.rows)


def infer_direction(name: str) -> str:
    """Latencies and durations should fall, throughputs and completions rise; anything else must hold still."""
    base = name.rsplit(".", 1)[-1]
    if re.search(r"(throughput|goodput|speedup|per_s|tokens_per_s|^completed$|^good_requests$|_pct$)", base):
        return "higher_is_better"
    if re.search(r"(_ms$|_s$|^duration$|^failed$|overhead)", base):
        return "lower_is_better"
    return "two_sided"


def figure(run: Run, name: str) -> float | None:
    """A run's figure by name: summary metric, dotted path in summary.json, or a reports.targets figure."""
    if name in run.metrics:
        return targets.number(run.metrics[name])
    node: Any = run.summary
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
        return targets.number(node)
    found = targets.observed(run, name)
    return None if found is None else found.value


def _current(run: Run, name: str, entry: dict) -> float | None:
    ratio = entry.get("ratio")
    if ratio is None:
        return figure(run, name)
    top, bottom = figure(run, ratio[0]), figure(run, ratio[1])
    return None if top is None or not bottom else top / bottom


def judge(baseline: float, current: float | None, tolerance: float, direction: str) -> str:
    if current is None:
        return "MISSING"
    allowed = tolerance * abs(baseline) if baseline != 0 else tolerance
    delta = current - baseline
    if abs(delta) <= allowed * (1 + 1e-12):
        return "ok"
    if direction == "two_sided":
        return "CHANGED"
    worse = delta > 0 if direction == "lower_is_better" else delta < 0
    return "REGRESSED" if worse else "improved"


def _entry(name: str, entry: Any, where: Path) -> dict:
    if not isinstance(entry, dict) or targets.number(entry.get("value")) is None:
        raise BaselineError(f"{where}: metric {name!r} needs a numeric 'value'")
    direction = entry.get("direction", "two_sided")
    if direction not in DIRECTIONS:
        raise BaselineError(f"{where}: metric {name!r}: direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    tolerance = targets.number(entry.get("tolerance", 0.0))
    if tolerance is None or tolerance < 0:
        raise BaselineError(f"{where}: metric {name!r}: tolerance must be a number >= 0")
    ratio = entry.get("ratio")
    if ratio is not None and (not isinstance(ratio, list) or len(ratio) != 2):
        raise BaselineError(f"{where}: metric {name!r}: ratio must be [numerator, denominator]")
    return {**entry, "direction": direction, "tolerance": tolerance}


def read_baseline(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise BaselineError(f"baseline {path} does not exist (write one with --write-baseline)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline {path}: not valid JSON ({exc})") from exc
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BaselineError(f"baseline {path}: schema_version {data.get('schema_version')!r}, "
                            f"expected {SCHEMA_VERSION}")
    if not isinstance(data.get("metrics"), dict) or not data["metrics"]:
        raise BaselineError(f"baseline {path}: no metrics to compare")
    data["metrics"] = {name: _entry(name, e, path) for name, e in data["metrics"].items()}
    return data


def check(run_dir: str | Path, baseline_path: str | Path) -> CheckResult:
    baseline = read_baseline(baseline_path)
    run = load_run(run_dir)
    rows = []
    for name, entry in baseline["metrics"].items():
        current = _current(run, name, entry)
        value = float(entry["value"])
        rows.append(Comparison(name, value, current, entry["tolerance"], entry["direction"],
                               judge(value, current, entry["tolerance"], entry["direction"])))
    return CheckResult(run.name, str(baseline_path), rows, run.incomplete_reason)


def _change_text(change: float | None) -> str:
    if change is None:
        return "–"
    return f"{change:+.2%}" if abs(change) >= 5e-5 else "0.00%"   # no "-0.00%" from float noise


def format_result(result: CheckResult) -> str:
    """A fixed-width table that reads well in a CI log, failures first, then a one-line verdict."""
    header = ("metric", "baseline", "current", "change", "tolerance", "direction", "status")
    order = sorted(result.rows, key=lambda r: (not r.failed, r.name))
    body = [(r.name, fmt(r.baseline, 6), fmt(r.current, 6), _change_text(r.change),
             f"±{r.tolerance:.2%}" if r.baseline else f"±{r.tolerance:g}", r.direction, r.status) for r in order]
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) if i in (0, 5, 6) else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    out = [f"check {result.run} against {result.baseline}", line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in body]
    failed = sum(r.failed for r in result.rows)
    if result.incomplete_reason:
        out.append(f"FAIL: the run is incomplete ({result.incomplete_reason})")
    if failed:
        out.append(f"FAIL: {failed} of {len(result.rows)} metrics moved beyond their tolerance or are missing")
    elif not result.incomplete_reason:
        improved = sum(r.status == "improved" for r in result.rows)
        out.append(f"OK: {len(result.rows)} metrics within tolerance"
                   + (f" ({improved} improved beyond it: consider updating the baseline)" if improved else ""))
    return "\n".join(out)


def _default_names(run: Run) -> list[str]:
    """Every numeric summary metric except spreads (std), which are not a performance figure of their own."""
    return [k for k, v in run.metrics.items() if targets.number(v) is not None and not k.startswith("std_")]


def write_baseline(run_dir: str | Path, path: str | Path, names: list[str] | None = None,
                   tolerance: float | None = None, ratios: dict[str, tuple[str, str]] | None = None) -> Path:
    """Write or update a baseline from a run. Existing entries keep their tolerance and direction."""
    run = load_run(run_dir)
    if run.incomplete:
        raise BaselineError(f"{run.path}: an incomplete run cannot be a baseline ({run.incomplete_reason})")
    path = Path(path)
    old = read_baseline(path)["metrics"] if path.exists() else {}
    source = "measured" if "measured" in run.source else "simulated"
    chosen = list(old) + [n for n in names or [] if n not in old] if old else names or _default_names(run)
    wanted = {n: old.get(n, {}) for n in chosen}
    for name, (top, bottom) in (ratios or {}).items():
        wanted[name] = {**old.get(name, {}), "ratio": [top, bottom]}
    entries = {}
    for name, prior in wanted.items():
        kind = "ratio" if prior.get("ratio") else source
        entry = {**prior, "value": None,
                 "tolerance": prior.get("tolerance", DEFAULT_TOLERANCE[kind] if tolerance is None else tolerance),
                 "direction": prior.get("direction", infer_direction(name))}
        entry["value"] = _current(run, name, entry)
        if entry["value"] is None:
            raise BaselineError(f"{run.path}: has no figure {name!r} for the baseline")
        entries[name] = entry
    body = {"schema_version": SCHEMA_VERSION, "run": run.name, "source": run.source, "metrics": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)
    return path
