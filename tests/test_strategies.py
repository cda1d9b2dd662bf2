import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import catalog
from harness.cli import main
from harness.costmodel import OBJECTIVES, load_profile
from harness.specs import DoesNotFit, model_from_config
from harness.costmodel import PlanOptions
from strategies.partitioning._plans import proportional_counts
from strategies.partitioning.ring_memory_weighted import memory_weighted_counts
from strategies.partitioning.uniform import even_counts
from strategies.registry import (PREFERRED_ORDER, get_strategy, partitioner, strategy_names,
                                 unregister_strategy)

PROFILE = load_profile()


def test_the_known_strategies_come_first_and_duplicates_are_refused():
    assert strategy_names()[:len(PREFERRED_ORDER)] == list(PREFERRED_ORDER)
    with pytest.raises(ValueError, match="twice"):
        partitioner("uniform")(lambda *a: None)


# ------------------------------------------------------------------------------------ exact tables
@pytest.mark.parametrize("memories, layers, expected", [
    ([192, 128, 128], 80, [34, 23, 23]),   # 0.42857 / 0.71428 boundaries -> layers 0-33, 34-56, 57-79
    ([192, 128, 128], 32, [13, 9, 10]),    # exo's shard mapping example: 0-12, 13-21, 22-31
    ([64, 64, 64, 64], 80, [20, 20, 20, 20]),
    ([6000, 3000, 1000], 10, [6, 3, 1]),
    ([100, 1, 1], 4, [3, 1]),              # a share smaller than one layer gets nothing (dropped)
])
def test_exo_memory_weighted_split(memories, layers, expected):
    counts = memory_weighted_counts(memories, layers)
    assert [c for c in counts if c] == expected


def test_ring_memory_weighted_orders_by_memory_like_exo():
    c = catalog.load_cluster("exo-128-192-128")
    plan = get_strategy("ring_memory_weighted")(c, catalog.load_model("llama-3.1-70b", 4), PlanOptions(PROFILE))
    assert [s.label for s in plan.stages] == ["b", "c", "a"]  # 192 GB first, ties by name descending
    assert plan.split() == [34, 23, 23]


@pytest.mark.parametrize("layers, stages, expected", [
    (80, 4, [20, 20, 20, 20]), (30, 4, [7, 7, 8, 8]), (5, 3, [1, 2, 2]),
])
def test_uniform_matches_mlx_lm_even_split(layers, stages, expected):
    # mlx-lm gives the extras to its low ranks, which run the last layers
    assert even_counts(layers, stages) == expected


@pytest.mark.parametrize("weights, total, caps, expected", [
    ([1, 1], 10, None, [5, 5]),
    ([3, 1], 8, None, [6, 2]),
    ([3, 1], 8, [4, 8], [4, 4]),
    ([1, 1, 1], 3, None, [1, 1, 1]),
])
def test_proportional_counts_water_fill(weights, total, caps, expected):
    assert proportional_counts(weights, total, caps) == expected


def test_proportional_counts_refuse_impossible_caps():
    with pytest.raises(DoesNotFit, match="at most 5 of 8"):
        proportional_counts([1, 1], 8, [2, 3])


def test_hybrid_uses_tensor_parallelism_over_rdma_when_it_pays():
    plan = get_strategy("hybrid_optimal")(catalog.load_cluster("mixed"), catalog.load_model("llama-3.1-70b", 4),
                                          PlanOptions(PROFILE))
    assert any(s.tp_degree > 1 for s in plan.stages)
    for s in plan.stages:
        if s.tp_degree > 1:
            assert all(catalog.load_cluster("mixed").link(a, b).rdma for a in s.nodes for b in s.nodes if a != b)


def test_model_that_cannot_fit_says_what_it_needs_and_what_there_is():
    c = catalog.load_cluster("seed-64gb")
    m = catalog.load_model("llama-3.1-405b", 8)
    for name in strategy_names():
        with pytest.raises(DoesNotFit) as err:
            get_strategy(name)(c, m, PlanOptions(PROFILE))
        assert "needs at least 435" in str(err.value) and "offers 192.0 GB" in str(err.value)


# ------------------------------------------------------------------------------------ properties
RDMA_CHIPS = [("M4 Max", 40, 128), ("M4 Pro", 20, 64), ("M3 Ultra", 80, 256)]
TCP_CHIPS = [("M1 Max", 32, 64), ("M2 Ultra", 76, 192), ("M2 Max", 38, 96), ("M1", 8, 16), ("M3 Pro", 18, 36)]


@st.composite
def clusters(draw):
    n = draw(st.integers(1, 5))
    nodes = []
    for i in range(n):
        chip, cores, cap = draw(st.sampled_from(RDMA_CHIPS + TCP_CHIPS))
        mem = draw(st.sampled_from([m for m in (16, 24, 32, 36, 48, 64, 96, 128, 192, 256) if m <= cap]))
        nodes.append({"name": f"n{i}", "chip": chip, "gpu_cores": cores, "memory_gb": mem})
    links = []
    for i in range(n):
        for j in range(i + 1, n):
            both_tb5 = all(nodes[k]["chip"] in {c[0] for c in RDMA_CHIPS} for k in (i, j))
            kinds = ["tb4-tcp", "10gbe", "1gbe", "wifi"] + (["tb5-rdma"] if both_tb5 else [])
            links.append({"a": f"n{i}", "b": f"n{j}", "kind": draw(st.sampled_from(kinds))})
    return catalog.parse_cluster({"name": "random", "nodes": nodes, "links": links})


@st.composite
def models(draw):
    heads = draw(st.sampled_from([8, 16, 32, 64]))
    head_dim = draw(st.sampled_from([64, 128]))
    moe = draw(st.booleans())
    cfg = {
        "model_type": "llama", "hidden_size": heads * head_dim, "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from([h for h in (1, 2, 4, 8, heads) if heads % h == 0])),
        "num_hidden_layers": draw(st.integers(2, 48)), "intermediate_size": heads * head_dim * draw(st.integers(2, 5)),
        "vocab_size": draw(st.sampled_from([32000, 128256, 151936])),
    }
    if moe:
        cfg.update({"num_experts": draw(st.sampled_from([8, 64])), "num_experts_per_tok": 2,
                    "moe_intermediate_size": heads * head_dim, "first_k_dense_replace": draw(st.integers(0, 2))})
    scale = draw(st.sampled_from([1, 4, 16]))  # widen to reach tens or hundreds of GB
    cfg["intermediate_size"] *= scale
    return model_from_config(cfg, "random", quant_bits=draw(st.sampled_from([4, 8, 16])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=clusters(), model=models(), objective=st.sampled_from(list(OBJECTIVES)),
       reserve=st.sampled_from([0, 4096, 32768]))
def test_every_strategy_covers_layers_in_order_within_memory_and_hybrid_is_never_worse(cluster, model, objective, reserve):
    options = PlanOptions(PROFILE, objective=objective, kv_reserve_tokens=reserve)
    plans = {}
    for name in strategy_names():   # every registered strategy, so a new one is held to this without an edit
        try:
            plan = get_strategy(name)(cluster, model, options)
        except DoesNotFit as exc:
            assert "GB" in str(exc) or "layers" in str(exc)
            continue
        assert plan.problems() == []
        assert sum(plan.split()) == model.num_layers
        assert plan.stages[0].layer_start == 0 and plan.stages[-1].layer_end == model.num_layers
        assert plan.predicted["ceiling_tokens_per_s"] >= plan.predicted["tokens_per_s"]   # printed beside it
        plans[name] = plan
    if plans and "hybrid_optimal" not in plans:
        pytest.fail(f"hybrid_optimal found no plan where {sorted(plans)} did")
    if plans:
        best = plans["hybrid_optimal"].predicted["objective_ms"]
        for name, plan in plans.items():
            assert best <= plan.predicted["objective_ms"] * (1 + 1e-9), (name, plan.split())


# ------------------------------------------------------------------------------------ CLI
def test_plan_all_prints_every_plan_side_by_side(capsys):
    assert main(["plan", "--cluster", "mixed", "--model", "llama-3.1-70b", "--quant", "4", "--strategy", "all"]) == 0
    out = capsys.readouterr().out
    for name in strategy_names():
        assert name in out
    assert "ms/token" in out and "theoretical" in out


def test_plan_json_is_machine_readable(capsys):
    assert main(["plan", "--cluster", "m2ultra-4x-tb4", "--model", "qwen3-235b-a22b", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["strategy"] == "hybrid_optimal" and sum(plan["split"]) == 94
    assert plan["source"] == "theoretical"


def test_plan_bad_input_exits_2_with_one_line(capsys):
    assert main(["plan", "--cluster", "nowhere.json"]) == 2
    err = capsys.readouterr().err
    assert "nowhere.json" in err and "Traceback" not in err


@pytest.fixture
def throwaway_strategy():
    """A strategy registered for one test: uniform's plan under another name, counting its calls."""
    name, calls = "zz_counted_uniform", []

    def counted(cluster, model, options):
        calls.append(model.num_layers)
        return get_strategy("uniform")(cluster, model, options)

    partitioner(name)(counted)
    yield name, calls
    unregister_strategy(name)


def test_a_registered_strategy_runs_the_shared_properties_and_is_listed_in_help(throwaway_strategy, capsys):
    name, calls = throwaway_strategy
    test_every_strategy_covers_layers_in_order_within_memory_and_hybrid_is_never_worse()
    assert calls                                   # the shared property test planned with it
    for command in ("plan", "simulate", "run", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert name in capsys.readouterr().out, command
