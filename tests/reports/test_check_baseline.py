"""`check`: a run against a committed baseline; exit codes and the table CI prints."""
import json

import pytest

from harness.cli import main
from reports.check import (BaselineError, FingerprintMismatch, check, format_result, gate_direction, judge,
                           read_baseline, write_baseline)
from report_runs import write_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    # Same seeded workload; "slow" differs only in TTFT (60 ms instead of 50 ms).
    return {"base": write_run(root, "base"),
            "same": write_run(root, "same"),
            "slow": write_run(root, "slow", ttft_s=0.06),
            "cut": write_run(root, "cut", finish=False)}


@pytest.fixture
def baseline(runs, tmp_path):
    return write_baseline(runs["base"], tmp_path / "baselines" / "smoke.json")


def test_written_baseline_has_values_tolerances_and_directions(baseline):
    data = json.loads(baseline.read_text())
    assert data["schema_version"] == 2
    ttft = data["metrics"]["median_ttft_ms"]
    assert ttft["value"] == pytest.approx(50.0)
    assert ttft["direction"] == "lower_is_better"
    assert ttft["tolerance"] == 0.001                 # simulated: tight
    assert data["metrics"]["output_throughput"]["direction"] == "higher_is_better"
    assert not any(name.startswith("std_") for name in data["metrics"])


def test_identical_seeded_run_passes_with_exit_0(runs, baseline, capsys):
    assert main(["check", "--baseline", str(baseline), str(runs["same"])]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "median_ttft_ms" in out and "REGRESSED" not in out


def test_slower_run_fails_with_exit_1_and_names_what_moved(runs, baseline, capsys):
    assert main(["check", "--baseline", str(baseline), str(runs["slow"])]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("median_ttft_ms"))
    assert "50" in row and "60" in row and "+20.00%" in row and "REGRESSED" in row
    assert out.splitlines()[-1].startswith("FAIL:")
    # failures are listed before the metrics that held
    lines = out.splitlines()
    last_failure = max(i for i, line in enumerate(lines) if "REGRESSED" in line)
    assert last_failure < min(i for i, line in enumerate(lines) if line.endswith(" ok"))


def test_incomplete_run_fails_the_check(runs, baseline):
    result = check(runs["cut"], baseline)
    assert not result.ok and "interrupted" in format_result(result)


def test_missing_metric_fails(runs, baseline):
    data = json.loads(baseline.read_text())
    data["metrics"]["no_such_metric"] = {"value": 1.0, "tolerance": 0.1, "direction": "two_sided"}
    baseline.write_text(json.dumps(data))
    result = check(runs["same"], baseline)
    assert not result.ok
    assert [r.name for r in result.rows if r.status == "MISSING"] == ["no_such_metric"]


def test_ratio_is_taken_within_the_run(runs, baseline):
    data = json.loads(baseline.read_text())
    data["metrics"] = {"ttft_share": {"ratio": ["median_ttft_ms", "median_e2el_ms"], "value": 0.1,
                                      "tolerance": 0.5, "direction": "lower_is_better"}}
    baseline.write_text(json.dumps(data))
    (row,) = check(runs["same"], baseline).rows
    assert row.current == pytest.approx(50.0 / 470.0)   # fixture: median E2E latency 470 ms
    assert row.status == "ok"


def test_rewriting_keeps_tolerances_and_adds_ratios(runs, baseline):
    data = json.loads(baseline.read_text())
    data["metrics"]["median_ttft_ms"]["tolerance"] = 0.25
    baseline.write_text(json.dumps(data))
    write_baseline(runs["slow"], baseline, ratios={"ttft_share": ("median_ttft_ms", "median_e2el_ms")})
    fresh = json.loads(baseline.read_text())["metrics"]
    assert fresh["median_ttft_ms"] == {"value": pytest.approx(60.0), "tolerance": 0.25, "direction": "lower_is_better"}
    assert fresh["ttft_share"]["ratio"] == ["median_ttft_ms", "median_e2el_ms"]
    assert fresh["ttft_share"]["tolerance"] == 0.5


def test_cli_writes_a_chosen_set_of_metrics(runs, tmp_path, capsys):
    path = tmp_path / "b.json"
    argv = ["check", "--baseline", str(path), "--write-baseline", "--metric", "p99_ttft_ms",
            "--metric", "load_time_s", "--tolerance", "0.01", str(runs["base"])]
    assert main(argv) == 0
    metrics = json.loads(path.read_text())["metrics"]
    assert set(metrics) == {"p99_ttft_ms", "load_time_s"}
    assert metrics["load_time_s"]["value"] == pytest.approx(4.0)      # a run-level figure: load steps span
    assert "baseline written" in capsys.readouterr().out


def test_incomplete_run_cannot_become_a_baseline(runs, tmp_path):
    with pytest.raises(BaselineError, match="incomplete"):
        write_baseline(runs["cut"], tmp_path / "b.json")


@pytest.mark.parametrize("body, message", [
    ({"schema_version": 3, "metrics": {"x": {"value": 1}}}, "schema_version"),
    ({"schema_version": 1, "metrics": {}}, "no metrics"),
    ({"schema_version": 1, "metrics": {"x": {"tolerance": 0.1}}}, "numeric 'value'"),
    ({"schema_version": 1, "metrics": {"x": {"value": 1, "direction": "up"}}}, "direction"),
    ({"schema_version": 1, "metrics": {"x": {"value": 1, "tolerance": -1}}}, "tolerance"),
])
def test_bad_baselines_are_refused(tmp_path, body, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    with pytest.raises(BaselineError, match=message):
        read_baseline(path)


def test_missing_baseline_is_a_user_error(runs, tmp_path, capsys):
    assert main(["check", "--baseline", str(tmp_path / "none.json"), str(runs["same"])]) == 2
    assert "--write-baseline" in capsys.readouterr().err


@pytest.mark.parametrize("baseline, current, direction, status", [
    (100, 100.05, "lower_is_better", "ok"),
    (100, 101, "lower_is_better", "REGRESSED"),
    (100, 99, "lower_is_better", "improved"),
    (100, 99, "higher_is_better", "REGRESSED"),
    (100, 101, "higher_is_better", "improved"),
    (100, 99, "two_sided", "CHANGED"),
    (0, 0.0005, "two_sided", "ok"),             # a zero baseline: the tolerance is absolute
    (0, 1, "lower_is_better", "REGRESSED"),
    (100, None, "two_sided", "MISSING"),
])
def test_judge(baseline, current, direction, status):
    assert judge(baseline, current, 0.001, direction) == status


@pytest.mark.parametrize("name, direction", [
    ("p99_itl_ms", "lower_is_better"), ("output_throughput", "higher_is_better"),
    ("request_goodput", "higher_is_better"), ("failed", "lower_is_better"), ("total_input_tokens", "two_sided"),
    # memory in use is better neither way: the old name-pattern guess (_pct -> higher) gated it as a throughput
    ("cluster_memory_used_pct", "two_sided"), ("plan_memory_used_pct", "two_sided"),
    ("decode_tokens_per_s", "higher_is_better"), ("load_time_s", "lower_is_better"),
])
def test_direction_comes_from_the_catalogue(name, direction):
    assert gate_direction(name) == direction
    # a baseline file cannot turn a catalogued latency into a figure that should rise
    assert gate_direction(name, {"direction": "higher_is_better" if direction != "higher_is_better"
                                 else "lower_is_better"}) == direction


def test_figures_outside_the_catalogue_keep_the_baseline_direction():
    assert gate_direction("sim_wall_per_reference", {"direction": "lower_is_better"}) == "lower_is_better"
    assert gate_direction("wall.sim_s") == "two_sided"


FINGERPRINT = {"model": "llama-3.1-70b 4-bit", "cluster": "test-cluster", "cluster_hash": "abc",
               "plan_stages": ["studio-1[0,40)"], "workload_hash": "w1"}


@pytest.fixture(scope="module")
def printed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fingerprints")
    other = dict(FINGERPRINT, model="llama-3.1-8b 4-bit", workload_hash="w2")
    return {"base": write_run(root, "fp-base", fingerprint=FINGERPRINT),
            "other": write_run(root, "fp-other", fingerprint=other)}


def test_a_run_of_another_experiment_is_refused_with_what_differs(printed, tmp_path, capsys):
    baseline = write_baseline(printed["base"], tmp_path / "fp.json")
    assert json.loads(baseline.read_text())["fingerprint"] == FINGERPRINT
    with pytest.raises(FingerprintMismatch, match="model: baseline 'llama-3.1-70b 4-bit', run 'llama-3.1-8b"):
        check(printed["other"], baseline)
    assert main(["check", "--baseline", str(baseline), str(printed["other"])]) == 2
    err = capsys.readouterr().err
    assert "workload_hash" in err and "--allow-mismatch" in err


def test_allow_mismatch_prints_the_differences_and_compares(printed, tmp_path, capsys):
    baseline = write_baseline(printed["base"], tmp_path / "fp.json")
    assert main(["check", "--allow-mismatch", "--baseline", str(baseline), str(printed["other"])]) == 0
    out = capsys.readouterr().out
    assert "fingerprint differs (allowed): model" in out and "OK:" in out


def test_a_version_1_baseline_is_read_under_todays_names(tmp_path):
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({"schema_version": 1, "metrics": {
        "memory_utilisation_pct": {"value": 50.0, "tolerance": 0.1, "direction": "higher_is_better"}}}))
    entry = read_baseline(path)["metrics"]["plan_memory_used_pct"]
    assert entry["direction"] == "two_sided"


@pytest.mark.parametrize("body, message", [
    ({"schema_version": 2, "metrics": {"x": {"value": 1, "tolerence": 0.5}}},
     "'metrics.x.tolerence', did you mean 'tolerance'"),
    ({"schema_version": 2, "metric": {"x": {"value": 1}}}, "'metric', did you mean 'metrics'"),
    ({"schema_version": 2, "fingerprint": {"modle": "m"}, "metrics": {"x": {"value": 1}}},
     "'fingerprint.modle', did you mean 'model'"),
])
def test_a_typo_in_a_baseline_is_named_not_ignored(tmp_path, body, message):
    from harness.specs import UserError
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(body))
    with pytest.raises(UserError, match=message):
        read_baseline(path)
