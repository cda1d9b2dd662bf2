"""Per-component error of the cost model against measured engine steps: one stage's decode step by batch size,
one stage's prefill forward by token bucket.

measured: the mean compute_s (network waits taken out) of the real steps.parquet rows in a group;
predicted: the mean of harness.costmodel's stage time for each of those rows (theoretical, with the profile given).
error_pct = (predicted - measured) / measured x 100: negative means the cost model is optimistic (too fast).

Only rows that are ONE forward are used: decode rows whose tokens equal their batch (a row with tokens != batch
holds two forwards) and prefill rows. A decode row's summed context is read from its KV bytes in use.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness import costmodel
from harness.costmodel import Profile, StageModel
from harness.specs import Cluster, ModelSpec, PartitionPlan, UserError

COMPONENT_KINDS = ("decode", "prefill")
NEEDED = ("stage", "kind", "batch_size", "tokens", "kv_bytes", "compute_s")


def single_forward_rows(steps: pd.DataFrame) -> pd.DataFrame:
    """The decode and prefill rows that hold exactly one forward and a measured compute time."""
    missing = [c for c in NEEDED if c not in steps.columns]
    if missing:
        raise UserError(f"steps table lacks column(s) {', '.join(missing)} (see harness.metrics.STEP_COLUMNS)")
    ok = steps["compute_s"].notna() & (steps["compute_s"] > 0)
    one_decode = (steps["kind"] == "decode") & (steps["tokens"] == steps["batch_size"])
    return steps[ok & (one_decode | (steps["kind"] == "prefill"))]


def context_sum(row, stage: StageModel) -> float:
    """Summed KV tokens a decode step reads, from the KV bytes the stage holds."""
    return float(row.kv_bytes) / stage.kv_bytes_per_token_node


def predicted_step_s(row, stage: StageModel, model: ModelSpec, profile: Profile) -> float:
    """The cost model's compute time of one measured decode or prefill row on its stage (theoretical)."""
    if row.kind == "decode":
        return stage.decode_s(model, profile, int(row.batch_size), context_sum(row, stage))
    return stage.prefill_s(model, profile, int(row.tokens), 0, int(row.batch_size))


def token_bucket(tokens: int) -> int:
    """Upper bound of a prefill's power-of-two token bucket (100 tokens -> 128)."""
    return 1 << max(int(tokens) - 1, 0).bit_length()


def bucket_of(row) -> int:
    return int(row.batch_size) if row.kind == "decode" else token_bucket(row.tokens)


def step_predictions(steps: pd.DataFrame, plan: PartitionPlan, model: ModelSpec, cluster: Cluster,
                     profile: Profile) -> pd.DataFrame:
    """The single-forward rows with their bucket and predicted compute time (seconds)."""
    stages = costmodel.stage_models(cluster, model, plan)
    rows = single_forward_rows(steps)
    bad = sorted(set(int(s) for s in rows["stage"]) - set(range(len(stages))))
    if bad:
        raise UserError(f"steps name stage(s) {bad} but the plan has {len(stages)} stage(s)")
    out = rows.assign(bucket=[bucket_of(r) for r in rows.itertuples()],
                      predicted_s=[predicted_step_s(r, stages[int(r.stage)], model, profile) for r in rows.itertuples()])
    return out[["kind", "stage", "bucket", "compute_s", "predicted_s"]]


def group_errors(pred: pd.DataFrame) -> list[dict]:
    """One row per (kind, stage, bucket): count, mean measured and predicted ms, signed % error."""
    out = []
    for (kind, stage, bucket), g in pred.groupby(["kind", "stage", "bucket"], sort=True):
        meas, sim = float(g["compute_s"].mean()) * 1e3, float(g["predicted_s"].mean()) * 1e3
        out.append({"kind": kind, "stage": int(stage), "bucket": int(bucket), "n": int(len(g)),
                    "measured_ms": meas, "predicted_ms": sim, "error_pct": (sim - meas) / meas * 100.0})
    return out


def component_errors(steps: pd.DataFrame, plan: PartitionPlan, model: ModelSpec, cluster: Cluster,
                     profile: Profile) -> list[dict]:
    """Measured vs predicted stage compute per (kind, stage, batch size | prefill token bucket)."""
    return group_errors(step_predictions(steps, plan, model, cluster, profile))


def _bucket_label(r: dict) -> str:
    if r["kind"] == "decode":
        return f"batch {r['bucket']}"
    return f"{r['bucket'] // 2 + 1}-{r['bucket']} tok"


def format_components(rows: list[dict], title: str = "") -> str:
    """A table of component errors (measured: real steps; predicted: theoretical cost model)."""
    lines = [title] if title else []
    lines.append(f"{'kind':<8} {'stage':>5} {'bucket':<14} {'n':>5} {'measured ms':>12} {'predicted ms':>13} "
                 f"{'error':>8}")
    for r in rows:
        err = "n/a" if math.isnan(r["error_pct"]) else f"{r['error_pct']:+.1f}%"
        lines.append(f"{r['kind']:<8} {r['stage']:>5} {_bucket_label(r):<14} {r['n']:>5} {r['measured_ms']:>12.2f} "
                     f"{r['predicted_ms']:>13.2f} {err:>8}")
    if not rows:
        lines.append("(no single-forward decode or prefill rows)")
    return "\n".join(lines)
