"""Pipeline hops between tensor-parallel stages, over plain TCP between the stages' ranks.

Why not MLX's own send/recv: a plan that pipelines tensor-parallel stages needs one all-sum group per
stage AND point-to-point hops between stages. MLX's ring backend is initialised once per process and
cannot split its group, so each TP stage gets its own ring (its members' all-sums), and the hidden state
crosses from stage to stage here instead:

- the leader (member 0) of stage s sends its output to every member of stage s+1 (each member of a TP
  stage needs the full input, and every member ends its layers with the same full hidden state);
- the leader of the last stage sends the final hidden state to every rank of the earlier stages, as
  mlx-lm's pipeline all_gather does, so every rank computes the same logits and samples the same tokens.

The driver starts each rank with HARNESS_HOPS = {"rank": g, "stages": [[g, ...] per stage], "addrs":
["ip:port" per rank]}: global ranks in layer order, members in order. Messages are an 8-byte length and
the array's raw bytes; the receiver knows the shape and dtype (it is the shape of its own embedding).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

_LEN = struct.Struct("!Q")
_HELLO = struct.Struct("!I")


def hops_env(rank: int, stages: list[list[int]], addrs: list[str]) -> dict[str, str]:
    return {"HARNESS_HOPS": json.dumps({"rank": rank, "stages": stages, "addrs": addrs})}


class Hops:
    def __init__(self, rank: int, stages: list[list[int]], addrs: list[str]):
        self.rank, self.stages, self.addrs = rank, stages, addrs
        self.stage = next(s for s, members in enumerate(stages) if rank in members)
        self.member = stages[self.stage].index(rank)
        self.last = len(stages) - 1
        self.size = len(addrs)
        # two connections between a pair that talks both ways (stage 0's leader and the last stage's):
        # each direction has its own socket, so a send never lands on a socket the peer does not read
        self.outgoing: dict[int, socket.socket] = {}
        self.incoming: dict[int, socket.socket] = {}
        self._listener: socket.socket | None = None

    @classmethod
    def from_env(cls) -> "Hops | None":
        raw = os.environ.get("HARNESS_HOPS")
        if not raw:
            return None
        cfg = json.loads(raw)
        return cls(int(cfg["rank"]), [list(m) for m in cfg["stages"]], list(cfg["addrs"]))

    def leader(self, stage: int) -> int:
        return self.stages[stage][0]

    def targets(self) -> list[int]:
        """Ranks this rank sends to: the next stage's members, or (last leader) every earlier rank."""
        if self.member != 0:
            return []
        if self.stage < self.last:
            return list(self.stages[self.stage + 1])
        return [g for members in self.stages[:-1] for g in members]

    def sources(self) -> list[int]:
        """Ranks that send to this rank: the previous stage's leader, and the last stage's leader."""
        out = [self.leader(self.stage - 1)] if self.stage > 0 else []
        if self.stage < self.last and self.leader(self.last) not in out:
            out.append(self.leader(self.last))
        return out

    # ------------------------------------------------------------------ setup
    def listen(self) -> None:
        host, port = self.addrs[self.rank].rsplit(":", 1)
        self._listener = socket.create_server((host, int(port)), backlog=len(self.addrs))
        expected = len(self.sources())
        self._accept_thread = threading.Thread(target=self._accept, args=(expected,), daemon=True)
        self._accept_thread.start()

    def _accept(self, expected: int) -> None:
        while len(self.incoming) < expected:
            conn, _ = self._listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            (sender,) = _HELLO.unpack(_read_exact(conn, _HELLO.size))
            self.incoming[sender] = conn

    def connect(self, timeout_s: float = 120.0) -> None:
        """Connect to every target (retrying while they start), then wait for every source."""
        deadline = time.monotonic() + timeout_s
        for g in self.targets():
            self.outgoing[g] = _connect(self.addrs[g], deadline)
            self.outgoing[g].sendall(_HELLO.pack(self.rank))
        self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        missing = [g for g in self.sources() if g not in self.incoming]
        if missing:
            raise SystemExit(f"rank {self.rank}: ranks {missing} did not connect within {timeout_s:.0f} s")

    # ------------------------------------------------------------------ transfers
    def send(self, arr) -> None:
        data = _to_bytes(arr)
        for g in self.targets():
            self.outgoing[g].sendall(_LEN.pack(len(data)) + data)

    def recv(self, source: int, like):
        conn = self.incoming[source]
        (n,) = _LEN.unpack(_read_exact(conn, _LEN.size))
        return _from_bytes(_read_exact(conn, n), like)


def _connect(addr: str, deadline: float) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _read_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("a pipeline peer closed its connection (its rank exited)")
        got += k
    return bytes(buf)


def _to_bytes(arr) -> bytes:
    import mlx.core as mx
    import numpy as np
    if arr.dtype == mx.bfloat16:        # numpy has no bfloat16: ship the raw 16-bit words
        arr = arr.view(mx.uint16)
    return np.asarray(arr).tobytes()


def _from_bytes(data: bytes, like):
    import mlx.core as mx
    import numpy as np
    wire = mx.uint16 if like.dtype == mx.bfloat16 else like.dtype
    np_dtype = {mx.float32: np.float32, mx.float16: np.float16, mx.uint16: np.uint16}[wire]
    flat = np.frombuffer(data, dtype=np_dtype).reshape(like.shape)
    out = mx.array(flat)
    return out.view(mx.bfloat16) if like.dtype == mx.bfloat16 else out
