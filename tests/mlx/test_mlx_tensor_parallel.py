"""Tensor-parallel stages on real ring ranks: mlx-lm's shard() over 2 and 3 ranks, alone or pipelined with
other stages, gives the greedy tokens of one process; a model the degree cannot split is refused before any
rank starts."""
from __future__ import annotations

import asyncio

import pytest

from harness.backends.base import GenerationRequest
from harness.backends.mlx import MlxBackend, links_for_plan, rank_layout
from harness.mlx import modelbuild
from harness.mlx.errors import UserError
from harness.specs import PartitionPlan, Stage

GUARD_S = 60
TINY3 = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, intermediate_size=192)


def _plan(layers: int, *stages: tuple[tuple[str, ...], int]) -> PartitionPlan:
    out, start = [], 0
    for nodes, n in stages:
        out.append(Stage(nodes=nodes, layer_start=start, layer_end=start + n, tp_degree=len(nodes)))
        start += n
    assert start == layers
    return PartitionPlan(strategy="test", objective="latency", cluster="test", model="tiny", quant_bits=32,
                         num_layers=layers, stages=tuple(out))


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """A tiny qwen2 whose heads, KV heads and MLP split two and three ways."""
    cfg = dict(modelbuild.qwen2_config("tiny"), **TINY3)
    return modelbuild.build(cfg, cache_dir=tmp_path_factory.mktemp("tp3")).path


async def _greedy(model, plan, prompt, n_requests=2):
    backend = MlxBackend(model, plan)
    try:
        report = await backend.load()
        reqs = [GenerationRequest(f"r{i}", prompt, max_tokens=16, ignore_eos=True) for i in range(n_requests)]

        async def one(r):
            return [ev.token_id async for ev in backend.generate(r)]
        outs = await asyncio.wait_for(asyncio.gather(*[one(r) for r in reqs]), GUARD_S)
        return outs, report, backend.step_records()
    finally:
        await backend.close()


def _prompt(model) -> list[int]:
    import json
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    return [(7 * i + 3) % vocab for i in range(40)]


@pytest.mark.slow
@pytest.mark.parametrize("members", [("a", "b"), ("a", "b", "c")])
def test_tensor_parallel_greedy_tokens_equal_one_process(tiny3, members):
    prompt = _prompt(tiny3)
    expected, _, _ = asyncio.run(_greedy(tiny3, None, prompt))
    assert len(set(expected[0])) > 3, "the model must not repeat one token, or equality means little"
    plan = _plan(6, (members, 6))
    outs, report, steps = asyncio.run(_greedy(tiny3, plan, prompt))
    assert outs == expected
    assert sorted(report.memory_bytes_per_node) == sorted(members)   # one rank per member
    one = sum(asyncio.run(_param_bytes(tiny3)).values())
    per_member = report.memory_bytes_per_node["a"]
    assert per_member < one * 0.9                                 # each rank holds a shard, not the model
    compute = [r for r in steps if r["kind"] in ("prefill", "decode", "mixed")]
    assert compute and {r["node"] for r in compute} == {"a"}       # one row per stage and step


async def _param_bytes(model):
    backend = MlxBackend(model, None)
    try:
        return (await backend.load()).memory_bytes_per_node
    finally:
        await backend.close()


def test_pipelined_tp_stages_number_ranks_in_layer_order():
    cfg = dict(modelbuild.qwen2_config("tiny"), **TINY3)
    layout = rank_layout(_plan(6, (("a", "b"), 3), (("c",), 1), (("d", "e", "f"), 2)), cfg)
    assert layout.rank_stage == [0, 0, 1, 2, 2, 2]
    assert layout.rank_node == ["a", "b", "c", "d", "e", "f"]
    assert layout.stage_tp == [2, 1, 3]


def test_a_model_whose_heads_do_not_divide_is_refused_before_any_rank_starts():
    cfg = modelbuild.qwen2_config("tiny")            # 2 KV heads
    with pytest.raises(UserError, match="num_key_value_heads = 2"):
        rank_layout(_plan(6, (("a", "b", "c"), 6)), cfg)


def test_tensor_parallel_layout_and_links_follow_the_members():
    from harness import catalog
    cluster = catalog.load_cluster("mixed")
    a, b = cluster.nodes[0].name, cluster.nodes[1].name
    plan = _plan(6, ((a, b), 6))
    layout = rank_layout(plan, modelbuild.qwen2_config("tiny"))
    assert (layout.rank_stage, layout.rank_node, layout.tp_degree) == ([0, 0], [a, b], 2)
    shapes = links_for_plan(plan, cluster)
    assert [s.bandwidth_gbps for s in shapes] == [cluster.link(a, b).bandwidth_gbps] * 2


@pytest.mark.slow
def test_pipelined_tensor_parallel_stages_give_the_tokens_of_one_process(tiny3):
    """PP x TP as hybrid_optimal emits it (a TP pair, then one more node): one ring per TP stage, TCP hops."""
    prompt = _prompt(tiny3)
    expected, _, _ = asyncio.run(_greedy(tiny3, None, prompt))
    plan = _plan(6, (("a", "b"), 4), (("c",), 2))
    outs, report, steps = asyncio.run(_greedy(tiny3, plan, prompt))
    assert outs == expected
    assert sorted(report.memory_bytes_per_node) == ["a", "b", "c"]
    compute = [r for r in steps if r["kind"] in ("prefill", "decode", "mixed")]
    assert {(r["stage"], r["node"]) for r in compute} == {(0, "a"), (1, "c")}
    assert any(r["kind"] == "send" for r in steps) and any(r["kind"] == "recv" for r in steps)
