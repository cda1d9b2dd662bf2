"""The real-time sim backend behind the server. Assertions use the engine's virtual-time records (exact),
never the wall clock."""
from __future__ import annotations


import numpy as np

import sim
from harness.serving.loadgen import LoadMode, Target, run_load_sync
from harness.serving.server import EmbeddedServer
from harness.backends.sim import SimBackend, SimBackendConfig
from harness.workloads import build_workload, parse_workload


def _serve(setup, wl, mode=LoadMode(), speed=20.0, engine_config=None):
    backend = SimBackend(*setup, engine_config=engine_config, config=SimBackendConfig(speed=speed))
    with EmbeddedServer(backend) as server:
        result = run_load_sync(Target(server.url), wl, mode)
    # read after the server stopped: the records outlive it, as a run folder writer needs
    engine = backend.requests_table().to_pandas()
    steps = backend.steps_table().to_pandas()
    return result.frame(), engine, steps


def test_isolated_requests_match_the_simulator_exactly(setup):
    # 1/8 s apart on the wall clock = 5 virtual seconds at speed 40: each request meets an idle cluster, so
    # its virtual-time latency is fixed by the cost model whatever the exact arrival instant
    wall = build_workload(parse_workload("constant,rate=8,n=3,prompt=128,output=8"))
    virtual = build_workload(parse_workload("constant,rate=0.2,n=3,prompt=128,output=8"))
    direct = sim.simulate(*setup, virtual, include_load=False).requests.to_pandas()
    client, engine, _ = _serve(setup, wall, speed=40.0)
    assert client["success"].all() and (client["output_tokens"] == 8).all()
    ttft_engine = (engine["first_token_s"] - engine["start_s"]).to_numpy()
    ttft_direct = (direct["first_token_s"] - direct["start_s"]).to_numpy()
    assert np.allclose(ttft_engine, ttft_direct, rtol=1e-9)
    gaps_engine = np.diff(np.stack(engine["chunk_times_s"].to_numpy()), axis=1)
    gaps_direct = np.diff(np.stack(direct["chunk_times_s"].to_numpy()), axis=1)
    assert np.allclose(gaps_engine, gaps_direct, rtol=1e-9)


def test_concurrent_http_requests_batch_in_the_engine(setup):
    # one scheduler, so overlapping requests must share its micro-batches (with one per stage, four requests
    # may each get a scheduler of their own)
    wl = build_workload(parse_workload("all_at_once,n=4,prompt=64,output=32"))
    client, engine, steps = _serve(setup, wl, speed=5.0, engine_config=sim.EngineConfig(micro_batches=1))
    assert client["success"].all() and len(engine) == 4
    decode = steps[(steps["kind"].isin(["decode", "mixed"])) & (steps["stage"] == 0)]
    assert decode["batch_size"].max() >= 2


def test_stats_report_kv_use_per_node(setup):
    backend = SimBackend(*setup, config=SimBackendConfig(speed=20.0))
    with EmbeddedServer(backend) as _server:
        stats = backend.stats()
    assert stats["healthy"] and stats["source"] == "simulated"
    plan_nodes = {n for stage in setup[2].stages for n in stage.nodes}
    assert set(stats["kv_cache_usage"]) == set(stats["kv_cache_bytes"]) == plan_nodes
    assert all(v == 0 for v in stats["kv_cache_usage"].values())


def test_oversized_request_is_refused_not_hung(setup):
    backend = SimBackend(*setup, engine_config=sim.EngineConfig(kv_tokens=256), config=SimBackendConfig(speed=20))
    wl = build_workload(parse_workload("all_at_once,n=1,prompt=400,output=4"))
    with EmbeddedServer(backend) as server:
        df = run_load_sync(Target(server.url), wl, LoadMode()).frame()
    assert not df["success"].iloc[0] and "HTTP 503" in df["error"].iloc[0]


def test_each_run_on_one_server_records_only_its_own_steps(setup):
    """validate sends several load points to one server: each point's steps.parquet must hold its own steps
    (and the model load), not every step since the server started."""
    from harness import recording
    backend = SimBackend(*setup, config=SimBackendConfig(speed=40.0))
    wl = build_workload(parse_workload("constant,rate=8,n=2,prompt=64,output=4"))
    with EmbeddedServer(backend) as server:
        first = run_load_sync(Target(server.url), wl, LoadMode())
        second = run_load_sync(Target(server.url), wl, LoadMode())
    a, b = recording.steps_frame(backend, first), recording.steps_frame(backend, second)
    work = lambda df: df[df["kind"] != "load"]
    assert len(work(a)) and len(work(b)) and (work(b)["start_s"] >= 0).all()
    everything = backend.step_table(second.t0_monotonic, second.wall_start_unix)
    assert len(work(b)) < len(work(everything))     # the first run's steps stay out of the second's folder
    assert (b["kind"] == "load").sum() == (everything["kind"] == "load").sum()
