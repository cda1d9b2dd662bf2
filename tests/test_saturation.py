"""Overload called out (issue 9): the verdict of harness.saturation on hand-built rows (exact figures) and on real
simulator runs, and where it shows: summary.json, the console lines of simulate / run / bench, the report."""
import json
from types import SimpleNamespace

import jsonschema
import numpy as np
import pandas as pd
import pytest

import reports
from reports import tables
from harness import saturation, summary
from harness.cli import main
from harness.commands.bench import summary_text
from harness.commands.run import _outcome_text


def rows(start, first_token, end, success=None, error=None) -> pd.DataFrame:
    """Request rows (scheduled = start: no dispatch lag) with the columns the verdict reads."""
    n = len(start)
    return pd.DataFrame({"scheduled_s": np.asarray(start, float), "start_s": np.asarray(start, float),
                         "first_token_s": np.asarray(first_token, float), "end_s": np.asarray(end, float),
                         "success": np.ones(n, bool) if success is None else np.asarray(success, bool),
                         "error": [""] * n if error is None else error})


def steady() -> pd.DataFrame:
    """8 arrivals one a second, each 0.1 s to its first token and 0.5 s in all: the queue always empties."""
    t = np.arange(8.0)
    return rows(t, t + 0.1, t + 0.5)


def single_server_overloaded() -> pd.DataFrame:
    """8 arrivals one a second to a server that takes 2 s each, in turn: request i is served over [2i, 2i + 2]
    with its first token at 2i + 0.5, so it waits i + 0.5 s."""
    t = np.arange(8.0)
    return rows(t, 2 * t + 0.5, 2 * t + 2)


def test_union_length_merges_overlaps():
    assert saturation.union_length([0, 1, 5], [2, 3, 6]) == 4.0
    assert saturation.union_length([0, 0.5], [4, 1]) == 4.0


def test_a_steady_run_is_not_saturated():
    v = saturation.assess(steady(), preemptions=0)
    assert v == {"saturated": False, "reasons": [], "offered_rate_rps": 1.0, "observed_service_rate_rps": 2.0,
                 # the queue stood 0.8 s of a 7 s arrival span: no limit shown, the offered rate was kept up
                 "sustainable_rate_rps": 1.0,
                 "queue_growth": {"first_quarter_wait_s": pytest.approx(0.1), "last_quarter_wait_s": pytest.approx(0.1)},
                 "preemptions": 0, "cancelled_at_bound": 0}
    assert saturation.console_line(v) is None


def test_an_overloaded_single_server_is_flagged_with_exact_figures():
    v = saturation.assess(single_server_overloaded())
    assert v["saturated"] is True
    assert v["offered_rate_rps"] == 1.0
    assert v["observed_service_rate_rps"] == 0.5          # 8 completions over the busy [0, 16] s
    # someone waited through [0, 0.5] + [1, 14.5] = 14 s of the 7 s arrival span: the service rate is the limit
    assert v["sustainable_rate_rps"] == 0.5
    assert v["queue_growth"] == {"first_quarter_wait_s": 1.0, "last_quarter_wait_s": 7.0}
    assert v["reasons"] == ["arrivals 1 req/s exceed the 0.5 req/s this cluster sustained",
                            "queueing grew from 1 s to 7 s (first vs last quarter of arrivals)"]
    assert saturation.console_line(v) == ("OVERLOADED: arrivals 1 req/s exceed the 0.5 req/s this cluster "
                                          "sustained; queueing grew from 1 s to 7 s (first vs last quarter of "
                                          "arrivals)")


def test_a_closed_loop_is_not_judged_by_its_arrival_rate():
    v = saturation.assess(single_server_overloaded(), closed_loop=True)
    assert v["offered_rate_rps"] == 1.0 and v["sustainable_rate_rps"] == 0.5
    assert v["reasons"] == ["queueing grew from 1 s to 7 s (first vs last quarter of arrivals)"]


def test_closed_loops_are_told_from_the_workload_or_the_load_mode():
    closed = {"kind": "synthetic", "closed_loop": {"concurrency": 2}}
    assert saturation.is_closed_loop(closed)                                   # simulate's spec
    assert saturation.is_closed_loop({"workload": closed, "mode": {"kind": "workload"}})   # bench, run
    assert saturation.is_closed_loop({"workload": {"kind": "synthetic"}, "mode": {"kind": "concurrent"}})
    assert not saturation.is_closed_loop({"workload": {"kind": "synthetic"}, "mode": {"kind": "poisson"}})
    assert not saturation.is_closed_loop(None)


def test_small_waits_that_double_are_not_growth():
    t = np.arange(8.0)
    wait = np.array([0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4])   # 4x, but under a second
    assert saturation.assess(rows(t, t + wait, t + wait + 0.1))["saturated"] is False


def test_preemptions_alone_saturate():
    v = saturation.assess(steady(), preemptions=3)
    assert v["saturated"] and v["reasons"] == ["3 preemptions (KV cache full)"]
    assert saturation.console_line(v) == "OVERLOADED: 3 preemptions (KV cache full); sustained 1 req/s"


def test_only_requests_cut_off_at_the_time_bound_count_as_cancelled():
    df = steady()
    df.loc[5:, "success"] = False
    df["error"] = [""] * 5 + ["cancelled: run time limit", "ReadTimeout: timed out", "HTTP 500: boom"]
    v = saturation.assess(df)
    assert v["cancelled_at_bound"] == 2
    assert "2 requests cancelled at the time bound" in v["reasons"]


def test_no_rows_no_verdict_figures():
    v = saturation.assess(rows([], [], []))
    assert v["saturated"] is False and v["offered_rate_rps"] is None and v["queue_growth"] is None


def test_console_lines_of_run_and_bench_name_the_overload():
    body = {"source": "simulated", "backend": "sim", "metrics": {"completed": 8, "failed": 0},
            "saturation": saturation.assess(single_server_overloaded())}
    line = saturation.console_line(body["saturation"])
    assert line in summary_text(body, None).splitlines()
    outcome = SimpleNamespace(error=None, strategy="uniform", summary=body, path="runs/out/x")
    assert line in _outcome_text(outcome, with_report=False).splitlines()
    calm = dict(body, saturation=saturation.assess(steady()))
    assert "OVERLOADED" not in summary_text(calm, None)


def simulate(tmp_path, run_id, *argv) -> dict:
    assert main(["simulate", *argv, "--quiet", "--out", str(tmp_path), "--run-id", run_id]) == 0
    return json.loads((tmp_path / run_id / "summary.json").read_text())


@pytest.fixture(scope="module")
def issue_run(tmp_path_factory):
    """The issue's case: the seed's 64 GB cluster serving the 70B model at its default workload."""
    root = tmp_path_factory.mktemp("issue9")
    body = simulate(root, "seed", "--cluster", "seed-64gb", "--model", "llama-3.1-70b")
    return root / "seed", body


def test_the_issue_case_is_flagged_in_summary(issue_run):
    folder, body = issue_run
    v = body["saturation"]
    assert v["saturated"] and v["preemptions"] == body["sim"]["preemptions"] > 0
    assert v["offered_rate_rps"] > 3 * v["sustainable_rate_rps"]
    assert v["queue_growth"]["last_quarter_wait_s"] > 2 * v["queue_growth"]["first_quarter_wait_s"]
    jsonschema.validate(body, summary.schema(), cls=jsonschema.Draft202012Validator)


def test_the_issue_case_prints_one_overload_line(tmp_path, capsys):
    simulate(tmp_path, "seed", "--cluster", "seed-64gb", "--model", "llama-3.1-70b")
    overloaded = [line for line in capsys.readouterr().out.splitlines() if line.startswith("OVERLOADED: ")]
    assert len(overloaded) == 1 and "sustained" in overloaded[0] and "preemptions" in overloaded[0]


def test_a_light_load_is_not_flagged(tmp_path, capsys):
    body = simulate(tmp_path, "light", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b",
                    "--workload", "poisson,rate=0.2,n=100,prompt=512,output=128")
    assert body["saturation"]["saturated"] is False and body["saturation"]["reasons"] == []
    assert "OVERLOADED" not in capsys.readouterr().out


def test_report_banner_only_for_a_saturated_summary(issue_run, tmp_path):
    folder, body = issue_run
    html = reports.render([folder]).read_text()
    banner = html[html.index('<div class="banner" id="overloaded-1">'):]
    banner = banner[:banner.index("</div>")]
    assert html.index("</h1>") < html.index(banner) < html.index('<p class="meta">')
    assert f"sustained {tables.fmt(body['saturation']['sustainable_rate_rps'])} req/s" in banner
    assert "preemptions" in banner
    # a summary without the section (written before it existed) shows no banner
    del body["saturation"]
    (folder / "summary.json").write_text(json.dumps(body))
    assert 'id="overloaded-' not in reports.render([folder]).read_text()


def test_bench_summary_carries_the_verdict(tmp_path, capsys):
    assert main(["bench", "--backend", "instant", "--workload", "closed,concurrency=2,n=12,prompt=16,output=4",
                 "--out", str(tmp_path), "--label", "b"]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    verdict = json.loads((folder / "summary.json").read_text())["saturation"]
    # twelve sends as fast as two slots free up: a closed loop the instant backend keeps up with
    assert verdict["saturated"] is False and verdict["observed_service_rate_rps"] > 0
    assert "OVERLOADED" not in capsys.readouterr().out
