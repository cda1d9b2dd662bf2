"""`python -m harness serve`: the access log is off by default and `--access-log` turns it on (issue 15)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.server.conftest import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


def _serve_output(*extra: str) -> str:
    """Everything `serve` printed while answering one completion."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness", "serve", "--backend", "instant", "--port", str(port),
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
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
