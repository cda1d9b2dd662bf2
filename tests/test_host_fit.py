"""Fitting this host's profile from step records: steps priced by a KNOWN profile must give it back, held-out
points must stay out of the fit, and broken folders must say what is wrong."""
import json
from types import SimpleNamespace

import pandas as pd
import pytest

from harness.costmodel import Profile, stage_models
from harness.mlx.hostcluster import host_plan, write_host_files
from harness.specs import UserError, model_from_config
from harness.validation import fit
from harness.validation.components import predicted_step_s
from tests.mlx.test_host_cluster import PROFILE

CONFIG = {"model_type": "qwen2", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
          "num_key_value_heads": 2, "intermediate_size": 1408, "vocab_size": 8192, "tie_word_embeddings": True}
TRUE = dict(eta_bw=0.7, mu_compute=0.4, step_overhead_s=0.002, layer_overhead_s=0.0005,
            seq_layer_overhead_s=0.0002, overlap=0.0, prefill_ramp_tokens=32.0)
BASE = Profile(name="host", eta_bw=1.0, mu_compute=1.0, step_overhead_s=0.0, layer_overhead_s=0.0,
               link_overhead_us=0.0, ssd_gbs=2.0)


def known_steps(cluster, plan, model, profile):
    """Decode steps at batch 1-6 and prefill forwards of 16-512 tokens on each stage, priced by `profile`."""
    stages = stage_models(cluster, model, plan)
    rows, step = [], 0
    for st in stages:
        kv = st.kv_bytes_per_token_node
        shapes = [("decode", b, b, b * 200 * kv) for b in range(1, 7)] + [("prefill", t, 1, 0) for t in (16, 64, 200, 512)]
        for kind, tokens, batch, kv_bytes in shapes:
            r = SimpleNamespace(kind=kind, tokens=tokens, batch_size=batch, kv_bytes=kv_bytes)
            rows.append({"step": step, "stage": st.index, "node": st.nodes[0], "kind": kind, "start_s": 0.0,
                         "end_s": 0.0, "batch_size": batch, "tokens": tokens, "kv_bytes": int(kv_bytes),
                         "compute_s": predicted_step_s(r, st, model, profile), "source": "measured"})
            step += 1
    return pd.DataFrame(rows)


@pytest.fixture
def sample(tmp_path):
    from harness.catalog import load_cluster
    path = write_host_files(PROFILE, tmp_path, 2)
    data = json.loads(path.read_text())
    model = model_from_config(CONFIG, "m", quant_bits=32)
    plan = host_plan(data, [5, 3])
    return load_cluster(str(path)), data, plan, model


def test_fit_recovers_the_profile_that_priced_the_steps(sample):
    cluster, _, plan, model = sample
    truth = Profile(**{**BASE.__dict__, **TRUE})
    steps = known_steps(cluster, plan, model, truth)
    fitted, report = fit.fit_host_profile([(steps, plan, model, cluster)], BASE)
    assert report["rms_relative_error_pct"] < 2.0
    assert all(abs(r["error_pct"]) < 3 for r in report["in_sample"])
    # bandwidth and per-layer overhead trade off on two stages (both are constant per stage), so the test is
    # prediction: shapes the fit never saw, priced by the fitted and the true profile alike
    for st in stage_models(cluster, model, plan):
        for r in (SimpleNamespace(kind="decode", tokens=9, batch_size=9, kv_bytes=9 * 300 * st.kv_bytes_per_token_node),
                  SimpleNamespace(kind="prefill", tokens=300, batch_size=1, kv_bytes=0)):
            assert predicted_step_s(r, st, model, fitted) == pytest.approx(predicted_step_s(r, st, model, truth),
                                                                           rel=0.05), (st.index, r.kind)


def write_point(root, name, level, cluster_data, plan, steps):
    d = root / "points" / name
    d.mkdir(parents=True)
    v = {"topology": "2-rank", "level": level, "cluster": cluster_data, "model_config": CONFIG, "model_name": "m",
         "quant_bits": 32}
    (d / "config.json").write_text(json.dumps({"validation": v}))
    (d / "plan.json").write_text(json.dumps(plan.to_dict()))
    steps.to_parquet(d / "steps.parquet")
    return d


def test_held_out_points_stay_out_of_the_fit(sample, tmp_path):
    cluster, data, plan, model = sample
    truth = Profile(**{**BASE.__dict__, **TRUE})
    top = tmp_path / "v"
    (top / "hosts").mkdir(parents=True)
    for f in (tmp_path).glob("*ranks.json"):
        (top / "hosts" / f.name).write_text(f.read_text())
    steps = known_steps(cluster, plan, model, truth)
    write_point(top, "a-0.3", "0.3", data, plan, steps)
    slow = steps.assign(compute_s=steps["compute_s"] * 3)     # a point the fit must not see
    write_point(top, "a-0.7", "0.7", data, plan, slow)
    fitted, report = fit.fit_per_chip([top], BASE, {"level": "0.7"})
    assert report["trained_points"] == ["a-0.3"]
    assert all(abs(r["error_pct"]) < 3 for r in report["in_sample"])
    assert all(r["point"] == "a-0.7" and r["error_pct"] < -50 for r in report["held_out"])
    with pytest.raises(UserError, match="nothing is left"):
        fit.fit_per_chip([top], BASE, {"topology": "2-rank"})


def test_broken_point_folders_name_the_problem(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"command": "bench"}))
    with pytest.raises(UserError, match="no \"validation\" object"):
        fit.load_point(d)
    with pytest.raises(UserError, match="neither a run folder"):
        fit.expand_point_dirs([tmp_path / "missing"])
    with pytest.raises(UserError, match="--hold-out"):
        fit.parse_hold_out(["speed=1"])



def test_a_rate_that_never_binds_is_bounded_not_infinite():
    """Full overlap and the compute side larger in every row (weights in cache): the solve leaves 1/eta_bw at 0,
    an infinite bandwidth (Infinity in the profile JSON). The data only say it never binds: the slowest such
    value is kept (never slower than the base), and every fitted row's time is unchanged."""
    import numpy as np
    rows = fit.Rows(mem=np.array([0.010, 0.020, 0.004]), comp=np.array([0.002, 0.001, 0.003]),
                    tokens=np.array([0, 0, 64]), layers=np.array([5, 3, 5]), seqs=np.array([1, 2, 1]),
                    measured=np.array([0.02, 0.02, 0.03]), prefill=np.array([False, False, True]))
    best = {"coef": np.array([0.0, 2.0, 0.004, 0.002, 0.0]), "overlap": 1.0, "prefill_ramp_tokens": 0.0}
    out = fit.bounded_rates(rows, best, fit.base_coefficients(BASE))
    assert out["coef"][0] == pytest.approx(min(0.002 * 2 / 0.010, 0.001 * 2 / 0.020, 0.003 * 2 / 0.004))
    assert fit.predict(rows, out["coef"], 0.0, 0.0) == pytest.approx(fit.predict(rows, best["coef"], 0.0, 0.0))
    partly = {**best, "overlap": 0.5}   # min(mem, comp) is charged: the rate is seen, nothing to bound
    assert fit.bounded_rates(rows, partly, fit.base_coefficients(BASE)) is partly


def test_fit_finds_the_decode_batch_scale_a_linear_batch_term_cannot_give(sample, tmp_path):
    """One BLAS thread on a CPU: batch 3 decodes 25 % slower than batch 1 or 4 (measured on this host's OpenBLAS,
    see costmodel.TABLE_TERMS). Steps priced with such a table must give a table with that bump and price every
    batch size as the truth does; the fitted profile file keeps it."""
    cluster, _, plan, model = sample
    table = (1.0, 1.05, 1.3, 1.0, 1.1, 1.2)
    truth = Profile(**{**BASE.__dict__, **TRUE, "decode_batch_scale": table})
    steps = pd.concat([known_steps(cluster, plan, model, truth)] * 3, ignore_index=True)
    fitted, report = fit.fit_host_profile([(steps, plan, model, cluster)], BASE)
    assert report["rms_relative_error_pct"] < 2.0
    # a linear trend in the batch can sit in seq_layer_overhead_s or in the table: the test is the bump at 3 and
    # the prices
    got = fitted.decode_batch_scale
    assert len(got) == 6 and got[2] > 1.15 * max(got[1], got[3])
    for st in stage_models(cluster, model, plan):
        for b in (1, 3, 4):
            r = SimpleNamespace(kind="decode", tokens=b, batch_size=b, kv_bytes=b * 250 * st.kv_bytes_per_token_node)
            assert predicted_step_s(r, st, model, fitted) == pytest.approx(predicted_step_s(r, st, model, truth),
                                                                           rel=0.03), (st.index, b)
    path = tmp_path / "fitted.json"
    path.write_text(json.dumps(fit.profile_json(fitted, report)))
    from harness.costmodel import load_profile
    assert load_profile(path).decode_batch_scale == fitted.decode_batch_scale


def test_too_few_rows_per_batch_size_fit_no_batch_scale(sample):
    cluster, _, plan, model = sample
    truth = Profile(**{**BASE.__dict__, **TRUE, "decode_batch_scale": (1.0, 1.3)})
    fitted, _ = fit.fit_host_profile([(known_steps(cluster, plan, model, truth), plan, model, cluster)], BASE)
    assert fitted.decode_batch_scale == ()


def test_prompts_of_one_length_leave_the_prefill_ramp_at_the_base(sample):
    """1 + ramp / T is a constant when every prompt has T tokens: the fit cannot tell the ramp from mu_compute, and
    a ramp picked anyway prices a batch of 3 prompts (3T tokens in one forward) below 3 single prompts, which the
    real backend does not do. The ramp stays at the base profile; the single prompt is still priced right."""
    cluster, _, plan, model = sample
    truth = Profile(**{**BASE.__dict__, **TRUE})
    steps = known_steps(cluster, plan, model, truth)
    steps = steps[(steps["kind"] == "decode") | (steps["tokens"] == 64)]
    fitted, report = fit.fit_host_profile([(steps, plan, model, cluster)], BASE)
    assert "prefill_ramp_tokens" in report["held_at_base"] and fitted.prefill_ramp_tokens == BASE.prefill_ramp_tokens
    st = stage_models(cluster, model, plan)[0]
    one = SimpleNamespace(kind="prefill", tokens=64, batch_size=1, kv_bytes=0)
    assert predicted_step_s(one, st, model, fitted) == pytest.approx(predicted_step_s(one, st, model, truth), rel=0.03)
