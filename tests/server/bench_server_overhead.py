"""Overhead benchmark (measured, this machine): the server's own cost with the instant backend (zero model
time), and the load generator's own ceiling.

1. Server overhead at 1, 16 and 64 concurrent streams (closed loop, 64-token prompts, 64-token outputs),
   with the server (a) in its own process (`python -m harness serve --backend instant`) and (b) embedded in
   this process on a background thread, as `run` and `bench --target embedded` use it. Reported: requests/s,
   output tokens/s, median TTFT, median TPOT and the mean time per output token of a stream
   (E2EL / tokens): with a zero-cost backend, all of it is HTTP, JSON and scheduling.
2. Load-generator ceiling: a minimal SSE responder in another process (pre-rendered bytes, no framework)
   answers every request; the generator sends at rising constant rates. Reported: offered and achieved
   chunks/s and the p99 dispatch delay; the ceiling is the highest rate with p99 delay under 10 ms and at
   least 95 % of the offered requests/s achieved.

    python tests/server/bench_server_overhead.py [--quick]

No assertions on wall-clock figures: they depend on the machine; it prints them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harness import metrics  # noqa: E402
from harness.backends.instant import InstantBackend  # noqa: E402
from harness.serving.loadgen import LoadMode, Target, run_load_sync  # noqa: E402
from harness.serving.server import EmbeddedServer  # noqa: E402
from harness.workloads import build_workload, parse_workload  # noqa: E402
from tests.server.conftest import free_port, wait_healthy  # noqa: E402




def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# ---------------------------------------------------------------------------------------------- part 1

def overhead_row(url: str, concurrency: int, requests: int) -> dict:
    wl = build_workload(parse_workload(f"all_at_once,n={requests},prompt=64,output=64"))
    result = run_load_sync(Target(url), wl, LoadMode("concurrent", concurrency), warmup=min(concurrency, 8))
    df = result.frame()
    m = metrics.compute(df)
    ok = df[df["success"]]
    per_token = ((ok["end_s"] - ok["start_s"]) / ok["output_tokens"]).mean() * 1e3
    return {"c": concurrency, "req_s": m["request_throughput"], "tok_s": m["output_throughput"],
            "ttft": m["median_ttft_ms"], "tpot": m["median_tpot_ms"], "per_token": per_token,
            "failed": m["failed"]}


def print_overhead(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'streams':>8}{'req/s':>9}{'out tok/s':>11}{'med TTFT ms':>13}{'med TPOT ms':>13}"
          f"{'E2EL/token ms':>15}{'failed':>8}")
    for r in rows:
        print(f"{r['c']:>8}{r['req_s']:>9.1f}{r['tok_s']:>11.0f}{r['ttft']:>13.2f}{r['tpot']:>13.3f}"
              f"{r['per_token']:>15.3f}{r['failed']:>8}")


def server_overhead(levels: list[int], requests: int) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness", "serve", "--backend", "instant", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 30.0)
        rows = [overhead_row(url, c, max(requests, 4 * c)) for c in levels]
    finally:
        proc.terminate()
        proc.wait(10)
    print_overhead("server overhead, instant backend, server in its own process (measured):", rows)
    with EmbeddedServer(InstantBackend()) as server:
        rows = [overhead_row(server.url, c, max(requests, 4 * c)) for c in levels]
    print_overhead("server overhead, instant backend, embedded server thread in the load generator's process "
                   "(measured):", rows)


# ---------------------------------------------------------------------------------------------- part 2

def _sse_body(tokens: int) -> bytes:
    chunk = b'data: {"id":"x","object":"text_completion","created":0,"model":"raw","choices":[{"index":0,' \
            b'"text":" the","logprobs":null,"finish_reason":null}]}\n\n'
    usage = ('data: {"id":"x","object":"text_completion","created":0,"model":"raw","choices":[],'
             f'"usage":{{"prompt_tokens":8,"completion_tokens":{tokens},"total_tokens":{tokens + 8}}}}}\n\n').encode()
    return chunk * tokens + usage + b"data: [DONE]\n\n"


async def _raw_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    bodies: dict[int, bytes] = {}
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length) if length else b""
            if head.startswith(b"GET /v1/models"):
                payload, ctype = b'{"object":"list","data":[{"id":"raw","object":"model"}]}', b"application/json"
            else:
                tokens = int(json.loads(body).get("max_tokens", 16))
                payload = bodies.get(tokens) or bodies.setdefault(tokens, _sse_body(tokens))
                ctype = b"text/event-stream"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _raw_server(port: int) -> None:
    async def main():
        server = await asyncio.start_server(_raw_handler, "127.0.0.1", port)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


def loadgen_ceiling(rates: list[float], tokens: int, seconds: float) -> None:
    port = free_port()
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_server_overhead as b; " \
           f"b._raw_server({port})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_port(port)
        print(f"\nload generator ceiling: raw SSE responder in another process, {tokens} chunks per request, "
              f"constant rate, {seconds:g} s per step (measured):")
        print(f"{'req/s offered':>14}{'req/s done':>12}{'chunks/s offered':>18}{'chunks/s done':>15}"
              f"{'median lag ms':>15}{'p99 lag ms':>12}{'keeps up':>10}")
        ceiling = 0.0
        for rate in rates:
            n = max(int(rate * seconds), 10)
            wl = build_workload(parse_workload(f"all_at_once,n={n},prompt=8,output={tokens}"))
            result = run_load_sync(Target(url), wl, LoadMode("constant", rate), warmup=4)
            df = result.frame()
            done_rate = df["success"].sum() / result.duration_s
            chunks = sum(len(c) for c in df["chunk_times_s"]) / result.duration_s
            lag = result.dispatch_summary()["p99_dispatch_delay_ms"]
            median_lag = float((df["start_s"] - df["scheduled_s"]).median() * 1e3)
            keeps = lag < 10.0 and done_rate >= 0.95 * rate
            ceiling = rate * tokens if keeps else ceiling
            print(f"{rate:>14.0f}{done_rate:>12.1f}{rate * tokens:>18.0f}{chunks:>15.0f}{median_lag:>15.2f}"
                  f"{lag:>12.2f}{'yes' if keeps else 'no':>10}")
            if not keeps:
                break
        print(f"ceiling (measured): about {ceiling:.0f} chunks/s without falling behind schedule")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests per level (a smoke run)")
    args = p.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {load} "
          f"(other work on the machine skews every figure below)")
    server_overhead([1, 16, 64], 64 if args.quick else 256)
    seconds = 1.0 if args.quick else 2.0
    loadgen_ceiling([25, 50, 100, 150, 200, 300, 400, 600, 800], tokens=64, seconds=seconds)
    loadgen_ceiling([10, 20, 40, 60, 80, 120, 160], tokens=512, seconds=seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
