"""A run folder's requests in the formats other tools read (issue 9): CSV and JSON lines with one row a request
and its raw timestamps, and the result JSON of `vllm bench serve --save-result --save-detailed`.

Every figure comes from harness.metrics (one definition); this module only lays rows and figures out.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from harness import metrics
from harness.metrics import REQUEST_COLUMNS
from harness.runfolder import JOURNAL, RequestJournal, RunFolder, read_run
from harness.specs import UserError
from harness.summary import migrate

DERIVED = ("ttft_ms", "tpot_ms", "e2el_ms")


@dataclass(frozen=True)
class ExportedRun:
    """One run folder's request rows and what the exports say about the run."""
    path: Path
    run_id: str
    requests: pd.DataFrame        # REQUEST_COLUMNS
    summary: dict                 # schema-2 layout (migrated); {} when the run never wrote one
    config: dict
    environment: dict
    note: str | None              # why the rows may not be the whole run

    @property
    def source(self) -> str | None:
        sources = self.requests["source"].dropna().unique()
        return str(sources[0]) if len(sources) == 1 else self.summary.get("source")

    @property
    def slo(self):
        return self.summary.get("slo") or self.config.get("slo")

    @property
    def created_utc(self) -> str | None:
        """environment.json's wall-clock stamp, written just before the first request (second resolution)."""
        return self.environment.get("created_utc")


# ------------------------------------------------------------------------------------------ reading

def load_export(path: str | Path) -> ExportedRun:
    folder = read_run(path, require_complete=False)
    requests, note = _requests(folder)
    summary = _optional_json(folder, "summary.json")
    return ExportedRun(folder.path, summary.get("run_id") or folder.path.name, requests,
                       migrate(summary) if summary else {}, _optional_json(folder, "config.json"),
                       _optional_json(folder, "environment.json"), note)


def _requests(folder: RunFolder) -> tuple[pd.DataFrame, str | None]:
    """requests.parquet; for a run cut short before writing it, the journal of the requests that finished."""
    cut_short = None if folder.complete else f"{folder.path} is incomplete ({folder.status})"
    if (folder.path / "requests.parquet").exists():
        return folder.requests(), cut_short and f"{cut_short}; exported the requests it recorded"
    rows = RequestJournal(folder.path / JOURNAL).rows()
    if folder.complete or not rows:
        raise UserError(_missing_message(folder))
    frame = pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))
    return frame, f"{cut_short}: requests.parquet is missing, exported the {len(rows)} finished requests " \
                  f"from {JOURNAL}"


def _missing_message(folder: RunFolder) -> str:
    missing = f"{folder.path / 'requests.parquet'} is missing"
    if folder.complete:
        return missing
    if (folder.path / JOURNAL).exists():
        return f"{missing} and {JOURNAL} holds no finished request: the run is incomplete ({folder.status})"
    return f"{missing}: the run is incomplete ({folder.status}) and recorded no finished request"


def _optional_json(folder: RunFolder, name: str) -> dict:
    path = folder.path / name
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


# ------------------------------------------------------------------------------------------ rows

def request_rows(run: ExportedRun) -> pd.DataFrame:
    """run_id, the record columns as stored, the per-request latencies (ms) and the run's wall-clock stamp."""
    df = run.requests[list(REQUEST_COLUMNS)].reset_index(drop=True)
    df["chunk_times_s"] = [_floats(c) for c in df["chunk_times_s"]]
    rows = pd.concat([df, metrics.per_request(df)], axis=1)
    rows.insert(0, "run_id", run.run_id)
    rows["run_created_utc"] = run.created_utc
    return rows


def _floats(values) -> list[float]:
    return [] if values is None else [float(v) for v in values]


def csv_text(runs: list[ExportedRun]) -> str:
    rows = pd.concat([request_rows(r) for r in runs], ignore_index=True)
    # a list has no CSV cell of its own; JSON is what every CSV reader's user can parse back
    rows["chunk_times_s"] = [json.dumps(c) for c in rows["chunk_times_s"]]
    return rows.to_csv(index=False)


def jsonl_text(runs: list[ExportedRun]) -> str:
    lines = [_json(row) for r in runs for row in request_rows(r).to_dict("records")]
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------------------------------ vLLM

# Field names and layout follow vLLM's `vllm bench serve` (vllm/benchmarks/serve.py in vllm-project/vllm:
# `benchmark()` builds the result dict, `main()` prepends date/backend/model_id/... and the traffic settings,
# and `--metadata KEY=VALUE` adds top-level fields, which is where run_id and source go). Per-request arrays
# are in seconds; a failed request has ttft 0.0, latency 0.0 and an empty itl list there, with its error.
VLLM_HEADLINE = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                 "request_throughput", "request_goodput", "output_throughput", "total_token_throughput")


def vllm_result(run: ExportedRun) -> dict:
    figures = metrics.compute(run.requests, run.slo)
    backend = run.summary.get("backend") or run.config.get("backend")
    model = _model_id(run)
    head = {"date": _vllm_date(run.created_utc), "endpoint_type": backend, "backend": backend,
            "label": run.run_id, "model_id": model, "tokenizer_id": model,
            "num_prompts": len(run.requests), "run_id": run.run_id, "source": run.source, **traffic(run.config)}
    body = {key: figures.get(key) for key in VLLM_HEADLINE}
    latency = {f"{stat}_{name}_ms": figures[f"{stat}_{name}_ms"]
               for name in metrics.LATENCIES for stat in metrics.LATENCY_STATS}
    return {**head, **body, **vllm_arrays(run.requests), **latency}


def vllm_arrays(df: pd.DataFrame) -> dict:
    ok = df["success"].to_numpy(bool)
    lat = metrics.per_request(df)
    ttft_s = np.where(ok, lat["ttft_ms"].to_numpy(float) / 1e3, 0.0)
    e2el_s = np.where(ok, lat["e2el_ms"].to_numpy(float) / 1e3, 0.0)
    return {"input_lens": df["prompt_tokens"].astype(int).tolist(),
            "output_lens": df["output_tokens"].astype(int).tolist(),
            "ttfts": ttft_s.tolist(), "itls": _itls_s(df["chunk_times_s"], ok),
            "latencies": e2el_s.tolist(), "start_times": df["start_s"].astype(float).tolist(),
            "generated_texts": [""] * len(df),     # the harness keeps no generated text
            "errors": df["error"].fillna("").astype(str).tolist()}


def _itls_s(chunks: pd.Series, ok: np.ndarray) -> list[list[float]]:
    """Each request's gaps between consecutive content chunks, split out of metrics.inter_token_gaps."""
    lengths, flat = metrics.flatten_chunks(chunks)
    gaps = metrics.inter_token_gaps(lengths, flat)
    per_request = np.split(gaps, np.cumsum(np.maximum(lengths - 1, 0))[:-1]) if len(lengths) else []
    return [g.tolist() if good else [] for g, good in zip(per_request, ok)]


def traffic(config: dict) -> dict:
    """vLLM's request_rate ("inf" when every request is sent at once), burstiness (1.0 is Poisson) and
    max_concurrency, read from the load mode a bench run used or else the workload."""
    mode = config.get("mode") or {}
    match mode.get("kind"):
        case "poisson":
            return {"request_rate": mode["value"], "burstiness": 1.0, "max_concurrency": None}
        case "constant":
            return {"request_rate": mode["value"], "burstiness": None, "max_concurrency": None}
        case "concurrent":
            return {"request_rate": "inf", "burstiness": 1.0, "max_concurrency": int(mode["value"])}
        case "synchronous":   # one request at a time
            return {"request_rate": "inf", "burstiness": 1.0, "max_concurrency": 1}
    return _workload_traffic(config.get("workload") or {})


def _workload_traffic(workload: dict) -> dict:
    closed = workload.get("closed_loop")
    if closed:
        concurrency = closed.get("concurrency") if isinstance(closed, dict) else closed
        return {"request_rate": "inf", "burstiness": 1.0, "max_concurrency": int(concurrency)}
    arrival = workload.get("arrival") or {}
    process = arrival.get("process")
    rate = arrival.get("rate") if process in ("poisson", "constant") else None
    if process == "all_at_once":
        rate = "inf"
    return {"request_rate": rate, "burstiness": 1.0 if process == "poisson" else None, "max_concurrency": None}


def _model_id(run: ExportedRun) -> str | None:
    fingerprint = run.summary.get("fingerprint") or {}
    return run.config.get("model") or (run.summary.get("run") or {}).get("model") or fingerprint.get("model")


def _vllm_date(created_utc: str | None) -> str | None:
    """vLLM stamps its results as YYYYmmdd-HHMMSS."""
    if not created_utc:
        return None
    return datetime.fromisoformat(created_utc).strftime("%Y%m%d-%H%M%S")


def vllm_text(runs: list[ExportedRun]) -> str:
    return "".join(_json(vllm_result(r)) + "\n" for r in runs)


# ------------------------------------------------------------------------------------------ writing

RENDERERS = {"csv": csv_text, "jsonl": jsonl_text, "vllm": vllm_text}


def render(runs: list[ExportedRun], fmt: str) -> str:
    return RENDERERS[fmt](runs)


def _json(obj) -> str:
    """Strict JSON (NaN and infinity are not JSON: an undefined figure is null)."""
    return json.dumps(_finite(obj), default=_plain, allow_nan=False)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _plain(obj):
    """numpy scalars that pandas hands back in records."""
    if hasattr(obj, "item"):
        return _finite(obj.item())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_atomic(target: str | Path, text: str) -> Path | None:
    """Write `text` to `target` whole or not at all (a temporary file moved into place); `-` is stdout.
    Returns the path written, None for stdout."""
    if str(target) == "-":
        sys.stdout.write(text)
        return None
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {target}: {exc}") from None
    return target
