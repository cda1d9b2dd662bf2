"""`MlxBackend`: the `harness.backends.base.Backend` adapter over real mlx-lm ranks on MLX's ring.

How it works:
- `load()` starts one rank process per pipeline stage (`harness.mlx.launcher`), each loading only its
  layers (`harness.mlx.worker`), and waits for every rank's "ready" line.
- One driver thread runs the engine loop. Each iteration it sends the same "step" command (new requests
  to insert, finished/cancelled ones to remove) to every rank's stdin and reads one reply per rank.
  The ranks run mlx-lm's `BatchGenerator`, so concurrent requests are continuously batched: a new
  request is prefilled while the others keep decoding, then joins the decode batch. Every rank returns
  the same tokens (checked); rank replies also carry per-stage timings.
- Tokens go to the waiting `generate()` iterators through their event loop as soon as a step ends.
- Stops (EOS, stop_token_ids, min_tokens, ignore_eos) are decided here, not in the ranks, so all ranks
  see the decision at the same step boundary.
- A rank that exits is noticed within `poll_s` (idle or mid-step): every pending and later request
  fails with `BackendUnavailable` naming the rank, and the other ranks are stopped. Each rank also sends a
  heartbeat every second from a thread of its own; a rank silent for `stall_s` (stopped with SIGSTOP, hung,
  swapping) fails the backend the same way, naming that rank, instead of waiting `step_timeout_s` for a step.

Records: `step_records()` (steps.parquet rows, one per step and stage, plus send/recv rows) and
`request_records()` (requests.parquet rows as seen by the backend), all `source="measured"`, times in
seconds from `run_start_epoch` (set it to the run's t=0; defaults to when load() began).
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import selectors
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from harness.backends.base import (BackendUnavailable, GenerationRequest, InvalidRequest, LoadReport, QueueFull,
                                   QueueStream, TokenEvent, step_frame)
from harness.backends.mlx_cache import RankCache
from harness.mlx import launcher
from harness.mlx.errors import UserError
from harness.mlx.hosts import hosts_for_ranks, preflight
from harness.specs import PartitionPlan


@dataclass
class _Req:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    key: str
    arrival: float                     # time.time()
    uid: int | None = None
    ids: list[int] = field(default_factory=list)
    prefix_off: int = 0                # incremental detokenizing: ids[prefix_off:read_off] is text already sent,
    read_off: int = 0                  # decoded again only as context for the next tokens
    cached: int = 0                    # prompt tokens served from a kept prefix (prefix caching)
    blocks: int = 0                    # KV blocks reserved for it under a KV budget
    save_as: str | None = None         # the kept entry its prompt KV becomes
    first: float | None = None
    end: float | None = None
    finish: str | None = None
    cancelled: bool = False
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list)

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:           # the client's event loop is gone: nobody to tell
            pass


class _LineReader:
    """Non-blocking reader of one rank's JSON lines, so a silent rank never blocks the driver. Heartbeats are
    taken as they come (`last_beat`, `beat`); every other line is a reply, queued in order."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = b""
        self.replies: deque[dict] = deque()
        self.last_beat = time.monotonic()
        self.beat: dict = {}
        os.set_blocking(fd, False)

    def feed(self) -> bool:
        """Read what the pipe holds; False at EOF (the rank closed its stdout: it exited)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if msg.get("op") == "beat":
                self.last_beat, self.beat = time.monotonic(), msg
            else:
                self.replies.append(msg)
        return True


def _plan_of(plan_or_split) -> PartitionPlan | None:
    """The PartitionPlan among MlxBackend's accepted forms (a plan, a plan.json dict, a split list, None)."""
    if isinstance(plan_or_split, dict) and "stages" in plan_or_split:   # a plan.json from a run folder
        return PartitionPlan.from_dict(plan_or_split)
    return plan_or_split if isinstance(plan_or_split, PartitionPlan) else None


@dataclass(frozen=True)
class RankLayout:
    """Which stage and node each rank process runs, from a plan or a plain split.

    Pipeline: one rank per stage, rank r runs layer-order stage size-1-r (mlx-lm's order). Tensor parallel
    (one stage of K members): K ranks, rank r is member r. Pipelined TP stages: ranks in layer order,
    members in order (`harness.mlx.hops`)."""
    split: list[int]                  # layer counts per stage, layer order
    stage_names: list[str]            # one unique name per stage ("a+b" for a TP pair)
    rank_stage: list[int]             # stage of each rank, rank order
    rank_node: list[str]              # node of each rank, rank order
    stage_tp: list[int] | None = None  # TP degree per stage; None: all 1

    @property
    def ranks(self) -> int:
        return len(self.rank_stage)

    @property
    def tp_degree(self) -> int:
        return max(self.stage_tp or [1])


def rank_layout(plan_or_split, config: dict) -> RankLayout:
    """The ranks a plan (or split) needs on the ring backend; a plan they cannot run fails here, before any
    rank starts, with what to change."""
    model_layers = int(config["num_hidden_layers"])
    if plan_or_split is None:
        return RankLayout([model_layers], ["local"], [0], ["local"])
    if (plan := _plan_of(plan_or_split)) is not None:
        counts, members = list(plan.split()), [list(s.nodes) for s in plan.stages]
        tp = max(s.tp_degree for s in plan.stages)
    else:
        counts = [int(c) for c in plan_or_split]
        members, tp = [[f"stage{i}"] for i in range(len(counts))], 1
    if any(c <= 0 for c in counts) or sum(counts) != model_layers:
        raise UserError(f"layer split {counts} must be positive and sum to the model's {model_layers} layers")
    names = _unique(["+".join(m) for m in members])
    if tp == 1:
        n = len(counts)
        stages = [n - 1 - r for r in range(n)]
        return RankLayout(counts, names, stages, [names[s] for s in stages])
    for k in sorted({len(m) for m in members} - {1}):
        _check_tp_shapes(config, k)
    rank_stage = [s for s, m in enumerate(members) for _ in m]
    return RankLayout(counts, names, rank_stage, _unique([n for m in members for n in m]),
                      [len(m) for m in members])


def _check_tp_shapes(config: dict, tp: int) -> None:
    # shard() splits heads and MLP columns evenly; a remainder would silently drop part of the model
    heads = int(config["num_attention_heads"])
    fields = {"num_attention_heads": heads, "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
              "intermediate_size": int(config["intermediate_size"])}
    bad = [f"{k} = {v}" for k, v in fields.items() if v % tp]
    if bad:
        raise UserError(f"tensor parallel over {tp} ranks needs {', '.join(fields)} divisible by {tp}; "
                        f"this model has {', '.join(bad)}")


def _unique(names: list[str]) -> list[str]:
    """Node names key the records: a name used twice gets '#2', '#3'."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


class MlxBackend:
    name = "mlx"
    source = "measured"

    def __init__(self, model_path: str | Path, plan_or_split=None, *, model_id: str | None = None,
                 links: list[launcher.LinkShape | None] | None = None, emulate_latency: bool = False,
                 use_blas: bool | str = True,
                 max_running: int = 16, max_waiting: int = 256, prefill_step_size: int = 512,
                 stage_timing: bool = True, step_timeout_s: float = 120.0, load_timeout_s: float = 600.0,
                 poll_s: float = 0.2, stall_s: float = 4.0, seed: int = 0, cache=None,
                 kv_budget_tokens: int | None = None, kv_block_tokens: int = 16, max_records: int = 1_000_000,
                 hosts: list | None = None, replan=None):
        self.model_path = Path(model_path)
        cfg_path = self.model_path / "config.json"
        if not cfg_path.exists():
            raise UserError(f"{self.model_path}: no config.json; build one with `python -m harness model build`")
        self.config = json.loads(cfg_path.read_text())
        self.plan = _plan_of(plan_or_split)
        self.layout = rank_layout(plan_or_split, self.config)
        self.split = self.layout.split
        self.model_id = model_id or self.model_path.name
        self.links, self.use_blas, self.emulate_latency = links, use_blas, emulate_latency
        # real hosts (harness.mlx.hosts), one per rank: mapped now, so a hostfile that misses a node fails first
        self._all_hosts = hosts
        self.hosts = None if hosts is None else hosts_for_ranks(hosts, self.layout.rank_node, self.layout.rank_stage)
        # failover: failed node names -> {"plan", "links", "cache", "kv_budget_tokens"} on the nodes left
        # (DoesNotFit or UserError when none holds the model); None: a failed rank ends serving
        self.replan = replan
        self.failovers: list[dict] = []
        self._failed: frozenset[str] = frozenset()
        self._reloading: str | None = None     # why new requests are refused while the ranks restart
        self.max_running, self.max_waiting = max_running, max_waiting
        self.step_timeout_s, self.load_timeout_s, self.poll_s = step_timeout_s, load_timeout_s, poll_s
        self.stall_s = stall_s
        # prefix caching: a sim.prefix_cache.PrefixCache decides, the ranks keep and reuse the KV
        self.cache = RankCache(cache) if cache is not None else None
        # KV memory: a token budget in blocks, as the simulator's engine keeps it (None: no limit)
        self.kv_block = kv_block_tokens
        self.kv_total = None if kv_budget_tokens is None else kv_budget_tokens // kv_block_tokens
        self.kv_free = self.kv_total
        self.preemptions = 0
        self.worker_args = ["--prefill-step-size", str(prefill_step_size), "--max-batch", str(max_running),
                            "--seed", str(seed)] + ([] if stage_timing else ["--no-stage-timing"])
        self.run_start_epoch: float | None = None
        self._tokenizer = None
        self._group: launcher.RankGroup | None = None
        self._readers: list[_LineReader] = []
        self._ready: list[dict] = []
        self._cv = threading.Condition()
        self._waiting: deque[_Req] = deque()
        self._running: dict[int, _Req] = {}
        self._removals: list[int] = []
        # the newest requests' records (request_records); a long-running `serve` must not grow without bound
        self._all: deque[_Req] = deque(maxlen=max_records)
        self.records_dropped = 0
        self._steps: list[dict] = []
        self._kv_last: dict[str, int] = {}   # KV bytes per node after its latest step (stats() reads it)
        self._step_no = 0
        self._error: BackendUnavailable | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._key_seq = 0
        self._inflight: dict[str, _Req] = {}

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from mlx_lm.utils import load_tokenizer
            self._tokenizer = load_tokenizer(self.model_path, eos_token_ids=self.config.get("eos_token_id"))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text of a chat in the model's own chat template."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def eos_ids(self) -> set[int]:
        return self.tokenizer.eos_token_ids   # mlx-lm keeps them as a set

    # ------------------------------------------------------------------ load
    async def load(self) -> LoadReport:
        return await asyncio.get_running_loop().run_in_executor(None, self.load_sync)

    def load_sync(self) -> LoadReport:
        if self._group is not None:
            raise UserError("this MlxBackend is already loaded; close() it before loading again")
        self.run_start_epoch = self.run_start_epoch or time.time()
        t0 = time.time()
        self.tokenizer  # noqa: B018  (load it now, not on the first request)
        try:
            self._launch()
        except BaseException as exc:
            self._error = exc if isinstance(exc, BackendUnavailable) else BackendUnavailable(f"load failed: {exc}")
            raise
        wall = time.time() - t0
        nodes = self.layout.rank_node
        self._thread = threading.Thread(target=self._drive, name="mlx-backend-driver", daemon=True)
        self._thread.start()
        notes = [f"ranks: {self.layout.ranks}, split in layer order {self.split} (mlx-lm rank order reversed)"
                 + (f", tensor-parallel degree per stage {self.layout.stage_tp} (mlx-lm shard(); "
                    "stages joined by TCP hops when more than one)" if self.layout.tp_degree > 1 else ""),
                 f"BLAS: {self._group.blas_path or 'bundled reference BLAS (slow; apt-get install libopenblas0-pthread)'}",
                 "batching: mlx-lm BatchGenerator (continuous batching) in lockstep on every rank",
                 f"load wall time (all ranks, incl. process start): {wall:.2f} s"]
        if self.hosts is not None:
            notes.append("hosts: " + ", ".join(f"rank {r} on {h.ssh}" + (" (ssh)" if not h.local else "")
                                               for r, h in enumerate(self.hosts)))
        if self.links is not None:
            notes.append("links: tc tbf rate limits per rank; " + (
                "latency added by userspace delay relays (throughput cap a few Gbit/s)" if self.emulate_latency
                else "latency not emulated (no netem in this kernel)"))
        return LoadReport(load_s_per_node={nodes[m["rank"]]: m["load_s"] for m in self._ready},
                          memory_bytes_per_node={nodes[m["rank"]]: m["param_bytes"] for m in self._ready},
                          source="measured", notes=tuple(notes))

    def _launch(self) -> None:
        """Start the layout's ranks and wait for every "ready" (closing them again when one fails)."""
        t0 = time.time()
        if self.hosts is not None:
            preflight(self.hosts, str(self.model_path.resolve()))
        self._group = launcher.launch(self.model_path.resolve(), self.split, links=self.links, use_blas=self.use_blas,
                                      worker_args=self.worker_args, emulate_latency=self.emulate_latency,
                                      stage_tp=self.layout.stage_tp, hosts=self.hosts)
        self._readers = [_LineReader(r.proc.stdout.fileno()) for r in self._group.ranks]
        try:
            self._ready = self._read_all(self.load_timeout_s, "load")
        except BaseException:
            self._group.close(grace_s=0.5)
            raise
        for rd in self._readers:   # heartbeats start with "ready": time them from here
            rd.last_beat = time.monotonic()
        for msg in self._ready:
            self._steps.append(self._row(self._step_no, msg["stage"], self.layout.rank_node[msg["rank"]], "load",
                                         t0, t0 + msg["load_s"], 0, 0, 0))

    # ------------------------------------------------------------------ rank I/O
    def _rank_label(self, rank: int) -> str:
        where = f", host {self.hosts[rank].ssh}" if self.hosts else ""
        return f"rank {rank} (stage {self.layout.rank_stage[rank]}, node {self.layout.rank_node[rank]}{where})"

    def _death(self) -> BackendUnavailable | None:
        dead = self._group.dead() if self._group else []
        if not dead:
            return None
        # a rank killed by a signal is the cause; ranks that then exit on a broken ring link are its echo
        rank, code = min(dead, key=lambda d: (not (d[1] is not None and d[1] < 0), d[0]))
        tail = self._group.ranks[rank].log_tail(600).strip().splitlines()[-3:]
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return _of_rank(rank, BackendUnavailable(f"{self._rank_label(rank)} {why}"
                                                 + (f"; last log: {' | '.join(tail)}" if tail else "")))

    def _stall(self) -> BackendUnavailable | None:
        """The first rank (after loading) whose heartbeat is older than stall_s, as the error that names it."""
        if not self._ready:
            return None
        now = time.monotonic()
        for i, rd in enumerate(self._readers):
            if now - rd.last_beat > self.stall_s:
                state = _process_state(self._group.ranks[i].proc.pid)
                return _of_rank(i, BackendUnavailable(
                    f"{self._rank_label(i)} stalled: no heartbeat for {now - rd.last_beat:.1f} s"
                    + (f" (process state: {state})" if state else "")))
        return None

    def _listen_idle(self) -> None:
        """Take the heartbeats that arrive while no step runs, so a rank that stalls while idle is seen too."""
        for rd in self._readers:
            rd.feed()

    def _send_all(self, cmd: dict) -> None:
        data = (json.dumps(cmd) + "\n").encode()
        for r in self._group.ranks:
            try:
                r.proc.stdin.write(data)
                r.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                time.sleep(self.poll_s)  # give poll() a moment to see the exit code
                raise self._death() or _of_rank(r.rank, BackendUnavailable(
                    f"{self._rank_label(r.rank)}: its input pipe closed"))

    def _read_all(self, timeout_s: float, what: str) -> list[dict]:
        """One JSON line from every rank, in rank order; fails fast when a rank dies."""
        out: list[dict | None] = [None] * len(self._readers)
        sel = selectors.DefaultSelector()
        for i, rd in enumerate(self._readers):
            sel.register(rd.fd, selectors.EVENT_READ, i)
        deadline = time.monotonic() + timeout_s
        try:
            while any(o is None for o in out):
                for i, rd in enumerate(self._readers):
                    if out[i] is None and rd.replies:
                        out[i] = rd.replies.popleft()
                if all(o is not None for o in out):
                    break
                for key, _ in sel.select(timeout=self.poll_s):
                    if not self._readers[key.data].feed():
                        sel.unregister(key.fd)
                if (err := self._death() or self._stall()) is not None:
                    raise err
                if time.monotonic() > deadline:
                    late = [self._rank_label(i) for i, o in enumerate(out) if o is None]
                    raise BackendUnavailable(f"{', '.join(late)} did not answer {what} within {timeout_s:.0f} s")
        finally:
            sel.close()
        return out

    # ------------------------------------------------------------------ engine loop
    def _drive(self) -> None:
        while True:
            try:
                self._serve()
                return
            except BackendUnavailable as exc:
                if not self._fail_over(exc):
                    self._fail(exc)
                    return
            except Exception as exc:  # a bug or protocol error: still fail every request, never hang them
                self._fail(BackendUnavailable(f"mlx backend driver failed: {type(exc).__name__}: {exc}"))
                return

    def _serve(self) -> None:
        while (cmd := self._next_command()) is not None:
            self._send_all(cmd)
            self._absorb(self._read_all(self.step_timeout_s, "a step"))

    # ------------------------------------------------------------------ failover
    def _fail_over(self, exc: BackendUnavailable) -> bool:
        """A rank failed: as the simulator does, every request in flight or waiting gets the error, the plan is
        made again on the nodes left, the ranks restart on it (new arrivals get 503 meanwhile) and serving goes
        on. False when failover is off, the failure names no rank, or the nodes left cannot hold the model."""
        rank = getattr(exc, "rank", None)
        if self.replan is None or rank is None or self._stopping:
            return False
        node, at = self.layout.rank_node[rank].split("#")[0], time.time()
        self._reloading = f"failing over after {node} failed ({exc}): restarting the ranks"
        self._fail_requests(exc)
        self._failed |= {node}
        try:
            self._adopt(self.replan(self._failed))
            self._launch()
        except Exception as why:   # no plan on the nodes left, or the restart failed: this failure ends serving
            self.failovers.append({"failed_node": node, "at_s": at - self._t0(), "error": str(why)})
            return False
        finally:
            self._reloading = None
        self.failovers.append({"failed_node": node, "at_s": at - self._t0(), "reload_s": time.time() - at,
                               "serving_again_s": time.time() - self._t0(),
                               "plan": [{"nodes": list(st.nodes), "layers": [st.layer_start, st.layer_end]}
                                        for st in self.plan.stages]})
        return True

    def _t0(self) -> float:
        return self.run_start_epoch or 0.0

    def _adopt(self, new: dict) -> None:
        """Take the plan made on the nodes left: its ranks, links, cache and KV budget (the old KV died)."""
        self.plan = new["plan"]
        self.layout = rank_layout(self.plan, self.config)
        self.split = self.layout.split
        self.links = new.get("links")
        self.emulate_latency = self.emulate_latency and self.links is not None
        if self._all_hosts is not None:
            self.hosts = hosts_for_ranks(self._all_hosts, self.layout.rank_node, self.layout.rank_stage)
        self.cache = RankCache(new["cache"]) if new.get("cache") is not None else None
        budget = new.get("kv_budget_tokens")
        self.kv_total = None if budget is None else budget // self.kv_block
        self.kv_free = self.kv_total
        self._kv_last.clear()

    def _next_command(self) -> dict | None:
        with self._cv:
            while not (self._stopping or self._waiting or self._running or self._removals):
                self._cv.wait(self.poll_s)
                self._listen_idle()
                if not self._stopping and (err := self._death() or self._stall()) is not None:
                    raise err          # noticed while idle
            if self._stopping:
                return None
            if self.kv_total is not None:
                self._grow_kv()
            removals, self._removals = self._removals, []
            inserts = []
            while self._waiting and len(self._running) + len(inserts) < self.max_running:
                req = self._waiting[0]
                if not req.cancelled and not self._reserve_kv(req):
                    break                # FIFO: wait for KV memory, no overtaking (as the simulator admits)
                self._waiting.popleft()
                if not req.cancelled:
                    inserts.append(req)
            self._inflight = {r.key: r for r in inserts}
            items = [self._insert_item(r) for r in inserts]
        return {"op": "step", "remove": removals, "insert": items,
                "drop": self.cache.take_drops() if self.cache else [],
                "move": self.cache.take_moves() if self.cache else []}

    # ------------------------------------------------------------------ KV budget
    def _kv_blocks(self, req: _Req, ahead: int) -> int:
        """Blocks for its prompt, its tokens so far and `ahead` more."""
        return -(-(len(req.request.prompt) + len(req.ids) + ahead) // self.kv_block)

    def _reserve_kv(self, req: _Req) -> bool:
        if self.kv_total is None:
            return True
        # room for two tokens ahead, as _grow_kv asks of a running request: admitting with less would preempt it
        # again at its next step, before it made any progress
        need = self._kv_blocks(req, 2)
        if need > self.kv_total:         # can never fit: fail it now rather than block the queue forever
            req.cancelled, req.end = True, time.time()
            req.error = f"needs {need * self.kv_block} KV tokens; the budget holds {self.kv_total * self.kv_block}"
            req.deliver(InvalidRequest(req.error))
            return True
        if need > self.kv_free:
            return False
        self.kv_free -= need
        req.blocks = need
        return True

    def _grow_kv(self) -> None:
        """Before a step every running request needs room for one more token: the youngest give their KV
        back (preempted: removed from the ranks, recomputed from prompt + tokens so far when re-admitted)."""
        running = sorted(self._running.values(), key=lambda r: r.arrival)
        extra = {r.key: max(0, self._kv_blocks(r, 2) - r.blocks) for r in running}
        while running and sum(extra[r.key] for r in running) > self.kv_free:
            victim = running.pop()
            self._running.pop(victim.uid, None)
            self._removals.append(victim.uid)
            self.kv_free += victim.blocks
            victim.blocks, victim.uid = 0, None
            self.preemptions += 1
            self._waiting.appendleft(victim)
        for r in running:
            r.blocks += extra[r.key]
            self.kv_free -= extra[r.key]

    def _release_kv(self, req: _Req) -> None:
        if self.kv_total is not None:
            self.kv_free += req.blocks
            req.blocks = 0

    def _insert_item(self, req: _Req) -> dict:
        r = req.request
        item = {"key": req.key, "prompt": list(r.prompt) + req.ids, "max_tokens": r.max_tokens - len(req.ids),
                "temperature": r.temperature, "seed": r.seed}
        if self.cache is not None and not req.ids:
            fields, req.cached = self.cache.plan_insert(r.prompt)
            req.save_as = fields.get("save_as")
            item.update(fields, prompt=list(r.prompt[req.cached:]))   # the ranks prefill only the rest
        return item

    def _absorb(self, replies: list[dict]) -> None:
        now = time.time()
        lead = replies[0]
        for rep in replies[1:]:
            if rep["tokens"] != lead["tokens"]:
                raise BackendUnavailable(f"ranks disagree on step {self._step_no}: rank 0 {lead['tokens']} vs "
                                         f"rank {rep['rank']} {rep['tokens']}")
        with self._cv:
            for key, uid in lead["uids"].items():
                req = self._inflight.pop(key)
                req.uid = uid
                self._running[uid] = req
            for entry, tokens in lead.get("saved", []):
                self.cache.saved(entry, tokens)
            for uid, token, finish in lead["tokens"]:
                req = self._running.get(uid)
                if req is not None:
                    self._emit(req, token, finish, now)
        self._record_step(replies)
        self._step_no += 1

    def _emit(self, req: _Req, token: int, rank_finish: str | None, now: float) -> None:
        r = req.request
        if req.cancelled:
            self._retire(req, rank_finish)
            return
        n = len(req.ids) + 1
        stop = (not r.ignore_eos and n > r.min_tokens and (token in self.eos_ids or token in r.stop_token_ids))
        finish = "stop" if stop else ("length" if (rank_finish == "length" or n >= r.max_tokens) else None)
        req.ids.append(token)
        text = self._delta(req, None if stop else token, final=finish is not None)
        req.first = req.first or now
        req.chunk_times.append(now)
        if finish:
            req.finish, req.end = finish, now
        req.deliver(TokenEvent(token_id=token, text=text, time_s=time.monotonic(), finish_reason=finish,
                               prompt_tokens=len(r.prompt), cached_tokens=req.cached))
        if finish:
            self._retire(req, rank_finish)

    def _retire(self, req: _Req, rank_finish: str | None) -> None:
        self._running.pop(req.uid, None)
        self._release_kv(req)
        if self.cache is not None:
            self.cache.forget(req.save_as)
        if rank_finish is None:
            self._removals.append(req.uid)   # the ranks still hold it: remove at the next step

    def _delta(self, req: _Req, token: int | None, final: bool) -> str:
        """The text the newest token adds (`token` None: a stop token, which adds none). Decodes a short window
        (the last text sent, as context, plus what is new), not the whole output each time, which was quadratic;
        the context keeps word-initial spaces right. An incomplete multi-byte character is held back until its
        last byte arrives or `final`."""
        ids = req.ids if token is not None else req.ids[:-1]
        sent = self.tokenizer.decode(ids[req.prefix_off:req.read_off])
        window = self.tokenizer.decode(ids[req.prefix_off:])
        if window.endswith("\ufffd") and not final:
            return ""
        req.prefix_off, req.read_off = req.read_off, len(ids)
        return window[len(sent):]

    def _record_step(self, replies: list[dict]) -> None:
        for rep in replies:
            stage, node = self.layout.rank_stage[rep["rank"]], self.layout.rank_node[rep["rank"]]
            self._kv_last[node] = rep["kv_bytes"]
            fw = rep["forwards"]
            # one row per stage and step, as the simulator writes: a TP stage's members step together
            if not fw or rep["rank"] != self.layout.rank_stage.index(stage):
                continue
            tokens, batch = sum(f[0] for f in fw), max(f[1] for f in fw)
            decode = all(f[0] == f[1] for f in fw)
            prefill = all(f[0] > f[1] for f in fw)
            kind = "decode" if decode else ("prefill" if prefill else "mixed")
            net_s = sum(e - s for _, s, e in rep["net"])
            row = self._row(self._step_no, stage, node, kind, rep["t0"], rep["t1"], batch, tokens, rep["kv_bytes"])
            row["compute_s"] = (rep["t1"] - rep["t0"]) - net_s
            self._steps.append(row)
            for kind_net, s, e in rep["net"]:
                k = "send" if kind_net == "send" else "recv"   # all_gather waits count as receiving
                self._steps.append(self._row(self._step_no, stage, node, k, s, e, batch, tokens, rep["kv_bytes"]))

    def _row(self, step, stage, node, kind, start, end, batch, tokens, kv) -> dict:
        t0 = self.run_start_epoch or 0.0
        return {"step": step, "stage": stage, "node": node, "kind": kind, "start_s": start - t0,
                "end_s": end - t0, "batch_size": batch, "tokens": tokens, "kv_bytes": kv, "compute_s": float("nan"),
                "source": "measured"}

    def _fail(self, exc: BackendUnavailable) -> None:
        with self._cv:
            self._error = exc
        self._fail_requests(exc)

    def _fail_requests(self, exc: BackendUnavailable) -> None:
        """Every request waiting or running gets `exc`; the ranks are stopped."""
        with self._cv:
            pending = list(self._waiting) + list(self._running.values()) + list(self._inflight.values())
            self._waiting.clear()
            self._running.clear()
            self._inflight.clear()
            self._removals.clear()
        if self._group:
            # stop the survivors first (they may be stuck in a ring recv), then tell the clients
            self._group.close(grace_s=0.2)
        for req in pending:
            req.end = req.end or time.time()
            req.error = str(exc)
            req.deliver(exc)

    # ------------------------------------------------------------------ Backend API
    def generate(self, request: GenerationRequest) -> QueueStream:
        """The request's tokens: a QueueStream, so the server takes every token the driver has delivered and the
        client has not had yet in one write (base.ReadyEvents). The request is checked and queued for the ranks
        on the stream's first `__anext__`."""
        return QueueStream(functools.partial(self._admit, request))

    async def _admit(self, request: GenerationRequest):
        """Checks and queues the request; its token queue and what ends it (QueueStream's start)."""
        self._validate(request)
        with self._cv:
            if self._error is not None:
                raise BackendUnavailable(str(self._error))
            if self._reloading is not None:
                raise BackendUnavailable(self._reloading)
            if self._thread is None:
                raise BackendUnavailable("mlx backend is not loaded (call load() first)")
            # only requests the batch cannot take count: a request waits for the driver's next step anyway
            free = self.max_running - len(self._running) - len(self._inflight)
            unadmitted = len(self._waiting) - max(0, free)
            if unadmitted >= self.max_waiting:
                raise QueueFull(f"{unadmitted} requests waiting beyond the batch's free places "
                                f"(max_waiting={self.max_waiting})")
            self._key_seq += 1
            req = _Req(request, asyncio.get_running_loop(), asyncio.Queue(), f"{self._key_seq}", time.time())
            self._waiting.append(req)
            if len(self._all) == self._all.maxlen:
                self.records_dropped += 1     # the oldest record gives way
            self._all.append(req)
            self._cv.notify()
        return req.queue, functools.partial(self._leave, req)

    def _leave(self, req: _Req) -> None:
        """The stream is over: if the request is neither finished nor failed, its client went away; free its
        batch slot."""
        if req.finish is None and req.error is None:
            with self._cv:
                req.cancelled = True
                req.end = req.end or time.time()
                if req.uid is not None and self._running.pop(req.uid, None) is not None:
                    self._removals.append(req.uid)
                    self._release_kv(req)
                self._cv.notify()

    def _validate(self, request: GenerationRequest) -> None:
        # checked here, not in the ranks: a bad request must fail alone, not crash every rank
        vocab = int(self.config["vocab_size"])
        if not request.prompt:
            raise InvalidRequest("empty prompt: the model needs at least one prompt token")
        if request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {request.max_tokens}")
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt token ids {bad[:5]} are outside this model's vocabulary [0, {vocab})")
        if request.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {request.temperature}")

    def stats(self) -> dict:
        with self._cv:
            out = {"num_requests_running": len(self._running), "num_requests_waiting": len(self._waiting),
                   "preemptions": self.preemptions, "records_dropped": self.records_dropped,
                   "kv_free_tokens": None if self.kv_free is None else self.kv_free * self.kv_block,
                   "steps": self._step_no, "ranks": self.layout.ranks, "split": self.split,
                   "error": str(self._error) if self._error else None,
                   "healthy": (self._error is None and self._reloading is None and self._thread is not None
                               and not self._stopping)}
            if self._reloading is not None:
                out["failing_over"] = self._reloading
            out["kv_cache_bytes"] = dict(self._kv_last)
            if self.failovers:
                out["failovers"] = list(self.failovers)
        out["rank_states"] = self.rank_states()
        if self.cache is not None:
            out["prefix_cache"] = self.cache.stats()
        return out

    def rank_states(self) -> list[dict]:
        """Each rank's node, process, last heartbeat and memory (for /health)."""
        if self._group is None:
            return []
        now = time.monotonic()
        return [{"rank": i, "stage": self.layout.rank_stage[i], "node": self.layout.rank_node[i],
                 "pid": r.proc.pid, "alive": r.proc.poll() is None,
                 "heartbeat_age_s": round(now - rd.last_beat, 3), "rss_bytes": rd.beat.get("rss_bytes")}
                for i, (r, rd) in enumerate(zip(self._group.ranks, self._readers))]

    def step_records(self, t0_unix: float | None = None) -> list[dict]:
        """steps.parquet rows; times from `t0_unix` (a time.time() value, e.g. the load generator's
        start) when given, else from `run_start_epoch`."""
        shift = 0.0 if t0_unix is None else (self.run_start_epoch or 0.0) - t0_unix
        if not shift:
            return [dict(r) for r in self._steps]
        return [r | {"start_s": r["start_s"] + shift, "end_s": r["end_s"] + shift} for r in self._steps]

    def step_table(self, t0_monotonic: float, t0_unix: float):
        return step_frame(self.step_records(t0_unix=t0_unix))   # rank times are time.time() values

    def request_records(self, t0_unix: float | None = None) -> list[dict]:
        t0 = t0_unix if t0_unix is not None else (self.run_start_epoch or 0.0)
        nan = float("nan")
        rows = []
        for r in list(self._all):
            err = "" if r.finish else (r.error or ("cancelled" if r.cancelled else "unfinished"))
            rows.append({"request_id": r.request.request_id, "source": "measured", "scheduled_s": r.arrival - t0,
                         "start_s": r.arrival - t0, "first_token_s": (r.first - t0) if r.first else nan,
                         "end_s": (r.end - t0) if r.end else nan, "prompt_tokens": len(r.request.prompt),
                         "output_tokens": len(r.ids), "cached_tokens": r.cached,
                         "chunk_times_s": [c - t0 for c in r.chunk_times], "success": r.finish is not None,
                         "error": err})
        return rows

    @property
    def ranks(self) -> launcher.RankGroup | None:
        return self._group

    async def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, self.step_timeout_s)
        if self._group is not None:
            self._group.close()


def _of_rank(rank: int, exc: BackendUnavailable) -> BackendUnavailable:
    exc.rank = rank        # which rank failed: failover replans without its node
    return exc


def _process_state(pid: int) -> str:
    """Linux's one-letter process state with its meaning ("T: stopped"), or "" where /proc is absent."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    names = {"T": "stopped", "t": "traced", "D": "in uninterruptible I/O", "Z": "exited", "R": "running", "S": "sleeping"}
    return f"{state}: {names.get(state, 'unknown')}"


def links_for_plan(plan, cluster) -> list[launcher.LinkShape | None]:
    """Per-rank link shapes (rank order) for namespace emulation of a plan's ring on this host.

    A rank's veth carries all its traffic, so it gets the slowest cluster link between its node and its
    ring neighbours (the next stages of a pipeline, the other members of a tensor-parallel stage).
    Loopback links and links between members of the same node are not shaped.
    Rates above about 10 Gbit/s exceed what veth achieves on a small host; latency is applied only
    with `MlxBackend(..., emulate_latency=True)` (delay relays).
    """
    shapes = []
    for node, peers in _rank_peers(plan):
        links = [cluster.link(node, other) for other in set(peers) - {node}]
        links = [l for l in links if l.kind != "loopback"]
        slowest = min(links, key=lambda l: l.bandwidth_gbps, default=None)
        shapes.append(launcher.LinkShape(slowest.bandwidth_gbps, slowest.latency_us) if slowest else None)
    return shapes


def _rank_peers(plan) -> list[tuple[str, list[str]]]:
    """(node, nodes it exchanges data with) per rank, in rank order."""
    if all(s.tp_degree == 1 for s in plan.stages):
        names = [s.nodes[0] for s in reversed(plan.stages)]   # pipeline: rank 0 runs the last stage
        return [(n, [names[i - 1], names[(i + 1) % len(names)]]) for i, n in enumerate(names)]
    members = [list(s.nodes) for s in plan.stages]           # TP: ranks in layer order, members in order
    last = len(members) - 1
    out = []
    for s, nodes in enumerate(members):
        near = [n for t in (s - 1, s, s + 1) if 0 <= t <= last for n in members[t]]
        final = [n for t in range(last) for n in members[t]] if s == last else members[last]
        out += [(n, near + final) for n in nodes]
    return out
