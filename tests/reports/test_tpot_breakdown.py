"""Issue 9: the run's mean TPOT split into compute, communication, batching, prefill interference and waiting."""
from pathlib import Path

import pandas as pd
import pytest

import reports
from harness.cli import main
from harness.metrics import REQUEST_COLUMNS, STEP_COLUMNS
from reports.breakdown import REMAINDER, tpot_breakdown, tpot_view
from reports.run import load_run
from report_runs import write_run

PROMPT = 11          # a prefill chunk of one whole prompt adds PROMPT tokens and 1 sequence to a step


def two_stage_step(step, kind, batch, tokens, stage0, send, stage1):
    """The rows the engine writes for one micro-batch through two stages: stage 0, its send, stage 1."""
    base = dict(step=step, kind=kind, batch_size=batch, tokens=tokens, kv_bytes=0, compute_s=float("nan"), source="simulated")
    return [dict(base, stage=0, node="a", start_s=stage0[0], end_s=stage0[1]),
            dict(base, stage=1, node="b", start_s=stage1[0], end_s=stage1[1]),
            dict(base, stage=0, node="a", kind="send", start_s=send[0], end_s=send[1])]


def known_steps() -> pd.DataFrame:
    rows = (two_stage_step(1, "decode", 1, 1, (0.0, 0.010), (0.010, 0.012), (0.012, 0.022))       # 20 ms compute
            + two_stage_step(2, "decode", 2, 2, (1.0, 1.015), (1.015, 1.017), (1.017, 1.032))     # 30 ms
            + two_stage_step(3, "prefill", 1, PROMPT, (2.0, 2.1), (2.1, 2.11), (2.11, 2.31))
            # ready at stage 1 at 2.117 but the prefill holds it until 2.31: 193 ms behind a prefill
            + two_stage_step(4, "decode", 2, 2, (2.1, 2.115), (2.115, 2.117), (2.31, 2.325))
            # 2 decodes + one prompt chunk: 100 ms where a decode-only step of batch 3 takes 40 ms (line fit)
            + two_stage_step(5, "mixed", 3, 2 + PROMPT, (3.0, 3.05), (3.05, 3.052), (3.052, 3.102)))
    return pd.DataFrame(rows)[list(STEP_COLUMNS)]


def known_requests(tpots_s=(0.1, 0.2)) -> pd.DataFrame:
    """Requests of 4 tokens each whose TPOTs are `tpots_s` exactly."""
    rows = []
    for i, tpot in enumerate(tpots_s):
        chunks = [1.0 + tpot * k for k in range(4)]
        rows.append(dict(request_id=f"r{i}", source="simulated", scheduled_s=0.0, start_s=0.0, first_token_s=1.0,
                         end_s=chunks[-1], prompt_tokens=PROMPT, output_tokens=4, cached_tokens=0,
                         chunk_times_s=chunks, success=True, error=""))
    return pd.DataFrame(rows)[list(REQUEST_COLUMNS)]


def parts_ms(found):
    return {p.key: p.ms for p in found.parts}


def test_hand_built_run_gives_exact_parts():
    found = tpot_breakdown(known_requests(), known_steps(), planned_tpot_ms=25.0)
    # decode tokens per step 1, 2, 2, 2 (the mixed step's prompt chunk is not a decode token): weights of 7
    expected = {"compute": 20.0, "communication": 14 / 7, "batching": (2 * 10 + 2 * 10 + 2 * 20) / 7,
                "prefill": (2 * 193 + 2 * 60) / 7}
    expected[REMAINDER] = 150.0 - sum(expected.values())
    assert parts_ms(found) == pytest.approx(expected, abs=1e-9)
    assert found.mean_tpot_ms == pytest.approx(150.0) and found.total_ms == pytest.approx(150.0, abs=1e-12)
    assert found.planned_tpot_ms == 25.0 and not found.remainder_negative


def test_a_negative_remainder_is_reported():
    found = tpot_breakdown(known_requests((0.05, 0.05)), known_steps())
    assert found.remainder_negative and found.total_ms == pytest.approx(50.0, abs=1e-12)


def test_without_step_records_there_is_no_breakdown():
    assert tpot_breakdown(known_requests(), pd.DataFrame(columns=list(STEP_COLUMNS))) is None


def simulate(out: Path, workload: str) -> Path:
    assert main(["simulate", "--cluster", "mixed", "--model", "llama-3.1-70b", "--quant", "4", "--strategy",
                 "uniform", "--workload", workload, "--seed", "1", "--quiet", "--out", str(out)]) == 0
    return next(p for p in out.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("loaded"), "poisson,rate=2,n=12,prompt=128,output=24")


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("alone"), "closed,concurrency=1,n=3,prompt=128,output=24")


def breakdown_of(path: Path):
    run = load_run(path)
    return tpot_breakdown(run.successful_requests(), run.steps, source=run.source)


def test_parts_of_a_simulated_run_sum_to_its_mean_tpot(loaded):
    found = breakdown_of(loaded)
    assert found.total_ms == pytest.approx(load_run(loaded).metrics["mean_tpot_ms"], abs=1e-6)


def test_batching_and_prefill_cost_appear_under_load_only(loaded, alone):
    busy, single = parts_ms(breakdown_of(loaded)), parts_ms(breakdown_of(alone))
    assert busy["batching"] > 0 and busy["prefill"] > 0
    assert single["batching"] == pytest.approx(0, abs=1e-9) and single["prefill"] == pytest.approx(0, abs=1e-9)
    assert single[REMAINDER] == pytest.approx(0, abs=1.0)        # one stream: its steps are its TPOT
    assert single["compute"] == pytest.approx(busy["compute"], rel=0.01)


def test_report_explains_the_gap_between_plan_and_run(loaded):
    html = reports.render([loaded], with_plots=False).read_text()
    section = html[html.index("Why TPOT differs from the plan"):]
    section = section[:section.index("</p>\n\n")]
    assert "prefill interference" in section and "waiting for a slot / pipeline bubbles" in section
    assert 'aria-label="plan (theoretical)"' in section and 'aria-label="run (simulated)"' in section
    assert "plan: TPOT of one stream" in section and "100.0 %" in section


def test_an_empty_steps_file_says_the_breakdown_needs_step_records(tmp_path):
    run = load_run(write_run(tmp_path, "outside"))
    run.steps = run.steps.iloc[0:0]
    view = tpot_view(run)
    assert view.table is None and "needs step records" in view.notes[0]
    html = reports.render_runs([run], tmp_path / "outside.html", with_plots=False).read_text()
    assert "Why TPOT differs from the plan" in html and "needs step records" in html


def test_a_step_of_several_forwards_waits_for_its_last_send():
    """Real ranks send once per forward, and a step can hold a prefill chunk and a decode: stage 1 may start only
    after the later send, so it waited 0 s here, not 0.5 s (and two sends for one step must not crash)."""
    from reports.breakdown import prefill_waits
    rows = [
        {"step": 0, "stage": 0, "kind": "prefill", "start_s": 0.0, "end_s": 1.0},
        {"step": 1, "stage": 0, "kind": "mixed", "start_s": 1.0, "end_s": 2.0},
        {"step": 1, "stage": 0, "kind": "send", "start_s": 1.4, "end_s": 1.5},
        {"step": 1, "stage": 0, "kind": "send", "start_s": 1.9, "end_s": 2.0},
        {"step": 0, "stage": 1, "kind": "prefill", "start_s": 1.0, "end_s": 2.0},
        {"step": 1, "stage": 1, "kind": "mixed", "start_s": 2.0, "end_s": 3.0},
    ]
    waits = prefill_waits(pd.DataFrame(rows))
    assert waits.loc[1] == pytest.approx(0.0)
