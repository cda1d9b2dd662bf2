"""exo's per-step cost (issue 11): an engine seen only on clusters gets engines.<name>.step_overhead_s from its
multi-node rows (harness/catalog/calibration/public_mac_multinode.csv), held out by source, paid once per stage
per engine step by the planner and the simulator alike; rows of other engines never get it."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from harness import calibrate as cal
from harness import costmodel
from harness.cli import main

EXO_1468 = "https://github.com/exo-explore/exo/issues/1468"
EXO_2295 = "https://github.com/exo-explore/exo/issues/2295"
MINI_PAIR = "runs/clusters/mini-pair.json"


@pytest.fixture(scope="module")
def rows():
    single, _ = cal.load_observations([cal.DATA])
    multi, _ = cal.load_observations(cal.MULTINODE)
    return single, multi


def _one_stream_s(o, profile) -> float:
    """A one-stream decode token of a multi-node row with the planner's own functions: every stage's step and hop."""
    cluster, stages = cal.row_cluster(o)
    return sum(costmodel.decode_steps_s(cluster, o.model, stages, profile, 1, o.context))


def test_the_rows_are_exo_and_the_step_cost_is_charged_per_stage(rows):
    _, multi = rows
    fit_rows = cal.multinode_step_rows(multi, "exo")
    # one stream, zero depth, RDMA: GLM-5 tensor x2 and x4 (exo#1468), GLM-5.3-Flash pipeline x4 over TB5 (exo#2295)
    assert [o.row for o in fit_rows] == [2, 5, 7]
    assert {o.engine for o in fit_rows} == {"exo (MlxJaccl)"} and {cal.profile_engine(o.engine) for o in multi} == {"exo"}
    # the Wi-Fi row joins only when its TCP hops are priced by a fitted tcp_hop_latencies
    assert [o.row for o in cal.multinode_step_rows(multi, "exo", tcp_priced=True)] == [2, 5, 7, 9]
    # step_overhead_s is inside every stage's step: a 4-stage pipeline pays it 4 times a token, a TP group once
    base = costmodel.load_profile()
    more = dataclasses.replace(base, step_overhead_s=base.step_overhead_s + 0.001)
    for o, stages in ((fit_rows[0], 1), (fit_rows[2], 4)):
        assert _one_stream_s(o, more) - _one_stream_s(o, base) == pytest.approx(stages * 0.001, rel=1e-9)


def test_held_out_step_cost_comes_from_the_other_sources_rows_only(rows):
    single, multi = rows
    # exo#1468 held out: exo#2295's one usable row (pipeline x4 over TB5 RDMA, 25.4 tok/s) alone
    rest = [o for o in multi if o.source != EXO_1468]
    plain = cal.fit_profile(single + rest, exclude_sources=(EXO_1468,), multinode_engines=False)
    (row7,) = cal.multinode_step_rows(rest, "exo")
    expected = round(plain.step_overhead_s + (1 / 25.4 - _one_stream_s(row7, plain)) / 4, 6)
    got = cal.fit_profile(single + rest, exclude_sources=(EXO_1468,)).engines["exo"]["step_overhead_s"]
    assert got == expected == 0.005762
    # exo#2295 held out: exo#1468's tensor x2 (18.3 tok/s) and x4 (23.7) rows, one stage each, on relative error
    rest = [o for o in multi if o.source != EXO_2295]
    plain = cal.fit_profile(single + rest, exclude_sources=(EXO_2295,), multinode_engines=False)
    t = np.array([1 / 18.3, 1 / 23.7])
    resid = t - np.array([_one_stream_s(o, plain) for o in cal.multinode_step_rows(rest, "exo")])
    expected = round(plain.step_overhead_s + float(np.sum(resid / t ** 2) / np.sum(1 / t ** 2)), 6)
    got = cal.fit_profile(single + rest, exclude_sources=(EXO_2295,)).engines["exo"]["step_overhead_s"]
    assert got == expected == 0.008221
    # the held-out source's own figures cannot move it
    faster = [dataclasses.replace(o, published_tok_s=2 * o.published_tok_s) if o.source == EXO_2295 else o
              for o in multi]
    assert cal.fit_profile(single + faster, exclude_sources=(EXO_2295,)).engines["exo"] == \
        cal.fit_profile(single + multi, exclude_sources=(EXO_2295,)).engines["exo"]


def test_loso_predicts_each_exo_source_with_the_other_ones_step_cost(rows):
    single, multi = rows
    held, _ = cal.leave_one_source_out(single + multi, sources={EXO_1468, EXO_2295})
    before, _ = cal.leave_one_source_out(single + multi, sources={EXO_1468, EXO_2295}, multinode_engines=False)
    after = {r["line"]: r["error_pct"] for r in held if r["kind"] == "tg"}
    assert sorted(after) == [2, 3, 4, 5, 6, 7, 9]
    assert cal._medians([r for r in before if r["nodes"] > 1])["decode_median_abs_error_pct"] == 35.2
    assert cal._medians(held)["decode_median_abs_error_pct"] == 16.0
    # every row was predicted too fast without the term; the term is per stage, so a pipeline row moves 4x as far
    assert all(r["error_pct"] > 0 for r in before if r["kind"] == "tg")
    assert after[2] == pytest.approx(6.2, abs=0.05) and after[7] == pytest.approx(-20.0, abs=0.05)


def test_rows_of_other_engines_are_unaffected(rows):
    single, multi = rows
    with_exo = cal.fit_profile(single + multi)
    without = cal.fit_profile(single + multi, multinode_engines=False)
    assert "exo" in with_exo.engines and "exo" not in without.engines
    assert dataclasses.replace(with_exo, engines=without.engines) == without   # nothing else moved
    for o in single:   # llama.cpp and mlx rows: bit-identical
        assert cal.predict(o, with_exo) == cal.predict(o, without)
    # a multi-node row of the default engine (mlx-lm's distributed ring) on the same cluster: unaffected
    o = dataclasses.replace(next(o for o in multi if o.row == 7), engine="mlx-lm")
    assert cal.predict(o, with_exo) == cal.predict(o, without)
    assert with_exo.for_engine("mlx-lm") is with_exo and with_exo.step_overhead_s == without.step_overhead_s


def test_committed_profile_carries_exo_with_its_provenance():
    data = json.loads((costmodel.PROFILE_DIR / "fitted.json").read_text())
    exo = data["engines"]["exo"]
    assert set(exo) == {"step_overhead_s", "basis"} and "lines 2, 5, 7" in exo["basis"]
    fit = data["fit"]["multinode_engines"]["engines"]["exo"]
    assert fit["step_overhead_s"] == exo["step_overhead_s"]
    assert fit["sources"] == [EXO_1468, EXO_2295] and [r["line"] for r in fit["rows"]] == [2, 5, 7]
    assert fit["held_out_step_overhead_s"] == {EXO_1468: 0.005762, EXO_2295: 0.008221}


def _tpot_ms(tmp_path, capsys, engine) -> tuple[float, float]:
    common = ["--cluster", MINI_PAIR, "--model", "llama-3.2-3b", "--quant", "4", "--strategy", "uniform",
              "--engine", engine, "--context-tokens", "528"]
    assert main(["plan", *common, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["stages"]) == 2
    out = tmp_path / engine
    assert main(["simulate", *common, "--workload", "poisson,rate=0.1,n=1,prompt=512,output=33,seed=1",
                 "--out", str(out), "--quiet", "--no-load"]) == 0
    capsys.readouterr()
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return plan["predicted"]["tpot_ms"], json.loads((run / "summary.json").read_text())["metrics"]["mean_tpot_ms"]


def test_plan_and_simulate_agree_on_exos_single_stream_step(tmp_path, capsys):
    """A 2-stage pipeline, one stream: the planner's time per token (at the stream's mean context, 512 + 32 / 2)
    and the simulator's TPOT agree, and both pay exo's step cost once per stage (2 x) over mlx-lm's."""
    plan_exo, sim_exo = _tpot_ms(tmp_path, capsys, "exo")
    plan_mlx, sim_mlx = _tpot_ms(tmp_path, capsys, "mlx-lm")
    assert sim_exo == pytest.approx(plan_exo, rel=1e-4)
    step = costmodel.load_profile().for_engine("exo").step_overhead_s - costmodel.load_profile().step_overhead_s
    assert plan_exo - plan_mlx == pytest.approx(2e3 * step, rel=1e-6)
    assert sim_exo - sim_mlx == pytest.approx(2e3 * step, rel=1e-4)
