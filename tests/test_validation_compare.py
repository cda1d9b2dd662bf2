"""harness.validation: the error figures, the gate and the validation file, on exact small tables."""
import math

import numpy as np
import pandas as pd
import pytest

from harness.metrics import REQUEST_COLUMNS
from harness.specs import UserError
from harness.validation import compare
from harness.validation.run import gate, replay_workload
from harness.validation.spec import spec_from_dict


def requests(ttft_s, tpot_s, n_out=5, ids=None, start=None):
    rows = []
    for i, (ttft, tpot) in enumerate(zip(ttft_s, tpot_s)):
        s = 0.0 if start is None else start[i]
        chunks = [s + ttft + k * tpot for k in range(n_out)]
        rows.append({"request_id": (ids or [f"req-{j:06d}" for j in range(len(ttft_s))])[i], "source": "measured",
                     "scheduled_s": s, "start_s": s, "first_token_s": chunks[0], "end_s": chunks[-1],
                     "prompt_tokens": 16, "output_tokens": n_out, "cached_tokens": 0, "chunk_times_s": chunks,
                     "success": True, "error": ""})
    return pd.DataFrame(rows)[list(REQUEST_COLUMNS)]


def test_signed_error_is_sim_minus_real_over_real():
    assert compare.signed_error_pct(90.0, 100.0) == pytest.approx(-10.0)
    assert compare.signed_error_pct(110.0, 100.0) == pytest.approx(10.0)
    assert math.isnan(compare.signed_error_pct(1.0, 0.0)) and math.isnan(compare.signed_error_pct(math.nan, 1.0))


def test_statistics_and_per_request_errors():
    real = requests([0.100, 0.200], [0.010, 0.010])
    sim = requests([0.110, 0.180], [0.012, 0.010])
    out = compare.compare(real, sim)
    assert out["errors"]["mean_ttft_ms"]["error_pct"] == pytest.approx((145 - 150) / 150 * 100)
    assert out["errors"]["mean_tpot_ms"]["error_pct"] == pytest.approx(10.0)
    pr = out["per_request"]
    assert pr["requests_joined"] == 2
    assert pr["ttft"]["mape_pct"] == pytest.approx(10.0)          # +10 % and -10 %
    assert pr["ttft"]["mean_signed_pct"] == pytest.approx(0.0)


def test_per_request_join_uses_ids_not_order():
    real = requests([0.1, 0.2], [0.01, 0.01], ids=["a", "b"])
    sim = requests([0.2, 0.1], [0.01, 0.01], ids=["b", "a"])
    assert compare.per_request_errors(real, sim)["ttft"]["mape_pct"] == pytest.approx(0.0)


def point(level, key, err, measured=100.0):
    errors = {k: {"measured": measured, "simulated": measured, "error_pct": 0.0} for k in compare.metric_keys()}
    errors[key] = {"measured": measured, "simulated": measured * (1 + err / 100), "error_pct": err}
    return {"point": f"p-{level}", "level": level, "errors": errors}


def test_gate_checks_points_below_saturation_only():
    limits = {"mean_tpot_ms": 5.0}
    assert gate([point("0.5", "mean_tpot_ms", 4.0)], limits, 5.0) == []
    assert len(gate([point("0.5", "mean_tpot_ms", -6.0)], limits, 5.0)) == 1
    assert gate([point("saturation", "mean_tpot_ms", 50.0), point("1.3", "mean_tpot_ms", 50.0)], limits, 5.0) == []


def test_gate_lets_small_ttft_pass_on_absolute_error():
    limits = {"median_ttft_ms": 10.0}
    assert gate([point("0.5", "median_ttft_ms", 20.0, measured=20.0)], limits, 5.0) == []    # 4 ms off
    assert len(gate([point("0.5", "median_ttft_ms", 20.0, measured=100.0)], limits, 5.0)) == 1


def test_replay_keeps_request_order_and_lengths():
    real = requests([0.1, 0.1, 0.1], [0.01] * 3, start=[0.5, 0.7, 0.65])
    wl = replay_workload(real, {"kind": "workload"})
    assert list(wl.arrival_s) == pytest.approx([0.0, 0.2, 0.2])   # non-decreasing, from the first send
    assert list(wl.prompt_tokens) == [16, 16, 16] and not wl.closed_loop
    closed = replay_workload(real, {"kind": "concurrent", "value": 4})
    assert closed.closed_loop and closed.concurrency == 4


def test_spec_rejects_typos_and_bad_values():
    base = {"model": "tiny", "topologies": [{"split": [6]}]}
    assert spec_from_dict(base, "t").topologies[0].ranks == 1
    with pytest.raises(UserError, match="toplogies"):
        spec_from_dict({**base, "toplogies": []}, "t")
    with pytest.raises(UserError, match="split"):
        spec_from_dict({**base, "topologies": [{"split": [0]}]}, "t")
    with pytest.raises(UserError, match="levels"):
        spec_from_dict({**base, "load": {"levels": [1.5]}}, "t")
    with pytest.raises(UserError, match="gate"):
        spec_from_dict({**base, "gate": {"mean_tpot": 5}}, "t")


def test_spec_topology_with_tensor_parallel_stages():
    spec = spec_from_dict({"model": "tiny", "topologies": [{"name": "tp2", "split": [6], "tp": [2]},
                                                           {"split": [4, 2], "tp": [2, 1]}, {"split": [3, 3]}]}, "t")
    assert [(t.ranks, t.degrees, t.tp) for t in spec.topologies] == [(2, (2,), (2,)), (3, (2, 1), (2, 1)),
                                                                     (2, (1, 1), ())]
    assert spec.topologies[1].name == "3-rank"
    with pytest.raises(UserError, match=r"topologies\[0\].tp must list one TP degree >= 1 per stage"):
        spec_from_dict({"model": "tiny", "topologies": [{"split": [4, 2], "tp": [2]}]}, "t")


def test_spec_prompt_tokens_may_be_a_range():
    from harness.validation.run import prompt_lengths
    base = {"model": "tiny", "topologies": [{"split": [6]}]}
    spec = spec_from_dict({**base, "workload": {"prompt_tokens": [64, 320]}}, "t")
    assert spec.prompt_tokens == (64, 320)
    assert prompt_lengths(spec.prompt_tokens) == {"dist": "uniform", "low": 64, "high": 320}
    assert prompt_lengths(128) == {"dist": "fixed", "value": 128}
    for bad in ([320, 64], [0, 8], [1, 2, 3], "many"):
        with pytest.raises(UserError, match="prompt_tokens must be an integer >= 1 or"):
            spec_from_dict({**base, "workload": {"prompt_tokens": bad}}, "t")
