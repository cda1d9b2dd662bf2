"""The report's plan table shows each tensor-parallel member's own memory (issue 9: a TP pair was shown with the
smaller member's usable memory for both)."""
from __future__ import annotations

from harness import catalog
from harness.costmodel import PlanOptions, load_profile
from reports.tables import _member_memory
from strategies.registry import get_strategy


def test_tp_stage_lists_each_members_usable_memory():
    plan = get_strategy("hybrid_optimal")(catalog.load_cluster("mixed"), catalog.load_model("llama-3.1-70b", 4),
                                          PlanOptions(load_profile(), objective="latency"))
    tp = next(s for s in plan.to_dict()["stages"] if len(s["nodes"]) == 2)
    assert _member_memory(tp) == ["21.8 / 21.8", "192 / 96"]


def test_a_plan_without_member_figures_shows_the_stage_figures():
    assert _member_memory({"memory_used_gb": 10.0, "memory_available_gb": 48.0}) == ["10", "48"]
