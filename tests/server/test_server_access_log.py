"""`python -m harness serve`: the access log is off by default and `--access-log` turns it on (issue 15)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_output(*extra: str) -> str:
    """Everything `serve` printed while answering one completion."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness", "serve", "--backend", "instant", "--port", str(port),
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20   # a hang bound, not a timing assert
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"model": "instant", "prompt": "a b", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    return out


def test_access_log_is_off_by_default():
    assert "POST /v1/completions" not in _serve_output()


def test_access_log_flag_logs_each_request():
    assert "POST /v1/completions" in _serve_output("--access-log")
