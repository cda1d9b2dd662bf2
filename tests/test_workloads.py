import json

import numpy as np
import pytest

from harness.specs import UserError
from harness.workloads import (RequestSpec, build_workload, parse_workload, sample_arrivals, sample_lengths,
                               write_trace)


def test_same_spec_same_requests_and_seed_changes_them():
    spec = {"kind": "synthetic", "num_requests": 50, "seed": 7, "arrival": {"process": "poisson", "rate": 3},
            "prompt": {"dist": "lognormal", "mean": 400, "sigma": 0.6}, "output": {"dist": "uniform", "low": 5, "high": 50}}
    a, b = list(build_workload(spec)), list(build_workload(dict(spec)))
    assert a == b
    assert a != list(build_workload(spec | {"seed": 8}))
    assert all(isinstance(r, RequestSpec) for r in a)


def test_lengths_follow_their_distributions():
    rng = np.random.default_rng(0)
    assert (sample_lengths(512, 10, rng) == 512).all()
    u = sample_lengths({"dist": "uniform", "low": 10, "high": 20}, 5000, rng)
    assert u.min() == 10 and u.max() == 20
    n = sample_lengths({"dist": "normal", "mean": 300, "std": 30}, 20000, rng)
    assert n.mean() == pytest.approx(300, rel=0.01) and n.std() == pytest.approx(30, rel=0.05)
    ln = sample_lengths({"dist": "lognormal", "mean": 200, "sigma": 0.5}, 50000, rng)
    assert ln.mean() == pytest.approx(200, rel=0.02)
    clipped = sample_lengths({"dist": "normal", "mean": 5, "std": 100, "min": 3, "max": 9}, 1000, rng)
    assert clipped.min() >= 3 and clipped.max() <= 9


def test_arrival_processes():
    rng = np.random.default_rng(1)
    assert (sample_arrivals({"process": "all_at_once"}, 4, rng) == 0).all()
    assert sample_arrivals({"process": "constant", "rate": 4}, 5, rng).tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    p = sample_arrivals({"process": "poisson", "rate": 10}, 20000, rng)
    assert p[0] == 0 and np.all(np.diff(p) >= 0) and len(p) / p[-1] == pytest.approx(10, rel=0.03)
    b = sample_arrivals({"process": "bursts", "burst_size": 3, "interval_s": 2}, 7, rng)
    assert b.tolist() == [0, 0, 0, 2, 2, 2, 4]


def test_changing_arrivals_keeps_lengths():
    base = {"kind": "synthetic", "num_requests": 30, "seed": 2, "prompt": {"dist": "uniform", "low": 1, "high": 999}}
    a = build_workload(base | {"arrival": {"process": "poisson", "rate": 1}})
    b = build_workload(base | {"arrival": {"process": "constant", "rate": 5}})
    assert a.prompt_tokens.tolist() == b.prompt_tokens.tolist()


def test_closed_loop_is_a_mode_flag():
    wl = build_workload(parse_workload("closed,concurrency=4,n=10,prompt=100,output=20"))
    assert wl.closed_loop and wl.concurrency == 4 and len(wl) == 10
    assert (wl.output_tokens == 20).all()


def test_conversations_share_growing_prefixes():
    wl = build_workload({"kind": "conversations", "conversations": 3, "turns": 3, "system_prompt_tokens": 50,
                         "user": 10, "output": 20, "think_time_s": 100, "arrival": {"process": "constant", "rate": 1}})
    turns = [r for r in wl if r.prefix_id == "conv-1"]
    assert [r.prompt_tokens for r in turns] == [60, 90, 120]
    assert [r.prefix_tokens for r in turns] == [50, 80, 110]   # everything before the new user message
    assert [r.arrival_s for r in turns] == [1, 101, 201]
    assert np.all(np.diff(wl.arrival_s) >= 0)


def test_trace_round_trip(tmp_path):
    wl = build_workload({"kind": "conversations", "conversations": 2, "turns": 2, "user": 5, "output": 7})
    path = tmp_path / "t.jsonl"
    write_trace(wl, path)
    back = build_workload({"kind": "trace", "path": "t.jsonl"}, base_dir=tmp_path)
    assert [(r.prompt_tokens, r.output_tokens, r.prefix_id, r.prefix_tokens) for r in back] == \
           [(r.prompt_tokens, r.output_tokens, r.prefix_id, r.prefix_tokens) for r in wl]
    assert back.arrival_s.tolist() == pytest.approx(wl.arrival_s.tolist())


def test_trace_sorts_by_arrival_and_rejects_bad_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"arrival_s": 5, "prompt_tokens": 3, "output_tokens": 2}) + "\n\n"
                 + json.dumps({"arrival_s": 2, "prompt_tokens": 4, "output_tokens": 1}) + "\n")
    wl = build_workload({"kind": "trace", "path": str(p)})
    assert wl.arrival_s.tolist() == [0, 3] and wl.prompt_tokens.tolist() == [4, 3]
    p.write_text('{"arrival_s": 1, "prompt_tokens": 3}\n')
    with pytest.raises(UserError, match="t.jsonl:1"):
        build_workload({"kind": "trace", "path": str(p)})


def test_shorthand_parses_to_the_dict_form():
    assert parse_workload("poisson,rate=5,n=100,prompt=uniform:10:20,output=lognormal:100:0.5,seed=3") == {
        "kind": "synthetic", "arrival": {"process": "poisson", "rate": 5.0}, "num_requests": 100, "seed": 3,
        "prompt": {"dist": "uniform", "low": 10, "high": 20},
        "output": {"dist": "lognormal", "mean": 100.0, "sigma": 0.5}}


def test_workload_file_toml(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text('[workload]\nkind = "synthetic"\nnum_requests = 5\n[workload.arrival]\nprocess = "constant"\nrate = 2\n')
    wl = build_workload(parse_workload(str(p)))
    assert wl.arrival_s.tolist() == [0, 0.5, 1.0, 1.5, 2.0]


@pytest.mark.parametrize("bad", ["zigzag,n=3", "poisson,rate", "poisson,rate=1,colour=red", "poisson,prompt=weird:1"])
def test_bad_shorthand_is_a_user_error(bad):
    with pytest.raises(UserError):
        build_workload(parse_workload(bad))


@pytest.mark.parametrize("spec", [{"kind": "nope"}, {"num_requests": 0}, {"arrival": {"process": "poisson"}},
                                  {"arrival": {"process": "poisson", "rate": -1}},
                                  {"prompt": {"dist": "uniform", "low": 5}}, {"closed_loop": {"concurrency": 0}}])
def test_bad_specs_are_user_errors(spec):
    with pytest.raises(UserError):
        build_workload(spec)


def test_columns_are_read_only():
    wl = build_workload({"num_requests": 3})
    with pytest.raises(ValueError):
        wl.prompt_tokens[0] = 1
