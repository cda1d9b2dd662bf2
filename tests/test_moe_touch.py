"""MoE prefill priced on the experts a chunk touches, the expert GEMM fill and the routed-read efficiency
(issue 11, item 2). Figures here are theoretical (the cost model), checked against closed forms."""
from __future__ import annotations

import dataclasses

import pytest

from harness import calibrate as cal
from harness import catalog, costmodel
from harness.costmodel import Profile

BASE = Profile(name="t", eta_bw=0.8, mu_compute=0.6, step_overhead_s=0.0, layer_overhead_s=0.0,
               link_overhead_us=0.0, ssd_gbs=4.0)


@pytest.fixture(scope="module")
def moe():
    return catalog.load_model("qwen3-30b-a3b", 4)


@pytest.fixture(scope="module")
def chip():
    return catalog.find_chip("M2 Ultra")


def test_experts_touched_is_the_occupancy_expectation(moe):
    e, k = moe.experts, moe.active_experts
    assert costmodel.experts_touched(moe, 1) == pytest.approx(k)
    for t in (2, 16, 512):
        assert costmodel.experts_touched(moe, t) == pytest.approx(e * (1 - (1 - k / e) ** t))
    assert costmodel.experts_touched(moe, 4096) == pytest.approx(e, rel=1e-9)
    assert costmodel.experts_touched(catalog.load_model("llama-2-7b", 4), 512) == 0.0


def test_a_short_moe_prefill_reads_only_the_experts_it_touches(moe, chip):
    L = moe.num_layers
    nbytes, _ = costmodel.prefill_work(moe, 0, L, 2, 0, profile=BASE)
    dense = moe._range("dense", 0, L)
    expert = moe._range("expert", 0, L)
    kv = 2 * moe.kv_bytes_per_token(0, L)
    assert nbytes == pytest.approx(dense + expert * costmodel.experts_touched(moe, 2) + kv)
    assert nbytes < 0.5 * moe.weight_bytes(0, L)   # the old pricing read every expert
    # a long prompt touches every expert: the stored weights
    long, _ = costmodel.prefill_work(moe, 0, L, 8192, 0, profile=BASE)
    assert long == pytest.approx(moe.weight_bytes(0, L) + 8192 * moe.kv_bytes_per_token(0, L), rel=1e-6)


def test_expert_fill_prices_small_chunks_per_touched_expert(moe, chip):
    L = moe.num_layers
    p = dataclasses.replace(BASE, expert_fill_tokens=24.0)
    per_expert = 2 * 3 * moe.hidden * moe.moe_ffn * L
    touched = costmodel.experts_touched(moe, 512)
    assert 512 * 8 / touched > 24   # 32 tokens per expert: the whole fill is paid
    assert costmodel.expert_fill_flops(moe, p, 0, L, 512) == pytest.approx(24.0 * touched * per_expert)
    # a forward of 20 tokens gives each touched expert under 2 of them: the waste is those rows, not the fill
    few = costmodel.experts_touched(moe, 20)
    assert costmodel.expert_fill_flops(moe, p, 0, L, 20) == pytest.approx(20 * 8 * per_expert)
    assert few * 24 * per_expert > 10 * costmodel.expert_fill_flops(moe, p, 0, L, 20)
    # an engine that prefills 512 at a time touches (nearly) every expert in each of 8 chunks of a 4096 prompt
    chunked = dataclasses.replace(p, prefill_chunk_tokens=512)
    assert costmodel.expert_fill_flops(moe, chunked, 0, L, 4096) == pytest.approx(
        8 * costmodel.expert_fill_flops(moe, p, 0, L, 512))
    # the fill costs relatively more on a short chunk (fewer tokens per expert)
    rate = lambda prof, t: t / costmodel.prefill_time(chip, prof, moe, 0, L, t)  # noqa: E731
    assert rate(p, 512) / rate(BASE, 512) < rate(p, 4096) / rate(BASE, 4096) < 1.0
    assert rate(chunked, 4096) / rate(BASE, 4096) < rate(p, 4096) / rate(BASE, 4096) - 0.1


def test_expert_eta_slows_only_the_routed_reads(moe, chip):
    L = moe.num_layers
    slow = dataclasses.replace(BASE, expert_eta=0.5)
    fast_b, _ = costmodel.decode_work(moe, 0, L, 1, profile=BASE)
    slow_b, _ = costmodel.decode_work(moe, 0, L, 1, profile=slow)
    expert = moe.decode_read_bytes(0, L, 1) - moe._range("dense", 0, L)
    assert slow_b - fast_b == pytest.approx(expert)
    dense = catalog.load_model("llama-2-7b", 4)
    assert costmodel.decode_time(chip, slow, dense, 0, 32) == costmodel.decode_time(chip, BASE, dense, 0, 32)


def test_dense_pricing_is_untouched_by_the_moe_terms(chip):
    m = catalog.load_model("llama-3.1-8b", 4)
    on = dataclasses.replace(BASE, expert_eta=0.3, expert_fill_tokens=50.0, prefill_chunk_tokens=512)
    for tokens, ctx in ((1, 0), (512, 0), (4096, 1024)):
        assert costmodel.prefill_time(chip, on, m, 0, 32, tokens, ctx) == costmodel.prefill_time(chip, BASE, m, 0, 32, tokens, ctx)
    assert costmodel.decode_time(chip, on, m, 0, 32, 4, 900) == costmodel.decode_time(chip, BASE, m, 0, 32, 4, 900)


def test_calibrate_reads_the_stated_chunk_and_the_engine_default():
    assert cal.stated_chunk("llama.cpp (Metal,BLAS)", "build b828e18c7 (7948), flash-attn on, n_ubatch 2048") == 2048
    assert cal.stated_chunk("llama.cpp (Metal)", "build 8e672ef") == 512
    assert cal.stated_chunk("mlx-lm", "0.20.4") == 2048
    obs, _ = cal.load_observations()
    assert {o.chunk for o in obs if o.model.moe} == {2048}


def test_fitted_moe_terms_recover_a_synthetic_truth():
    """MoE rows priced by a profile with a known fill and read efficiency: given the dense factors, the MoE fit
    finds them again; the whole fit puts them in the engine's entry (llama.cpp rows) or the profile's own."""
    truth = dataclasses.replace(BASE, expert_eta=0.8, expert_fill_tokens=20.0)
    obs, _ = cal.load_observations([cal.DATA, cal.PUBLIC])
    clean = [dataclasses.replace(o, published_tok_s=cal.predict(o, truth)) for o in obs if o.batch == 1]
    cpp = [o for o in clean if cal.profile_engine(o.engine) == "llama.cpp"]
    got = cal.fit_moe([o for o in cpp if o.kind == "tg"], [o for o in cpp if o.kind == "pp"],
                      truth.eta_bw, truth.mu_compute, (truth.step_overhead_s, truth.layer_overhead_s))
    assert got["expert_fill_tokens"] == pytest.approx(20.0, abs=0.5)
    assert got["expert_eta"] == pytest.approx(0.8, rel=0.02)
    whole = cal.fit_profile(clean, per_chip=False, base=truth)
    # mu_compute is fitted over every prefill row, the MoE ones included, so here the recovery is rougher
    assert whole.engines["llama.cpp"]["expert_fill_tokens"] == pytest.approx(20.0, rel=0.3)
    assert whole.expert_fill_tokens == pytest.approx(20.0, rel=0.3)   # mlx-lm#406's rows: the default engine's


def test_committed_profile_prices_moe_prefill_by_chunk():
    """The committed fit gives llama.cpp a non-zero expert fill (from its MoE rows), so DeepSeek's llama.cpp
    pp512 (256 experts, 512-token chunks: 16 tokens per expert) is priced well below its plain roofline; the
    default engine (mlx-lm) has no MoE prefill rows in the default fit and no fill."""
    p = costmodel.load_profile().for_engine("llama.cpp")
    assert p.expert_fill_tokens > 0 and costmodel.load_profile().expert_fill_tokens == 0
    r1 = catalog.load_model("deepseek-v3", 4)
    chip = catalog.find_chip("M3 Ultra")
    plain = dataclasses.replace(p, expert_fill_tokens=0.0)
    L = r1.num_layers
    ratio = costmodel.prefill_time(chip, p, r1, 0, L, 512) / costmodel.prefill_time(chip, plain, r1, 0, L, 512)
    assert ratio > 1.3
