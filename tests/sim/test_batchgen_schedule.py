"""The "mlx-lm" schedule: mlx_lm.generate.BatchGenerator's iterations, checked against the cost model by hand."""
from __future__ import annotations

import numpy as np
import pytest

from harness.specs import UserError
from sim import EngineConfig
from tests.sim.conftest import make_cluster, make_plan, make_profile
from tests.sim.test_sim_engine import chunk_times, one_request, run

L, OUT = 300, 6


def mlx(**cfg):
    return dict(scheduler="mlx-lm", **cfg)


def stage(cl, model, plan):
    from harness.costmodel import stage_models
    return stage_models(cl, model, plan)


@pytest.mark.parametrize("ramp", [0.0, 32.0])
def test_lone_request_prefill_then_join_then_first_token(llama7b, ramp):
    profile = make_profile(prefill_ramp_tokens=ramp)   # the ramp must not reach the one-token join
    cl = make_cluster(1)
    plan = make_plan(llama7b, [("n0",)], [32])
    (st,) = stage(cl, llama7b, plan)
    res = run(cl, llama7b, plan, profile, one_request(L, OUT), **mlx())
    row = res.requests.to_pylist()[0]
    # iteration A prefills all but the last token; B runs the last token alone, a decode forward over the L - 1
    # cached tokens and itself (the real join rows cost 1.1-1.2x a batch-1 decode, far from a 1-token prefill
    # chunk with the GEMM ramp); C's decode hands out token 1
    expected = (st.prefill_s(llama7b, profile, L - 1, 0) + st.decode_s(llama7b, profile, 1, L)
                + st.decode_s(llama7b, profile, 1, L + 1))
    assert row["first_token_s"] - row["start_s"] == pytest.approx(expected, rel=1e-12)
    gaps = [st.decode_s(llama7b, profile, 1, L + 1 + k) for k in range(1, OUT)]
    assert np.diff(chunk_times(res)) == pytest.approx(gaps, rel=1e-12)
    assert row["output_tokens"] == OUT and len(chunk_times(res)) == OUT and row["success"]


def test_prompts_arriving_together_share_one_prefill_forward(llama7b, profile):
    cl = make_cluster(1)
    plan = make_plan(llama7b, [("n0",)], [32])
    together = run(cl, llama7b, plan, profile, one_request(L, OUT, n=2), **mlx())
    ttft = [r["first_token_s"] for r in together.requests.to_pylist()]
    assert ttft[0] == ttft[1]
    one_by_one = run(cl, llama7b, plan, profile, one_request(L, OUT, n=2), **mlx(prefill_batch=1))
    t1 = [r["first_token_s"] for r in one_by_one.requests.to_pylist()]
    # one at a time: the second prompt waits for the first to leave the prompt batch, so both finish later
    assert t1[1] > t1[0] and t1[1] > ttft[1]


def test_two_stages_run_one_iteration_at_a_time(llama7b, profile):
    cl = make_cluster(2)
    plan = make_plan(llama7b, [("n0",), ("n1",)], [16, 16])
    a, b = stage(cl, llama7b, plan)
    res = run(cl, llama7b, plan, profile, one_request(L, OUT), **mlx())
    gaps = np.diff(chunk_times(res))
    steps = res.steps.to_pandas()
    hops = steps[steps.kind == "send"].groupby("step").apply(lambda g: (g.end_s - g.start_s).sum())
    step = a.decode_s(llama7b, profile, 1, L + 2) + b.decode_s(llama7b, profile, 1, L + 2)
    assert gaps[0] == pytest.approx(step + hops.iloc[-1], rel=1e-9)   # stages then hops, no overlap


def test_steps_read_like_the_real_backend(llama7b, profile):
    cl = make_cluster(1)
    res = run(cl, llama7b, make_plan(llama7b, [("n0",)], [32]), profile, one_request(L, 3), **mlx())
    kinds = res.steps.to_pandas().kind.tolist()
    assert kinds[:3] == ["prefill", "decode", "decode"]      # the join forward is decode-like, as mlx labels it


def test_bad_engine_settings_are_refused():
    with pytest.raises(UserError, match="scheduler"):
        EngineConfig(scheduler="vllm")
    with pytest.raises(UserError, match="prefill_batch"):
        EngineConfig(scheduler="mlx-lm", prefill_batch=0)


def test_step_batch_size_is_the_largest_forward_as_the_real_backend_records(llama7b, profile):
    cl = make_cluster(1)
    res = run(cl, llama7b, make_plan(llama7b, [("n0",)], [32]), profile, one_request(L, OUT, n=3),
              **mlx(prefill_batch=1))
    steps = res.steps.to_pandas()
    # while the third prompt prefills, two sequences decode: forwards of 2 and 1 sequences, the row says 2
    mixed = steps[steps.kind == "mixed"]
    assert len(mixed) and (mixed.batch_size <= 2).all() and (mixed.batch_size == 2).any()
