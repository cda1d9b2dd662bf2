"""The embedded OpenAI server in front of real MLX ranks: same tokens over HTTP, 503 once a rank dies."""
from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from harness.backends.mlx import MlxBackend
from harness.serving.server import EmbeddedServer


def _stream_ids_text(client, url, body):
    texts, usage = [], None
    with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                texts.append(chunk["choices"][0]["text"])
            usage = chunk.get("usage") or usage
    return "".join(texts), usage


@pytest.mark.slow
def test_server_over_two_ranks_then_503_after_a_rank_dies(tiny):
    backend = MlxBackend(tiny, [2, 4])
    prompt = backend.encode("import os\nimport sys\n")
    body = {"model": backend.model_id, "prompt": prompt, "max_tokens": 16, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    with EmbeddedServer(backend) as server, httpx.Client(timeout=30) as client:
        text, usage = _stream_ids_text(client, server.url, body)
        assert usage["completion_tokens"] == 16 and usage["prompt_tokens"] == len(prompt)
        full = client.post(f"{server.url}/v1/completions", json={**body, "stream": False}).json()
        assert full["choices"][0]["text"] == text        # greedy: same text streamed or not
        assert client.get(f"{server.url}/health").status_code == 200
        vocab = backend.config["vocab_size"]
        bad = client.post(f"{server.url}/v1/completions", json={**body, "stream": False, "prompt": [1, vocab]})
        assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]   # the client's fault
        assert client.get(f"{server.url}/health").status_code == 200

        os.kill(backend.ranks.ranks[1].proc.pid, signal.SIGKILL)
        resp = client.post(f"{server.url}/v1/completions", json={**body, "stream": False})
        assert resp.status_code == 503 and "rank 1" in resp.text
        assert client.get(f"{server.url}/health").status_code == 503
    rows = backend.request_records()
    assert [r["success"] for r in rows] == [True, True, False] and "rank 1" in rows[-1]["error"]
