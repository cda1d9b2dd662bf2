"""The validation report re-renders from validation.json and the points' request files alone."""
import json

import pytest

import reports
from harness.validation import compare
from reports.run import RunFolderError
from reports.validation import render_validation
from tests.test_validation_compare import requests


def write_folder(top, with_sim=True):
    real = requests([0.10, 0.20, 0.15], [0.010, 0.012, 0.011])
    sim = requests([0.11, 0.18, 0.15], [0.011, 0.012, 0.010])
    points = []
    for level in ("saturation", "0.5"):
        d = top / "points" / f"1-rank-{level}"
        d.mkdir(parents=True)
        real.to_parquet(d / "requests.parquet")
        if with_sim:
            sim.to_parquet(d / "sim-requests.parquet")
        points.append({"point": d.name, "topology": "1-rank", "level": level, "rate_rps": None if level == "saturation"
                       else 1.5, "profile": "fitted-host", **compare.compare(real, sim), "in_fit": level == "0.5"})
    points[1]["errors"]["mean_tpot_ms"]["error_pct"] = None     # a figure one side lacked
    doc = {"schema": "harness.validation/1", "created": "2026-12-02T12:00:00Z", "points": points,
           "gate": {"limits": {"mean_e2el_ms": 1.0}, "failures": ["1-rank-0.5: mean_e2el_ms error +2.0 %"],
                    "passed": False}}
    (top / "validation.json").write_text(json.dumps(doc))
    return doc


def test_report_shows_values_verdict_and_plots(tmp_path):
    doc = write_folder(tmp_path)
    html = render_validation(tmp_path).read_text()
    ttft = doc["points"][0]["errors"]["median_ttft_ms"]
    assert f"{ttft['measured']:.1f}" in html and f"{ttft['error_pct']:+.1f} %" in html
    assert "gate FAILED" in html and "mean_e2el_ms error +2.0 %" in html and "(in fit)" in html
    assert html.count("<img") >= 2 and "n/a" in html


def test_missing_simulated_files_render_as_na(tmp_path):
    write_folder(tmp_path, with_sim=False)
    html = render_validation(tmp_path).read_text()
    assert "<img" in html and "1-rank-0.5 simulated: n/a (no sim-requests.parquet)" in html


def test_harness_report_entry_routes_a_validation_folder(tmp_path):
    write_folder(tmp_path)
    assert reports.render(tmp_path) == tmp_path / "report.html"
    assert "Simulator validation" in (tmp_path / "report.html").read_text()


def test_malformed_validation_file_is_a_clear_error(tmp_path):
    (tmp_path / "validation.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        render_validation(tmp_path)
    (tmp_path / "validation.json").write_text(json.dumps({"points": 3}))
    with pytest.raises(RunFolderError, match="points"):
        render_validation(tmp_path)
    (tmp_path / "validation.json").write_text(json.dumps({"points": [{"point": "a", "topology": "1-rank"}]}))
    with pytest.raises(RunFolderError, match=r"points\[0\] needs"):
        render_validation(tmp_path)
    (tmp_path / "validation.json").write_text(json.dumps({"points": [{"point": "a", "topology": "t", "level": "x"}]}))
    with pytest.raises(RunFolderError, match="neither"):
        render_validation(tmp_path)
    with pytest.raises(RunFolderError, match="no validation.json"):
        render_validation(tmp_path / "nowhere")
