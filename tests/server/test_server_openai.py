"""The real openai SDK against a real server on 127.0.0.1: completions and chat, streaming and not."""
from __future__ import annotations

import httpx
import openai
import pytest

from harness.backends.instant import WordTokenizer


@pytest.fixture(scope="module")
def client(instant_server):
    return openai.OpenAI(base_url=instant_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_backend_model(client):
    assert [m.id for m in client.models.list().data] == ["instant"]


def test_completion_non_streaming_reports_usage(client):
    prompt = "the quick brown fox jumps over"
    r = client.completions.create(model="instant", prompt=prompt, max_tokens=7)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert len(WordTokenizer().encode(choice.text)) == 7
    assert r.usage.prompt_tokens == 6
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == 13
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="instant", messages=[{"role": "user", "content": "hello there"}],
                                       max_tokens=5)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_chat_streaming_has_no_role_only_chunk_and_ends_with_usage(client):
    stream = client.chat.completions.create(
        model="instant", messages=[{"role": "user", "content": "count to four"}], max_tokens=4,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.content for c in content)       # every chunk carries text, the first too
    assert len(content) == 4
    assert content[-1].choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in content[:-1]] == [None] * 3
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 4


def test_completion_streaming_without_usage_sends_no_usage_chunk(client):
    chunks = list(client.completions.create(model="instant", prompt="a b c", max_tokens=3, stream=True))
    assert len(chunks) == 3
    assert all(c.usage is None for c in chunks)


def test_stream_ends_with_done_marker(instant_server):
    body = {"prompt": "one two", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    text = httpx.post(instant_server.url + "/v1/completions", json=body, timeout=10).text
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 2 + 1 + 1   # two tokens, usage, [DONE]


def test_stop_string_ends_generation_and_is_not_returned(client):
    full = client.completions.create(model="instant", prompt="x", max_tokens=8, seed=3).choices[0].text
    stop_word = full.split()[3]
    r = client.completions.create(model="instant", prompt="x", max_tokens=8, seed=3, stop=[" " + stop_word])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(" " + stop_word)]


def test_seed_makes_output_reproducible(client):
    a = client.completions.create(model="instant", prompt="x", max_tokens=6, seed=11).choices[0].text
    b = client.completions.create(model="instant", prompt="x", max_tokens=6, seed=11).choices[0].text
    c = client.completions.create(model="instant", prompt="x", max_tokens=6, seed=12).choices[0].text
    assert a == b != c


def test_stop_token_ids_respect_min_tokens(client):
    first = WordTokenizer().encode(
        client.completions.create(model="instant", prompt="x", max_tokens=1, seed=5).choices[0].text)[0]
    early = client.completions.create(model="instant", prompt="x", max_tokens=6, seed=5,
                                      extra_body={"stop_token_ids": [first]})
    pinned = client.completions.create(model="instant", prompt="x", max_tokens=6, seed=5,
                                       extra_body={"stop_token_ids": [first], "min_tokens": 6, "ignore_eos": True})
    assert (early.usage.completion_tokens, early.choices[0].finish_reason) == (1, "stop")
    assert (pinned.usage.completion_tokens, pinned.choices[0].finish_reason) == (6, "length")


def test_token_id_prompt_is_accepted(client):
    r = client.completions.create(model="instant", prompt=[1, 2, 3, 4], max_tokens=2)
    assert r.usage.prompt_tokens == 4
