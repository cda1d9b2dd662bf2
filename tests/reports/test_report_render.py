"""The HTML report: rendered from saved folders only, self-contained, every figure labelled with its source."""
import base64
import io
import re

import pytest
from PIL import Image

import reports
from harness.cli import main
from report_runs import write_run

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"')


def figures(html: str) -> dict[str, str]:
    """alt text -> base64 PNG of every figure on the page."""
    return dict(IMG.findall(html))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = write_run(tmp_path_factory.mktemp("single"), "one")
    return path, reports.render([path]).read_text()


def test_one_run_writes_report_html_into_its_folder(single):
    path, html = single
    assert (path / "report.html").read_text() == html


def test_page_needs_no_network(single):
    _, html = single
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script" not in html and "@import" not in html


def test_every_figure_is_a_real_png_labelled_with_its_source(single):
    _, html = single
    found = figures(html)
    assert set(found) == {"Latency distributions (simulated)", "Per-node memory and busy time (simulated)",
                          "Partition ring (theoretical)"}
    for data in found.values():
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and image.width > 300


def test_targets_table_shows_value_source_and_status(single):
    _, html = single
    table = html[html.index('<table class="targets">'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr class=") == 4
    assert "median TTFT" in table and "median_ttft_ms" not in table and "50 ms" in table and "prompt 512 tokens" in table
    assert "theoretical: plan prediction for one stream at a 512-token prompt" in table
    assert '<span class="status fail">fail (theoretical)</span>' in table   # memory 77 % < 80 %
    assert "3 of 4 targets pass, 1 fail." in html


def test_summary_tables_carry_vllm_metrics(single):
    _, html = single
    assert "TTFT (ms)" in html and "output throughput" in html and "Partition plan" in html
    assert "Plan predictions" in html and "<td class=\"text\">decode speed, one request</td>" in html
    assert "<td class=\"text\">tokens_per_s</td>" not in html       # labels, not raw keys


def test_nested_backend_figures_are_listed(tmp_path):
    extra = {"load": {"load_s_per_node": {"studio-1": 12.5}}, "kv_peak_fraction": 0.4}
    html = reports.render([write_run(tmp_path, "stats", extra_metrics=extra)], with_plots=False).read_text()
    assert "load.load_s_per_node.studio-1" in html and "kv_peak_fraction" in html


def test_incomplete_run_is_said_prominently(tmp_path):
    path = write_run(tmp_path, "cut", finish=False)
    html = reports.render([path], with_plots=False).read_text()
    assert 'class="banner"' in html and "INCOMPLETE RUN: cut" in html and "interrupted" in html
    assert html.index('class="banner"') < html.index("<h2")          # above everything else
    assert "summary.json had no metrics; recomputed" in html           # numbers still shown, from the rows


def test_complete_run_has_no_banner(single):
    assert 'class="banner"' not in single[1]


def test_comparison_of_a_sweep_draws_comparison_and_load_plots(tmp_path):
    runs = [write_run(tmp_path, f"{s}-{rate}", n=30, rate=rate, strategy=s)
            for s in ("uniform", "hybrid_optimal") for rate in (2.0, 8.0)]
    out = tmp_path / "compare.html"
    assert reports.render(runs, out) == out
    html = out.read_text()
    assert "Comparison of 4 runs" in html
    alts = set(figures(html))
    assert "Strategy comparison (simulated + theoretical)" in alts
    assert "Throughput and latency against load (simulated)" in alts
    assert html.count('<table class="targets">') == 4


def test_comparison_without_load_sweep_has_no_load_plot(tmp_path):
    runs = [write_run(tmp_path, s, n=20, strategy=s) for s in ("uniform", "min_latency")]
    html = reports.render(runs, tmp_path / "c.html", with_plots=True).read_text()
    assert not any(a.startswith("Throughput and latency") for a in figures(html))


def test_measured_rows_are_labelled_measured(tmp_path):
    html = reports.render([write_run(tmp_path, "real", source="measured")]).read_text()
    assert "Latency distributions (measured)" in figures(html)


def test_cli_rerenders_from_saved_files(tmp_path, capsys):
    path = write_run(tmp_path, "cli")
    assert main(["report", str(path)]) == 0
    assert f"report: {path / 'report.html'}" in capsys.readouterr().out
    assert "Run report: cli" in (path / "report.html").read_text()


def test_cli_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_text_from_run_files_is_escaped(tmp_path):
    html = reports.render([write_run(tmp_path, "esc", strategy="<b>bold</b>")], with_plots=False).read_text()
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold</b>" not in html


def test_default_comparison_path_is_next_to_the_runs(tmp_path):
    runs = [write_run(tmp_path, name, n=10) for name in ("x", "y")]
    assert reports.render(runs, with_plots=False) == tmp_path / "comparison-x-vs-y.html"


def test_cli_warns_about_an_incomplete_run(tmp_path, capsys):
    path = write_run(tmp_path, "stopped", finish=False)
    assert main(["report", str(path)]) == 0
    assert "is incomplete (marked incomplete: interrupted" in capsys.readouterr().out
