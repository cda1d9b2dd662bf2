"""Server fast path vs a bare floor (issue 15, measured on this machine, both in the same run).

Starts `python -m harness serve --backend instant` and a bare Starlette SSE app that streams the same OpenAI
chat-chunk JSON (64 tokens, pre-rendered, no validation, no middleware) on 127.0.0.1, drives both with `wrk`
(a Lua script POSTing a streaming chat completion) at 1, 16 and 64 connections, and prints req/s, our
server's ratio to the floor, and the p99 gap between SSE events of one stream, measured by a small httpx
client of this file (a coarse figure: events that arrive in one TCP read show near-zero gaps, so a
server that sends a whole stream in one tick looks gap-free). Every figure is measured; with 2 shared cores they are noisy, so compare only the ratios.

    python benchmarks/server_vs_bare.py [--duration 5] [--connections 1,16,64]

`wrk` must be on PATH (apt-get install -y wrk).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 64
BODY = {"model": "instant", "stream": True, "max_tokens": TOKENS,
        "messages": [{"role": "user", "content": "hello there"}]}
WRK_LUA = f"""wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{json.dumps(BODY)}'
"""


def bare_app():
    """The floor: Starlette's StreamingResponse, one pre-rendered chunk per token, like a server with no work."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    def chunk(text: str, finish):
        obj = {"id": "chatcmpl-bare", "object": "chat.completion.chunk", "created": int(time.time()),
               "model": "instant", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    async def events():
        for i in range(TOKENS):
            yield chunk("tok ", "length" if i == TOKENS - 1 else None)
        yield b"data: [DONE]\n\n"

    async def chat(request):
        await request.body()
        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _start(kind: str, port: int) -> subprocess.Popen:
    if kind == "ours":
        cmd = [sys.executable, "-m", "harness", "serve", "--backend", "instant", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "server_vs_bare:bare_app", "--port", str(port),
               "--log-level", "warning", "--no-access-log", "--app-dir", str(Path(__file__).parent)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc


def wrk_rps(port: int, connections: int, duration_s: int, lua: str) -> float:
    out = subprocess.run(["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{duration_s}s",
                          "-s", lua, f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                         timeout=duration_s + 30).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        raise RuntimeError(f"wrk printed no Requests/sec line:\n{out}")
    return float(found.group(1))


async def _gap_p99(port: int, streams: int, requests_per_stream: int) -> float:
    """p99 of the time between two SSE events of one stream, over `streams` concurrent streams."""
    import httpx
    gaps: list[float] = []

    async def one_stream(client):
        for _ in range(requests_per_stream):
            async with client.stream("POST", "/v1/chat/completions", json=BODY) as r:
                last = None
                async for _line in r.aiter_lines():
                    now = time.perf_counter()
                    if _line and last is not None:
                        gaps.append(now - last)
                    if _line:
                        last = now

    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as client:
        await asyncio.gather(*(one_stream(client) for _ in range(streams)))
    gaps.sort()
    return gaps[int(0.99 * (len(gaps) - 1))] if gaps else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk per point (default %(default)s)")
    p.add_argument("--connections", default="1,16,64", help="comma-separated connection counts")
    p.add_argument("--repeat", type=int, default=3,
                   help="wrk runs per point, alternating the two servers; the median is printed (default %(default)s)")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk not found on PATH; install it (apt-get install -y wrk)", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.connections.split(",")]
    sys.path.insert(0, str(ROOT))
    from harness.mlx.launcher import free_ports
    ours, bare = free_ports(2)
    ports = {"ours": ours, "bare": bare}
    procs = {k: _start(k, port) for k, port in ports.items()}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA)
    try:
        print(f"measured, this machine, {TOKENS}-token streams, median of {args.repeat} wrk runs of "
              f"{args.duration} s per point")
        print(f"{'conns':>5} {'ours req/s':>11} {'bare req/s':>11} {'ratio':>6} {'ours gap p99 ms':>16} "
              f"{'bare gap p99 ms':>16} {'gap ratio':>9}")
        for c in conns:
            runs = {k: [] for k in ports}
            for _ in range(args.repeat):   # alternate, so a noisy neighbour hits both alike
                for k, port in ports.items():
                    runs[k].append(wrk_rps(port, c, args.duration, f.name))
            rps = {k: statistics.median(v) for k, v in runs.items()}
            gap = {k: asyncio.run(_gap_p99(port, c, max(2, 64 // c))) for k, port in ports.items()}
            print(f"{c:>5} {rps['ours']:>11.0f} {rps['bare']:>11.0f} {rps['ours'] / rps['bare']:>6.2f} "
                  f"{gap['ours'] * 1e3:>16.3f} {gap['bare'] * 1e3:>16.3f} {gap['ours'] / gap['bare']:>9.2f}")
    finally:
        os.unlink(f.name)
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
