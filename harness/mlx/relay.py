"""A TCP relay that delays every byte by a fixed one-way latency, for link emulation without netem.

    python -m harness.mlx.relay --listen 127.0.0.1:6001 --to 10.213.1.3:5000 --delay-ms 1.0

Each accepted connection is forwarded to `--to`; both directions are delayed by `--delay-ms` (so the
round trip gains twice that). Bandwidth is untouched: rate limits stay with tc on the veths. Data is
forwarded in the order received, each chunk released `delay` after it arrived, so the delay does not
accumulate and a bulk transfer still runs at the link's rate.

Used by the launcher with per-rank ring hostfiles: a rank's own entry is its real listen address, its
neighbours' entries point at relays. A Python relay caps throughput (a few Gbit/s on a small host).
"""
from __future__ import annotations

import argparse
import collections
import os
import socket
import sys
import threading
import time


def _pump(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
    """Copy src -> dst, releasing each chunk delay_s after it arrived."""
    queue: collections.deque = collections.deque()
    cv = threading.Condition()
    done = []

    def reader():
        try:
            while chunk := src.recv(1 << 20):
                with cv:
                    queue.append((time.monotonic() + delay_s, chunk))
                    cv.notify()
        except OSError:
            pass
        with cv:
            done.append(True)
            cv.notify()

    threading.Thread(target=reader, daemon=True).start()
    try:
        while True:
            with cv:
                while not queue and not done:
                    cv.wait()
                if not queue and done:
                    break
                due, chunk = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _nodelay(s: socket.socket) -> socket.socket:
    # small ring messages must not wait for Nagle: the relay would add 40 ms, not `delay`
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _connect(target: tuple[str, int], patience_s: float = 60.0) -> socket.socket | None:
    # the peer rank may still be starting: keep trying, so the rank that connected through us does not
    # see its connection accepted and then dropped
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection(target, timeout=5)
            s.settimeout(None)
            return s
        except OSError:
            time.sleep(0.1)
    return None


def serve(listen: tuple[str, int], target: tuple[str, int], delay_s: float, ready_fd: int | None = None) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(listen)
    server.listen(16)
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
    while True:
        client, _ = server.accept()
        upstream = _connect(target)
        if upstream is None:
            client.close()
            continue
        _nodelay(client), _nodelay(upstream)
        threading.Thread(target=_pump, args=(client, upstream, delay_s), daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, client, delay_s), daemon=True).start()


def _addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.mlx.relay")
    p.add_argument("--listen", required=True, type=_addr)
    p.add_argument("--to", required=True, type=_addr)
    p.add_argument("--delay-ms", type=float, default=0.0)
    args = p.parse_args(argv)
    from harness.mlx.worker import _exit_with_parent
    _exit_with_parent()   # exit with the launcher, like the ranks
    serve(args.listen, args.to, args.delay_ms / 1e3, ready_fd=sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
