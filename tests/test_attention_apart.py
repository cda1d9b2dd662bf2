"""Attention at depth as its own term (issue 11, item 2): with attn_eta_bw and attn_mu set, the KV reads and
pair FLOPs leave the weights' roofline for attention's own; unset, pricing is the plain roofline. Theoretical."""
from __future__ import annotations

import dataclasses

import pytest

from harness import calibrate as cal
from harness import catalog, costmodel
from harness.costmodel import Profile, stage_model
from tests.sim.conftest import make_cluster

BASE = Profile(name="t", eta_bw=0.8, mu_compute=0.6, step_overhead_s=0.001, layer_overhead_s=0.0001,
               link_overhead_us=0.0, ssd_gbs=4.0)
APART = dataclasses.replace(BASE, attn_eta_bw=0.3, attn_mu=0.25)


def test_decode_attention_is_its_own_roofline():
    chip, m = catalog.find_chip("M2 Ultra"), catalog.load_model("llama-3.1-8b", 4)
    L, ctx = m.num_layers, 8000
    weights_only = costmodel.decode_time(chip, BASE, m, 0, L, 1, 0)
    kv = ctx * m.kv_bytes_per_token(0, L)
    flops = ctx * L * m._attn_flops_per_position()
    attn = max(kv / (0.3 * 800e9), flops / (0.25 * chip.fp16_tflops * 1e12))
    assert costmodel.decode_time(chip, APART, m, 0, L, 1, ctx) == pytest.approx(weights_only + attn)
    assert costmodel.decode_time(chip, APART, m, 0, L, 1, 0) == pytest.approx(weights_only)


def test_stage_terms_agree_with_decode_time():
    cluster, m = make_cluster(2), catalog.load_model("llama-3.1-8b", 4)
    st = stage_model(cluster, m, ("n0", "n1"), 0, 32, True)
    chip = cluster.node("n0").chip
    terms = st.decode_terms(m, APART, 3)
    assert terms.at(3 * 900.0) == pytest.approx(st.decode_s(m, APART, 3, 2700.0))
    import numpy as np
    assert terms.vector(np.array([0.0, 2700.0]))[1] == pytest.approx(terms.at(2700.0))
    expected = costmodel.decode_time(chip, APART, m, 0, 32, 3, 900.0, tp=2, with_head=True) + st.allreduce_s(m, APART, 3)
    assert st.decode_s(m, APART, 3, 2700.0) == pytest.approx(expected)


def test_prefill_attention_is_quadratic_and_apart():
    chip, m = catalog.find_chip("M2 Ultra"), catalog.load_model("llama-3.1-8b", 4)
    L, n, c = m.num_layers, 2048, 16384
    matmul = costmodel.roofline(chip, APART, m.weight_bytes(0, L), m.decode_flops(0, L, n, 0), n)
    pairs = n * c + n * (n + 1) / 2
    attn = max((c + n) * m.kv_bytes_per_token(0, L) / (0.3 * 800e9),
               pairs * L * m._attn_flops_per_position() / (0.25 * chip.fp16_tflops * 1e12))
    assert costmodel.prefill_time(chip, APART, m, 0, L, n, c) == pytest.approx(matmul + APART.overhead(chip, L) + attn)


def test_unset_attention_terms_leave_pricing_identical():
    chip, m = catalog.find_chip("M1 Max"), catalog.load_model("llama-3.1-70b", 4)
    half = dataclasses.replace(BASE, attn_eta_bw=0.3)          # one factor alone: still inside the roofline
    assert costmodel.decode_time(chip, half, m, 0, 80, 2, 4000) == costmodel.decode_time(chip, BASE, m, 0, 80, 2, 4000)
    assert costmodel.prefill_time(chip, half, m, 0, 80, 2048, 4096) == costmodel.prefill_time(chip, BASE, m, 0, 80, 2048, 4096)


def test_attention_fit_recovers_a_synthetic_truth():
    obs, _ = cal.load_observations()
    clean = [dataclasses.replace(o, published_tok_s=cal.predict(o, APART)) for o in obs if o.batch == 1]
    got = cal.fit_profile(clean, per_chip=False, base=APART, terms=("attention",))
    assert got.attn_eta_bw == pytest.approx(0.3, rel=0.1)
    assert got.attn_mu == pytest.approx(0.25, rel=0.1)
    assert got.eta_bw == pytest.approx(0.8, rel=0.05)
