"""The real backend: ring ranks on loopback produce exactly what one mlx-lm process produces.

These start real rank processes on the tiny model (built once per session, about 2 s).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from harness.backends.base import BackendUnavailable, GenerationRequest, InvalidRequest
from harness.backends.mlx import MlxBackend
from harness.mlx.errors import UserError
from harness.mlx.launcher import LinkShape

PROMPT_TEXT = "def fibonacci(n):\n    return"
GUARD_S = 30   # hang guard only: a correct backend answers in well under a second


@pytest.fixture(scope="session")
def reference(tiny):
    """Greedy tokens from plain mlx-lm in this process: no ranks, no harness code in the loop."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load

    model, tok = load(str(tiny))
    prompt = tok.encode(PROMPT_TEXT)
    steps = generate_step(mx.array(prompt), model, max_tokens=24, sampler=make_sampler(temp=0.0))
    return tuple(prompt), [int(t) for t, _ in steps]


async def _collect(backend, request):
    return [ev async for ev in backend.generate(request)]


async def _generate(split, tiny, prompt, n_requests=1, **req):
    backend = MlxBackend(tiny, split)
    try:
        report = await backend.load()
        reqs = [GenerationRequest(f"r{i}", prompt, **{"max_tokens": 24, "ignore_eos": True, **req})
                for i in range(n_requests)]
        outs = await asyncio.wait_for(asyncio.gather(*[_collect(backend, r) for r in reqs]), GUARD_S)
        return outs, report, backend.step_records(), backend.request_records()
    finally:
        await backend.close()


@pytest.mark.slow
@pytest.mark.parametrize("split", [[2, 4], [5, 1], [1, 3, 2]])
def test_pipeline_greedy_tokens_equal_one_process(tiny, reference, split):
    prompt, expected = reference
    assert len(set(expected)) > 3, "the tiny model must not repeat one token, or equality means little"
    outs, report, steps, _ = asyncio.run(_generate(split, tiny, prompt))
    assert [ev.token_id for ev in outs[0]] == expected
    assert len(report.load_s_per_node) == len(split)
    assert {r["stage"] for r in steps if r["kind"] == "decode"} == set(range(len(split)))


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_match(tiny, reference):
    prompt, expected = reference
    outs, _, steps, requests = asyncio.run(_generate([2, 4], tiny, prompt, n_requests=3))
    assert all([ev.token_id for ev in out] == expected for out in outs)
    assert max(r["batch_size"] for r in steps if r["kind"] == "decode") > 1
    assert all(r["success"] and r["output_tokens"] == 24 for r in requests)
    assert outs[0][-1].finish_reason == "length"


@pytest.mark.slow
def test_records_fit_the_run_folder_tables(tiny, reference, tmp_path):
    import pandas as pd
    from harness.runfolder import RunWriter, read_run
    prompt, _ = reference
    _, _, steps, requests = asyncio.run(_generate([2, 4], tiny, prompt, n_requests=2))
    with RunWriter(tmp_path, "mlx") as w:
        w.write_steps(pd.DataFrame(steps))
        w.write_requests(pd.DataFrame(requests))
    kinds = set(pd.read_parquet(w.path / "steps.parquet")["kind"])
    assert {"load", "prefill", "decode", "send", "recv"} <= kinds
    df = pd.read_parquet(w.path / "requests.parquet")
    assert (df["source"] == "measured").all() and (df["first_token_s"] <= df["end_s"]).all()
    assert df["chunk_times_s"].map(len).tolist() == [24, 24]


@pytest.mark.slow
def test_stop_token_and_min_tokens(tiny, reference):
    prompt, expected = reference
    stop_at = 3
    stop_token = expected[stop_at]
    first = expected.index(stop_token)       # the earliest position that token appears at
    outs, *_ = asyncio.run(_generate(None, tiny, prompt, ignore_eos=False, stop_token_ids=(stop_token,)))
    ids = [ev.token_id for ev in outs[0]]
    assert ids == expected[: first + 1] and outs[0][-1].finish_reason == "stop"
    # the stop token adds no text; its event only flushes what the detokenizer held back (a lone space)
    assert "".join(ev.text for ev in outs[0]) == MlxBackend(tiny).decode(ids[:-1])
    outs, *_ = asyncio.run(_generate(None, tiny, prompt, ignore_eos=False, stop_token_ids=(stop_token,),
                                     min_tokens=len(expected), max_tokens=len(expected)))
    assert [ev.token_id for ev in outs[0]] == expected and outs[0][-1].finish_reason == "length"


@pytest.mark.slow
def test_text_streams_decode_to_the_full_text(tiny, reference):
    prompt, expected = reference
    outs, *_ = asyncio.run(_generate([3, 3], tiny, prompt))
    backend = MlxBackend(tiny)
    assert "".join(ev.text for ev in outs[0]) == backend.decode(expected)


@pytest.mark.slow
def test_a_stopped_rank_is_found_by_its_missing_heartbeat_naming_it(tiny, reference):
    """kill -STOP: the process is alive (no exit code) and its peer spins in a ring recv; only the heartbeat
    says which rank is gone, mid-stream and while idle."""
    prompt, _ = reference

    async def scenario(mid_stream: bool):
        backend = MlxBackend(tiny, [3, 3], stall_s=2.0)
        await backend.load()
        victim = backend.ranks.ranks[0].proc.pid
        try:
            assert [r["alive"] for r in backend.stats()["rank_states"]] == [True, True]
            stream = backend.generate(GenerationRequest("long", prompt, max_tokens=100_000, ignore_eos=True))
            if mid_stream:
                await asyncio.wait_for(stream.__anext__(), GUARD_S)
            os.kill(victim, signal.SIGSTOP)
            t0 = time.monotonic()
            if not mid_stream:
                await asyncio.sleep(3.0)              # idle: nobody asked for a step
            with pytest.raises(BackendUnavailable, match=r"rank 0 .*stalled: no heartbeat .*stopped"):
                await asyncio.wait_for(_drain(stream), GUARD_S)
            found = time.monotonic() - t0
            assert not backend.stats()["healthy"]
            return found
        finally:
            with contextlib.suppress(ProcessLookupError):   # the backend has killed it already
                os.kill(victim, signal.SIGCONT)
            await backend.close()

    assert asyncio.run(scenario(mid_stream=True)) < GUARD_S
    asyncio.run(scenario(mid_stream=False))


@pytest.mark.slow
def test_killed_rank_fails_fast_naming_the_rank(tiny, reference):
    prompt, _ = reference

    async def scenario():
        backend = MlxBackend(tiny, [3, 3])
        await backend.load()
        try:
            stream = backend.generate(GenerationRequest("long", prompt, max_tokens=100_000, ignore_eos=True))
            await asyncio.wait_for(stream.__anext__(), GUARD_S)
            os.kill(backend.ranks.ranks[1].proc.pid, signal.SIGKILL)
            with pytest.raises(BackendUnavailable, match=r"rank 1 .*signal 9"):
                await asyncio.wait_for(_drain(stream), GUARD_S)
            with pytest.raises(BackendUnavailable, match="rank 1"):
                await backend.generate(GenerationRequest("after", prompt, max_tokens=2)).__anext__()
            assert all(r.proc.poll() is not None for r in backend.ranks.ranks), "survivors must be stopped"
            assert backend.stats()["error"]
        finally:
            await backend.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_rank_killed_while_idle_is_reported(tiny, reference):
    prompt, _ = reference

    async def scenario():
        backend = MlxBackend(tiny, [4, 2])
        await backend.load()
        try:
            os.kill(backend.ranks.ranks[0].proc.pid, signal.SIGKILL)
            with pytest.raises(BackendUnavailable, match="rank 0"):
                await asyncio.wait_for(_drain(backend.generate(GenerationRequest("x", prompt, max_tokens=4))),
                                       GUARD_S)
        finally:
            await backend.close()

    asyncio.run(scenario())


async def _drain(stream):
    async for _ in stream:
        pass


def test_split_must_cover_every_layer(tiny):
    with pytest.raises(UserError, match="sum to the model's 6 layers"):
        MlxBackend(tiny, [2, 2])
    with pytest.raises(UserError, match="positive"):
        MlxBackend(tiny, [0, 6])


def _netns_available() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc") and \
        subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _netns_available(), reason="needs root and iproute2 for network namespaces")
def test_ranks_in_shaped_namespaces_match_and_clean_up(tiny, reference):
    prompt, expected = reference

    async def scenario():
        backend = MlxBackend(tiny, [2, 4], links=[LinkShape(1.0), LinkShape(1.0)])
        try:
            await backend.load()
            names = list(backend.ranks.netns.names)
            assert set(names) <= set(_netns_list())
            out = await asyncio.wait_for(_collect(backend, GenerationRequest("n", prompt, max_tokens=24,
                                                                             ignore_eos=True)), GUARD_S)
            return names, [ev.token_id for ev in out]
        finally:
            await backend.close()

    names, ids = asyncio.run(scenario())
    assert ids == expected
    assert not set(names) & set(_netns_list()), "namespaces must be removed on close"


@pytest.mark.slow
@pytest.mark.skipif(not _netns_available(), reason="needs root and iproute2 for network namespaces")
def test_delay_relays_add_latency_and_keep_tokens(tiny, reference):
    from harness.mlx.profile import ring_link
    prompt, expected = reference
    link = LinkShape(1.0, latency_us=2000)
    rtts = ring_link(use_blas=False, links=[link, link], emulate_latency=True)["rtt_s_by_size"]
    # a lower bound only: each round trip crosses the 2 ms one-way delay twice
    assert min(rtts.values()) >= 2 * 2e-3

    async def scenario():
        backend = MlxBackend(tiny, [2, 4], links=[link, link], emulate_latency=True)
        try:
            await backend.load()
            helpers = list(backend.ranks.helpers)
            out = await asyncio.wait_for(_collect(backend, GenerationRequest("d", prompt, max_tokens=24,
                                                                             ignore_eos=True)), GUARD_S)
            return helpers, [ev.token_id for ev in out]
        finally:
            await backend.close()

    helpers, ids = asyncio.run(scenario())
    assert ids == expected and helpers
    assert all(h.poll() is not None for h in helpers), "relays must stop with the backend"


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.slow
def test_queue_full_bad_requests_and_cancellation(tiny, reference):
    from harness.backends.base import QueueFull
    prompt, expected = reference

    async def scenario():
        backend = MlxBackend(tiny, [3, 3], max_running=1, max_waiting=1)
        await backend.load()
        try:
            for bad in (GenerationRequest("v", (10**6,), max_tokens=4), GenerationRequest("e", (), max_tokens=4)):
                with pytest.raises(ValueError):
                    await backend.generate(bad).__anext__()
            running = backend.generate(GenerationRequest("a", prompt, max_tokens=10_000, ignore_eos=True))
            await asyncio.wait_for(running.__anext__(), GUARD_S)
            waiting = asyncio.ensure_future(_collect(backend, GenerationRequest("b", prompt, max_tokens=24,
                                                                                ignore_eos=True)))
            for _ in range(GUARD_S * 100):  # until "b" waits behind "a" (a hang guard, not a timing assert)
                if backend.stats()["num_requests_waiting"] == 1:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFull):
                await backend.generate(GenerationRequest("c", prompt, max_tokens=2)).__anext__()
            await running.aclose()          # the client of "a" goes away: its slot must free up
            out = await asyncio.wait_for(waiting, GUARD_S)
            assert [ev.token_id for ev in out] == expected
            assert backend.stats()["num_requests_running"] == 0 and backend.stats()["healthy"]
            rows = {r["request_id"]: r for r in backend.request_records()}
            assert rows["a"]["error"] == "cancelled" and rows["b"]["success"]
        finally:
            await backend.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_rank_that_cannot_load_fails_the_load_naming_it(tmp_path, tiny):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")

    async def scenario():
        backend = MlxBackend(broken, [3, 3])
        with pytest.raises(BackendUnavailable, match=r"rank \d .*exited with code 1"):
            await asyncio.wait_for(backend.load(), GUARD_S)
        with pytest.raises(BackendUnavailable):
            await backend.generate(GenerationRequest("x", (1, 2), max_tokens=2)).__anext__()
        await backend.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_across_batches_and_ranks(tiny, reference):
    prompt, greedy = reference
    hot = dict(temperature=1.5, seed=7)
    one, *_ = asyncio.run(_generate(None, tiny, prompt, **hot))
    # three at once: batch companions must not change a seeded request's tokens, nor must the pipeline
    three, *_ = asyncio.run(_generate([1, 3, 2], tiny, prompt, n_requests=3, **hot))
    ids = [ev.token_id for ev in one[0]]
    assert all([ev.token_id for ev in out] == ids for out in three)
    assert ids != greedy, "temperature 1.5 should leave the greedy path on a 512-token vocabulary"
    other, *_ = asyncio.run(_generate(None, tiny, prompt, temperature=1.5, seed=8))
    assert [ev.token_id for ev in other[0]] != ids


def test_incremental_text_equals_decoding_the_whole_output(tiny):
    """Random token streams (multi-byte characters split across tokens included): the deltas sent one token at
    a time join to exactly what decoding the whole output gives."""
    import random
    from harness.backends.mlx import _Req
    backend = MlxBackend(tiny)
    vocab = backend.config["vocab_size"]
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        req = _Req(None, None, None, "k", 0.0)
        parts = []
        for i, t in enumerate(ids):
            req.ids.append(t)
            parts.append(backend._delta(req, t, final=i == len(ids) - 1))
        assert "".join(parts) == backend.decode(ids)


@pytest.mark.slow
def test_a_kv_budget_makes_requests_wait_and_preempts_the_youngest_without_changing_tokens(tiny, reference):
    """Four 40-token streams in a budget of 128 KV tokens: at most two fit at once, the youngest gives its KV back
    when the others grow (recomputed from prompt + tokens so far), and every greedy stream is unchanged. A request
    that can never fit fails at once with the reason."""
    prompt, _ = reference

    async def scenario(budget, max_tokens=40, n=4):
        backend = MlxBackend(tiny, [3, 3], kv_budget_tokens=budget)
        await backend.load()
        try:
            reqs = [GenerationRequest(f"r{i}", prompt, max_tokens=max_tokens, ignore_eos=True) for i in range(n)]
            outs = await asyncio.wait_for(asyncio.gather(*[_collect(backend, r) for r in reqs]), GUARD_S)
            return [[ev.token_id for ev in o] for o in outs], backend.stats()
        finally:
            await backend.close()

    free, _ = asyncio.run(scenario(None))
    tight, stats = asyncio.run(scenario(128))
    assert tight == free
    assert stats["preemptions"] >= 1 and stats["kv_free_tokens"] == 128    # all given back at the end
    with pytest.raises(InvalidRequest, match="KV tokens; the budget holds 128"):
        asyncio.run(scenario(128, max_tokens=400, n=1))


def test_request_records_keep_the_newest_within_a_bound(tiny, reference):
    """A long-running serve keeps at most max_records request records (the newest) and counts what it dropped."""
    prompt, _ = reference

    async def scenario():
        backend = MlxBackend(tiny, None, max_records=3)
        await backend.load()
        try:
            for i in range(5):
                await asyncio.wait_for(_collect(backend, GenerationRequest(f"r{i}", prompt, max_tokens=2)), GUARD_S)
            return backend.request_records(), backend.stats()
        finally:
            await backend.close()

    rows, stats = asyncio.run(scenario())
    assert [r["request_id"] for r in rows] == ["r2", "r3", "r4"] and stats["records_dropped"] == 2
