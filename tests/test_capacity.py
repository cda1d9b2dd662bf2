"""`harness capacity`: the goodput knee by a search over simulated rates, the curve, the memory table (issue 13 item 1)."""
import csv
import json

import pytest

from harness.capacity import CurvePoint, Slo, find_knee, first_failure_knee
from harness.cli import build_parser, main
from harness.commands.capacity import length_spec, make_evaluator, prepare
from harness.specs import UserError

SMALL = ["--cluster", "mini-pair", "--model", "llama-3.1-8b", "--requests", "120", "--ttft-p90-ms", "8000",
         "--tpot-p90-ms", "110", "--curve-points", "2", "--quiet"]


def capacity_args(extra=()):
    return build_parser().parse_args(["capacity", *SMALL, *extra])


@pytest.fixture(scope="module")
def small_setup():
    args = capacity_args()
    prompt, output = length_spec(None, 512, "--prompt"), length_spec(None, 128, "--output")
    setup = prepare(args, prompt, output)
    return setup, make_evaluator(setup, prompt, output, args.requests, args.seed)


def test_the_knee_meets_the_slos_and_ten_percent_more_does_not(small_setup):
    setup, evaluate = small_setup
    knee = find_knee(evaluate, setup["start_rps"], tolerance=0.02)
    assert knee.status == "found" and knee.knee_rps is not None
    assert knee.upper_rps / knee.lower_rps <= 1.02 + 1e-9
    assert evaluate(knee.knee_rps).meets                 # the same seed: the same run again
    assert not evaluate(1.1 * knee.knee_rps).meets
    assert knee.search_simulations <= 12


def test_the_search_is_reproducible(small_setup):
    setup, evaluate = small_setup
    a = find_knee(evaluate, setup["start_rps"])
    b = find_knee(evaluate, setup["start_rps"])
    assert a.knee_rps == b.knee_rps and [p.rate_rps for p in a.points] == [p.rate_rps for p in b.points]


def synthetic_point(rate, limit=1.0):
    """A curve whose latency ratio grows with the rate and crosses 1 at `limit` req/s."""
    ratio = (rate / limit) ** 3
    return CurvePoint(rate, 1, ratio, 1, ratio, rate, 1.0, rate, False, (), ratio, ratio <= 1)


def test_the_search_brackets_from_far_above_and_far_below():
    for start in (40.0, 0.01):
        knee = find_knee(lambda r: synthetic_point(r, 1.0), start, tolerance=0.01)
        assert knee.status == "found" and 0.99 <= knee.knee_rps <= 1.0 <= knee.upper_rps <= 1.011


def test_a_slo_no_rate_meets_says_so():
    knee = find_knee(lambda r: synthetic_point(r, 1e-9), 1.0)
    assert knee.status == "below-all" and knee.knee_rps is None


def test_a_fine_sweep_knee_stops_at_the_first_failure():
    points = [synthetic_point(r / 10, 0.55) for r in range(1, 10)]
    assert first_failure_knee(points) == pytest.approx(0.5)


def test_the_command_writes_every_file_whole(tmp_path, capsys):
    out = tmp_path / "cap"
    assert main(["capacity", *SMALL, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "goodput knee (simulated)" in text and "KV tokens that fit" in text and "meets SLO" in text
    report = json.loads((out / "capacity.json").read_text())
    assert report["knee"]["status"] == "found" and "simulated" in report["source"]
    assert report["slo"] == {"ttft_p90_ms": 8000.0, "tpot_p90_ms": 110.0, "explicit": {"ttft": True, "tpot": True},
                             "slo_scale": 5.0}
    knee = report["knee"]["knee_rps"]
    assert any(p["rate_rps"] == knee and p["meets"] for p in report["points"])
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert len(rows) == len(report["points"]) and {r["source"] for r in rows} == {"simulated"}
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "capacity.html").read_text()
    assert page.rstrip().endswith("</html>") and "data:image/png;base64," in page
    assert report["memory"][0]["kv_tokens"] > 0 and report["memory"][0]["node"] == "mini-a"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]     # no temporary file left


@pytest.mark.parametrize("flags, message", [
    (["--requests", "5"], "--requests: found 5; allowed: an integer >= 20"),
    (["--prompt", "uniform:9"], "--prompt: found 'uniform:9'; allowed:"),
    (["--output", "0"], "--output: found '0'; allowed:"),
    (["--ttft-p90-ms", "-1"], "--ttft-p90-ms: found -1.0; allowed: a number of ms > 0"),
    (["--tpot-p90-ms", "0"], "--tpot-p90-ms: found 0.0; allowed: a number of ms > 0"),
    (["--seed", "-1"], "--seed: found -1; allowed: an integer from 0"),
    (["--tolerance", "2"], "--tolerance: found 2.0; allowed: a fraction in (0, 1)"),
    (["--model", "llama-3.1-405b", "--quant", "16"], "hybrid_optimal"),
])
def test_bad_input_is_one_line_naming_the_flag(flags, message, tmp_path, capsys):
    assert main(["capacity", *SMALL, "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert "Traceback" not in err[0]


def test_an_existing_folder_with_files_is_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["capacity", *SMALL, "--out", str(tmp_path)]) == 2
    assert "allowed: a new or empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_slo_rejects_a_non_positive_target():
    with pytest.raises(UserError, match="tpot-p90-ms"):
        Slo(100, 0)


def test_length_distributions_set_the_plan_reference_to_their_means(tmp_path, capsys):
    out = tmp_path / "dist"
    assert main(["capacity", *SMALL, "--prompt", "uniform:256:768", "--output", "lognormal:100:0.4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "capacity.json").read_text())
    prompt_mean, output_mean = report["plan"]["reference_lengths"]
    assert report["config"]["workload"]["prompt"] == {"dist": "uniform", "low": 256, "high": 768}
    assert 480 <= prompt_mean <= 544 and 85 <= output_mean <= 115
    assert report["knee"]["knee_rps"] > 0


def test_slos_tighter_than_one_request_alone_stop_the_search_early(tmp_path, capsys):
    out = tmp_path / "tight"
    assert main(["capacity", *SMALL, "--tpot-p90-ms", "5", "--out", str(out)]) == 1
    assert "no rate down to" in capsys.readouterr().out
    report = json.loads((out / "capacity.json").read_text())
    assert report["knee"]["status"] == "below-all" and report["knee"]["knee_rps"] is None
    assert report["knee"]["search_simulations"] <= 6     # halving stops once latency no longer improves
