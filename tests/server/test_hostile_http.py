"""Hostile HTTP against a real server on 127.0.0.1 (issue 14): malformed bodies get an OpenAI-shaped 400 and the
connection stays usable, every error has the OpenAI shape, the OpenAPI document says what the server answers,
large prompts cost the event loop nothing, the API key guards every route but /health, and connections that
never send a whole request are closed."""
from __future__ import annotations

import socket
import threading

import httpx
import pytest

from harness.backends.instant import InstantBackend
from harness.serving.server import EmbeddedServer, ServerLimits

ERROR_KEYS = {"message", "type", "param", "code"}
CHAT = "/v1/chat/completions"


def _is_openai_error(response: httpx.Response) -> bool:
    body = response.json()
    return set(body) == {"error"} and set(body["error"]) == ERROR_KEYS and bool(body["error"]["message"])


def _chat_body(content) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


class _BrokenTokenizer(InstantBackend):
    """A backend whose tokenizer fails on the word 'boom': an error the server did not foresee."""

    def encode(self, text: str) -> list[int]:
        if "boom" in text:
            raise RuntimeError("tokenizer exploded")
        return super().encode(text)


class _SlowTokenizer(InstantBackend):
    """Tokenizing a long prompt blocks until the test lets it go, as a slow tokenizer on a huge prompt would."""

    def __init__(self):
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if len(text) > 40_000:
            self.started.set()
            self.release.wait(20)
        return super().encode(text)


# ------------------------------------------------------------------------------------------- bodies and errors

@pytest.mark.parametrize("text", [123, None, ["a"]])
def test_text_part_that_is_not_a_string_is_400(instant_server, text):
    r = httpx.post(instant_server.url + CHAT, json=_chat_body([{"type": "text", "text": text}]), timeout=10)
    assert r.status_code == 400 and _is_openai_error(r)
    assert r.json()["error"]["param"].startswith("messages.0.content.0")


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("max_tokens", "5"), ("temperature", "0.5"),
                                          ("stream", "yes"), ("seed", 1.0)])
def test_a_value_of_the_wrong_json_type_is_400_not_coerced(instant_server, field, value):
    # the OpenAPI document says integer (number, boolean): what it forbids the server refuses
    r = httpx.post(instant_server.url + "/v1/completions", json={"prompt": "a", field: value}, timeout=10)
    assert r.status_code == 400 and _is_openai_error(r) and r.json()["error"]["param"] == field


def test_connection_stays_usable_over_30_alternating_bad_and_good_requests(instant_server):
    bad = _chat_body([{"type": "text", "text": 123}])
    good = {"prompt": "still here", "max_tokens": 2}
    statuses = []
    with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=1)) as client:
        for i in range(30):
            path, body = (CHAT, bad) if i % 2 else ("/v1/completions", good)
            statuses.append(client.post(instant_server.url + path, json=body).status_code)
    assert statuses == [200, 400] * 15


@pytest.mark.parametrize("method, path, content, status", [
    ("GET", "/no/such/route", None, 404),
    ("GET", "/v1/completions", None, 405),
    ("DELETE", "/v1/models", None, 405),
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),        # not UTF-8
    ("POST", "/v1/completions", b'{"prompt": [-1]}', 400),              # token ids are >= 0
])
def test_every_error_has_the_openai_shape(instant_server, method, path, content, status):
    r = httpx.request(method, instant_server.url + path, content=content,
                      headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == status and _is_openai_error(r)


def test_an_unforeseen_error_is_an_openai_shaped_500_and_the_connection_survives():
    with EmbeddedServer(_BrokenTokenizer(), log_level="critical") as server, \
            httpx.Client(timeout=10, limits=httpx.Limits(max_connections=1)) as client:
        r = client.post(server.url + "/v1/completions", json={"prompt": "boom", "max_tokens": 1})
        assert r.status_code == 500 and _is_openai_error(r) and r.json()["error"]["type"] == "server_error"
        assert client.post(server.url + "/v1/completions", json={"prompt": "fine", "max_tokens": 1}).status_code == 200


# ------------------------------------------------------------------------------------------- the OpenAPI document

def test_openapi_document_says_400_lists_sse_and_metrics(instant_server):
    paths = httpx.get(instant_server.url + "/openapi.json", timeout=10).json()["paths"]
    for route in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[route]["post"]["responses"]
        assert "422" not in responses and "400" in responses
        assert "text/event-stream" in responses["200"]["content"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


# ------------------------------------------------------------------------------------------- size and time bounds

def test_too_long_prompt_is_refused_before_tokenizing():
    backend = _SlowTokenizer()
    with EmbeddedServer(backend, limits=ServerLimits(max_prompt_chars=1000)) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a " * 600, "max_tokens": 1}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert "1200 characters" in r.json()["error"]["message"]
        assert backend.calls == 0


def test_health_answers_while_a_large_prompt_is_tokenized():
    backend = _SlowTokenizer()
    with EmbeddedServer(backend) as server:
        answer = {}
        post = threading.Thread(target=lambda: answer.setdefault("r", httpx.post(
            server.url + "/v1/completions", json={"prompt": "word " * 10_000, "max_tokens": 1}, timeout=30)))
        post.start()
        try:
            assert backend.started.wait(10)
            # the loop is free while the tokenizer works: on the loop itself this would time out
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        finally:
            backend.release.set()
            post.join(30)
        assert answer["r"].status_code == 200


@pytest.mark.parametrize("body", [
    {"prompt": "a", "stop": [f"s{i}" for i in range(65)]},
    {"prompt": "a", "stop": ["x" * 5000, "y" * 5000]},
    {"prompt": "a", "stop_token_ids": list(range(1025))},
])
def test_stop_lists_are_bounded(instant_server, body):
    r = httpx.post(instant_server.url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 400 and _is_openai_error(r)
    assert r.json()["error"]["param"] in ("stop", "stop_token_ids")


# ------------------------------------------------------------------------------------------- the API key

@pytest.mark.parametrize("path", ["/metrics", "/openapi.json", "/v1/models", "/no/such/route"])
def test_api_key_guards_every_route_but_health(path):
    with EmbeddedServer(InstantBackend(), api_key="s3cret") as server:
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 401 and _is_openai_error(r)
        assert httpx.get(server.url + path, headers={"authorization": "Bearer s3cret"},
                         timeout=10).status_code in (200, 404)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_metrics_open_lets_a_scraper_in_without_the_key():
    with EmbeddedServer(InstantBackend(), api_key="s3cret", metrics_open=True) as server:
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401


# ------------------------------------------------------------------------------------------- connection timeouts

def _closed_within(sock: socket.socket, bound_s: float) -> bool:
    """True when the server closes the connection (EOF or reset) before `bound_s` passes."""
    sock.settimeout(bound_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _read_until(sock: socket.socket, end: bytes, bound_s: float) -> bytes:
    """What the server sends up to `end` (the response may come in several segments) or until it closes."""
    sock.settimeout(bound_s)
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"])
def test_connection_without_a_whole_request_head_is_closed(sent):
    with EmbeddedServer(InstantBackend(), limits=ServerLimits(header_timeout_s=0.5)) as server:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(sent)
            assert _closed_within(sock, 8)


def test_idle_kept_alive_connection_is_closed():
    with EmbeddedServer(InstantBackend(), limits=ServerLimits(keep_alive_s=0.5)) as server:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_until(sock, b"}", bound_s=8).startswith(b"HTTP/1.1 200")
            assert _closed_within(sock, 8)


def test_body_that_never_arrives_is_408():
    with EmbeddedServer(InstantBackend(), limits=ServerLimits(body_timeout_s=0.5)) as server:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\"")
            answer = _read_until(sock, b"}}", bound_s=8)
            assert answer.startswith(b"HTTP/1.1 408") and b'"code":"body_timeout"' in answer


def test_a_long_stream_outlives_the_header_timeout():
    limits = ServerLimits(header_timeout_s=0.3)
    with EmbeddedServer(InstantBackend(token_interval_s=0.02), limits=limits) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 40}, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40


# ------------------------------------------------------------------------------------------- fuzzing the document

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (only once schemathesis is known to be there)

OPERATIONS = [("/health", "GET"), ("/metrics", "GET"), ("/v1/models", "GET"),
              ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")]


@pytest.fixture(scope="module")
def served_schema():
    """The server's own OpenAPI document, loaded from the live server it describes."""
    limits = ServerLimits(max_tokens=64, max_body_bytes=64 * 1024)
    with EmbeddedServer(InstantBackend(), limits=limits, log_level="critical") as server:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_the_document_lists_every_operation_fuzzed_here(served_schema):
    listed = {(op.ok().path, op.ok().method.upper()) for op in served_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE


# Negative cases only where there is something to break: the GET routes take no parameters.
@pytest.mark.parametrize("path, method, mode", [(path, method, POSITIVE) for path, method in OPERATIONS]
                         + [(path, method, NEGATIVE) for path, method in OPERATIONS if method == "POST"])
def test_fuzzed_requests_get_no_5xx_and_openai_shaped_errors(served_schema, path, method, mode):
    checks = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
              schemathesis.checks.content_type_conformance,
              schemathesis.checks.response_schema_conformance]
    if mode is NEGATIVE:   # what the document forbids, the server must refuse
        checks.append(schemathesis.checks.negative_data_rejection)

    @given(case=served_schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def one(case):
        response = case.call(timeout=10)
        said = f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text[:300]}"
        assert response.status_code < 500, said
        if response.status_code >= 400:
            assert _is_openai_error(httpx.Response(response.status_code, content=response.content)), said
        case.validate_response(response, checks=checks)
    one()


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000,   # 16 kB buffered and still no end of head
    b"NOT AN HTTP REQUEST\r\n\r\n",
])
def test_unparsable_request_head_gets_an_openai_shaped_400(head):
    with EmbeddedServer(InstantBackend(), log_level="critical") as server:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(head)
            answer = _read_until(sock, b"}}", bound_s=8)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400")
    assert _is_openai_error(httpx.Response(400, content=body))
