"""Why a run's TPOT differs from the plan's: the mean TPOT split into additive parts (issue 9).

The plan predicts one stream; a run serves many at once. `tpot_breakdown` reads the saved requests and steps
(harness.metrics REQUEST_COLUMNS / STEP_COLUMNS) and splits the run's mean TPOT (ms, harness.metrics'
definition, mean over successful requests) into five parts that sum to it exactly.

Attribution. Every output token after a request's first is carried by one micro-batch ("step") through every
stage and link, so the token experiences that step's whole time. Parts (a)-(d) are therefore means over the
steps that carry decode tokens, each step weighted by its decode tokens (batch_size for a decode step; for a
mixed step batch_size minus its prefill chunks, which the records do not list: a chunk adds its tokens to
`tokens` and 1 to `batch_size`, so chunks = (tokens - batch_size) / (mean uncached prompt - 1), rounded and kept
within 1..batch_size; exact when prompts are prefilled whole and are of one length):
  (a) single-stream compute: the summed stage time of a decode step at batch 1 (observed mean; when no batch-1
      step was recorded, a least-squares line of decode step time against batch size, read at batch 1).
  (b) communication: the step's link sends (every send lies on its micro-batch's path: stages run in order).
  (c) batching cost: decode step time at the step's batch size minus (a). A mixed step counts here with the
      time a decode-only step of its batch size takes, so (c) holds the cost of batch size alone.
  (d) prefill interference: what a mixed step took beyond a decode-only step of its batch size, plus the time
      the step waited at a stage (after its input arrived) behind a micro-batch that ran a prefill there.
  (e) waiting for a slot / pipeline bubbles: the remainder, mean TPOT - (a+b+c+d). It holds waiting to be
      scheduled into a step, waiting behind other decode micro-batches, link queueing, and the difference between
      a per-request mean and the per-token means above. It is negative only when the parts over-explain TPOT;
      `Breakdown.remainder_negative` says so and the report prints it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness import metrics
from reports.tables import Table, fmt

WORK_KINDS = ("decode", "prefill", "mixed")
PREFILL_KINDS = ("prefill", "mixed")
REMAINDER = "waiting"


@dataclass(frozen=True)
class Part:
    key: str
    label: str
    ms: float
    source: str


@dataclass(frozen=True)
class Breakdown:
    parts: tuple[Part, ...]
    mean_tpot_ms: float
    planned_tpot_ms: float | None
    source: str

    @property
    def total_ms(self) -> float:
        return float(sum(p.ms for p in self.parts))

    @property
    def remainder_negative(self) -> bool:
        # float rounding leaves a remainder of -1e-14 where the parts explain TPOT fully: that is not negative
        return self.part(REMAINDER).ms < -1e-9 * max(abs(self.mean_tpot_ms), 1.0)

    def part(self, key: str) -> Part:
        return next(p for p in self.parts if p.key == key)

    def share(self, part: Part) -> float:
        return part.ms / self.mean_tpot_ms if self.mean_tpot_ms else float("nan")


def mean_tpot_ms(requests: pd.DataFrame) -> float | None:
    """The run's mean TPOT over successful requests with at least two tokens (harness.metrics' definition)."""
    ok = requests[requests["success"].astype(bool)] if "success" in requests else requests
    if ok.empty:
        return None
    tpot = metrics.per_request(ok)["tpot_ms"].dropna()
    return float(tpot.mean()) if len(tpot) else None


def step_table(steps: pd.DataFrame, prompt_tokens: float = 1.0) -> pd.DataFrame:
    """One row per micro-batch: kind, batch_size, tokens, compute_s (summed stage time), send_s, decode_tokens.
    `prompt_tokens`: the mean uncached prompt, to tell a mixed step's prefill chunks from its decodes."""
    rows = steps[steps["kind"].isin(WORK_KINDS)]
    dur = (rows["end_s"] - rows["start_s"]).rename("compute_s")
    per = rows.assign(compute_s=dur).groupby("step").agg(
        kind=("kind", "first"), batch_size=("batch_size", "first"), tokens=("tokens", "first"),
        compute_s=("compute_s", "sum"))
    sends = steps[steps["kind"] == "send"]
    per["send_s"] = (sends["end_s"] - sends["start_s"]).groupby(sends["step"]).sum().reindex(per.index).fillna(0.0)
    per["decode_tokens"] = decode_tokens(per, prompt_tokens)
    return per


def decode_tokens(per: pd.DataFrame, prompt_tokens: float) -> pd.Series:
    """Decode tokens each step carries; a mixed step's prefill chunks are estimated (module docstring)."""
    batch = per["batch_size"].to_numpy()
    chunks = np.clip(np.rint((per["tokens"] - batch) / max(prompt_tokens - 1.0, 1.0)), 1, batch)
    count = np.select([per["kind"] == "decode", per["kind"] == "mixed"], [batch, batch - chunks], 0)
    return pd.Series(count, index=per.index, dtype=float)


def mean_uncached_prompt(requests: pd.DataFrame) -> float:
    """Mean prompt tokens a request had to prefill (its cached tokens need no prefill)."""
    uncached = requests["prompt_tokens"] - requests.get("cached_tokens", 0)
    return float(uncached.mean()) if len(uncached) else 1.0


def decode_time_fn(per: pd.DataFrame):
    """decode step time (s) as a function of batch size: the observed mean where recorded, else a line fit."""
    decode = per[per["kind"] == "decode"]
    observed = decode.groupby("batch_size")["compute_s"].mean()
    if observed.empty:
        return None
    if len(observed) == 1:
        slope, base = 0.0, float(observed.iloc[0])   # one batch size seen: no slope to learn
    else:
        slope, base = np.polyfit(decode["batch_size"].astype(float), decode["compute_s"], 1)
    table = observed.to_dict()
    return lambda b: np.array([table.get(x, base + slope * x) for x in np.asarray(b)], dtype=float)


def prefill_waits(steps: pd.DataFrame) -> pd.Series:
    """Per step: seconds its stages waited, after their input arrived, behind a micro-batch running a prefill."""
    work = steps[steps["kind"].isin(WORK_KINDS)].sort_values(["stage", "start_s"])
    blocker = work.groupby("stage")["kind"].shift(1)
    sends = steps[steps["kind"] == "send"]
    # a send feeds the next stage; a step of several forwards (prefill chunks, then decode) sends once per
    # forward, and the stage's work can start only after the last of them
    arrived = sends.groupby([sends["step"], sends["stage"] + 1])["end_s"].max()
    ready = arrived.reindex(pd.MultiIndex.from_arrays([work["step"], work["stage"]])).to_numpy()
    wait = np.where(work["stage"].to_numpy() > 0, np.nan_to_num(work["start_s"].to_numpy() - ready), 0.0)
    behind_prefill = np.maximum(wait, 0.0) * blocker.isin(PREFILL_KINDS).to_numpy()
    return pd.Series(behind_prefill, index=work.index).groupby(work["step"]).sum()


def per_token_ms(seconds_per_step, decode_tokens) -> float:
    """A per-step time as ms per decode token: every token in a step lives through all of that step's time."""
    return 1e3 * float(np.average(np.asarray(seconds_per_step, dtype=float), weights=decode_tokens))


def tpot_breakdown(requests: pd.DataFrame, steps: pd.DataFrame, planned_tpot_ms: float | None = None,
                   source: str = "simulated") -> Breakdown | None:
    """The run's mean TPOT split into parts (module docstring); None without step records or decode tokens."""
    mean = mean_tpot_ms(requests)
    if mean is None or steps.empty:
        return None
    known = step_parts(step_table(steps, mean_uncached_prompt(requests)), steps, source)
    if known is None:
        return None
    rest = mean - sum(p.ms for p in known)
    return Breakdown((*known, Part(REMAINDER, "waiting for a slot / pipeline bubbles (remainder)", rest, source)),
                     mean, planned_tpot_ms, source)


def step_parts(per: pd.DataFrame, steps: pd.DataFrame, source: str) -> list[Part] | None:
    """Parts (a)-(d) in ms per decode token from the per-step table; None without decode-carrying steps."""
    carrying = per[per["decode_tokens"] > 0]
    decode_at = decode_time_fn(per)
    if carrying.empty or decode_at is None:
        return None
    w = carrying["decode_tokens"].to_numpy()
    base = float(decode_at([1])[0])
    at_batch = decode_at(carrying["batch_size"].to_numpy())
    mixed_extra = np.where(carrying["kind"] == "mixed", carrying["compute_s"].to_numpy() - at_batch, 0.0)
    waits = prefill_waits(steps).reindex(carrying.index).fillna(0.0).to_numpy()
    return [Part("compute", "single-stream compute (decode step at batch 1)", 1e3 * base, source),
            Part("communication", "communication (link sends on the path)",
                 per_token_ms(carrying["send_s"], w), source),
            Part("batching", "batching cost (batch larger than 1)", per_token_ms(at_batch - base, w), source),
            Part("prefill", "prefill interference", per_token_ms(mixed_extra + waits, w), source)]


def explain_run(run) -> Breakdown | None:
    """The breakdown of a loaded reports.run.Run, with the plan's one-stream TPOT next to it."""
    planned = (run.plan.get("predicted") or {}).get("tpot_ms")
    return tpot_breakdown(run.successful_requests(), run.steps, planned, run.source)


# ---------------------------------------------------------------- the report section's view

COLOURS = {"compute": "#4c78a8", "communication": "#72b7b2", "batching": "#f58518", "prefill": "#e45756",
           REMAINDER: "#bab0ac", "plan": "#eeca3b"}


@dataclass(frozen=True)
class Segment:
    label: str
    ms: float
    width_pct: float
    colour: str


@dataclass(frozen=True)
class Bar:
    label: str
    source: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class TpotView:
    source: str
    table: Table | None = None
    bars: tuple[Bar, ...] = ()
    notes: tuple[str, ...] = ()


def tpot_view(run) -> TpotView:
    """The "Why TPOT differs from the plan" section: a parts table and a plan-vs-run stacked bar, or a note."""
    if run.step_records == "summary":
        from reports.run import SUMMARY_ONLY
        return TpotView(run.source, notes=(f"The TPOT breakdown needs per-step records: {SUMMARY_ONLY}.",))
    found = explain_run(run)
    if found is None:
        why = "steps.parquet has no step records" if run.steps.empty else "no decode steps or no successful requests"
        return TpotView(run.source, notes=(f"The TPOT breakdown needs step records with decode steps: {why} "
                                           "(a run against an outside server records none).",))
    return TpotView(found.source, parts_table(found), plan_vs_run_bars(found), breakdown_notes(found))


def parts_table(found: Breakdown) -> Table:
    rows = [[p.label, fmt(p.ms), f"{100 * found.share(p):.1f} %", p.source] for p in found.parts]
    rows.append([f"mean TPOT ({found.source})", fmt(found.mean_tpot_ms), "100.0 %", found.source])
    if found.planned_tpot_ms is not None:
        rows.append(["plan: TPOT of one stream", fmt(found.planned_tpot_ms), "", "theoretical"])
    return Table(["part", "ms per token", "share", "source"], rows, text_columns=1)


def plan_vs_run_bars(found: Breakdown) -> tuple[Bar, ...]:
    """Widths share one scale so the two bars compare; a negative remainder draws no segment (a note says it)."""
    scale = max(found.mean_tpot_ms, found.planned_tpot_ms or 0.0, 1e-12)
    run = Bar(f"run ({found.source})", found.source, tuple(
        Segment(p.label, p.ms, 100 * max(p.ms, 0.0) / scale, COLOURS[p.key]) for p in found.parts))
    if found.planned_tpot_ms is None:
        return (run,)
    plan = Bar("plan (theoretical)", "theoretical",
               (Segment("plan: one stream", found.planned_tpot_ms, 100 * found.planned_tpot_ms / scale,
                        COLOURS["plan"]),))
    return plan, run


def breakdown_notes(found: Breakdown) -> tuple[str, ...]:
    notes = []
    if found.planned_tpot_ms is None:
        notes.append("plan.json has no predicted TPOT to compare with.")
    if found.remainder_negative:
        notes.append(f"The remainder is negative ({found.part(REMAINDER).ms:.2f} ms): the step-based parts "
                     "over-explain the mean TPOT (per-token means against a per-request mean).")
    return tuple(notes)
