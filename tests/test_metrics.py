import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from harness import metrics
from harness.metrics import REQUEST_COLUMNS
from harness.specs import UserError


def frame(rows):
    df = pd.DataFrame(rows)
    for col in REQUEST_COLUMNS:
        if col not in df:
            df[col] = {"source": "simulated", "cached_tokens": 0, "error": "", "success": True,
                       "prompt_tokens": 10, "request_id": "r"}.get(col, np.nan)
    return df


def req(start, chunks, success=True, prompt=10):
    return {"start_s": start, "scheduled_s": start, "first_token_s": chunks[0] if chunks else math.nan,
            "end_s": chunks[-1] if chunks else start + 1, "chunk_times_s": list(chunks),
            "output_tokens": len(chunks), "success": success, "prompt_tokens": prompt}


def test_hand_computed_example():
    df = frame([req(0.0, [0.1, 0.2, 0.4]), req(1.0, [1.5, 1.6]), req(2.0, [], success=False)])
    m = metrics.compute(df)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["mean_ttft_ms"] == pytest.approx(300)          # 100 and 500
    assert m["median_ttft_ms"] == pytest.approx(300)
    assert m["mean_e2el_ms"] == pytest.approx((400 + 600) / 2)
    assert m["mean_tpot_ms"] == pytest.approx((150 + 100) / 2)  # (400-100)/2 and (600-500)/1
    assert m["mean_itl_ms"] == pytest.approx((100 + 200 + 100) / 3)  # no gap across requests
    assert m["duration"] == pytest.approx(3.0)                # the failure's end counts
    assert m["output_throughput"] == pytest.approx(5 / 3.0)
    assert m["total_token_throughput"] == pytest.approx(25 / 3.0)
    assert m["request_throughput"] == pytest.approx(2 / 3.0)


def test_single_token_requests_have_no_tpot():
    m = metrics.compute(frame([req(0.0, [0.2])]))
    assert math.isnan(m["mean_tpot_ms"]) and math.isnan(m["mean_itl_ms"])
    assert m["mean_ttft_ms"] == pytest.approx(200)


def test_goodput_counts_requests_meeting_every_slo():
    df = frame([req(0.0, [0.1, 0.2]), req(0.0, [0.6, 0.7]), req(0.0, [0.1, 0.5]), req(0.0, [0.05])])
    m = metrics.compute(df, "ttft:500 tpot:200")
    # second misses TTFT, third misses TPOT (400 ms); the single-token one has no TPOT and passes
    assert m["good_requests"] == 2
    assert m["request_goodput"] == pytest.approx(2 / m["duration"])
    m_itl = metrics.compute(df, {"itl": 150})
    assert m_itl["good_requests"] == 3


@pytest.mark.parametrize("bad", ["ttft", "ttft:abc", "latency:5", "ttft:-1"])
def test_bad_slo_is_a_user_error(bad):
    with pytest.raises(UserError):
        metrics.parse_slo(bad)


def test_percentiles_use_vllm_names():
    df = frame([req(float(i), [i + 0.001 * (i + 1), i + 1.0]) for i in range(100)])
    m = metrics.compute(df)
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p90", "p95", "p99"):
            assert f"{stat}_{name}_ms" in m
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile(np.arange(1, 101), 99))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0.001, 5), min_size=0, max_size=6), min_size=1, max_size=12))
def test_itl_matches_a_plain_loop(gap_lists):
    rows, expect, maxima = [], [], []
    for i, gaps in enumerate(gap_lists):
        chunks = list(np.cumsum([0.01] + gaps) + i)
        rows.append(req(float(i), chunks))
        expect.extend(np.diff(chunks) * 1e3)
        maxima.append(max(np.diff(chunks) * 1e3) if len(chunks) > 1 else math.nan)
    df = frame(rows)
    lengths, flat = metrics.flatten_chunks(df["chunk_times_s"])
    assert metrics.inter_token_gaps(lengths, flat) * 1e3 == pytest.approx(expect)
    got = metrics._max_gap_per_request(lengths, flat)
    assert np.allclose(got, maxima, equal_nan=True)


def test_headline_labels_the_source():
    text = metrics.headline(metrics.compute(frame([req(0.0, [0.1, 0.2])])), "simulated")
    # human labels with units from the catalogue, not raw keys
    assert text.startswith("metrics (simulated)") and "mean TTFT" in text and "100.00 ms" in text
    assert "mean_ttft_ms" not in text
