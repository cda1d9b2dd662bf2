"""EngineConfig(step_records="summary"): per-window aggregates of the step records instead of one row per
micro-batch and stage. The requests must be byte for byte the full-records ones, and the summary must be exactly
what aggregating the full records gives, on workloads that exercise every record writer (one-by-one steps,
single-scheduler fast-forward, sim.steady windows, prefill/mixed steps, faults, a prefix cache, TP, a closed loop)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from harness.catalog import load_model
from harness.metrics import STEP_SUMMARY_COLUMNS
from harness.specs import UserError
from harness.workloads import build_workload, parse_workload
from sim import EngineConfig, simulate
from sim.engine import Engine
from sim.prefix_cache import make_prefix_cache
from tests.sim.conftest import make_cluster, make_plan, make_profile
from tests.sim.test_sim_golden import CHATS, _four_stages, _one_stage, _uniform_8b


def _tp():
    model = load_model("llama-3.1-8b", 4)
    return make_cluster(3), model, make_plan(model, [("n0", "n1"), ("n2",)], [20, 12]), make_profile()


def _fault_setup():
    model = load_model("llama-3.1-8b", 4, 64)
    return make_cluster(3), model, make_plan(model, [("n0",), ("n1",)], [16, 16]), make_profile()


CASES = {
    "one_stage": (_one_stage, "poisson,rate=1,n=60,prompt=512,output=128,seed=7", {}),
    "four_stages_light": (_four_stages, "poisson,rate=0.2,n=20,prompt=512,output=128,seed=5", {}),
    "four_stages_busy": (_four_stages, "poisson,rate=2,n=40,prompt=512,output=64,seed=11", {"include_load": False}),
    "prefix_cache": (_uniform_8b, CHATS, {"include_load": False, "cache": "lru"}),
    "node_down": (_fault_setup, "poisson,rate=2,n=60,prompt=256,output=64,seed=3",
                  {"include_load": False, "faults": [dict(kind="node_down", node="n1", at_s=8.0)]}),
    "straggler": (_fault_setup, "poisson,rate=2,n=60,prompt=256,output=64,seed=3",
                  {"include_load": False, "faults": [dict(kind="straggler", node="n0", at_s=4.0, factor=2.0)]}),
    "tensor_parallel": (_tp, "poisson,rate=1,n=40,prompt=300,output=48,seed=2", {}),
    "closed_loop": (_four_stages, "closed,concurrency=6,n=60,prompt=128,output=32,seed=4", {"include_load": False}),
}


def _simulate(name, config, sink=False):
    setup_fn, spec, kw = CASES[name]
    setup = setup_fn()
    kw = dict(kw)
    if kw.get("cache"):
        kw["cache"] = make_prefix_cache(kw["cache"], *setup)
    workload = build_workload(parse_workload(spec) if isinstance(spec, str) else spec)
    pieces = []
    res = simulate(*setup, workload, config, step_sink=pieces.append if sink else None, **kw)
    if sink:
        from harness.metrics import STEP_COLUMNS, arrow_schema
        steps = pa.concat_tables([arrow_schema(STEP_COLUMNS).empty_table(), *pieces])
    else:
        steps = res.steps
    return res, steps


def _ipc_bytes(table) -> bytes:
    """The table's bytes (one record batch, so how it was chunked does not count)."""
    table = table.combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _aggregate(steps: pd.DataFrame, width: float) -> pd.DataFrame:
    """What the summary must hold: the full records grouped as Engine.step_summary_table documents."""
    rows = steps[steps["kind"] != "load"].copy()
    rows["window"] = np.floor(rows["start_s"] / width).astype(np.int64)
    rows["dur"] = rows["end_s"] - rows["start_s"]
    g = rows.groupby(["window", "stage", "kind"], sort=False)
    out = g.agg(node=("node", "first"), steps=("dur", "size"), busy_s=("dur", "sum"), min_s=("dur", "min"),
                max_s=("dur", "max"), tokens=("tokens", "sum"), sequences=("batch_size", "sum"),
                kv_bytes_max=("kv_bytes", "max")).reset_index()
    return out.sort_values(["window", "stage", "kind"]).reset_index(drop=True)


def _summary_frame(table, width: float) -> pd.DataFrame:
    df = table.to_pandas()
    df["window"] = np.rint(df["window_start_s"] / width).astype(np.int64)
    return df.sort_values(["window", "stage", "kind"]).reset_index(drop=True)


@pytest.mark.parametrize("name", list(CASES))
def test_summary_keeps_requests_byte_identical_and_aggregates_the_full_records(name):
    width = 0.5
    full, full_steps = _simulate(name, EngineConfig())
    summ, summ_steps = _simulate(name, EngineConfig(step_records="summary", step_window_s=width))
    assert _ipc_bytes(summ.requests) == _ipc_bytes(full.requests)
    assert full.step_summary is None
    assert summ.stats["engine_steps"] == full.stats["engine_steps"]
    # only the model-load rows stay per step
    load = full_steps.filter(pa.compute.equal(full_steps["kind"], "load"))
    assert _ipc_bytes(summ_steps) == _ipc_bytes(load)
    assert summ.step_summary.schema.names == list(STEP_SUMMARY_COLUMNS)
    want = _aggregate(full_steps.to_pandas(), width)
    got = _summary_frame(summ.step_summary, width)
    assert len(got) == len(want) > 0
    for col in ("window", "stage", "kind", "node", "steps", "min_s", "max_s", "tokens", "sequences", "kv_bytes_max"):
        assert got[col].tolist() == want[col].tolist(), col
    np.testing.assert_allclose(got["busy_s"], want["busy_s"], rtol=1e-12)
    assert (got["window_end_s"] - got["window_start_s"]).round(12).eq(width).all()
    assert int(got["steps"].sum()) == len(full_steps) - len(load)


@pytest.mark.parametrize("name", ["four_stages_light", "closed_loop", "prefix_cache"])
def test_summary_streamed_in_small_blocks_is_the_same(monkeypatch, name):
    """Blocks flushed mid-window (and mid-steady-window) merge into the same aggregates."""
    config = EngineConfig(step_records="summary", step_window_s=2.0)
    whole, _ = _simulate(name, config)
    monkeypatch.setattr(Engine, "STREAM_ROWS", 97)
    pieces, pieces_steps = _simulate(name, config, sink=True)
    assert _ipc_bytes(pieces.requests) == _ipc_bytes(whole.requests)
    a, b = _summary_frame(whole.step_summary, 2.0), _summary_frame(pieces.step_summary, 2.0)
    assert a.drop(columns="busy_s").equals(b.drop(columns="busy_s"))
    np.testing.assert_allclose(a["busy_s"], b["busy_s"], rtol=1e-12)
    assert set(pieces_steps.column("kind").to_pylist()) <= {"load"}


def test_full_records_streamed_in_small_blocks_match_the_whole_table(monkeypatch):
    """Flushes in the middle of steady windows and fast-forwarded runs (a run longer than the buffer grows it)."""
    whole, steps = _simulate("four_stages_light", EngineConfig())
    monkeypatch.setattr(Engine, "STREAM_ROWS", 97)
    _, pieces = _simulate("four_stages_light", EngineConfig(), sink=True)
    assert _ipc_bytes(pieces) == _ipc_bytes(steps)
    assert whole.stats["steady_window_steps"] > 0


def test_bad_step_records_settings_are_refused():
    with pytest.raises(UserError, match="step_records"):
        EngineConfig(step_records="some")
    with pytest.raises(UserError, match="step_window_s"):
        EngineConfig(step_records="summary", step_window_s=0)
    assert dataclasses.asdict(EngineConfig())["step_records"] == "full"


def test_simulate_step_records_summary_writes_the_summary_and_the_report_says_what_is_missing(tmp_path, capsys):
    from harness.cli import main
    from harness.runfolder import read_run
    from reports.breakdown import tpot_view
    from reports import render
    from reports.plots import node_timelines
    from reports.run import SUMMARY_ONLY, load_run
    common = ["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--quant", "4",
              "--strategy", "uniform", "--workload", "poisson,rate=4,n=30,prompt=256,output=32", "--seed", "5",
              "--out", str(tmp_path), "--quiet"]
    assert main(common + ["--run-id", "full"]) == 0
    assert main(common + ["--run-id", "summ", "--step-records", "summary", "--step-window-s", "2"]) == 0
    full, summ = read_run(tmp_path / "full"), read_run(tmp_path / "summ")
    assert full.requests().equals(summ.requests())
    assert summ.config["engine"]["step_records"] == "summary" and summ.config["engine"]["step_window_s"] == 2.0
    assert set(summ.steps().kind) == {"load"}
    table = pd.read_parquet(tmp_path / "summ" / "step_summary.parquet")
    assert list(table.columns) == list(STEP_SUMMARY_COLUMNS)
    full_steps = full.steps()
    assert int(table["steps"].sum()) == int((full_steps.kind != "load").sum())
    assert summ.summary["metrics"]["load_time_s"] == full.summary["metrics"]["load_time_s"]
    assert not (tmp_path / "full" / "step_summary.parquet").exists()
    run = load_run(tmp_path / "summ")
    assert run.step_records == "summary" and load_run(tmp_path / "full").step_records == "full"
    assert node_timelines(run) is None
    view = tpot_view(run)
    assert view.table is None and SUMMARY_ONLY in view.notes[0]
    html = render([tmp_path / "summ"], tmp_path / "summ.html").read_text()
    assert "--step-records full" in html
