"""Reports a person can read (issue 9): time axes from the first request, legible per-node figures at 8 nodes,
tensor-parallel partners named in legends, a partition figure as wide as the page, a compact comparison page."""
import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import QuadMesh
from PIL import Image

import reports
from harness.specs import PartitionPlan, Stage
from reports import load_run
from reports.html import render_html, run_labels
from reports.plots import (clock_zero, node_timelines, node_timelines_figure, partition_figure, partition_ring,
                           stage_labels, strategy_comparison_figure)
from report_runs import PLAN, write_run


def pipeline_plan(nodes: int) -> dict:
    """A plan of `nodes` single-node stages over 80 layers."""
    width = 80 // nodes
    stages = tuple(Stage((f"mini{i}",), i * width, (i + 1) * width, 1, memory_used_gb=6.0,
                         memory_available_gb=48.0, decode_ms=20.0) for i in range(nodes))
    return PartitionPlan(strategy="uniform", objective="latency", cluster="minis", model="llama-3.1-70b",
                         quant_bits=4, num_layers=80, stages=stages, predicted={"tpot_ms": 160.0}).to_dict()


def steps_of(nodes: list[str], load_from: float, until: float) -> pd.DataFrame:
    """A load step per node from `load_from` to 0, then decode steps of 30 ms every 50 ms up to `until`."""
    rows = []
    for stage, node in enumerate(nodes):
        rows.append((0, stage, node, "load", load_from, 0.0, 0, 0, 0, float("nan"), "measured"))
        for step, t in enumerate(np.arange(0.1, until, 0.05), start=1):
            rows.append((step, stage, node, "decode", t, t + 0.03, 4, 4, step * 1_000_000, 0.03, "measured"))
    return pd.DataFrame(rows, columns=["step", "stage", "node", "kind", "start_s", "end_s", "batch_size",
                                       "tokens", "kv_bytes", "compute_s", "source"])


@pytest.fixture
def measured_run(tmp_path):
    """As a real run records it: the model loads for 10 s before the load generator sends request one."""
    run = load_run(write_run(tmp_path, "measured", source="measured"))
    first = float(run.requests["start_s"].min())
    run.steps = steps_of(["studio-1", "mini-1", "mini-2"], first - 10.0, float(run.requests["end_s"].max()))
    return run


def test_time_axes_start_at_the_first_request(measured_run):
    fig, data = node_timelines_figure(measured_run)
    assert clock_zero(measured_run) == pytest.approx(float(measured_run.requests["start_s"].min()))
    for ax in fig.axes:
        assert ax.get_xlim()[0] == 0.0
        assert all(np.min(line.get_xdata()) >= 0.0 for line in ax.get_lines())
    assert data.clipped_s == pytest.approx(10.0)
    assert "model loading before it (10 s) is clipped" in fig.axes[-1].get_xlabel()


def test_loading_that_reaches_past_t0_is_a_labelled_span(measured_run):
    measured_run.steps.loc[measured_run.steps["kind"] == "load", "end_s"] += 3.0
    fig, data = node_timelines_figure(measured_run)
    assert data.loading_until > 0
    assert "model loading" in [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]


def test_eight_nodes_get_one_heatmap_row_each(tmp_path):
    run = load_run(write_run(tmp_path, "eight", plan=pipeline_plan(8)))
    run.steps = steps_of([f"mini{i}" for i in range(8)], -2.0, 20.0)
    fig, _ = node_timelines_figure(run)
    meshes = [c for ax in fig.axes[:2] for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 2 and all(m.get_array().shape == (8, 120) for m in meshes)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][:2] == ["stage 0: mini0", "stage 1: mini1"]
    assert len(fig.axes) == 4              # two heatmaps and their colour bars, not sixteen overlaid lines


def test_three_nodes_stay_line_plots(measured_run):
    fig, _ = node_timelines_figure(measured_run)
    assert len(fig.axes) == 2 and not any(isinstance(c, QuadMesh) for ax in fig.axes for c in ax.collections)


def test_tensor_parallel_partners_share_a_legend_entry(measured_run):
    fig, data = node_timelines_figure(measured_run)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "stage 2: mini-2 + mini-3 (TP2)" in legend
    assert "stage 2: mini-2 + mini-3 (TP2)" in data.labels and len(data.labels) == 3
    assert stage_labels(PLAN)["mini-3"] == "stage 2: mini-2 + mini-3 (TP2)"


def test_partition_figure_names_tp_stage_and_fills_the_width(measured_run):
    fig = partition_figure(measured_run)
    layer_map = fig.axes[1]
    assert [t.get_text() for t in layer_map.get_legend().get_texts()] == ["stage 2: mini-2 + mini-3 (TP2)"]
    ring = Image.open(io.BytesIO(base64.b64decode(partition_ring(measured_run).png_base64)))
    timeline = Image.open(io.BytesIO(base64.b64decode(node_timelines(measured_run).png_base64)))
    assert ring.width >= 0.9 * timeline.width and ring.width > 2 * ring.height


def test_partners_with_their_own_memory_figures(tmp_path):
    plan = dict(PLAN, stages=[dict(PLAN["stages"][2], memory_per_node=[
        {"node": "mini-2", "used_gb": 30.0, "usable_gb": 96.0}, {"node": "mini-3", "used_gb": 30.0,
                                                                  "usable_gb": 48.0}])])
    run = load_run(write_run(tmp_path, "own", plan=plan))
    texts = [t.get_text() for t in partition_figure(run).axes[1].texts]
    assert "30.0 / 96 GB" in texts and "30.0 / 48 GB" in texts


def five_runs(tmp_path) -> list:
    return [load_run(write_run(tmp_path, f"run-{s}", n=20, strategy=s))
            for s in ("uniform", "min_latency", "compute_balanced", "hybrid_optimal", "ring_memory_weighted")]


def test_comparison_bars_are_labelled_by_strategy(tmp_path):
    runs = five_runs(tmp_path)
    fig, _ = strategy_comparison_figure(runs, labels=run_labels(runs))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [r.strategy for r in runs]


def test_repeated_strategies_are_told_apart_by_load(tmp_path):
    runs = [load_run(write_run(tmp_path, f"u{rate}", n=10, rate=rate, strategy="uniform")) for rate in (2.0, 8.0)]
    runs.append(load_run(write_run(tmp_path, "again", n=10, rate=8.0, strategy="uniform")))
    assert run_labels(runs) == ["uniform @ 2 req/s", "uniform @ 8 req/s (run 2)", "uniform @ 8 req/s (run 3)"]


def test_comparison_of_five_runs_is_one_summary_with_folded_reports(tmp_path):
    html = render_html(five_runs(tmp_path))
    top = html[:html.index('<details class="run"')]
    assert top.count("<table>") + top.count('<table class="targets">') == 2     # metrics and targets matrix
    assert top.count("<img ") == 1                                              # the strategy comparison
    assert html.count('<details class="run"') == 5
    folded = re.findall(r'<details class="run".*?</section>\s*</details>', html, flags=re.S)
    assert len(folded) == 5 and all('<table class="targets">' in part for part in folded)
    assert all(part.count("<img ") == 3 for part in folded)                     # each run's own figures kept


def test_single_run_is_not_folded(tmp_path):
    html = render_html([load_run(write_run(tmp_path, "solo"))])
    assert '<details class="run"' not in html and "Each run's own report" not in html


def test_comparison_page_is_short_in_a_browser(tmp_path):
    """Rendered height in Chromium: five appended reports measured > 20,000 px; folded, it fits a few screens."""
    browser = pytest.importorskip("test_report_browser")
    if browser.CHROMIUM is None:
        pytest.skip("chromium is not installed")
    page = reports.render([r.path for r in five_runs(tmp_path)], tmp_path / "c.html")
    probe = ('<script>window.addEventListener("load", function () {'
             'document.body.setAttribute("data-height", document.documentElement.scrollHeight); });</script>')
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", probe + "</body>"))
    dom = browser.chromium(tmp_path, "--window-size=1400,1000", "--dump-dom", probed.as_uri()).stdout
    height = int(re.search(r'data-height="(\d+)"', dom).group(1))
    assert 800 < height < 3000
