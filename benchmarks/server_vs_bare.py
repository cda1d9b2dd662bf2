"""Server fast path vs a bare floor (issue 15, measured on this machine, everything in the same run).

Starts `python -m harness serve --backend instant` and bare Starlette SSE apps that stream the same OpenAI
chat-chunk JSON (64 tokens, pre-rendered, no validation, no middleware) on 127.0.0.1, and prints ratios:

1. throughput: `wrk` (a Lua script POSTing a streaming chat completion) at 1, 16 and 64 connections, req/s
   of our server over the floor's. Two floors: `bare` writes each token's chunk on its own (the issue's floor),
   `bare-1w` writes a whole stream in one write, the least a server can do for tokens that are all ready.
2. per-token latency: the same servers with tokens paced on a fixed schedule (--interval-ms, as from a real
   engine, where coalescing cannot help), a small raw-socket client timestamping every read of 1, 16 and 64
   concurrent streams; the p50 and p99 gap between consecutive token events, ours over the floor's.

3. the sim backend's streams with their `ready()` (base.ReadyEvents: every token the engine has emitted goes
   out in one write) against the same streams with it hidden (one write per token, as before it had one), both
   `harness serve`'s backend and server (llama-3.1-8b on seed-64gb, ~22 ms a simulated decode step), at each
   --sim-speeds speed (virtual seconds per wall second; at 10^4 a step is ~2 us of wall time, tokens as good as
   all ready): HTTP writes per stream from a raw-socket client and `wrk` req/s, with over without.

Every figure is measured; with 2 shared cores they are noisy, so compare only the ratios.

    python benchmarks/server_vs_bare.py [--duration 5] [--connections 1,16,64] [--interval-ms 10]
                                        [--parts 1,2,3] [--sim-speeds 100,10000]

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
SIM_PLAN = ["--cluster", "seed-64gb", "--model", "llama-3.1-8b", "--strategy", "uniform"]
SIM_BODY = {**BODY, "model": "llama-3.1-8b", "ignore_eos": True}


def _wrk_lua(body: dict) -> str:
    return f"""wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{json.dumps(body)}'
"""


WRK_LUA = _wrk_lua(BODY)


def _chunk(text: str, finish) -> bytes:
    obj = {"id": "chatcmpl-bare", "object": "chat.completion.chunk", "created": int(time.time()),
           "model": "instant", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _bare_events(interval_s: float):
    """One pre-rendered chunk per token; paced, token k is due (k + 1) intervals after the stream started."""
    async def events():
        started = time.monotonic()
        for i in range(TOKENS):
            if interval_s > 0:
                await asyncio.sleep(max(0.0, started + (i + 1) * interval_s - time.monotonic()))
            yield _chunk("tok ", "length" if i == TOKENS - 1 else None)
        yield b"data: [DONE]\n\n"
    return events


async def _one_write():
    yield b"".join([_chunk("tok ", "length" if i == TOKENS - 1 else None) for i in range(TOKENS)]
                   + [b"data: [DONE]\n\n"])


def bare_app():
    """The floor: Starlette's StreamingResponse, one write per token, like a server with no work. With
    BARE_ONE_WRITE=1 the whole stream goes in one write; BARE_INTERVAL_MS paces the tokens."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    one_write = os.environ.get("BARE_ONE_WRITE") == "1"
    events = _bare_events(float(os.environ.get("BARE_INTERVAL_MS", "0")) / 1000)

    async def chat(request):
        await request.body()
        return StreamingResponse(_one_write() if one_write else events(), media_type="text/event-stream")

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


class _NoReady:
    """A stream with its optional `ready` hidden: what the server does with a backend that has none."""

    def __init__(self, stream):
        self.stream = stream

    def __aiter__(self):
        return self

    def __anext__(self):
        return self.stream.__anext__()

    async def aclose(self) -> None:
        await self.stream.aclose()


def serve_sim(port: int, speed: float, ready: bool) -> None:
    """`harness serve --backend sim` (its arguments, backend and server), with the streams' `ready` hidden
    unless `ready`: both sides of part 3 start here, so they differ in that alone."""
    from harness.commands import serve
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args(["--backend", "sim", *SIM_PLAN, "--speed", str(speed), "--port", str(port)])
    backend = serve.build_backend(args)
    if not ready:
        generate = backend.generate
        backend.generate = lambda request: _NoReady(generate(request))
    from harness.serving.server import serve_forever
    serve_forever(backend, host="127.0.0.1", port=port, limits=serve.limits_from_args(args), log_level="warning")


def _start(kind: str, port: int, interval_ms: float = 0.0, sim_speed: float = 1.0) -> subprocess.Popen:
    """kind: "ours", "bare" (one write per token), "bare-1w" (one write per stream), "sim" or "sim-plain"
    (the sim backend with and without its streams' ready())."""
    env = dict(os.environ)
    if kind.startswith("sim"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-sim", str(port), "--speed", str(sim_speed)]
        if kind == "sim-plain":
            cmd.append("--no-ready")
    elif kind == "ours":
        cmd = [sys.executable, "-m", "harness", "serve", "--backend", "instant", "--port", str(port),
               "--token-interval-ms", str(interval_ms)]
    else:
        env.update(BARE_ONE_WRITE="1" if kind == "bare-1w" else "0", BARE_INTERVAL_MS=str(interval_ms))
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "server_vs_bare:bare_app", "--port", str(port),
               "--log-level", "warning", "--no-access-log", "--app-dir", str(Path(__file__).parent)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


_REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(json.dumps(BODY)), json.dumps(BODY).encode()))
_BODY_END = b"0\r\n\r\n"   # a chunked body's last chunk


async def _stream_gaps(port: int, requests: int, gaps: list[float]) -> None:
    """Sends `requests` streaming requests one after another on one kept-alive connection and appends the time
    from each token event to the next (events of one read share its time: the client saw them together)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(requests):
            writer.write(_REQUEST)
            last, pending, done = None, b"", False
            while not (done and pending.endswith(_BODY_END)):
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError("server closed the connection mid-stream")
                now = time.perf_counter()
                *events, pending = (pending + data).split(b"\n\n")
                for event in events:   # chunk-size lines of the chunked encoding come along: look for data
                    done = done or b"data: [DONE]" in event
                    if b"data: {" in event:
                        if last is not None:
                            gaps.append(now - last)
                        last = now
    finally:
        writer.close()


def _gap_percentiles(port: int, streams: int, requests_per_stream: int) -> tuple[float, float]:
    gaps: list[float] = []

    async def run():
        await asyncio.gather(*(_stream_gaps(port, requests_per_stream, gaps) for _ in range(streams)))
    asyncio.run(run())
    gaps.sort()
    return gaps[len(gaps) // 2], gaps[int(0.99 * (len(gaps) - 1))]


def _throughput(ports: dict, conns: list[int], args, lua: str) -> None:
    print(f"1. throughput, tokens all ready: median req/s of {args.repeat} wrk runs of {args.duration} s, "
          f"{TOKENS}-token streams")
    print(f"{'conns':>5} {'ours':>7} {'bare':>7} {'bare-1w':>7} {'ours/bare':>9} {'ours/bare-1w':>12}")
    for c in conns:
        runs = {k: [] for k in ports}
        for _ in range(args.repeat):   # alternate, so a noisy neighbour hits all alike
            for k, port in ports.items():
                runs[k].append(wrk_rps(port, c, args.duration, lua))
        rps = {k: statistics.median(v) for k, v in runs.items()}
        print(f"{c:>5} {rps['ours']:>7.0f} {rps['bare']:>7.0f} {rps['bare-1w']:>7.0f} "
              f"{rps['ours'] / rps['bare']:>9.2f} {rps['ours'] / rps['bare-1w']:>12.2f}")


def _latency(ports: dict, conns: list[int], args) -> None:
    print(f"\n2. per-token gaps, tokens paced every {args.interval_ms:g} ms: p50 and p99 in ms over "
          f"{args.paced_requests} streams per connection, median of {args.paced_repeat} runs")
    print(f"{'conns':>5} {'ours p50':>8} {'bare p50':>8} {'ours p99':>8} {'bare p99':>8} {'p99 ours/bare':>13}")
    for c in conns:
        runs = {k: [] for k in ports}
        for _ in range(args.paced_repeat):   # a p99 is one noisy moment: the median of several runs
            for k, port in ports.items():
                runs[k].append(_gap_percentiles(port, c, args.paced_requests))
        p50 = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        p99 = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
        print(f"{c:>5} {p50['ours'] * 1e3:>8.2f} {p50['bare'] * 1e3:>8.2f} {p99['ours'] * 1e3:>8.2f} "
              f"{p99['bare'] * 1e3:>8.2f} {p99['ours'] / p99['bare']:>13.2f}")


async def _count_writes(port: int, body: dict, requests: int, writes: list[int], tokens: list[int]) -> None:
    """Sends `requests` streaming requests one after another on one kept-alive connection; appends each one's
    count of HTTP chunks (one per server write) and of token events."""
    payload = json.dumps(body).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(requests):
            writer.write(request)
            await reader.readuntil(b"\r\n\r\n")          # the response head (chunked: SSE)
            chunks = events = 0
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks += 1
                events += data.count(b'"finish_reason":')
            writes.append(chunks)
            tokens.append(events)
    finally:
        writer.close()


def _writes_per_stream(port: int, body: dict, streams: int, requests_per_stream: int) -> tuple[float, float]:
    writes: list[int] = []
    tokens: list[int] = []

    async def run():
        await asyncio.gather(*(_count_writes(port, body, requests_per_stream, writes, tokens)
                               for _ in range(streams)))
    asyncio.run(run())
    return statistics.mean(writes), statistics.mean(tokens)


def _sim_ready(conns: list[int], args, speed: float, lua: str) -> None:
    ports, procs = _serving(["sim", "sim-plain"], sim_speed=speed)
    try:
        print(f"\n3. sim backend at speed {speed:g} (virtual seconds per wall second), {TOKENS}-token streams: "
              f"ready() vs hidden (one write per token); HTTP writes per stream "
              f"({args.paced_requests} streams per connection), median req/s of {args.repeat} wrk runs of "
              f"{args.duration} s")
        print(f"{'conns':>5} {'tokens':>6} {'writes':>7} {'w/o':>7} {'w/o:with':>8} {'req/s':>7} {'w/o':>7} "
              f"{'with/w/o':>8}")
        for c in conns:
            (w_ready, tok), (w_plain, tok_plain) = (_writes_per_stream(ports[k], SIM_BODY, c, args.paced_requests)
                                                    for k in ("sim", "sim-plain"))
            assert tok == tok_plain == TOKENS, (tok, tok_plain)
            runs = {k: [] for k in ports}
            for _ in range(args.repeat):   # alternate, so a noisy neighbour hits both alike
                for k, port in ports.items():
                    runs[k].append(wrk_rps(port, c, args.duration, lua))
            rps = {k: statistics.median(v) for k, v in runs.items()}
            print(f"{c:>5} {tok:>6.0f} {w_ready:>7.1f} {w_plain:>7.1f} {w_plain / w_ready:>8.1f} "
                  f"{rps['sim']:>7.0f} {rps['sim-plain']:>7.0f} {rps['sim'] / rps['sim-plain']:>8.2f}")
    finally:
        _stop(procs)


def _serving(kinds: list[str], interval_ms: float = 0.0, sim_speed: float = 1.0):
    from harness.mlx.launcher import free_ports
    ports = dict(zip(kinds, free_ports(len(kinds))))
    return ports, [_start(k, port, interval_ms, sim_speed) for k, port in ports.items()]


def _stop(procs) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds of wrk per point (default %(default)s)")
    p.add_argument("--connections", default="1,16,64", help="comma-separated connection counts")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per point, alternating the servers; the median is printed (default %(default)s)")
    p.add_argument("--interval-ms", type=float, default=10.0, help="token pacing of part 2 (default %(default)s)")
    p.add_argument("--paced-requests", type=int, default=4,
                   help="streams one after another per connection in part 2 (default %(default)s)")
    p.add_argument("--paced-repeat", type=int, default=5,
                   help="runs per point of part 2, alternating; the median p50/p99 is printed (default %(default)s)")
    p.add_argument("--parts", default="1,2,3", help="which parts to run (default %(default)s)")
    p.add_argument("--sim-speeds", default="100,10000",
                   help="sim backend speeds of part 3, virtual seconds per wall second (default %(default)s)")
    p.add_argument("--serve-sim", type=int, metavar="PORT", help=argparse.SUPPRESS)   # part 3's servers
    p.add_argument("--speed", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--no-ready", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_sim is not None:
        sys.path.insert(0, str(ROOT))
        serve_sim(args.serve_sim, args.speed, ready=not args.no_ready)
        return 0
    parts = {int(x) for x in args.parts.split(",")}
    if shutil.which("wrk") is None:
        print("error: wrk not found on PATH; install it (apt-get install -y wrk)", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.connections.split(",")]
    sys.path.insert(0, str(ROOT))
    print("measured, this machine, all servers in this one run")
    if 1 in parts:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(WRK_LUA)
        ports, procs = _serving(["ours", "bare", "bare-1w"])
        try:
            _throughput(ports, conns, args, f.name)
        finally:
            os.unlink(f.name)
            _stop(procs)
    if 2 in parts:
        ports, procs = _serving(["ours", "bare"], args.interval_ms)
        try:
            _latency(ports, conns, args)
        finally:
            _stop(procs)
    if 3 in parts:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(_wrk_lua(SIM_BODY))
        try:
            for speed in (float(x) for x in args.sim_speeds.split(",")):
                _sim_ready(conns, args, speed, f.name)
        finally:
            os.unlink(f.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
