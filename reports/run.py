"""Read a saved run folder (DESIGN §9) into plain data for the report and the check.

harness/runfolder.py owns the folder format (files, INCOMPLETE marker); this module opens folders with its
reader and tolerates missing files, so a report can still say what an interrupted run left behind.
Metrics come from summary.json (migrated to schema 2 by harness.summary), or from harness.metrics (the one
definition) when the summary lacks them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness import metrics as metric_defs
from harness import summary as summary_schema
from harness.metrics import REQUEST_COLUMNS, STEP_COLUMNS
from harness.runfolder import read_run
from harness.specs import UserError


class RunFolderError(UserError):
    """A folder that is not a readable run folder."""


# what a report says where it needs per-step records and the run kept only per-window summaries
SUMMARY_ONLY = ("this run kept only per-window step summaries (simulate --step-records summary, in "
                "step_summary.parquet), not one record per step; re-run it with --step-records full")


@dataclass
class Run:
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    requests: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(REQUEST_COLUMNS)))
    steps: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(STEP_COLUMNS)))
    incomplete_reason: str | None = None
    missing: tuple[str, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_recomputed: bool = False   # True when summary.json had no metrics and harness.metrics filled them

    @property
    def name(self) -> str:
        return str(self.summary.get("run_id") or self.config.get("run_id") or self.path.name)

    @property
    def incomplete(self) -> bool:
        return self.incomplete_reason is not None

    @property
    def step_records(self) -> str:
        """"summary" for a simulation run with `--step-records summary` (steps.parquet then holds only the model
        load rows; the per-window aggregates are in step_summary.parquet), else "full"."""
        engine = self.config.get("engine")
        return str(engine.get("step_records") or "full") if isinstance(engine, dict) else "full"

    @property
    def strategy(self) -> str:
        return str(self.plan.get("strategy") or self.config.get("strategy") or "?")

    @property
    def source(self) -> str:
        """measured | simulated | a combination | unknown, from the per-request rows (each row says its source)."""
        found = {str(x) for x in self.requests["source"].dropna().unique()} if "source" in self.requests else set()
        if not found:
            return str(self.summary.get("source") or "unknown")
        return " + ".join(sorted(found))

    def successful_requests(self) -> pd.DataFrame:
        if self.requests.empty or "success" not in self.requests:
            return self.requests
        return self.requests[self.requests["success"].astype(bool)]


def _json(path: Path, missing: list[str]) -> dict[str, Any]:
    if not path.exists():
        missing.append(path.name)
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc})") from exc


def _table(path: Path, columns: dict[str, str], missing: list[str]) -> pd.DataFrame:
    if not path.exists():
        missing.append(path.name)
        return pd.DataFrame(columns=list(columns))
    return pd.read_parquet(path)


def _metrics(summary: dict[str, Any], requests: pd.DataFrame) -> tuple[dict[str, Any], bool]:
    """The summary's metrics; recomputed with harness.metrics only when the summary has none."""
    saved = summary.get("metrics")
    if isinstance(saved, dict) and saved:
        return saved, False
    if not requests.empty and set(REQUEST_COLUMNS) <= set(requests.columns):
        return metric_defs.compute(requests, (summary.get("slo") or None)), True
    return {}, False


def load_run(path: str | Path) -> Run:
    """Read one run folder, complete or not. Missing files are listed in Run.missing; broken ones raise."""
    folder = read_run(path, require_complete=False)
    root = folder.path
    missing: list[str] = []
    # every reader sees schema 2: version-1 summaries (flat, or nested under "metrics") are migrated here
    summary = summary_schema.migrate(_json(root / "summary.json", missing))
    requests = _table(root / "requests.parquet", REQUEST_COLUMNS, missing)
    if {"summary.json", "requests.parquet"} <= set(missing) and not (root / "config.json").exists():
        raise RunFolderError(f"{root}: not a run folder (no config.json, summary.json or requests.parquet)")
    metrics, recomputed = _metrics(summary, requests)
    return Run(
        path=root, summary=summary, requests=requests, metrics=metrics, metrics_recomputed=recomputed,
        config=_json(root / "config.json", missing), environment=_json(root / "environment.json", missing),
        plan=_json(root / "plan.json", missing), steps=_table(root / "steps.parquet", STEP_COLUMNS, missing),
        incomplete_reason=None if folder.complete else f"marked incomplete: {folder.status}", missing=tuple(missing),
    )


def per_request_latencies(run: Run) -> pd.DataFrame:
    """ttft_ms, tpot_ms, e2el_ms of each successful request, by harness.metrics' definitions."""
    ok = run.successful_requests()
    if ok.empty:
        return pd.DataFrame(columns=["ttft_ms", "tpot_ms", "e2el_ms"])
    return metric_defs.per_request(ok)
