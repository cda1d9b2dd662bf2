"""Figure helpers whose numbers can be checked without looking at pixels."""
import numpy as np
import pytest

from reports import load_run
from reports.plots import _busy_fraction, node_timelines, partition_ring, ring_members
from report_runs import PLAN, write_run


def test_ring_has_one_circle_per_node_with_per_node_memory():
    members = ring_members(PLAN)
    assert [m["node"] for m in members] == ["studio-1", "mini-1", "mini-2", "mini-3"]
    assert [m["stage"] for m in members] == [0, 1, 2, 2]
    assert members[3]["group"] == 2 and members[3]["used"] == 30.0 and members[3]["available"] == 48.0


def test_busy_fraction_of_known_intervals():
    # node busy 0-1 s and 2.5-3 s; bins of 1 s over 0-4 s
    share = _busy_fraction(np.array([0.0, 2.5]), np.array([1.0, 3.0]), np.linspace(0, 4, 5))
    assert share == pytest.approx([1.0, 0.0, 0.5, 0.0])


def test_busy_fraction_counts_overlapping_steps_twice():
    share = _busy_fraction(np.array([0.0, 0.0]), np.array([1.0, 0.5]), np.array([0.0, 1.0]))
    assert share == pytest.approx([1.5])


def test_figures_without_data_are_skipped(tmp_path):
    run = load_run(write_run(tmp_path, "bare", plan=dict(PLAN, stages=[])))
    run.steps = run.steps.iloc[0:0]
    assert node_timelines(run) is None and partition_ring(run) is None


def test_offered_load_prefers_the_load_generator_mode(tmp_path):
    from reports.html import offered_load
    run = load_run(write_run(tmp_path, "mode", rate=5.0))
    assert offered_load(run) == (5.0, "offered request rate (req/s)")
    run.config["mode"] = {"kind": "concurrent", "value": 8}
    assert offered_load(run) == (8.0, "concurrency (requests in flight)")
    run.config["mode"] = {"kind": "workload", "value": 0.0}
    assert offered_load(run) == (5.0, "offered request rate (req/s)")
