"""Per-node memory of tensor-parallel stages, and plan warnings (to act on) apart from notes (information only).

Issue 9: both members of a TP pair were shown with the smaller member's usable memory (studio-m3u "21.8 / 96"
while it has 192 GB usable), and the planner's informational remarks were titled warnings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import catalog
from harness.cli import main
from harness.costmodel import PlanOptions, load_profile
from harness.specs import Cluster, DoesNotFit, Node, NodeMemory, PartitionPlan, model_from_config
from strategies.partitioning._plans import build_plan, require_fit
from strategies.registry import get_strategy

OLD_PLAN_JSON = Path(__file__).parent / "fixtures" / "v1_runs" / "simulate" / "plan.json"


@pytest.fixture(scope="module")
def options() -> PlanOptions:
    return PlanOptions(load_profile())


@pytest.fixture(scope="module")
def hybrid_on_mixed(options) -> PartitionPlan:
    return get_strategy("hybrid_optimal")(catalog.load_cluster("mixed"), catalog.load_model("llama-3.1-70b", 4),
                                          options)


def member_table(plan: PartitionPlan) -> list[tuple[str, float, float]]:
    return [(m.node, round(m.used_gb, 1), m.usable_gb) for s in plan.stages for m in s.member_memory()]


def studio_with_a_small_partner(small_gb: float) -> Cluster:
    """An M3 Ultra (192 GB usable) paired over RDMA with an M4 Max of `small_gb` GB (three quarters usable)."""
    big = Node("big", catalog.find_chip("M3 Ultra", 80), 256, 0.75)
    small = Node("small", catalog.find_chip("M4 Max", 40), small_gb, 0.75)
    return Cluster("lopsided", (big, small), (catalog.make_link("big", "small", "tb5-rdma"),))


# ------------------------------------------------------------------------------------ per-node memory
def test_each_tp_member_on_mixed_has_its_own_usable_memory(hybrid_on_mixed):
    # each member holds half the layers and KV plus a full embeddings/head copy: 21.8 GB on both
    assert member_table(hybrid_on_mixed) == [("studio-m3u", 21.8, 192.0), ("studio-m4max", 21.8, 96.0)]
    stage = hybrid_on_mixed.stages[0]
    assert (stage.tp_degree, stage.memory_available_gb) == (2, 96.0)   # the old field still bounds the stage
    assert hybrid_on_mixed.predicted["memory_usable_gb"] == 288.0


def test_the_plan_command_shows_each_members_own_figures(capsys):
    main(["plan", "--cluster", "mixed", "--model", "llama-3.1-70b", "--quant", "4", "--strategy", "hybrid_optimal"])
    assert "studio-m3u 21.8 / 192.0, studio-m4max 21.8 / 96.0" in capsys.readouterr().out


def test_the_comparison_shows_one_figure_per_node(capsys):
    main(["plan", "--cluster", "mixed", "--model", "llama-3.1-70b", "--quant", "4", "--strategy", "all"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert rows["hybrid_optimal"].endswith("22/192 22/96")
    assert rows["uniform"].endswith("11/192 11/96 11/72 11/48")


def test_plan_json_carries_each_members_memory_and_reads_back(hybrid_on_mixed):
    written = json.loads(json.dumps(hybrid_on_mixed.to_dict()))
    members = [(m["node"], round(m["used_gb"], 1), m["usable_gb"]) for m in written["stages"][0]["memory_per_node"]]
    assert members == [("studio-m3u", 21.8, 192.0), ("studio-m4max", 21.8, 96.0)]
    assert PartitionPlan.from_dict(written) == hybrid_on_mixed


def test_a_plan_json_written_before_per_node_memory_still_reads():
    old = PartitionPlan.from_dict(json.loads(OLD_PLAN_JSON.read_text()))
    assert old.stages[0].member_memory() == (NodeMemory("studio0", 11.47969536, 144.0),)
    assert old.notes == () and old.problems() == []


def test_a_tp_group_whose_smaller_member_cannot_hold_its_share_is_refused(options):
    cluster, model = studio_with_a_small_partner(16), catalog.load_model("llama-3.1-70b", 4)
    plan = build_plan("test", cluster, model, options, [("big", "small")], [80])
    assert plan.problems() == ["stage 0 (big+small): small needs 21.8 GB, has 12.0 GB"]   # big (192 GB) is fine
    with pytest.raises(DoesNotFit, match=r"big\+small: small needs 21.8 GB .* has 12.0 GB usable"):
        require_fit(plan)


def test_the_search_never_picks_a_tp_group_with_a_member_too_small(options):
    cluster, model = studio_with_a_small_partner(16), catalog.load_model("llama-3.1-70b", 4)
    plan = get_strategy("hybrid_optimal")(cluster, model, options)
    assert ("big", "small") not in [s.nodes for s in plan.stages] and plan.problems() == []


# ------------------------------------------------------------------------------------ warnings and notes
def test_how_the_search_went_is_a_note_not_a_warning(hybrid_on_mixed, capsys):
    assert hybrid_on_mixed.warnings == ()
    assert len(hybrid_on_mixed.notes) == 1 and hybrid_on_mixed.notes[0].startswith("search (exact over 4 nodes")
    main(["plan", "--cluster", "mixed", "--model", "llama-3.1-70b", "--quant", "4", "--strategy", "hybrid_optimal"])
    out = capsys.readouterr().out
    assert "note: search (exact over 4 nodes" in out and "warning" not in out


def test_a_nearly_full_tp_member_is_warned_about_by_name(options):
    # 30 GB x 0.75 = 22.5 GB usable against a 21.8 GB share: 97 % full, while the studio is at 11 %
    cluster, model = studio_with_a_small_partner(30), catalog.load_model("llama-3.1-70b", 4)
    plan = require_fit(build_plan("test", cluster, model, options, [("big", "small")], [80]))
    assert plan.warnings == ("small is 97 % full (21.8 of 22.5 GB usable): little room beyond the 8192-token "
                             "KV reserve",)


def test_a_nearly_full_node_is_a_warning_in_the_comparison(capsys):
    main(["plan", "--cluster", "seed-64gb", "--model", "llama-3.1-70b", "--quant", "8", "--strategy", "all"])
    out = capsys.readouterr().out
    assert "min_latency warning: mac0 is 99 % full (47.5 of 48.0 GB usable)" in out


def test_a_hop_that_bottlenecks_the_pipeline_is_a_warning(options):
    chip = catalog.find_chip("M4 Max", 40)
    cluster = Cluster("wifi-pair", (Node("a", chip, 64, 0.75), Node("b", chip, 64, 0.75)),
                      (catalog.make_link("a", "b", "wifi"),))
    plan = get_strategy("uniform")(cluster, catalog.load_model("qwen2.5-0.5b", 4), options)
    # the last stage sends token ids back over wifi (5.00 ms) in more than its own 2.62 ms step
    assert plan.warnings == ("the hop from stage 1 (b) to a over wifi takes 5.00 ms, more than the stage's own "
                             "step (2.62 ms): it is the pipeline's bottleneck",)


def test_idle_nodes_are_a_note(options):
    # eight minis and a four-layer model: uniform says why half the nodes sit out, which asks nothing of the user
    tiny = model_from_config({"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4,
                              "intermediate_size": 512, "vocab_size": 1000}, "tiny", 4)
    plan = get_strategy("uniform")(catalog.load_cluster("m4pro-8x-mini"), tiny, options)
    assert (plan.warnings, plan.notes) == ((), ("4 nodes left idle: only 4 layers to share",))
