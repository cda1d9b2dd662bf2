"""Public Mac measurements and leave-one-source-out error of `calibrate` (issue 11, items 1 and 5)."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from harness import calibrate as cal
from harness.cli import main
from harness.costmodel import Profile

TRUTH = Profile(name="truth", eta_bw=0.6, mu_compute=0.6, step_overhead_s=0.002, layer_overhead_s=0.0,
                link_overhead_us=0.0, ssd_gbs=4.0)


def _synthetic(obs):
    """Batch-1 observations whose published rate is what TRUTH predicts: a fit recovers TRUTH exactly."""
    return [dataclasses.replace(o, published_tok_s=cal.predict(o, TRUTH)) for o in obs if o.batch == 1]


def test_public_rows_are_cited_and_all_usable():
    with open(cal.PUBLIC, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 10
    for row in rows:
        assert row["source"].startswith("https://"), row
        assert row["date"] and row["engine"] and row["engine_version"] and row["confidence"], row
    obs, skipped = cal.load_observations(cal.PUBLIC)
    assert skipped == []
    assert {o.chip.name.split()[0] for o in obs} >= {"M3", "M4"}
    assert any(o.model.moe for o in obs) and any(o.context > 10000 for o in obs)


def test_held_out_source_is_predicted_by_a_fit_that_never_saw_it():
    obs, _ = cal.load_observations()
    clean = _synthetic(obs)
    # an outlier publication: the M1 Max rows again, every rate halved
    outlier = [dataclasses.replace(o, source="https://example.org/outlier", published_tok_s=o.published_tok_s / 2)
               for o in clean if o.chip.name == "M1 Max"]
    rows, notes = cal.leave_one_source_out(clean + outlier, per_chip=False, base=TRUTH)
    held = [r for r in rows if r["source"] == "https://example.org/outlier"]
    assert len(held) == len(outlier) and notes == []
    # fitted on the other sources only, the prediction is TRUTH's: twice the halved rate, +100 %
    assert all(r["error_pct"] == pytest.approx(100.0, abs=1.0) for r in held)
    # the in-sample fit absorbs part of the outlier, so it would understate this error
    in_sample = cal.error_table(outlier, cal.fit_profile(clean + outlier, per_chip=False, base=TRUTH))
    mean = lambda table: sum(r["error_pct"] for r in table) / len(table)  # noqa: E731
    assert mean(in_sample) < mean(held) - 5


def test_summary_breaks_down_by_engine_generation_arch_and_nodes():
    obs, _ = cal.load_observations([cal.DATA, cal.PUBLIC])
    rows, notes = cal.leave_one_source_out(_synthetic(obs), per_chip=True, base=TRUTH)
    summary = cal.loso_summary(rows, notes)
    assert set(summary["engine_family"]) >= {"llama.cpp", "mlx"}
    assert set(summary["generation"]) >= {"M1", "M2", "M3", "M4"}
    assert set(summary["arch"]) == {"dense", "MoE"} and set(summary["topology"]) == {"single"}
    assert summary["overall"]["decode_median_abs_error_pct"] < 1.0
    assert summary["overall"]["prefill_median_abs_error_pct"] < 1.0
    assert "ml-explore/mlx-lm/pull/406" in "".join(summary["source"])


def test_cli_prints_and_writes_the_leave_one_source_out_table(capsys, tmp_path):
    out = tmp_path / "proposed.json"
    assert main(["calibrate", "--with-public", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "leave-one-source-out" in text and "chip generation" in text and "dense/MoE" in text
    loso = json.loads(out.read_text())["fit"]["leave_one_source_out"]
    assert loso["overall"]["decode_rows"] > 70 and loso["overall"]["prefill_rows"] > 70
    assert "M4" in loso["generation"] and "MoE" in loso["arch"]


def test_cli_json_lists_held_out_rows(capsys, tmp_path):
    assert main(["calibrate", "--dry-run", "--json", "--out", str(tmp_path / "x.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["held_out_rows"] and all("source" in r and "generation" in r for r in report["held_out_rows"])


def test_csv_without_the_columns_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("engine,tg_tok_s\nllama.cpp,10\n")
    assert main(["calibrate", "--dry-run", "--data", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert "bad.csv" in err and "missing column" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_multinode_rows_are_cited_and_pair_the_published_comparisons():
    with open(cal.MULTINODE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        assert row["source"].startswith("https://") and row["date"] and row["confidence"], row
        assert int(row["nodes"]) >= 2 and row["link"] and row["strategy"], row
    # the published orderings a multi-node predictor must reproduce, as the sources state them
    glm5 = {(r["nodes"], r["context_depth"]): float(r["tg_tok_s"]) for r in rows if r["model"] == "GLM-5"}
    assert glm5[("4", "0")] > glm5[("2", "0")] and glm5[("4", "10000")] > glm5[("2", "10000")]
    flash = {(r["engine"], r["concurrency"]): float(r["tg_tok_s"]) for r in rows if r["model"] == "GLM-5.3-Flash"}
    assert flash[("exo (MlxJaccl)", "1")] > flash[("exo (MlxRing)", "1")]
