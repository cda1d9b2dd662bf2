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
  For a metric of the catalogue (harness.metrics.CATALOGUE) the catalogue's direction decides, whatever the file
  says ("neither" gates as two_sided); the file's direction only serves ratios and other figures.
- fingerprint (schema 2): model, cluster, cluster hash, plan stages and workload hash of the baseline run
  (harness.summary). A run whose fingerprint differs is refused (exit 2) unless allow_mismatch is given.
  Schema-1 baselines have none; their version-1 metric names are read under today's names.
- An entry's key names a metric of summary.json "metrics" (vLLM names), a dotted path into summary.json
  (e.g. "wall.sim_s"), or a run-level figure of reports.targets (load_time_s, cluster_memory_used_pct, ...).
- ratio [numerator, denominator]: compare numerator / denominator taken from the same run. Wall-clock figures
  (simulator speed, server overhead) vary between machines; their ratio to a reference timed in the same run
  does not, much.
Simulated metrics of a seeded run are deterministic, so their tolerance can be tight.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import metrics as catalogue
from harness.specs import UserError, reject_unknown
from harness.summary import V1_RENAMED
from reports import targets
from reports.run import Run, load_run
from reports.tables import fmt

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
DIRECTIONS = ("lower_is_better", "higher_is_better", "two_sided")
# The catalogue's direction as a gate reads it: a figure that is better neither way must hold still.
GATE_DIRECTION = {"lower": "lower_is_better", "higher": "higher_is_better", "neither": "two_sided"}
# Default relative tolerances when a baseline is first written: seeded simulations repeat exactly (the slack
# absorbs float differences between library versions); measurements and wall-clock ratios are noisy.
DEFAULT_TOLERANCE = {"simulated": 0.001, "measured": 0.2, "ratio": 0.5}


# Keys a baseline file may hold: a typo (say "tolerence") must not silently fall back to a default.
BASELINE_KEYS = ("schema_version", "run", "source", "fingerprint", "metrics")
FINGERPRINT_KEYS = ("model", "cluster", "cluster_hash", "plan_stages", "workload_hash")
ENTRY_KEYS = ("value", "tolerance", "direction", "ratio")


class BaselineError(UserError):
    """A baseline file that cannot be used."""


class FingerprintMismatch(UserError):
    """The run is not the experiment the baseline was taken from: comparing them would score noise."""


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
    mismatches: tuple[str, ...] = ()      # fingerprint differences the caller allowed

    @property
    def ok(self) -> bool:
        return self.incomplete_reason is None and not any(r.failed for r in self.rows)


def gate_direction(name: str, entry: dict | None = None) -> str:
    """The catalogue's direction for one of its metrics; otherwise what the baseline entry says, else
    two_sided (an unknown figure must hold still)."""
    known = catalogue.metric(name)
    if known is not None and not (entry or {}).get("ratio"):
        return GATE_DIRECTION[known.direction]
    return (entry or {}).get("direction", "two_sided")


def fingerprint_differences(baseline: dict | None, run: dict | None) -> list[str]:
    """What differs between two fingerprints; a part either side does not know is not a difference."""
    baseline, run = baseline or {}, run or {}
    return [f"{key}: baseline {baseline[key]!r}, run {run[key]!r}" for key in sorted(baseline)
            if baseline.get(key) not in (None, []) and run.get(key) not in (None, []) and baseline[key] != run[key]]


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
    return {**entry, "direction": gate_direction(name, {**entry, "direction": direction}), "tolerance": tolerance}


def read_baseline(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise BaselineError(f"baseline {path} does not exist (write one with --write-baseline)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline {path}: not valid JSON ({exc})") from exc
    reject_unknown(data, BASELINE_KEYS, f"baseline {path}")
    reject_unknown(data.get("fingerprint") or {}, FINGERPRINT_KEYS, f"baseline {path}", "fingerprint")
    for name, entry in (data.get("metrics") or {}).items():
        if isinstance(entry, dict):
            reject_unknown(entry, ENTRY_KEYS, f"baseline {path}", f"metrics.{name}")
    if data.get("schema_version") not in READABLE_VERSIONS:
        raise BaselineError(f"baseline {path}: schema_version {data.get('schema_version')!r}, "
                            f"expected one of {READABLE_VERSIONS}")
    if not isinstance(data.get("metrics"), dict) or not data["metrics"]:
        raise BaselineError(f"baseline {path}: no metrics to compare")
    renamed = {V1_RENAMED.get(n, n) if data["schema_version"] == 1 else n: e for n, e in data["metrics"].items()}
    data["metrics"] = {name: _entry(name, e, path) for name, e in renamed.items()}
    return data


def check(run_dir: str | Path, baseline_path: str | Path, allow_mismatch: bool = False) -> CheckResult:
    """Compare a run with a baseline; FingerprintMismatch when they are different experiments (unless allowed,
    then the differences travel with the result)."""
    baseline = read_baseline(baseline_path)
    run = load_run(run_dir)
    differences = fingerprint_differences(baseline.get("fingerprint"), run.summary.get("fingerprint"))
    if differences and not allow_mismatch:
        raise FingerprintMismatch(f"{run.name} is not the experiment of baseline {baseline_path}:\n  "
                                  + "\n  ".join(differences) + "\n(--allow-mismatch compares them anyway)")
    rows = []
    for name, entry in baseline["metrics"].items():
        current = _current(run, name, entry)
        value = float(entry["value"])
        rows.append(Comparison(name, value, current, entry["tolerance"], entry["direction"],
                               judge(value, current, entry["tolerance"], entry["direction"])))
    return CheckResult(run.name, str(baseline_path), rows, run.incomplete_reason, tuple(differences))


def _change_text(change: float | None) -> str:
    if change is None:
        return "–"
    return f"{change:+.2%}" if abs(change) >= 5e-5 else "0.00%"   # no "-0.00%" from float noise


def format_result(result: CheckResult) -> str:
    """A fixed-width table that reads well in a CI log, failures first, then a one-line verdict."""
    header = ("metric", "baseline", "current", "change", "tolerance", "direction", "status")
    order = sorted(result.rows, key=lambda r: (not r.failed, r.name))
    body = [(_metric_name(r.name), fmt(r.baseline, 6), fmt(r.current, 6), _change_text(r.change),
             f"±{r.tolerance:.2%}" if r.baseline else f"±{r.tolerance:g}", r.direction, r.status) for r in order]
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) if i in (0, 5, 6) else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    out = [f"check {result.run} against {result.baseline}"]
    out += [f"warning: fingerprint differs (allowed): {d}" for d in result.mismatches]
    out += [line(header), line(["-" * w for w in widths])]
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
    prior_file = read_baseline(path) if path.exists() else {}
    old = prior_file.get("metrics", {})
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
                 "direction": gate_direction(name, prior)}
        entry["value"] = _current(run, name, entry)
        if entry["value"] is None:
            raise BaselineError(f"{run.path}: has no figure {name!r} for the baseline")
        entries[name] = entry
    body = {"schema_version": SCHEMA_VERSION, "run": run.name, "source": run.source,
            "fingerprint": run.summary.get("fingerprint") or {}, "metrics": entries}
    if "_about" in prior_file:
        body["_about"] = prior_file["_about"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)
    return path


def _metric_name(key: str) -> str:
    """key plus its human label and unit where the catalogue knows it: CI logs stay greppable by key."""
    known = catalogue.metric(key)
    return f"{key} ({known.heading})" if known else key
