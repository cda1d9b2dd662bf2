"""Every report table shows human labels with units from the metric catalogue, never raw summary keys."""
from harness import metrics
from reports import tables
from reports.plots import COMPARE_METRICS
from reports.run import load_run
from report_runs import PLAN, request_rows, write_run


def test_headline_table_labels_catalogue_figures_and_keeps_unknown_keys(tmp_path):
    run = load_run(write_run(tmp_path, "labels", extra_metrics={"cluster_memory_used_pct": 40.0, "odd_figure": 1.0}))
    rows = {row[0]: row for row in tables.headline_table(run.metrics).rows}
    assert rows["decode speed"][2] == "tok/s" and rows["memory used, whole cluster"][2] == "%"
    assert "decode_tokens_per_s" not in rows and "odd_figure" in rows     # nothing unknown is hidden


def test_comparison_table_headings_carry_units(tmp_path):
    runs = [load_run(write_run(tmp_path, name)) for name in ("a", "b")]
    table = tables.comparison_table(runs, ("output_throughput", "median_ttft_ms"))
    assert table.columns[3:] == ["output throughput (tok/s)", "median TTFT (ms)"]


def test_plan_predictions_are_labelled_with_units():
    rows = {row[0]: row for row in tables.predicted_table(dict(PLAN, predicted={**PLAN["predicted"],
                                                                                "objective_ms": 75.0})).rows}
    assert rows["planner objective"][2] == "ms" and rows["decode speed, one request"][2] == "tok/s"
    assert not any(key in rows for key in ("objective_ms", "tokens_per_s"))


def test_every_listed_figure_is_in_the_catalogue():
    from harness.commands import bench, run
    from reports import html
    for keys in (metrics.HEADLINE, tables.HEADLINE, html.COMPARE_KEYS, COMPARE_METRICS, run.COMPARISON_KEYS,
                 bench.SWEEP_KEYS):
        assert set(keys) <= set(metrics.BY_KEY), keys


def test_catalogue_entries_are_well_formed():
    keys = [m.key for m in metrics.CATALOGUE]
    assert len(keys) == len(set(keys))
    assert all(m.direction in metrics.DIRECTIONS and m.label and m.description for m in metrics.CATALOGUE)
    # every figure compute() produces has an entry (SLO dict aside)
    produced = metrics.compute(request_rows(5), "ttft:100")
    assert {k for k, v in produced.items() if not isinstance(v, dict)} <= set(keys)


def test_every_prediction_a_planner_makes_has_a_label():
    """Plan predictions are shown with labels, never raw keys (issue 9): each key the planner writes is labelled."""
    from harness import catalog
    from harness.costmodel import PlanOptions, load_profile
    from reports.tables import PREDICTED_LABELS
    from strategies.registry import get_strategy, strategy_names
    cluster, model = catalog.load_cluster("mixed"), catalog.load_model("llama-3.1-70b", 4)
    for name in strategy_names():
        predicted = get_strategy(name)(cluster, model, PlanOptions(load_profile(), arrival_rate_rps=0.5)).predicted
        assert set(predicted) - {"source"} <= set(PREDICTED_LABELS), name
