"""The engine dimension of a profile (issue 11, item 2): per-engine per-step and per-request costs and prefill
chunk, picked with Profile.for_engine / --engine; the default engine (mlx-lm) is the profile itself."""
from __future__ import annotations

import dataclasses
import json

import pytest

from harness import catalog, costmodel
from harness.cli import main
from harness.costmodel import Profile, load_profile, stage_model
from harness.specs import UserError
from tests.sim.conftest import make_cluster

BASE = Profile(name="t", eta_bw=0.8, mu_compute=0.6, step_overhead_s=0.001, layer_overhead_s=0.0,
               link_overhead_us=0.0, ssd_gbs=4.0,
               engines={"llama.cpp": {"step_overhead_s": 0.004, "request_overhead_s": 0.05,
                                      "prefill_chunk_tokens": 512, "per_chip": {"M2 Ultra": {"eta_bw": 0.7}}}})


def test_default_engine_is_the_profile_itself():
    assert BASE.for_engine(None) is BASE and BASE.for_engine("mlx-lm") is BASE
    fitted = load_profile()
    assert fitted.for_engine("mlx-lm") is fitted


def test_an_engine_entry_overrides_its_factors():
    chip, m = catalog.find_chip("M2 Ultra"), catalog.load_model("llama-2-7b", 4)
    cpp = BASE.for_engine("llama.cpp")
    assert cpp.engine == "llama.cpp" and cpp.step_overhead_s == 0.004 and cpp.prefill_chunk_tokens == 512
    assert cpp.bandwidth(chip) == pytest.approx(0.7 * 800e9)
    plain = dataclasses.replace(BASE, per_chip={"M2 Ultra": {"eta_bw": 0.7}}, step_overhead_s=0.004)
    assert costmodel.decode_time(chip, cpp, m, 0, 32) == pytest.approx(costmodel.decode_time(chip, plain, m, 0, 32))
    with pytest.raises(UserError, match="no engine 'vllm-mlx'.*llama.cpp, mlx-lm"):
        BASE.for_engine("vllm-mlx")


def test_request_overhead_is_paid_once_per_request_on_the_first_stage():
    cluster, m = make_cluster(2), catalog.load_model("llama-2-7b", 4)
    cpp = BASE.for_engine("llama.cpp")
    first, second = stage_model(cluster, m, ("n0",), 0, 16, False, 0), stage_model(cluster, m, ("n1",), 16, 32, True, 1)
    no_req = dataclasses.replace(cpp, request_overhead_s=0.0)
    assert first.prefill_s(m, cpp, 512, 0) == pytest.approx(first.prefill_s(m, no_req, 512, 0) + 0.05)
    assert first.prefill_s(m, cpp, 512, 512) == first.prefill_s(m, no_req, 512, 512)    # a later chunk
    assert second.prefill_s(m, cpp, 512, 0) == second.prefill_s(m, no_req, 512, 0)       # a later stage
    mixed = first.mixed_s(m, cpp, 2, 1000.0, [(256, 0), (256, 256)])
    assert mixed == pytest.approx(first.mixed_s(m, no_req, 2, 1000.0, [(256, 0), (256, 256)]) + 0.05)
    chip = catalog.find_chip("M2 Ultra")
    assert costmodel.request_prefill_time(chip, cpp, m, 0, 32, 512) == pytest.approx(
        costmodel.prefill_time(chip, cpp, m, 0, 32, 512) + 0.05)


@pytest.mark.parametrize("entry, message", [({"step_overhead_s": "slow"}, "engines.exo.step_overhead_s must be a number"),
                                            ({"warp_factor": 2}, "warp_factor"),
                                            ({"request_overhead_s": -1.0}, "request_overhead_s")])
def test_profile_file_engines_are_checked(tmp_path, entry, message):
    data = json.loads((costmodel.PROFILE_DIR / "fitted.json").read_text())
    data["engines"] = {"exo": entry}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        load_profile(bad)


def test_committed_profile_has_llama_cpp_with_its_ubatch():
    cpp = load_profile().for_engine("llama.cpp")
    assert cpp.prefill_chunk_tokens == 512


def test_plan_engine_flag(capsys):
    assert main(["plan", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--quant", "4"]) == 0
    default = capsys.readouterr().out
    assert main(["plan", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--quant", "4",
                 "--engine", "mlx-lm"]) == 0
    assert capsys.readouterr().out.split("planned in")[0] == default.split("planned in")[0]
    assert main(["plan", "--cluster", "m2ultra-4x-tb4", "--model", "llama-3.1-8b", "--quant", "4",
                 "--engine", "llama.cpp"]) == 0
    assert "engine llama.cpp" in capsys.readouterr().out


def test_simulate_engine_flag(tmp_path, capsys):
    args = ["simulate", "--cluster", "m2ultra-4x-tb4", "--model", "qwen3-30b-a3b", "--quant", "4", "--workload",
            "poisson,rate=0.5,n=6,prompt=600,output=8,seed=1", "--out", str(tmp_path), "--quiet", "--no-load"]
    assert main(args + ["--engine", "llama.cpp"]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run / "config.json").read_text())["cost_engine"] == "llama.cpp"
    assert main(args + ["--engine", "nope"]) != 0
    assert "no engine 'nope'" in capsys.readouterr().err
