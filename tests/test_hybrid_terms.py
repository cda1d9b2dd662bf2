"""hybrid_optimal's vectorised cost matrices agree with the StageModel the simulator times, also with the named
terms of issue 11 on: MoE expert touch, fill and read efficiency, attention apart, per-generation factors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from harness import catalog
from harness.costmodel import PlanOptions, load_profile
from strategies.partitioning._plans import stage_decode_s, stage_prefill_s, unit_stage
from strategies.partitioning.hybrid_optimal import _Search

BASE = load_profile()
TERMS = dataclasses.replace(BASE, expert_eta=0.8, expert_fill_tokens=20.0, attn_eta_bw=0.4, attn_mu=0.3,
                            per_generation={"M4": {"eta_bw": 0.7}})


@pytest.fixture(scope="module")
def cluster():
    return catalog.load_cluster("mixed")


@pytest.mark.parametrize("profile", [BASE, TERMS], ids=["fitted", "terms-on"])
@pytest.mark.parametrize("model_name", ["llama-3.1-8b", "qwen3-30b-a3b"])
def test_search_matrices_are_the_stage_costs(cluster, profile, model_name):
    model = catalog.load_model(model_name, 4)
    L = model.num_layers
    for obj in ("latency", "goodput"):
        opts = PlanOptions(profile, objective=obj, context_tokens=3000, prompt_tokens=700)
        search = _Search(cluster, model, opts)
        for t in search.unit_types()[:3]:
            unit = search._assign([t])[0]
            step, last = search.costs(unit)
            for i, j in ((0, L // 3), (2, L - 1)):
                if np.isfinite(step[i, j]):
                    assert step[i, j] == pytest.approx(stage_decode_s(cluster, model, opts, unit, i, j, False), rel=1e-9)
            if np.isfinite(last[L // 2]):
                assert last[L // 2] == pytest.approx(stage_decode_s(cluster, model, opts, unit, L // 2, L, True), rel=1e-9)
            if obj == "goodput":
                pre, pre_last = search.prefill(unit)
                if np.isfinite(pre[1, L // 2]):
                    assert pre[1, L // 2] == pytest.approx(stage_prefill_s(cluster, model, opts, unit, 1, L // 2, False),
                                                           rel=1e-9)
                steps, steps_last = search._batched_steps(unit)
                b = min(3, len(search.batches) - 1)
                n = int(search.batches[b])
                if np.isfinite(steps[b, 0, L // 2]):
                    st = unit_stage(cluster, model, unit, 0, L // 2, False)
                    assert steps[b, 0, L // 2] == pytest.approx(
                        st.decode_s(model, profile, n, n * opts.mean_decode_context), rel=1e-9)


@pytest.mark.parametrize("obj", ["latency", "goodput"])
def test_lower_bounds_hold_with_the_terms_on(cluster, obj):
    model = catalog.load_model("qwen3-30b-a3b", 4)
    search = _Search(cluster, model, PlanOptions(TERMS, objective=obj, context_tokens=3000))
    for t in search.unit_types():
        unit = search._assign([t])[0]
        a, b = search.lower(unit)
        matrix, _ = search.prefill(unit) if obj == "goodput" else search.costs(unit)
        prefix = np.concatenate([[0.0], np.cumsum(b)])
        spans = a + prefix[None, :] - prefix[:, None]
        ok = np.isfinite(matrix)
        assert np.all(spans[ok] <= matrix[ok] * (1 + 1e-12) + 1e-15)
