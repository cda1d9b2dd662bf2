"""Calibration: the fit recovers known factors, and the committed fitted profile is what the data gives."""
from __future__ import annotations

import dataclasses
import json

import pytest

from harness import calibrate as cal
from harness import costmodel
from harness.cli import main
from tests.sim.conftest import make_profile


@pytest.fixture(scope="module")
def observations():
    obs, skipped = cal.load_observations()
    return obs, skipped


def test_bundled_table_gives_usable_rows(observations):
    obs, skipped = observations
    assert len([o for o in obs if o.kind == "tg" and o.batch == 1]) > 50
    assert len([o for o in obs if o.kind == "pp"]) > 50
    assert any("no catalog config" in s for s in skipped)


def test_fit_recovers_factors_from_data_the_cost_model_generated(observations):
    obs, _ = observations
    truth = make_profile(eta_bw=0.55, mu_compute=0.7, step_overhead_s=0.004)
    synthetic = [dataclasses.replace(o, published_tok_s=cal.predict(o, truth)) for o in obs if o.batch == 1]
    fitted = cal.fit_profile(synthetic, per_chip=False, base=truth)
    assert fitted.eta_bw == pytest.approx(0.55, abs=1e-4)
    assert fitted.step_overhead_s == pytest.approx(0.004, abs=1e-6)
    assert fitted.layer_overhead_s == pytest.approx(0.0, abs=1e-8)
    assert fitted.mu_compute == pytest.approx(0.7, rel=0.02)   # a few long-context prefills are not compute bound
    errors = [r["error_pct"] for r in cal.error_table(synthetic, fitted)]
    assert max(abs(e) for e in errors) < 3


def test_fit_separates_per_layer_from_per_step_overhead(observations):
    obs, _ = observations
    truth = make_profile(eta_bw=0.6, mu_compute=0.6, step_overhead_s=0.001, layer_overhead_s=0.00005)
    synthetic = [dataclasses.replace(o, published_tok_s=cal.predict(o, truth)) for o in obs if o.batch == 1]
    fitted = cal.fit_profile(synthetic, per_chip=False, base=truth)
    assert fitted.layer_overhead_s == pytest.approx(0.00005, rel=1e-3)
    assert fitted.step_overhead_s == pytest.approx(0.001, abs=1e-6)
    assert fitted.eta_bw == pytest.approx(0.6, abs=1e-4)


def test_per_chip_factors_override_the_global_ones(observations):
    obs, _ = observations
    truth = make_profile(eta_bw=0.5, mu_compute=0.6, step_overhead_s=0.003,
                         per_chip={"M1 Max": {"eta_bw": 0.8}})
    synthetic = [dataclasses.replace(o, published_tok_s=cal.predict(o, truth)) for o in obs if o.batch == 1]
    fitted = cal.fit_profile(synthetic, per_chip=True, base=truth)
    assert fitted.per_chip["M1 Max"]["eta_bw"] > fitted.per_chip["M2 Ultra"]["eta_bw"] + 0.2


def test_committed_profile_matches_a_fresh_fit(observations):
    obs, skipped = observations
    fitted = cal.fit_profile(obs)
    saved = json.loads((costmodel.PROFILE_DIR / "fitted.json").read_text())
    assert saved["eta_bw"] == fitted.eta_bw and saved["mu_compute"] == fitted.mu_compute
    assert saved["step_overhead_s"] == fitted.step_overhead_s and saved["per_chip"] == fitted.per_chip
    assert saved["layer_overhead_s"] == fitted.layer_overhead_s
    loaded = costmodel.load_profile("fitted")
    assert loaded.eta_bw == fitted.eta_bw


def test_cli_dry_run_reports_every_row(capsys, tmp_path):
    out = tmp_path / "p.json"
    assert main(["calibrate", "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] and all("error_pct" in r for r in report["rows"])
    assert json.loads(out.read_text())["name"] == "fitted"
    dry = tmp_path / "dry.json"
    assert main(["calibrate", "--dry-run", "--json", "--out", str(dry)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] and not dry.exists()
