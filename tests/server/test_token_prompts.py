"""Exact token prompts: the load generator sends token ids, so the server sees the workload's lengths exactly
(words tokenize to 134-144 tokens for a 128-word prompt on a BPE tokenizer)."""
import pytest

from harness.serving.loadgen import LoadMode, Target, prompt_token_ids, request_body, run_load_sync
from harness.specs import UserError
from harness.workloads import RequestSpec, build_workload


def test_token_ids_are_exact_seeded_and_share_prefixes():
    a = RequestSpec("a", 0.0, 50, 4, prefix_id="p", prefix_tokens=20)
    b = RequestSpec("b", 0.0, 60, 4, prefix_id="p", prefix_tokens=20)
    ids_a, ids_b = prompt_token_ids(a, 0, 7, 512), prompt_token_ids(b, 1, 7, 512)
    assert len(ids_a) == 50 and len(ids_b) == 60 and all(16 <= t < 512 for t in ids_a + ids_b)
    assert ids_a[:20] == ids_b[:20] and ids_a[20:30] != ids_b[20:30]
    assert prompt_token_ids(a, 0, 7, 512) == ids_a and prompt_token_ids(a, 0, 8, 512) != ids_a


def test_body_carries_token_ids_only_when_asked():
    spec = RequestSpec("a", 0.0, 12, 4)
    assert isinstance(request_body(Target("http://x"), "m", spec, 0, 0)["prompt"], str)
    assert len(request_body(Target("http://x", prompt_vocab=100), "m", spec, 0, 0)["prompt"]) == 12
    with pytest.raises(UserError, match="completions"):
        Target("http://x", endpoint="chat", prompt_vocab=100)


def test_server_counts_exactly_the_sent_tokens(instant_server):
    wl = build_workload({"kind": "synthetic", "num_requests": 3, "seed": 0, "prompt": {"dist": "fixed", "value": 37},
                         "output": {"dist": "fixed", "value": 3}, "arrival": {"process": "all_at_once"}})
    res = run_load_sync(Target(instant_server.url, prompt_vocab=512), wl, LoadMode("concurrent", 3))
    assert [r["prompt_tokens"] for r in res.rows] == [37, 37, 37] and all(r["success"] for r in res.rows)
