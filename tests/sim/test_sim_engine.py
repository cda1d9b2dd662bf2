"""Analytic checks of the simulator against the cost model it is built on."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import simpy

from harness import costmodel
from harness.specs import UserError
from harness.workloads import build_workload
from sim import Engine, EngineConfig, simulate
from tests.sim.conftest import feed_and_probe, make_cluster, make_plan, make_profile

PROMPT, OUT = 300, 6


def one_request(prompt=PROMPT, out=OUT, n=1, arrival=None, seed=0):
    spec = {"kind": "synthetic", "num_requests": n, "prompt": prompt, "output": out, "seed": seed,
            "arrival": arrival or {"process": "all_at_once"}}
    return build_workload(spec)


def run(cluster, model, plan, profile, wl, **cfg):
    return simulate(cluster, model, plan, profile, wl, EngineConfig(**cfg), include_load=False)


def chunk_times(res, i=0):
    return np.asarray(res.requests.column("chunk_times_s")[i].as_py())


def test_one_request_one_node_matches_cost_model(llama7b, profile):
    cl = make_cluster(1)
    chip = cl.nodes[0].chip
    res = run(cl, llama7b, make_plan(llama7b, [("n0",)], [32]), profile, one_request())
    row = res.requests.to_pylist()[0]
    ttft = costmodel.prefill_time(chip, profile, llama7b, 0, 32, PROMPT, 0, with_head=True)
    assert row["first_token_s"] - row["start_s"] == pytest.approx(ttft, rel=1e-12)
    # decode step k reads the KV of the prompt, the k tokens before it, and itself
    gaps = [costmodel.decode_time(chip, profile, llama7b, 0, 32, 1, PROMPT + k, with_head=True)
            for k in range(1, OUT)]
    assert np.diff(chunk_times(res)) == pytest.approx(gaps, rel=1e-12)
    assert row["output_tokens"] == OUT and row["success"]


def with_link_kind(cluster, kind):
    return replace(cluster, links=tuple(replace(link, kind=kind) for link in cluster.links))


# the hop's fixed cost by transport (costmodel.hop_latency_s) is what the planner prices: the simulator must agree
TRANSPORTS = [("tb4-tcp", {}), ("tb4-tcp", {"tcp_hop_latencies": 3.5}), ("tb5-rdma", {"rdma_hop_overhead_us": 40.0})]


@pytest.mark.parametrize("kind, terms", TRANSPORTS)
def test_adding_a_stage_adds_exactly_link_and_stage_terms(llama7b, kind, terms):
    profile = make_profile(**terms)
    cl = with_link_kind(make_cluster(2), kind)
    chip, link = cl.nodes[0].chip, cl.link("n0", "n1")
    res = run(cl, llama7b, make_plan(llama7b, [("n0",), ("n1",)], [12, 20]), profile, one_request())
    row = res.requests.to_pylist()[0]
    ttft = (costmodel.prefill_time(chip, profile, llama7b, 0, 12, PROMPT, 0)
            + costmodel.link_time(link, llama7b.activation_bytes(PROMPT), profile)
            + costmodel.prefill_time(chip, profile, llama7b, 12, 32, PROMPT, 0, with_head=True))
    assert row["first_token_s"] - row["start_s"] == pytest.approx(ttft, rel=1e-12)
    gaps = []
    for k in range(1, OUT):
        gaps.append(costmodel.link_time(link, 4, profile)            # token id back to the first stage
                    + costmodel.decode_time(chip, profile, llama7b, 0, 12, 1, PROMPT + k)
                    + costmodel.link_time(link, llama7b.activation_bytes(1), profile)
                    + costmodel.decode_time(chip, profile, llama7b, 12, 32, 1, PROMPT + k, with_head=True))
    assert np.diff(chunk_times(res)) == pytest.approx(gaps, rel=1e-12)


def test_tensor_parallel_stage_adds_allreduce(llama7b, profile):
    cl = make_cluster(2)
    chip, link = cl.nodes[0].chip, cl.link("n0", "n1")
    res = run(cl, llama7b, make_plan(llama7b, [("n0", "n1")], [32]), profile, one_request())
    gap = np.diff(chunk_times(res))[0]
    expect = (costmodel.decode_time(chip, profile, llama7b, 0, 32, 1, PROMPT + 1, tp=2, with_head=True)
              + 2 * 32 * costmodel.allreduce_time(link, llama7b.activation_bytes(1), 2, profile))
    assert gap == pytest.approx(expect, rel=1e-12)


def test_chunked_prefill_splits_the_prompt_into_budget_sized_steps(llama7b, profile):
    cl = make_cluster(1)
    chip = cl.nodes[0].chip
    res = run(cl, llama7b, make_plan(llama7b, [("n0",)], [32]), profile, one_request(prompt=512),
              max_batched_tokens=128)
    row = res.requests.to_pylist()[0]
    expect = sum(costmodel.prefill_time(chip, profile, llama7b, 0, 32, 128, c, with_head=True)
                 for c in (0, 128, 256, 384))
    assert row["first_token_s"] - row["start_s"] == pytest.approx(expect, rel=1e-12)


def test_pipeline_overlaps_micro_batches(llama7b, profile):
    """Four requests on four stages: with one micro-batch per stage they overlap, so the run takes far less
    than four times one request's time (and no less than one request's)."""
    cl = make_cluster(4)
    plan = make_plan(llama7b, [("n0",), ("n1",), ("n2",), ("n3",)], [8, 8, 8, 8])
    one = run(cl, llama7b, plan, profile, one_request(out=50)).requests.to_pandas()
    many = run(cl, llama7b, plan, profile, one_request(out=50, n=4, arrival={"process": "constant", "rate": 1e4}),
               max_num_seqs=1).requests.to_pandas()
    single = one.end_s.max() - one.start_s.min()
    span = many.end_s.max() - many.start_s.min()
    assert single < span < 1.6 * single
    serial = run(cl, llama7b, plan, profile, one_request(out=50, n=4, arrival={"process": "constant", "rate": 1e4}),
                 max_num_seqs=1, micro_batches=1).requests.to_pandas()
    assert serial.end_s.max() - serial.start_s.min() > 3.5 * single


def test_littles_law_on_a_long_steady_run(llama7b, profile):
    """Time-averaged number of requests in the system equals arrival rate x mean time in system."""
    cl = make_cluster(2)
    plan = make_plan(llama7b, [("n0",), ("n1",)], [16, 16])
    rate = 2.0
    wl = build_workload({"kind": "synthetic", "num_requests": 3000, "seed": 3, "prompt": {"dist": "uniform", "low": 64, "high": 512},
                         "output": {"dist": "uniform", "low": 16, "high": 128},
                         "arrival": {"process": "poisson", "rate": rate}})
    env = simpy.Environment()
    eng = Engine(env, cl, llama7b, plan, profile)
    samples = []
    feed_and_probe(env, eng, wl, 0.5,
                   lambda: samples.append((env.now, eng.n - int(np.count_nonzero(eng.status[:eng.n] >= 3)))))
    env.run(until=wl.arrival_s[-1])
    df = eng.requests_table().to_pandas()
    t = np.array([s[0] for s in samples])
    in_system = np.array([s[1] for s in samples])
    window = (t > 200) & (t < t[-1] - 200)          # skip the warm-up and the end of arrivals
    done = df[(df.start_s > 200) & (df.start_s < t[-1] - 400) & df.success]
    w = (done.end_s - done.start_s).mean()
    assert in_system[window].mean() == pytest.approx(rate * w, rel=0.1)


def test_kv_exhaustion_makes_requests_wait_never_overcommit(llama7b, profile):
    cl = make_cluster(1)
    plan = make_plan(llama7b, [("n0",)], [32])
    cap = 4 * (256 + 64)                       # room for four whole requests
    res = run(cl, llama7b, plan, profile, one_request(prompt=256, out=64, n=20), kv_tokens=cap,
              kv_block_tokens=16)
    df = res.requests.to_pandas()
    assert df.success.all() and (df.output_tokens == 64).all()
    assert res.stats["kv_peak_tokens"] <= cap
    steps = res.steps.to_pandas()
    kv_per_token = llama7b.kv_bytes_per_token(0, 32)
    assert steps.kv_bytes.max() <= cap * kv_per_token
    # admission reserves whole prompts: at most cap // prompt requests hold KV at once
    events = np.concatenate([np.c_[df.first_token_s, np.ones(len(df))], np.c_[df.end_s, -np.ones(len(df))]])
    events = events[np.lexsort((events[:, 1], events[:, 0]))]
    assert np.cumsum(events[:, 1]).max() <= cap // 256
    ttft = df.first_token_s - df.start_s
    assert ttft.max() > 4 * ttft.min()        # the later ones waited for memory


def test_growth_beyond_kv_preempts_and_recomputes(llama7b, profile):
    cl = make_cluster(1)
    plan = make_plan(llama7b, [("n0",)], [32])
    # admission needs 16 tokens per prompt; four prompts fit, their growth does not
    res = run(cl, llama7b, plan, profile, one_request(prompt=16, out=200, n=4), kv_tokens=16 * 20,
              kv_block_tokens=16)
    df = res.requests.to_pandas()
    assert res.stats["preemptions"] > 0
    assert df.success.all() and (df.output_tokens == 200).all()
    assert res.stats["kv_peak_tokens"] <= 16 * 20
    for times in df.chunk_times_s:
        assert len(times) == 200 and np.all(np.diff(times) > 0)


def test_request_larger_than_kv_pool_fails_cleanly(llama7b, profile):
    cl = make_cluster(1)
    res = run(cl, llama7b, make_plan(llama7b, [("n0",)], [32]), profile, one_request(prompt=2000, out=10, n=2),
              kv_tokens=1024)
    df = res.requests.to_pandas()
    assert not df.success.any() and df.error.str.contains("KV").all()


def test_weights_that_do_not_fit_are_a_user_error(llama70b, profile):
    cl = make_cluster(1, chip="M2", memory_gb=24)
    with pytest.raises(UserError, match="weights need"):
        run(cl, llama70b, make_plan(llama70b, [("n0",)], [80]), profile, one_request())


def test_seeded_runs_reproduce_exactly(llama7b, profile):
    cl = make_cluster(2)
    plan = make_plan(llama7b, [("n0",), ("n1",)], [16, 16])

    def go(seed):
        wl = build_workload({"kind": "synthetic", "num_requests": 200, "seed": seed,
                             "prompt": {"dist": "lognormal", "mean": 300, "sigma": 0.5},
                             "output": {"dist": "uniform", "low": 8, "high": 64},
                             "arrival": {"process": "poisson", "rate": 5}})
        return simulate(cl, llama7b, plan, profile, wl)

    a, b, c = go(1), go(1), go(2)
    # pandas equality: NaN cells (link rows have no compute time) compare equal where both are NaN
    assert a.requests.equals(b.requests) and a.steps.to_pandas().equals(b.steps.to_pandas())
    assert not a.requests.equals(c.requests)


@pytest.mark.parametrize("kind, terms", TRANSPORTS)
def test_loading_reads_ssd_or_receives_from_a_peer(llama7b, kind, terms):
    profile = make_profile(ssd_gbs=2.0, **terms)
    cl = with_link_kind(make_cluster(2, bandwidth_gbps=8.0), kind)
    plan = make_plan(llama7b, [("n0",), ("n1",)], [16, 16])
    res = simulate(cl, llama7b, plan, profile, one_request(), weights_local={"n0"})
    from sim.costs import stage_models
    st = stage_models(cl, llama7b, plan)
    assert res.load.load_s_per_node["n0"] == pytest.approx(st[0].weight_bytes_node / 2e9)
    link = cl.link("n0", "n1")
    send = st[1].weight_bytes_node * 8 / 8e9
    assert res.load.load_s_per_node["n1"] == pytest.approx(send + costmodel.hop_latency_s(link, profile))
    first = res.requests.to_pylist()[0]
    assert first["start_s"] == pytest.approx(max(res.load.load_s_per_node.values()))


def test_closed_loop_keeps_concurrency_in_flight(llama7b, profile):
    cl = make_cluster(1)
    wl = build_workload({"kind": "synthetic", "num_requests": 30, "prompt": 64, "output": 16,
                         "closed_loop": {"concurrency": 3}})
    df = run(cl, llama7b, make_plan(llama7b, [("n0",)], [32]), profile, wl).requests.to_pandas()
    assert df.success.all()
    starts, ends = np.sort(df.start_s.to_numpy()), np.sort(df.end_s.to_numpy())
    # every request after the first three starts exactly when an earlier one ends
    assert starts[3:] == pytest.approx(ends[:-3])


def test_incremental_drive_emits_tokens_via_callback(llama7b, profile):
    cl = make_cluster(2)
    plan = make_plan(llama7b, [("n0",), ("n1",)], [16, 16])
    env = simpy.Environment()
    seen: dict[int, list[float]] = {}
    finished = []

    def on_tokens(t, slots, done):
        for s in slots:
            seen.setdefault(int(s), []).append(t)
        finished.extend(int(s) for s in slots[done])

    eng = Engine(env, cl, llama7b, plan, profile, on_tokens=on_tokens)
    a = eng.submit(100, 5, "a")
    eng.advance(0.05)
    assert eng.next_event_time() >= env.now
    b = eng.submit(50, 3, "b")
    while eng.unfinished():
        eng.advance(eng.next_event_time() + 1e-9)
    assert sorted(finished) == [a, b] and len(seen[a]) == 5 and len(seen[b]) == 3
    assert min(seen[b]) > 0.05
    df = eng.requests_table().to_pandas()
    assert df.chunk_times_s[0].tolist() == seen[a]


@pytest.mark.parametrize("case", ["light", "closed", "kv", "tp"])
def test_fast_forward_is_exactly_the_step_by_step_result(llama7b, profile, case):
    """Batching steady decode steps into one event must not change a single record."""
    cl = make_cluster(4)
    plan = make_plan(llama7b, [("n0",), ("n1",), ("n2",), ("n3",)], [8, 8, 8, 8])
    spec = {"kind": "synthetic", "num_requests": 60, "seed": 4, "prompt": {"dist": "uniform", "low": 8, "high": 300},
            "output": {"dist": "uniform", "low": 1, "high": 90}, "arrival": {"process": "poisson", "rate": 0.5}}
    cfg = {}
    if case == "closed":
        spec["closed_loop"] = {"concurrency": 2}
    if case == "kv":
        spec["arrival"] = {"process": "poisson", "rate": 20}
        cfg = {"kv_tokens": 1200, "max_batched_tokens": 256}
    if case == "tp":
        plan = make_plan(llama7b, [("n0", "n1"), ("n2",)], [20, 12])
    wl = build_workload(spec)
    fast = run(cl, llama7b, plan, profile, wl, fast_forward=True, **cfg)
    slow = run(cl, llama7b, plan, profile, wl, fast_forward=False, **cfg)
    a, b = fast.requests.to_pandas(), slow.requests.to_pandas()
    assert a.success.tolist() == b.success.tolist() and a.output_tokens.tolist() == b.output_tokens.tolist()
    for col in ("start_s", "first_token_s", "end_s"):
        assert np.allclose(a[col], b[col], rtol=1e-12, atol=1e-9, equal_nan=True)
    assert np.allclose(np.concatenate(a.chunk_times_s.tolist()), np.concatenate(b.chunk_times_s.tolist()),
                       rtol=1e-12, atol=1e-9)
    sa, sb = fast.steps.to_pandas(), slow.steps.to_pandas()
    assert len(sa) == len(sb) and (sa.kv_bytes.to_numpy() == sb.kv_bytes.to_numpy()).all()
    assert np.allclose(sa.end_s, sb.end_s, rtol=1e-12, atol=1e-9)
    assert fast.stats["kv_peak_tokens"] == slow.stats["kv_peak_tokens"]
    assert fast.stats["preemptions"] == slow.stats["preemptions"]


def test_step_records_can_be_switched_off(llama7b, profile):
    cl = make_cluster(2)
    plan = make_plan(llama7b, [("n0",), ("n1",)], [16, 16])
    res = run(cl, llama7b, plan, profile, one_request(n=3), record_steps=False)
    assert res.steps.num_rows == 0 and res.requests.num_rows == 3
    assert res.requests.column("success").to_pylist() == [True] * 3


def test_streamed_step_records_equal_the_in_memory_table(llama7b, profile, monkeypatch):
    import pyarrow as pa
    monkeypatch.setattr(Engine, "STREAM_ROWS", 64)
    cl = make_cluster(2)
    plan = make_plan(llama7b, [("n0",), ("n1",)], [16, 16])
    wl = one_request(n=20, out=40, arrival={"process": "poisson", "rate": 3})
    pieces = []
    streamed = simulate(cl, llama7b, plan, profile, wl, step_sink=pieces.append)
    whole = simulate(cl, llama7b, plan, profile, wl)
    assert streamed.steps is None and len(pieces) > 3
    assert pa.concat_tables(pieces).to_pandas().equals(whole.steps.to_pandas())   # NaN-aware
