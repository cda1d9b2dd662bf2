"""`harness bench` writes an HTML report, shows a status line while it runs, and writes a sweep as ONE run
folder (issue 9): run as a user runs it, against the embedded instant backend."""
from __future__ import annotations

import json

import jsonschema

from harness import summary
from harness.cli import main
from harness.commands.bench import strategy_name
from harness.runfolder import read_run
from harness.serving.loadgen import LoadSink
from harness.serving.progress import LoadProgress
from reports.run import load_run

SMALL = "all_at_once,n=12,prompt=16,output=8"


def bench(tmp_path, *extra) -> int:
    return main(["bench", "--backend", "instant", "--workload", SMALL, "--out", str(tmp_path), *extra])


def test_bench_renders_report_html_in_its_run_folder(tmp_path, capsys):
    assert bench(tmp_path, "--mode", "concurrent", "-c", "2") == 0
    (folder,) = tmp_path.iterdir()
    assert (folder / "report.html").is_file()
    assert f"report: {folder / 'report.html'}" in capsys.readouterr().out
    assert load_run(folder).strategy == "instant"    # the backend's name when there is no plan, never "?"


def test_no_report_skips_it(tmp_path):
    assert bench(tmp_path, "--no-report") == 0
    (folder,) = tmp_path.iterdir()
    assert not (folder / "report.html").exists()


def test_sweep_is_one_folder_with_one_valid_summary_and_a_sweep_report(tmp_path, capsys):
    assert bench(tmp_path, "--mode", "concurrent", "--sweep", "1,2,4") == 0
    (folder,) = tmp_path.iterdir()
    body = json.loads((folder / "summary.json").read_text())
    jsonschema.validate(body, summary.schema(), cls=jsonschema.Draft202012Validator)
    points = body["sweep"]["points"]
    assert [p["load"] for p in points] == [1.0, 2.0, 4.0] and body["sweep"]["kind"] == "concurrent"
    # the whole sweep's requests are the points' requests, one table on one clock
    per_point = [len(read_run(folder / p["run"]).requests()) for p in points]
    assert per_point == [12, 12, 12] and [p["metrics"]["completed"] for p in points] == per_point
    whole = read_run(folder).requests()
    assert len(whole) == sum(per_point) == body["metrics"]["completed"]
    assert whole["request_id"].str.startswith(("p1/", "p2/", "p3/")).all() and whole["request_id"].is_unique
    point_of = whole["request_id"].str[:2]
    # the points ran one after another, and the shared clock keeps them so
    assert whole[point_of == "p2"]["start_s"].min() >= whole[point_of == "p1"]["end_s"].max()
    assert whole[point_of == "p3"]["start_s"].min() >= whole[point_of == "p2"]["end_s"].max()
    page = (folder / "report.html").read_text()
    assert page.count("<html") == 1 and "Throughput and latency against load" in page
    assert all(p["run"].split("/")[-1] in page for p in points)   # each point's own section
    assert ">?<" not in page and "sweep folder:" in capsys.readouterr().out


def test_the_status_line_appears_on_stderr(tmp_path, capsys):
    # constant rate 40 req/s over 12 requests lasts ~0.3 s: several 0.05 s lines
    assert bench(tmp_path, "--mode", "constant", "--rate", "40", "--progress-every", "0.05", "--no-report") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "finished" in line]
    assert lines and "req/s" in lines[-1] and "output tok/s" in lines[-1] and "in flight" in lines[-1]
    assert "failed 0" in lines[-1]


def test_status_line_counts_failures_and_recent_rates_after_the_journal():
    journal = []
    sink = LoadSink(journal.append)
    with LoadProgress(None, 3, every_s=60) as progress:
        progress.follow(sink)
        sink.row({"success": True, "output_tokens": 8})
        sink.row({"success": False, "output_tokens": 0})
        line = progress.line()
        req_rate, tok_rate = progress.rates()
    assert len(journal) == 2    # the run folder's journal still gets every row
    assert "finished 2/3" in line and "failed 1" in line and "in flight" not in line   # no backend to ask
    assert req_rate > 0 and tok_rate == req_rate * 4    # 8 tokens over 2 requests in the same window


def test_an_outside_server_is_called_external():
    assert strategy_name(None) == "external"
