"""The load generator over worker processes (issue 15): same requests, same schedule, rows in request order,
a dead worker's error reported with the other rows kept, Ctrl-C keeping what finished. Real servers on
127.0.0.1; every run is a few dozen requests. No wall-clock assertions."""
from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest

from harness.backends.instant import InstantBackend
from harness.metrics import REQUEST_COLUMNS
from harness.serving.loadgen import LoadMode, LoadSink, Target, run_load_sync
from harness.serving.loadgen_workers import LoadWorkerError, split_jobs
from harness.serving.server import EmbeddedServer
from harness.workloads import build_workload, parse_workload
from tests.server.conftest import instant_server  # noqa: F401  (the fixture: a real server on 127.0.0.1)
from tests.test_nothing_lost import _assert_kept_what_finished, _only_folder, _signal_after_finished


def _workload(text="constant,rate=200,n=24,prompt=uniform:8:40,output=uniform:2:12"):
    return build_workload(parse_workload(text))


@pytest.mark.parametrize("mode", [LoadMode("constant", 200.0), LoadMode("poisson", 150.0, seed=3)])
def test_two_workers_send_what_one_sends_on_the_same_schedule(instant_server, mode):
    wl = _workload()
    one = run_load_sync(Target(instant_server.url), wl, mode, warmup=2).frame()
    two = run_load_sync(Target(instant_server.url), wl, mode, warmup=2, workers=2).frame()
    assert list(two.columns) == list(REQUEST_COLUMNS)
    assert two["request_id"].tolist() == one["request_id"].tolist() == [s.request_id for s in wl]   # in order
    assert two["scheduled_s"].tolist() == one["scheduled_s"].tolist()      # one clock, one global schedule
    assert two["output_tokens"].tolist() == one["output_tokens"].tolist() == wl.output_tokens.tolist()
    assert two["prompt_tokens"].tolist() == one["prompt_tokens"].tolist()
    assert two["success"].all() and (two["source"] == "measured").all()


def test_closed_loop_workers_share_the_concurrency(instant_server):
    wl = _workload("all_at_once,n=18,prompt=8,output=4")
    one = run_load_sync(Target(instant_server.url), wl, LoadMode("concurrent", 3)).frame()
    three = run_load_sync(Target(instant_server.url), wl, LoadMode("concurrent", 3), workers=3).frame()
    assert three["request_id"].tolist() == one["request_id"].tolist()
    assert three["output_tokens"].tolist() == one["output_tokens"].tolist() and three["success"].all()
    events = sorted([(s, 1) for s in three["start_s"]] + [(e, -1) for e in three["end_s"]])
    assert np.cumsum([d for _, d in events]).max() <= 3     # never more in flight than the concurrency


def test_shares_are_deterministic_and_keep_the_global_schedule():
    specs = list(_workload("constant,rate=10,n=7,prompt=4,output=2"))
    target = Target("http://127.0.0.1:9")
    jobs = split_jobs(target, "m", specs, LoadMode("constant", 10.0), 2, warmup=3, seed=0, max_duration_s=None)
    assert [j.positions for j in jobs] == [(0, 2, 4, 6), (1, 3, 5)]
    assert jobs[1].times == (0.1, 0.3, 0.5)
    assert [[i for i, _ in j.warm] for j in jobs] == [[0, 2], [1]]
    closed = split_jobs(target, "m", specs, LoadMode("concurrent", 3), 2, warmup=0, seed=0, max_duration_s=None)
    assert [j.concurrency for j in closed] == [2, 1] and [j.positions for j in closed] == [(0, 2, 3, 5, 6), (1, 4)]
    assert len(split_jobs(target, "m", specs, LoadMode("synchronous"), 4, warmup=0, seed=0, max_duration_s=None)) == 1


class _KillSecondWorker(LoadSink):
    """Kills worker 2 when the first row comes back (a crash mid-run)."""

    def __init__(self):
        super().__init__(self._on_row)
        self.pids: list[int] = []
        self.seen: list[dict] = []

    def workers_started(self, pids):
        self.pids = pids

    def _on_row(self, row):
        self.seen.append(row)
        if len(self.seen) == 1:
            os.kill(self.pids[1], signal.SIGKILL)


def test_a_killed_worker_keeps_the_other_rows_and_raises_a_clear_error():
    wl = _workload("constant,rate=40,n=12,prompt=4,output=5")
    sink = _KillSecondWorker()
    with EmbeddedServer(InstantBackend(token_interval_s=0.01)) as server:
        with pytest.raises(LoadWorkerError) as caught:
            run_load_sync(Target(server.url), wl, LoadMode(), sink=sink, workers=2)
    message = str(caught.value)
    assert "worker 2 of 2" in message and "killed by signal 9" in message and "not recorded" in message
    rows = caught.value.result.rows
    ids = [r["request_id"] for r in rows]
    first_workers = [s.request_id for i, s in enumerate(wl) if i % 2 == 0]
    assert set(first_workers) <= set(ids) and len(ids) < len(wl)      # worker 1's share whole, worker 2's cut
    assert ids == sorted(ids) and all(r["success"] for r in rows)
    assert sorted(r["request_id"] for r in sink.seen) == ids          # every kept row also reached the sink


def test_dispatch_delay_is_recorded_per_request(instant_server):
    result = run_load_sync(Target(instant_server.url), _workload(), LoadMode("constant", 200.0), workers=2)
    df = result.frame()
    delays = result.dispatch_delays_s()
    assert len(delays) == len(df) and np.allclose(delays, df["start_s"] - df["scheduled_s"])
    assert all(math.isfinite(d) for d in delays)
    from harness.commands.bench import dispatch_line
    line = dispatch_line(result)
    assert "p50" in line and "p99" in line and "2 load generator worker processes" in line


def test_bad_worker_count_is_refused(instant_server):
    from harness.specs import UserError
    with pytest.raises(UserError):
        run_load_sync(Target(instant_server.url), _workload(), LoadMode(), workers=0)


def test_ctrl_c_in_bench_with_workers_keeps_the_finished_requests(tmp_path):
    args = ["bench", "--backend", "sim", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b",
            "--workload", "poisson,rate=3,n=16,prompt=64,output=8", "--warmup", "0", "--workers", "2"]
    rc, out, journaled = _signal_after_finished(args, tmp_path / "out", signal.SIGINT)
    assert rc == 130, out
    _assert_kept_what_finished(_only_folder(tmp_path / "out"), journaled, "interrupted (Ctrl-C)")


# ---------------------------------------------------------------------------------------------- the SSE fast path

EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
    b'data: {"choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}',
    b'data: {"choices":[{"index":0,"delta":{"content":"\\"quoted\\" usage"},"finish_reason":null}]}',
    b'data: {"choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null}]}',
    b'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}',
    b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"hm"},"finish_reason":null}]}',
    b'data: {"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":3,"total_tokens":11}}',
    b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}',
    b'data: {"error":{"message":"overloaded"}}',
    b'data: {"choices": [{"index": 0, "delta": {"content": "spaced"}}]}',
    b': keep-alive comment',
    b'data: [DONE]',
]


def _full_path(event: bytes) -> tuple:
    from harness.serving import loadgen
    chunks, state = [], {"usage": None, "error": None, "done": False}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loadgen, "_is_plain_content", lambda _event: False)
        loadgen._handle_event(event, 1.0, chunks, state)
    return chunks, state


@pytest.mark.parametrize("event", EVENTS)
def test_the_fast_sse_path_reads_every_event_as_the_full_path_does(event):
    from harness.serving.loadgen import _handle_event
    chunks, state = [], {"usage": None, "error": None, "done": False}
    _handle_event(event, 1.0, chunks, state)
    assert (chunks, state) == _full_path(event)


class _Stream:
    """A response whose body arrives in the given reads."""

    def __init__(self, reads):
        self.reads, self.headers = reads, {}

    async def aiter_raw(self):
        for data in self.reads:
            yield data


def test_events_split_anywhere_across_reads_are_all_read():
    import asyncio
    from harness.serving.loadgen import _Clock, _read_sse
    body = b"".join(e + b"\r\n\r\n" for e in EVENTS[:4] + EVENTS[6:7] + EVENTS[-1:])
    for cut in range(1, len(body)):
        chunks, state = [], {"usage": None, "error": None, "done": False}
        asyncio.run(_read_sse(_Stream([body[:cut], body[cut:]]), chunks, state, _Clock()))
        assert len(chunks) == 3 and state["usage"]["completion_tokens"] == 3 and state["done"], cut
