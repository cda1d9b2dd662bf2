"""The load generator against a real embedded server: records, modes, warm-up, failures, time bound."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness import metrics
from harness.backends.instant import InstantBackend, WordTokenizer
from harness.serving.loadgen import LoadMode, Target, prompt_text, run_load_sync, schedule, sweep_modes
from harness.metrics import REQUEST_COLUMNS
from harness.serving.server import EmbeddedServer
from harness.specs import UserError
from harness.workloads import RequestSpec, build_workload, parse_workload


def _workload(text="constant,rate=200,n=12,prompt=uniform:8:40,output=uniform:2:12"):
    return build_workload(parse_workload(text))


def test_rows_have_record_columns_and_usage_counts(instant_server):
    wl = _workload()
    result = run_load_sync(Target(instant_server.url), wl, LoadMode("concurrent", 4))
    df = result.frame()
    assert list(df.columns) == list(REQUEST_COLUMNS)
    assert len(df) == len(wl) and df["success"].all() and (df["source"] == "measured").all()
    assert df["output_tokens"].tolist() == wl.output_tokens.tolist()      # pinned lengths, from usage
    assert df["prompt_tokens"].tolist() == wl.prompt_tokens.tolist()      # one word, one token
    assert [len(c) for c in df["chunk_times_s"]] == wl.output_tokens.tolist()
    ordered = (df["scheduled_s"] <= df["start_s"]) & (df["start_s"] <= df["first_token_s"]) \
        & (df["first_token_s"] <= df["end_s"])
    assert ordered.all()
    summary = metrics.compute(df)
    assert summary["completed"] == len(wl) and summary["total_output_tokens"] == int(wl.output_tokens.sum())


def test_chat_endpoint_records_the_same_work(instant_server):
    wl = _workload("constant,rate=500,n=4,prompt=16,output=5")
    df = run_load_sync(Target(instant_server.url, endpoint="chat"), wl, LoadMode("synchronous")).frame()
    assert df["success"].all() and (df["output_tokens"] == 5).all()


def test_progress_is_reported_per_finished_request(instant_server):
    seen = []
    run_load_sync(Target(instant_server.url), _workload(), LoadMode("constant", 200.0),
                  progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 12) for i in range(1, 13)]


def test_closed_loop_never_exceeds_its_concurrency():
    backend = InstantBackend(token_interval_s=0.002)
    wl = _workload("constant,rate=1,n=12,prompt=4,output=6")
    with EmbeddedServer(backend) as server:
        df = run_load_sync(Target(server.url), wl, LoadMode("concurrent", 3)).frame()
    events = sorted([(s, 1) for s in df["start_s"]] + [(e, -1) for e in df["end_s"]], key=lambda x: (x[0], x[1]))
    in_flight = np.cumsum([d for _, d in events])
    assert in_flight.max() == 3


def test_synchronous_mode_sends_one_at_a_time(instant_server):
    df = run_load_sync(Target(instant_server.url), _workload(), LoadMode("synchronous")).frame()
    df = df.sort_values("start_s")
    assert (df["start_s"].to_numpy()[1:] >= df["end_s"].to_numpy()[:-1]).all()


def test_open_loop_schedules():
    specs = list(_workload("all_at_once,n=5,prompt=4,output=2"))
    assert schedule(LoadMode("constant", 4.0), specs).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    p1, p2 = schedule(LoadMode("poisson", 2.0, seed=7), specs), schedule(LoadMode("poisson", 2.0, seed=7), specs)
    assert p1.tolist() == p2.tolist() and p1[0] == 0 and (np.diff(p1) > 0).all()
    assert schedule(LoadMode("concurrent", 2), specs) is None
    assert [m.label for m in sweep_modes("poisson", [1, 2.5])] == ["poisson=1", "poisson=2.5"]


def test_scheduled_times_follow_the_mode(instant_server):
    df = run_load_sync(Target(instant_server.url), _workload(), LoadMode("constant", 100.0)).frame()
    assert np.allclose(sorted(df["scheduled_s"]), np.arange(12) / 100.0)


def test_warmup_requests_are_sent_but_not_recorded():
    backend = InstantBackend()
    with EmbeddedServer(backend) as server:
        df = run_load_sync(Target(server.url), _workload(), LoadMode("concurrent", 2), warmup=3).frame()
        served = backend.stats()["requests_served"]
    assert len(df) == 12 and served == 15
    assert not df["request_id"].str.startswith("warmup").any()


def test_failures_are_recorded_not_raised():
    with EmbeddedServer(InstantBackend(), api_key="k") as server:
        df = run_load_sync(Target(server.url, model="instant"), _workload(), LoadMode("concurrent", 4)).frame()
    assert not df["success"].any()
    assert df["error"].str.startswith("HTTP 401").all()
    assert metrics.compute(df)["failed"] == 12


def test_time_bound_cancels_and_records_unfinished_requests():
    backend = InstantBackend(token_interval_s=0.05)
    wl = _workload("all_at_once,n=3,prompt=4,output=200")     # 10 s each if left alone
    with EmbeddedServer(backend) as server:
        df = run_load_sync(Target(server.url), wl, LoadMode(), max_duration_s=0.2).frame()
    assert len(df) == 3 and not df["success"].any()
    assert (df["error"] == "cancelled: run time limit").all()
    assert (df["output_tokens"] < 200).all()


def test_shared_prefixes_share_prompt_words():
    a = RequestSpec("a", 0.0, 20, 1, prefix_id="conv-1", prefix_tokens=12)
    b = RequestSpec("b", 0.0, 30, 1, prefix_id="conv-1", prefix_tokens=12)
    ta, tb = prompt_text(a, 0).split(), prompt_text(b, 1).split()
    assert ta[:12] == tb[:12] and ta[12:] != tb[12:20]
    assert len(WordTokenizer().encode(prompt_text(b, 1))) == 30


def test_bad_mode_is_a_user_error():
    with pytest.raises(UserError):
        LoadMode("concurrent", 0)
    with pytest.raises(UserError):
        LoadMode("bursty", 1)


def test_dispatch_summary_reports_lag(instant_server):
    result = run_load_sync(Target(instant_server.url), _workload(), LoadMode("constant", 100.0))
    lag = result.dispatch_summary()
    assert set(lag) == {"mean_dispatch_delay_ms", "p99_dispatch_delay_ms", "max_dispatch_delay_ms"}
    assert all(math.isfinite(v) and v >= 0 for v in lag.values())
