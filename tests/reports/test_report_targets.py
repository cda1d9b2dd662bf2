"""Targets: format, defaults, where each figure comes from, pass/fail."""
import pytest

from reports import load_run
from reports.targets import DEFAULT_TARGETS, Target, TargetError, as_summary, evaluate, targets_of, targets_summary
from report_runs import PLAN, write_run


def by_metric(results):
    return {r.target.metric: r for r in results}


def test_defaults_apply_when_config_has_no_targets(run_dir):
    run = load_run(run_dir)
    assert [t.metric for t in targets_of(run)] == [t["metric"] for t in DEFAULT_TARGETS]


def test_default_targets_use_summary_steps_and_plan(run_dir):
    results = by_metric(evaluate(load_run(run_dir)))
    ttft = results["median_ttft_ms"]
    assert ttft.observed.value == pytest.approx(50.0)          # the fixture's TTFT is 50 ms by construction
    assert ttft.observed.source == "simulated"
    assert ttft.theoretical.value == 80.0                      # plan.json predicted ttft_ms
    assert "512-token prompt" in ttft.theoretical.how
    assert ttft.status == "pass"
    assert "prompt 512 tokens" in ttft.conditions              # DESIGN §10: state the prompt length
    assert results["decode_tokens_per_s"].observed.value == pytest.approx(50.0)   # 1000 / 20 ms
    load = results["load_time_s"]
    assert load.observed.value == pytest.approx(4.0)           # load steps span 0..4 s in the fixture
    assert load.observed.source == "simulated"


def test_memory_utilisation_from_plan_is_theoretical_and_decides_alone(run_dir):
    mem = by_metric(evaluate(load_run(run_dir)))["cluster_memory_used_pct"]
    assert mem.observed is None
    assert mem.theoretical.source == "theoretical"
    assert mem.theoretical.value == pytest.approx(100 * 250 / 324)
    assert mem.status == "fail"                                # 77.2 % < 80 %


def test_planner_memory_utilisation_covers_the_whole_cluster(tmp_path):
    plan = dict(PLAN, predicted=dict(PLAN["predicted"], memory_utilisation=0.85))
    mem = by_metric(evaluate(load_run(write_run(tmp_path, "cluster-mem", plan=plan))))["cluster_memory_used_pct"]
    assert mem.theoretical.value == pytest.approx(85.0) and mem.status == "pass"


def test_plan_memory_from_stages_counts_the_plan_nodes_only(run_dir):
    # a target on the plan's nodes, written with the version-1 name, reads the renamed figure
    targets = [{"metric": "memory_utilisation_pct", "op": ">=", "value": 80}]
    run = load_run(run_dir)
    run.config = {**run.config, "targets": targets}
    mem = evaluate(run)[0]
    assert mem.target.metric == "plan_memory_used_pct" and mem.target.unit == "%"
    assert mem.theoretical.value == pytest.approx(100 * 250 / 324)


def test_configured_targets_replace_defaults(tmp_path):
    targets = [{"name": "fast tokens", "metric": "median_tpot_ms", "op": "<=", "value": 19, "unit": "ms"},
               {"metric": "output_throughput", "op": ">", "value": 1}, {"metric": "no_such_metric", "value": 1}]
    results = evaluate(load_run(write_run(tmp_path, "custom", targets=targets)))
    assert [r.status for r in results] == ["fail", "pass", "no data"]
    assert results[1].target.name == "output throughput" and results[1].target.unit == "tok/s"   # catalogue


def test_empty_targets_list_means_no_targets(tmp_path):
    assert evaluate(load_run(write_run(tmp_path, "none", targets=[]))) == []


def test_summary_metric_wins_over_fallbacks(tmp_path):
    path = write_run(tmp_path, "measured-mem", extra_metrics={"cluster_memory_used_pct": 91.0, "load_time_s": 75.0})
    results = by_metric(evaluate(load_run(path)))
    assert results["cluster_memory_used_pct"].observed.value == 91.0
    assert results["cluster_memory_used_pct"].status == "pass"
    assert results["load_time_s"].status == "fail"


@pytest.mark.parametrize("raw, message", [
    ({"metric": "x"}, "value"),
    ({"metric": "x", "value": 1, "op": "=="}, "op"),
    ({"metric": "x", "value": "fast"}, "not a number"),
])
def test_bad_targets_are_refused_with_the_reason(raw, message):
    with pytest.raises(TargetError, match=message):
        Target.from_dict(raw)


def test_targets_must_be_a_list(tmp_path):
    run = load_run(write_run(tmp_path, "bad", targets={"metric": "x"}))
    with pytest.raises(TargetError, match="list"):
        targets_of(run)


def test_plan_without_stages_gives_no_theoretical_memory(tmp_path):
    predicted = {k: v for k, v in PLAN["predicted"].items() if k != "memory_utilisation"}
    run = load_run(write_run(tmp_path, "noplan", plan=dict(PLAN, stages=[], predicted=predicted)))
    assert by_metric(evaluate(run))["cluster_memory_used_pct"].status == "no data"


def test_targets_summary_before_the_folder_exists_matches_the_report(run_dir):
    run = load_run(run_dir)
    section = targets_summary(run.config, run.plan, run.metrics, run.requests, run.steps)
    assert [(t["metric"], t["status"], t["source"]) for t in section] == [
        ("load_time_s", "pass", "simulated"), ("median_ttft_ms", "pass", "simulated"),
        ("decode_tokens_per_s", "pass", "simulated"), ("cluster_memory_used_pct", "fail", "theoretical")]
    assert section == as_summary(evaluate(run))


@pytest.mark.parametrize("nested", [False, True])
def test_both_summary_layouts_give_the_same_metrics(tmp_path, nested):
    run = load_run(write_run(tmp_path, f"layout-{nested}", nested=nested))
    assert run.metrics["median_ttft_ms"] == pytest.approx(50.0)
    assert "schema_version" not in run.metrics and "backend" not in run.metrics
    assert not run.metrics_recomputed
