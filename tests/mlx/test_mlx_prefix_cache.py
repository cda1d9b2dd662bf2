"""Prefix caching on real ranks: the simulator's policy decides, the ranks keep and reuse the KV. The same trace
gets the same cached tokens per request from the sim backend and from real ranks, and a request served from a
kept prefix gives exactly the tokens it gives with no cache."""
from __future__ import annotations

import asyncio

import pytest

from harness import catalog
from harness.backends import BackendOptions, Planned, make_backend
from harness.backends.base import GenerationRequest
from harness.costmodel import PlanOptions, load_profile
from strategies.registry import get_strategy

GUARD_S = 120


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    import os
    os.environ.setdefault("HARNESS_CACHE", str(tmp_path_factory.mktemp("cache")))
    cluster, model = catalog.load_cluster("mini-pair"), catalog.load_model("qwen2.5-0.5b", 16, 64)
    profile = load_profile()
    plan = get_strategy("uniform")(cluster, model, PlanOptions(profile=profile))
    return Planned(cluster, model, plan, profile, "qwen2.5-0.5b")


def _trace() -> list[list[int]]:
    base = [(11 * i + 5) % 8000 for i in range(200)]          # a shared 200-token prefix (3 full blocks)
    other = [(13 * i + 7) % 8000 for i in range(150)]
    return [base + [1, 2, 3], other, base + [4, 5], other + [9] * 70, base + [6], [42] * 30]


async def _serve_in_turn(backend, prompts) -> list[tuple[int, list[int]]]:
    await backend.load()
    try:
        out = []
        for i, prompt in enumerate(prompts):
            events = [ev async for ev in backend.generate(GenerationRequest(f"r{i}", tuple(prompt), max_tokens=6,
                                                                            ignore_eos=True))]
            out.append((events[-1].cached_tokens, [ev.token_id for ev in events]))
        return out
    finally:
        await backend.close()


def _run(planned, backend_name, cache):
    backend = make_backend(backend_name, BackendOptions(planned=lambda: planned, cache=cache, speed=1000.0))
    return asyncio.run(asyncio.wait_for(_serve_in_turn(backend, _trace()), GUARD_S)), backend


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lru", "s3_fifo"])
def test_real_ranks_make_the_simulators_cache_decisions_and_reuse_is_exact(planned, policy):
    sim, _ = _run(planned, "sim", policy)
    real, backend = _run(planned, "mlx", policy)
    plain, _ = _run(planned, "mlx", "none")
    sim_cached, real_cached = [c for c, _ in sim], [c for c, _ in real]
    assert real_cached == sim_cached
    assert sum(c > 0 for c in real_cached) >= 2, "the trace must hit, or the comparison means little"
    assert [ids for _, ids in real] == [ids for _, ids in plain]   # greedy tokens unchanged by reuse
    assert [c for c, _ in plain] == [0] * len(plain)
    rows = backend.request_records()
    assert [r["cached_tokens"] for r in rows] == real_cached
