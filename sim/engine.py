"""The serving engine: iteration-level (continuous) batching over a pipeline of stages, in SimPy virtual time.

Scheduling model (the one vLLM uses for pipeline parallelism, "virtual engines"):
- `micro_batches` schedulers (default: one per stage) each own a disjoint set of running sequences. Each
  forms a micro-batch (decodes of its running sequences, plus prefill chunks up to a token budget and a
  sequence cap), sends it through the stages, and forms its next one only when the sampled tokens are back
  at the first stage. With as many micro-batches as stages, every stage can be busy on a different one.
- Stages and links are FIFO servers. A micro-batch's passage is computed when it is formed with the Lindley
  recursion (start = max(arrival, server free), end = start + service), which is exact for FIFO servers
  visited in the same order by every job; so one SimPy event per micro-batch suffices, never one per token
  or per stage. Links are full duplex: one FIFO per direction, occupied for bytes/bandwidth, then the latency
  (plus the profile's software overhead) is pure delay. Activations travel forward; only token ids go back.
- KV memory is a pool of blocks (`kv_block_tokens` tokens) shared by all stages: every stage holds KV for
  its layers of every admitted sequence, so the pool holds min over stages of free bytes / KV bytes per
  token. Admission reserves the whole prompt; decoding grows one block at a time. A request waits while the
  pool is full; when a running batch outgrows the pool the newest sequence is preempted (its KV dropped, its
  prompt and generated tokens recomputed on readmission). Nothing is ever over-committed.
- Tokens are emitted when the last stage finishes (the server sits beside it); the next step of that
  micro-batch starts after the token ids cross back to the first stage.

Driving it incrementally (real-time adapters): `submit()` requests at any virtual time, `advance(until)` the
clock, and receive `on_tokens(time, request_slots, finished_mask)` callbacks per micro-batch. See sim/README.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import simpy

from harness.costmodel import TOKEN_ID_BYTES, DecodeTerms, Profile, hop_latency_s, hop_links, stage_models
from harness.specs import Cluster, ModelSpec, PartitionPlan, UserError
from sim import steady
from sim.costs import kv_pool_tokens

WAITING, RUNNING, DONE, FAILED = 1, 2, 3, 4
# "mlx-lm" reproduces mlx_lm.generate.BatchGenerator, which the real backend runs in lockstep on every rank.
# One iteration: a decode forward over the generation batch; admission into the prompt batch (at most
# prefill_batch prompts, generation + prompt batch at most max_num_seqs); a one-token forward of the prompts whose
# all-but-last tokens were prefilled in an EARLIER iteration (they join the generation batch); one prefill forward of
# up to prefill_step_tokens per remaining prompt. Each forward reads the weights itself; with several stages exactly
# one iteration is in flight (the ranks run it together), so there are no micro-batches.
SCHEDULERS = ("continuous", "mlx-lm")
# "full": one step record per micro-batch and stage (and link send), harness.metrics.STEP_COLUMNS; "summary": only
# per-window aggregates of them (harness.metrics.STEP_SUMMARY_COLUMNS: steps, busy/min/max seconds, tokens per stage,
# kind and step_window_s of virtual time), which skips building and writing the per-step tables
STEP_RECORDS = ("full", "summary")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 128            # sequences per micro-batch
    max_batched_tokens: int = 4096     # token budget per micro-batch (prefill chunk tokens + one per decode)
    chunked_prefill: bool = True       # off: a prompt is prefilled in one go (alone if it exceeds the budget)
    micro_batches: int = 0             # schedulers in flight; 0 = one per stage
    kv_block_tokens: int = 16
    kv_tokens: int = 0                 # cap the KV pool (tokens); 0 = what memory allows
    record_steps: bool = True
    fast_forward: bool = True          # batch runs of identical decode steps into one event (see _fast_forward)
    fast_forward_schedulers: bool = True   # and several schedulers' steady decode at once (sim.steady)
    scheduler: str = "continuous"      # "continuous" (vLLM-like, above) or "mlx-lm" (BatchGenerator, below)
    prefill_batch: int = 8             # mlx-lm: prompts prefilled together in one forward (prefill_batch_size)
    prefill_step_tokens: int = 512     # mlx-lm: tokens of each prompt per prefill forward (prefill_step_size)
    step_records: str = "full"         # "full" or "summary" (per-window aggregates only; see STEP_RECORDS)
    step_window_s: float = 1.0         # summary: virtual seconds per window (a record counts where it starts)

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.step_records not in STEP_RECORDS:
            raise UserError(f"unknown step_records {self.step_records!r}; choose one of {', '.join(STEP_RECORDS)}")
        if not (self.step_window_s > 0 and math.isfinite(self.step_window_s)):
            raise UserError(f"engine step_window_s must be a positive number of seconds, got {self.step_window_s}")
        for name in ("max_num_seqs", "prefill_batch", "prefill_step_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"engine {name} must be >= 1, got {getattr(self, name)}")

    @property
    def hidden_tokens(self) -> int:
        """Tokens a sequence generates before its first visible one: mlx-lm samples the token after the prompt's
        last token asynchronously and hands it out with the NEXT decode step, so each request holds its decode
        slot one step longer than it emits tokens."""
        return 1 if self.scheduler == "mlx-lm" else 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Sched:
    """One scheduler ("virtual engine"): its running decodes and its partially prefilled sequences.

    The decoding sequences' counters live here, aligned with `running`, so a decode step updates a few
    small contiguous arrays instead of gathering from the engine's per-request arrays (the hot loop's cost).
    The engine's arrays are brought up to date (`Engine._sync`) whenever membership changes.
    """
    __slots__ = ("running", "prefilling", "comp", "blk", "nxt", "left", "ctx", "min_left", "flight", "wake",
                 "table")

    def __init__(self):
        self.running = np.empty(0, dtype=np.int64)   # decoding sequences, oldest admission first
        self.prefilling: list[int] = []
        empty = np.empty(0, dtype=np.int64)
        self.comp = self.blk = self.nxt = self.left = empty   # tokens in KV, KV blocks, next token slot, tokens left
        self.ctx = 0                                     # sum over running of (comp + 1): KV read by the next step
        self.min_left = 0
        self.flight = None           # (micro-batch, emit time) in flight; micro-batch None: a fast-forwarded run
        self.wake = None             # the timeout it waits for (sim.steady may replace it by a later one)
        self.table = None            # sim.steady's decode times for the current decoding set


class Engine:
    """Continuous-batching pipeline engine on a SimPy Environment. All state lives here and in `env`."""

    STREAM_ROWS = 65536        # micro-batches buffered before step records go to the step sink

    def __init__(self, env: simpy.Environment, cluster: Cluster, model: ModelSpec, plan: PartitionPlan,
                 profile: Profile, config: EngineConfig = EngineConfig(), start_at: float | None = None,
                 on_tokens=None, on_finish=None, step_sink=None):
        self.env, self.model, self.profile, self.cfg = env, model, profile, config
        self.stages = stage_models(cluster, model, plan)
        self.on_tokens, self.on_finish = on_tokens, on_finish
        self.step_sink = step_sink          # called with pyarrow tables of step records as they fill up
        t0 = env.now if start_at is None else start_at
        self._stage_free = [t0] * len(self.stages)
        self._init_links(cluster)
        self._init_kv(cluster)
        self._init_state()
        n = 1 if config.scheduler == "mlx-lm" else (config.micro_batches or len(self.stages))
        self._join_count = 0               # mlx-lm: how many of the formed iteration's chunks are one-token joins
        self.scheds = [_Sched() for _ in range(n)]
        self._wake = env.event()
        self._idle = 0
        self._step = 0
        self._decode_terms: dict[int, list[DecodeTerms]] = {}   # per batch size, one per stage
        self._prefill_durs: dict[tuple[int, int], list[float]] = {}   # a lone prompt chunk's stage times
        self._init_records()
        self.preemptions = 0
        self.steady_steps = 0               # micro-batches that sim.steady's windows took (the rest one by one)
        self.down: str | None = None        # why the cluster stopped serving (a node failed), once it did
        self.down_node: str | None = None   # which node that was
        self._slow = [1.0] * len(self.stages)   # straggler factor per stage (fault injection)
        self._degraded = False
        self.plan_nodes = {n for st in self.stages for n in st.nodes}
        self._outages: list[tuple[frozenset, float, float]] = []   # link_down windows: (pair, down, up), by down
        self._stage_pairs = [frozenset(frozenset((a, b)) for j, a in enumerate(st.nodes) for b in st.nodes[j + 1:])
                             for st in self.stages]                 # the links inside each TP group
        self.plan_links = set().union(*self._stage_pairs, *self._hop_pairs)
        for s in self.scheds:
            env.process(self._scheduler(s, t0))

    @staticmethod
    def check_fault_nodes(faults, cluster) -> None:
        """UserError for a fault naming a node the cluster lacks, or a link (node, peer) it does not have
        (before anything is simulated)."""
        names = [n.name for n in cluster.nodes]
        for fault in faults:
            where = f"fault {fault['kind']} at {fault['at_s']:g} s"
            for key in ("node", "peer"):
                if key in fault and fault[key] not in names:
                    raise UserError(f"{where}: no node {fault[key]!r} in "
                                    f"cluster {cluster.name}; nodes: {', '.join(names)}")
            if "peer" in fault and not _linked(cluster, fault["node"], fault["peer"]):
                raise UserError(f"{where}: no link between {fault['node']!r} and {fault['peer']!r} in cluster "
                                f"{cluster.name}; a link joins two different nodes")

    def inject(self, fault: dict) -> None:
        """Schedule one fault (virtual seconds from the run's start in fault["at_s"]):
        {"kind": "node_down", "node"}, {"kind": "straggler", "node", "factor"} (that node's stage computes
        `factor` times slower from then on; a TP group steps at its slowest member), or
        {"kind": "slow_link", "node", "peer", "factor"} (the link between them carries 1/factor of its bandwidth),
        or {"kind": "link_down", "node", "peer", "duration_s" (optional)} (see drop_link)."""
        kind = fault["kind"]
        if kind == "node_down":
            self.fail_node_at(fault["node"], fault["at_s"])
        elif kind in ("straggler", "slow_link"):
            self.env.process(self._degrade(fault))
        elif kind == "link_down":
            self.drop_link(fault["node"], fault["peer"], fault["at_s"], fault.get("duration_s"))
        else:
            raise UserError(f"unknown fault kind {kind!r}; known: node_down, straggler, slow_link, link_down")

    def drop_link(self, node: str, peer: str, at_s: float, duration_s: float | None = None) -> None:
        """Fault injection: the link between `node` and `peer` carries nothing from virtual time `at_s`.

        With `duration_s` it is a flap: every transfer that would overlap the outage (a pipeline hop or the
        token-id return between those nodes, or a TP stage whose group holds both, since its all-reduces
        cross the link) waits: one due during it starts when the link is back, one under way pauses for the
        outage and then goes on; requests are delayed, none fails. Without it the drop is permanent: if the
        plan uses the link, the cluster goes down as for a failed node (every unfinished request fails with
        "link A-B down at ...", later ones are refused), and `down_node` is the end that failover treats as
        lost (`end_to_lose`). A link the plan does not use changes nothing.
        """
        pair = frozenset((node, peer))
        if pair not in self.plan_links:
            return                 # no transfer of this plan crosses it: the run stays exactly as it was
        up = at_s + duration_s if duration_s else math.inf
        self._outages.append((pair, at_s, up))
        self._outages.sort(key=lambda outage: outage[1])
        self._degraded = True      # fast-forward plans steps ahead without looking at outage windows
        if math.isinf(up):
            self.env.process(self._link_lost(node, peer, at_s))

    def _link_lost(self, node: str, peer: str, at_s: float):
        if at_s > self.env.now:
            yield self.env.timeout(at_s - self.env.now)
        if not self.down:
            self._go_down(f"link {node}-{peer} down at {at_s:g} s (fault injected)",
                          self.end_to_lose(frozenset((node, peer))))

    def end_to_lose(self, pair: frozenset) -> str:
        """The end of a dropped link that failover treats as failed: the one holding fewer of the plan's layers
        (losing it moves the fewest weights), on a tie the later one in the plan (the first stage, which
        takes the requests in, stays where it is)."""
        order = [n for st in self.stages for n in st.nodes]
        layers = {n: sum(st.end - st.start for st in self.stages if n in st.nodes) for n in pair}
        return min(pair, key=lambda n: (layers[n], -order.index(n)))

    def _through_outages(self, pairs: frozenset, begin: float, busy: float) -> tuple[float, float]:
        """(begin, busy) of a transfer (or TP stage) that needs the links `pairs` for `busy` seconds from
        `begin`, with the flaps in its way: one due while a link is down starts when it is back, one under way
        when it goes down pauses until it is back (TCP and the collectives resume, nothing is resent).
        Permanent drops are left out: the engine goes down at that moment and drops whatever is in flight."""
        for pair, down, up in self._outages:
            if pair not in pairs or math.isinf(up):
                continue
            if down <= begin < up:
                begin = up
            elif begin < down < begin + busy:
                busy += up - down
        return begin, busy

    def _degrade(self, fault: dict):
        if fault["at_s"] > self.env.now:
            yield self.env.timeout(fault["at_s"] - self.env.now)
        factor = float(fault["factor"])
        if fault["kind"] == "straggler":
            for i, st in enumerate(self.stages):
                if fault["node"] in st.nodes:
                    self._slow[i] *= factor
        else:
            pair = {fault["node"], fault["peer"]}
            self._hops = [(k, lat, rate / factor if set(k) == pair else rate) for k, lat, rate in self._hops]
            if self._back is not None and set(self._back[0]) == pair:
                key, lat, rate = self._back
                self._back = (key, lat, rate / factor)
        self._degraded = True      # fast-forward assumes constant step costs: step one by one from here

    def fail_node_at(self, node: str, at_s: float) -> None:
        """Fault injection: `node` fails at virtual time `at_s` (seconds from the run's start). A node the plan
        uses takes its stage down: every unfinished request fails with the reason recorded, later ones are
        refused. A node outside the plan changes nothing, as on a real cluster."""
        self.env.process(self._node_down(node, at_s))

    def _node_down(self, node: str, at_s: float):
        if at_s > self.env.now:
            yield self.env.timeout(at_s - self.env.now)
        if node not in self.plan_nodes or self.down:
            return
        self._go_down(f"node {node} failed at {at_s:g} s (fault injected)", node)

    def _go_down(self, reason: str, node: str) -> None:
        """The cluster stops serving: every unfinished request fails with `reason`, later ones are refused;
        `node` is the one failover plans without."""
        self.down = reason
        self.down_node = node
        for sc in self.scheds:
            self._sync(sc)
            self._set_running(sc, np.empty(0, dtype=np.int64))
            sc.prefilling.clear()
        self.waiting.clear()
        for slot in np.flatnonzero((self.status[:self.n] == WAITING) | (self.status[:self.n] == RUNNING)):
            self.free_blocks += int(self.blocks[slot])
            self.blocks[slot] = 0
            self._fail(int(slot), self.down)

    # ------------------------------------------------------------------ construction

    def _init_links(self, cluster: Cluster) -> None:
        fwd, back = hop_links(cluster, self.stages)
        # (direction key, latency s, bytes per s) per forward hop, and for the token-id return; the fixed cost is
        # the planner's (hop_latency_s: by transport), so a plan's predicted hop and the simulated one agree
        self._hops = [((a.nodes[0], b.nodes[0]), hop_latency_s(l, self.profile), l.bandwidth_gbps * 1e9 / 8)
                      for (a, b), l in zip(zip(self.stages, self.stages[1:]), fwd)]
        self._back = None if back is None else (
            (self.stages[-1].nodes[0], self.stages[0].nodes[0]), hop_latency_s(back, self.profile),
            back.bandwidth_gbps * 1e9 / 8)
        self._hop_pairs = [frozenset([frozenset(key)]) for key, _, _ in self._hops] + \
            ([frozenset([frozenset(self._back[0])])] if self._back is not None else [])
        self._link_free: dict[tuple, float] = {}
        self._act_bytes = self.model.activation_bytes(1)

    def _init_records(self) -> None:
        """Per micro-batch: begin/end on every stage and link (floats), kind/batch/tokens/KV blocks (ints)."""
        self._link_col = 2 * len(self.stages)
        self._rec_base = 0                  # global step number of buffer row 0
        if not self.cfg.record_steps:
            self._rec_times = self._rec_ints = None
            return
        width = self._link_col + 2 * len(self._hops) + (2 if self._back is not None else 0)
        self._summary = self.cfg.step_records == "summary"
        self._summary_parts: list[tuple] = []     # summary: per-block partial aggregates (merged at the end)
        rows = self.STREAM_ROWS if self.step_sink is not None or self._summary else 4096
        self._rec_times = np.zeros((rows, width))
        self._rec_ints = np.zeros((rows, 4), dtype=np.int64)

    def _init_kv(self, cluster: Cluster) -> None:
        tokens = kv_pool_tokens(cluster, self.stages)
        if self.cfg.kv_tokens:
            tokens = min(tokens, self.cfg.kv_tokens)
        self.block = self.cfg.kv_block_tokens
        self.total_blocks = tokens // self.block
        self.free_blocks = self.total_blocks
        self.peak_blocks = 0

    INT_COLUMNS = ("prompt", "target", "generated", "computed", "blocks", "status", "preempted", "tok_off", "cached")
    FLOAT_COLUMNS = ("sched_t", "start_t", "first_t", "end_t")

    def _init_state(self, cap: int = 1024) -> None:
        self.n = 0
        self._cap = cap
        for name in self.INT_COLUMNS:
            setattr(self, name, np.zeros(cap, dtype=np.int64))
        for name in self.FLOAT_COLUMNS:
            setattr(self, name, np.full(cap, math.nan))
        self.request_ids: list[str] = []
        self.errors: dict[int, str] = {}
        self.tok_t = np.full(cap * 64, math.nan)
        self._tok_used = 0
        self.waiting: deque[int] = deque()

    def _grow(self) -> None:
        self._cap *= 2
        for name in self.INT_COLUMNS + self.FLOAT_COLUMNS:
            old = getattr(self, name)
            new = np.zeros(self._cap, dtype=old.dtype) if old.dtype.kind == "i" else np.full(self._cap, math.nan)
            new[:old.size] = old
            setattr(self, name, new)

    # ------------------------------------------------------------------ public API

    def submit(self, prompt_tokens: int, output_tokens: int, request_id: str | None = None,
               scheduled_s: float | None = None, arrived_s: float | None = None, cached_tokens: int = 0) -> int:
        """Hand a request to the engine now (virtual time env.now); returns its slot number.

        `prompt_tokens` is what must be prefilled; `cached_tokens` more came from a prefix cache (recorded
        only). `arrived_s`: when the request reached the server, if earlier than now (it waited for a cache
        load), so its TTFT counts the wait."""
        if prompt_tokens < 1 or output_tokens < 1:
            raise UserError("a request needs at least one prompt and one output token")
        if self.n == self._cap:
            self._grow()
        s = self.n
        self.n += 1
        now = self.env.now
        output_tokens += self.cfg.hidden_tokens   # requests_table drops the hidden ones again
        self.prompt[s], self.target[s] = prompt_tokens, output_tokens
        self.sched_t[s] = now if scheduled_s is None else scheduled_s
        self.start_t[s] = now if arrived_s is None else arrived_s
        self.cached[s] = cached_tokens
        self.tok_off[s] = self._tok_used
        self._tok_used += output_tokens
        if self._tok_used > self.tok_t.size:
            grown = np.full(max(self.tok_t.size * 2, self._tok_used), math.nan)
            grown[:self.tok_t.size] = self.tok_t
            self.tok_t = grown
        self.request_ids.append(request_id or f"req-{s:06d}")
        needed = -(-(prompt_tokens + output_tokens) // self.block)
        if self.down:
            self._fail(s, self.down)
        elif needed > self.total_blocks:
            self._fail(s, f"needs {needed * self.block} KV tokens; the cluster holds {self.total_blocks * self.block}")
        else:
            self.status[s] = WAITING
            self.waiting.append(s)
            self._notify()
        return s

    def cancel(self, s: int) -> None:
        """The client went away: a waiting request leaves the queue (failed, "cancelled by the client"); a
        running one ends at its next token, which frees its batch slot and KV blocks the normal way. A prefill
        chunk already in flight is not taken back."""
        if self.status[s] == WAITING:
            self.waiting.remove(s)
            self._fail(s, "cancelled by the client")
        elif self.status[s] == RUNNING:
            for sc in self.scheds:
                if s in sc.prefilling:
                    self.target[s] = self.generated[s] + 1
                    return
                hit = np.flatnonzero(sc.running == s)
                if hit.size:
                    i = int(hit[0])
                    self.target[s] -= int(sc.left[i]) - 1   # generated = target - left stays what it is
                    sc.left[i] = 1
                    sc.min_left = min(sc.min_left, 1)
                    return

    def free_sequence_slots(self) -> int:
        """Batch places not taken by a running request: a waiting request that fits one is admitted next step."""
        running = int(np.count_nonzero(self.status[:self.n] == RUNNING))
        return max(0, self.cfg.max_num_seqs * len(self.scheds) - running)

    def advance(self, until: float) -> None:
        """Run the simulation up to virtual time `until`, including the events due at exactly `until`."""
        env = self.env
        if until > env.now:
            env.run(until=until)
        # env.run(until=...) leaves its own spent stop event at `now`; stepping past it (and anything else
        # due now) keeps next_event_time() pointing at real work
        while env.peek() <= env.now:
            env.step()

    def next_event_time(self) -> float:
        """Virtual time of the next scheduled event (inf when idle): sleep until then in a real-time loop."""
        return self.env.peek()

    @property
    def kv_capacity_tokens(self) -> int:
        return self.total_blocks * self.block

    def kv_peak_bytes(self) -> dict[str, float]:
        """Peak KV bytes per node over the run."""
        tokens = self.peak_blocks * self.block
        return {n: tokens * st.kv_bytes_per_token_node for st in self.stages for n in st.nodes}

    def unfinished(self) -> int:
        return int(np.count_nonzero(self.status[:self.n] < DONE))

    # ------------------------------------------------------------------ scheduler process

    def _notify(self) -> None:
        if self._idle:
            ev, self._wake = self._wake, self.env.event()
            ev.succeed()

    def _scheduler(self, sc: _Sched, t0: float):
        """One scheduler's loop. Its state between wake-ups lives in `sc` (flight: what lands on the next
        wake-up), so sim.steady can advance it and replace the wake-up it waits for."""
        env = self.env
        if t0 > env.now:
            yield env.timeout(t0 - env.now)
        at_stage = False          # woke from waiting for the first stage: straight back to that check
        while not self.down:
            if not at_stage:
                flight, sc.flight = sc.flight, None
                if flight is not None:
                    self._land(sc, flight)
                if sc.running.size == 0 and not sc.prefilling and not self.waiting:
                    self._idle += 1                       # nothing to do: sleep until work arrives
                    yield self._wake
                    self._idle -= 1
                    continue
            at_stage = self._stage_free[0] > env.now      # another micro-batch holds the first stage
            if at_stage:
                ev = sc.wake = env.timeout(self._stage_free[0] - env.now)
            elif steady.can_start(self, sc) and steady.run_window(self, sc):
                ev = sc.wake                              # several schedulers' steady decode, in one go
            else:
                ev = self._launch(sc)
                if ev is None:
                    self._idle += 1
                    yield self._wake
                    self._idle -= 1
                    continue
            yield ev
            while ev is not sc.wake:                      # a steady window moved this wake-up later
                ev = sc.wake
                yield ev
            if sc.flight is not None:                     # ... and sent a micro-batch meanwhile
                at_stage = False

    def _launch(self, sc: _Sched):
        """Send this scheduler's next micro-batch (or a fast-forwarded run of them); returns the timeout for its
        token ids coming back, or None when it has nothing to send."""
        env = self.env
        if self._can_fast_forward(sc):
            ff = self._fast_forward(sc)
            if ff is not None:
                t_emit, t_back = ff
                sc.flight = (None, t_emit)
                sc.wake = env.timeout(t_back - env.now)
                return sc.wake
        mb = self._form(sc)
        if mb is None:
            return None
        t_emit, t_back = self._traverse(mb)
        sc.flight = (mb, t_emit)
        sc.wake = env.timeout(t_back - env.now)
        return sc.wake

    def _land(self, sc: _Sched, flight) -> None:
        """Account what came back: a micro-batch's tokens, or the end of a fast-forwarded run."""
        mb, t_emit = flight
        if mb is None:
            self._finish_fast_forward(sc, t_emit)
        else:
            self._complete(sc, mb, t_emit)

    # ------------------------------------------------------------------ fast-forwarding steady decode

    def _steady_decode(self, sc: _Sched) -> bool:
        """What both fast-forwards (this one's and sim.steady's) need: the scheduler only decodes, nobody waits,
        step costs are constant (not degraded) and fast-forward is on. Off when tokens are streamed
        (on_tokens), since a real-time consumer needs each token at its own virtual time."""
        return (self.cfg.fast_forward and not self._degraded and self.on_tokens is None and not self.waiting
                and not sc.prefilling and sc.running.size > 0)

    def _can_fast_forward(self, sc: _Sched) -> bool:
        """Alone in the pipeline with only decodes and nobody waiting: the next steps are fully determined
        until a request finishes or something arrives, so they can be computed in one go."""
        return self._steady_decode(sc) and self._idle == len(self.scheds) - 1

    def _fast_forward(self, sc: _Sched, max_steps: int = 4096):
        """Run k decode steps of this scheduler at once, exactly as k calls of _form/_traverse/_complete would
        (same Lindley state, KV blocks, token times and step records). Returns (last emit, last back), or
        None when fewer than two steps qualify. Steps are taken while (a) nobody finishes before the last one,
        (b) KV blocks last, (c) each step is formed before the next scheduled event (an arrival)."""
        running = sc.running
        n, B = running.size, self.block
        comp, blk = sc.comp, sc.blk
        k = min(sc.min_left, max_steps)
        if k < 2:
            return None
        j = np.arange(k)
        used_new = ((comp[None, :] + j[:, None] + B) // B).sum(axis=1) - int(blk.sum())   # blocks added by step j
        k = min(k, int(np.count_nonzero(used_new <= self.free_blocks)))
        if k < 2:
            return None
        j, used_new = j[:k], used_new[:k]
        ctx = float(sc.ctx) + j * float(n)
        durs = [terms.vector(ctx) for terms in self._stage_decode_terms(n)]
        links = [nbytes / rate + lat for (_, lat, rate), nbytes in
                 zip(self._hops, [n * self._act_bytes] * len(self._hops))]
        back = 0.0 if self._back is None else TOKEN_ID_BYTES * n / self._back[2] + self._back[1]
        trip = sum(durs) + (sum(links) + back) + self.profile.iteration_gap_s
        starts = self.env.now + np.concatenate([[0.0], np.cumsum(trip[:-1])])
        k = min(k, int(np.count_nonzero(starts < self.env.peek())))     # stop at the next outside event
        if k < 2:
            return None
        return self._apply_fast_forward(sc, k, starts[:k], [d[:k] for d in durs], links, back, used_new[:k])

    def _apply_fast_forward(self, sc, k, starts, durs, links, back, used_new):
        running = sc.running
        n = running.size
        t = starts.copy()
        rec = self._rec_times
        if rec is not None:
            row = self._reserve_rows(k)
            rec = self._rec_times
        for i, d in enumerate(durs):
            begin, t = t, t + d
            self._stage_free[i] = float(t[-1])
            if rec is not None:
                rec[row:row + k, 2 * i] = begin
                rec[row:row + k, 2 * i + 1] = t
            if i < len(self._hops):
                key, lat, rate = self._hops[i]
                begin, t = t, t + links[i]
                self._link_free[key] = float(begin[-1] + n * self._act_bytes / rate)
                if rec is not None:
                    rec[row:row + k, self._link_col + 2 * i] = begin
                    rec[row:row + k, self._link_col + 2 * i + 1] = t
        t_emit = t
        if self._back is not None:
            key, lat, rate = self._back
            self._link_free[key] = float(t_emit[-1] + TOKEN_ID_BYTES * n / rate)
            if rec is not None:
                rec[row:row + k, -2] = t_emit
                rec[row:row + k, -1] = t_emit + back
        used0 = self.total_blocks - self.free_blocks
        if rec is not None:
            self._rec_ints[row:row + k] = np.c_[np.zeros(k, np.int64), np.full(k, n), np.full(k, n), used0 + used_new]
        self._step += k
        self.tok_t[sc.nxt[None, :] + np.arange(k)[:, None]] = t_emit[:, None]
        sc.nxt = sc.nxt + k
        sc.comp = sc.comp + k
        sc.left = sc.left - k
        sc.blk = (sc.comp + self.block - 1) // self.block
        sc.ctx += k * n
        sc.min_left -= k
        self.free_blocks -= int(used_new[-1])
        self.peak_blocks = max(self.peak_blocks, self.total_blocks - self.free_blocks)
        return float(t_emit[-1]), float(t_emit[-1] + back + self.profile.iteration_gap_s)

    def _finish_fast_forward(self, sc: _Sched, t_emit: float) -> None:
        if sc.min_left == 0:
            self._retire(sc, sc.left == 0, t_emit)

    # ------------------------------------------------------------------ a scheduler's decoding set

    def _set_running(self, sc: _Sched, slots: np.ndarray) -> None:
        """Make `slots` the decoding set, loading its counters from the engine's arrays."""
        sc.running = slots
        gen = self.generated[slots]
        sc.comp = self.computed[slots]
        sc.blk = self.blocks[slots]
        sc.nxt = self.tok_off[slots] + gen
        sc.left = self.target[slots] - gen
        sc.ctx = int(sc.comp.sum()) + slots.size
        sc.min_left = int(sc.left.min()) if slots.size else 0

    def _sync(self, sc: _Sched) -> None:
        """Write the decoding set's counters back to the engine's arrays."""
        r = sc.running
        if r.size:
            self.computed[r] = sc.comp
            self.blocks[r] = sc.blk
            self.generated[r] = self.target[r] - sc.left

    def _retire(self, sc: _Sched, done: np.ndarray, t: float) -> None:
        """Finish the decoding sequences selected by `done` at time t and drop them from the set."""
        self._sync(sc)
        finished = sc.running[done]
        self._set_running(sc, sc.running[~done])
        self._finish(finished, t)

    # ------------------------------------------------------------------ forming a micro-batch

    def _form(self, sc: _Sched):
        if self.cfg.scheduler == "mlx-lm":
            return self._form_batchgen(sc)
        running = self._grow_running(sc)
        budget = self.cfg.max_batched_tokens - running.size
        slots_left = self.cfg.max_num_seqs - running.size - len(sc.prefilling)
        chunks: list[tuple[int, int, int]] = []        # (slot, tokens this step, tokens cached before)
        for s in sc.prefilling:
            if budget <= 0:
                break
            pending = int(self.prompt[s] + self.generated[s] - self.computed[s])
            chunk = min(pending, budget) if self.cfg.chunked_prefill else pending
            chunks.append((s, chunk, int(self.computed[s])))
            budget -= chunk
        budget = self._admit(sc, chunks, budget, slots_left, running.size)
        if running.size == 0 and not chunks:
            return None
        self.peak_blocks = max(self.peak_blocks, self.total_blocks - self.free_blocks)
        return running, chunks, float(sc.ctx)

    def _form_batchgen(self, sc: _Sched):
        """One BatchGenerator iteration: (generation batch, prompt chunks then one-token joins, KV read)."""
        running = self._grow_running(sc)
        if running.size >= self.cfg.max_num_seqs:     # mlx-lm: hands full with decoding, no prompt work
            self._join_count = 0
            return (running, [], float(sc.ctx)) if running.size else None
        room = min(self.cfg.prefill_batch - len(sc.prefilling), self.cfg.max_num_seqs - running.size)
        self._admit(sc, [], 1 << 62, room, running.size)      # the chunks it proposes are recomputed below
        # mlx-lm splits off, after admission, the prompts left with only their last token (a 1-token prompt at once)
        joins = [s for s in sc.prefilling if self._to_prefill(s) == 1]
        chunks = [(s, min(self._to_prefill(s) - 1, self.cfg.prefill_step_tokens), int(self.computed[s]))
                  for s in sc.prefilling if s not in joins and self._to_prefill(s) > 1]
        chunks += [(s, 1, int(self.computed[s])) for s in joins]
        self._join_count = len(joins)
        if running.size == 0 and not chunks:
            return None
        self.peak_blocks = max(self.peak_blocks, self.total_blocks - self.free_blocks)
        return running, chunks, float(sc.ctx)

    def _to_prefill(self, s: int) -> int:
        """Tokens of a sequence's prompt (or recompute) not in its KV cache yet."""
        return int(self.prompt[s] + self.generated[s] - self.computed[s])

    def _batchgen_durs(self, n_dec: int, ctx_sum: float, chunks: list) -> list[float]:
        """Every stage's time in one mlx-lm iteration: its decode, prefill and join forwards one after another.
        A join forward is one new token per sequence over its cached prompt: a decode forward, priced as one (the
        prefill compute ramp, fitted on prompt chunks, does not reach down to one token)."""
        k = self._join_count
        durs = self._decode_durs(n_dec, ctx_sum) if n_dec else [0.0] * len(self.stages)
        prompts, joins = chunks[:len(chunks) - k], chunks[len(chunks) - k:]
        if prompts:
            pairs = [(t, c) for _, t, c in prompts]
            durs = [d + st.mixed_s(self.model, self.profile, 0, 0.0, pairs) for d, st in zip(durs, self.stages)]
        if joins:
            durs = [d + j for d, j in zip(durs, self._decode_durs(len(joins), sum(c + 1 for _, _, c in joins)))]
        return durs

    def _grow_running(self, sc: _Sched) -> np.ndarray:
        """Reserve one more KV slot for every decode; preempt the newest sequences when the pool is short."""
        running = sc.running
        if running.size == 0:
            return running
        if running.size == 1:                 # the common light-load case: scalar arithmetic is ~8x cheaper
            need1 = int(sc.comp[0]) // self.block + 1 - int(sc.blk[0])
            if need1 <= self.free_blocks:
                if need1:
                    sc.blk[0] += need1
                    self.free_blocks -= need1
                return running
        need = (sc.comp + self.block) // self.block - sc.blk
        total = int(need.sum())
        if total > self.free_blocks:
            self._sync(sc)
            while total > self.free_blocks and running.size:
                victim = int(running[-1])
                total -= int(need[-1])
                running, need = running[:-1], need[:-1]
                self._preempt(victim)
            self._set_running(sc, running)
        if total:
            sc.blk += need
            self.free_blocks -= total
        return running

    def _preempt(self, s: int) -> None:
        self.free_blocks += int(self.blocks[s])
        self.blocks[s] = 0
        self.computed[s] = 0
        self.preempted[s] += 1
        self.preemptions += 1
        self.status[s] = WAITING
        self.waiting.appendleft(s)   # first in line again: it was admitted before anyone still waiting

    def _admit(self, sc: _Sched, chunks: list, budget: int, slots_left: int, n_dec: int) -> int:
        """Move waiting requests into this scheduler while budget, sequence slots and KV blocks last."""
        waiting = self.waiting
        while waiting and slots_left > 0 and (budget > 0 or not self.cfg.chunked_prefill):
            s = waiting[0]
            todo = int(self.prompt[s] + self.generated[s])   # a preempted request recomputes its output so far
            if self.cfg.chunked_prefill:
                chunk = min(todo, budget)
            elif todo <= budget or (n_dec == 0 and not chunks):
                chunk = todo                                     # an oversized prompt runs alone
            else:
                break
            blocks = -(-todo // self.block)
            if blocks > self.free_blocks:
                break                                            # wait for memory; FIFO, no overtaking
            waiting.popleft()
            self.blocks[s] = blocks
            self.free_blocks -= blocks
            self.status[s] = RUNNING
            sc.prefilling.append(s)
            chunks.append((s, chunk, 0))
            budget -= chunk
            slots_left -= 1
        return budget

    # ------------------------------------------------------------------ timing one micro-batch

    def _traverse(self, mb) -> tuple[float, float]:
        """Lindley recursion through stages and links; returns (tokens ready, token ids back at stage 0)."""
        running, chunks, ctx_sum = mb          # ctx_sum: KV the decodes read, each including its new token
        n_dec = int(running.size)
        if self.cfg.scheduler == "mlx-lm":
            tokens = n_dec + sum(t for _, t, _ in chunks)
            durs = self._batchgen_durs(n_dec, ctx_sum, chunks)
        elif chunks:
            pairs = [(t, c) for _, t, c in chunks]
            tokens = n_dec + sum(t for t, _ in pairs)
            if n_dec == 0 and len(pairs) == 1:    # a prompt chunk alone: its times depend on (tokens, context) only
                durs = self._prefill_durs.get(pairs[0])
                if durs is None:
                    if len(self._prefill_durs) >= 4096:
                        self._prefill_durs.clear()
                    durs = self._prefill_durs[pairs[0]] = [st.mixed_s(self.model, self.profile, 0, ctx_sum, pairs)
                                                           for st in self.stages]
            else:
                durs = [st.mixed_s(self.model, self.profile, n_dec, ctx_sum, pairs) for st in self.stages]
        else:
            tokens = n_dec
            durs = self._decode_durs(n_dec, ctx_sum)
        rec = self._rec_times
        t = self.env.now
        free, link_free = self._stage_free, self._link_free
        act = tokens * self._act_bytes
        sv, lv = [], []                       # begin/end per stage and per link, in record column order
        last = len(durs) - 1
        slow, outages = self._slow, self._outages
        for i, dur in enumerate(durs):
            begin = t if t > free[i] else free[i]
            busy = dur * slow[i]
            if outages:
                begin, busy = self._through_outages(self._stage_pairs[i], begin, busy)
            t = begin + busy
            free[i] = t
            sv += (begin, t)
            if i < last:                      # inline of _send: FIFO per direction, then pure latency
                key, latency, rate = self._hops[i]
                lf = link_free.get(key, t)
                begin = t if t > lf else lf
                if outages:
                    begin, busy = self._through_outages(self._hop_pairs[i], begin, act / rate)
                    done = begin + busy
                else:
                    done = begin + act / rate
                link_free[key] = done
                t = done + latency
                lv += (begin, t)
        t_emit = t
        if self._back is not None:
            begin, t = self._send(self._back, TOKEN_ID_BYTES * (n_dec + len(chunks)), t)
            lv += (begin, t)
        if rec is not None:
            row = self._reserve_rows(1)
            self._rec_times[row] = sv + lv
            prompt_work = len(chunks) - (self._join_count if self.cfg.scheduler == "mlx-lm" else 0)
            # as the real backend labels an iteration: one-token joins are decode-like forwards
            kind = 0 if not prompt_work else (1 if n_dec == 0 and prompt_work == len(chunks) else 2)
            self._rec_ints[row] = (kind, self._row_batch(n_dec, len(chunks)), tokens,
                                   self.total_blocks - self.free_blocks)
        self._step += 1
        return t_emit, t + self.profile.iteration_gap_s

    def _row_batch(self, n_dec: int, n_chunks: int) -> int:
        """A step row's batch_size: continuous runs one forward of everything; mlx-lm runs a forward each for
        the decodes, the prompts and the joins, and the real backend records the largest one."""
        if self.cfg.scheduler != "mlx-lm":
            return n_dec + n_chunks
        return max(n_dec, n_chunks - self._join_count, self._join_count)

    def _decode_durs(self, n: int, ctx: float) -> list[float]:
        """Every stage's decode step time for n sequences reading ctx tokens of KV in all."""
        return [terms.at(ctx) for terms in self._stage_decode_terms(n)]

    def _stage_decode_terms(self, n: int) -> list[DecodeTerms]:
        """The stages' decode terms for batch size n, computed once per size: this runs once per engine step."""
        terms = self._decode_terms.get(n)
        if terms is None:
            terms = self._decode_terms[n] = [st.decode_terms(self.model, self.profile, n) for st in self.stages]
        return terms

    def _reserve_rows(self, k: int) -> int:
        """Buffer row for the next k step records: hand full buffers to the step sink (streaming), or grow."""
        row = self._step - self._rec_base
        cap = self._rec_times.shape[0]
        if row + k <= cap:
            return row
        if self.step_sink is not None or self._summary:
            self.flush_steps()
            if k <= cap:
                return 0
            row = 0                           # a run longer than the whole buffer: grow it
        size = max(cap * 2, row + k)
        for name in ("_rec_times", "_rec_ints"):
            old = getattr(self, name)
            new = np.zeros((size, old.shape[1]), dtype=old.dtype)
            new[:row] = old[:row]
            setattr(self, name, new)
        return row

    def flush_steps(self) -> None:
        """Send the buffered step records to the sink (summary: into the window aggregates) and empty the buffer."""
        if self._rec_times is None or self._step == self._rec_base:
            return
        if self._summary:
            self._summarise_block()
            self._rec_base = self._step
        elif self.step_sink is not None:
            self.step_sink(self.steps_table())
            self._rec_base = self._step

    def _record_rows(self):
        """(micro-batches m, their times, their ints, the stage of each begin/end column pair) of the buffer:
        a pair per stage, then one per link send (its sending stage)."""
        m = self._step - self._rec_base
        return m, self._rec_times[:m], self._rec_ints[:m], self._record_stages()

    def _record_stages(self) -> np.ndarray:
        p = len(self.stages)
        senders = list(range(len(self._hops))) + ([p - 1] if self._back is not None else [])
        return np.array(list(range(p)) + senders, dtype=np.int64)

    def _summarise_block(self) -> None:
        """Aggregate the buffered micro-batches per (window, record column, kind): runs of equal keys in formation
        order, merged across blocks and runs in step_summary_table."""
        m, times, ints, stage = self._record_rows()
        p, width = len(self.stages), self.cfg.step_window_s
        kv = ints[:, 3]
        for r in range(stage.size):
            start, end = times[:, 2 * r], times[:, 2 * r + 1]
            kind = ints[:, 0] if r < p else np.full(m, 3, dtype=np.int64)
            key = np.floor(start / width).astype(np.int64) * 4 + kind
            first = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1])
            dur = end - start
            self._summary_parts.append((
                key[first], np.full(first.size, r, dtype=np.int64), np.diff(np.append(first, m)),
                np.add.reduceat(dur, first), np.minimum.reduceat(dur, first), np.maximum.reduceat(dur, first),
                np.add.reduceat(ints[:, 2], first), np.add.reduceat(ints[:, 1], first), np.maximum.reduceat(kv, first)))

    def _send(self, hop: tuple, nbytes: float, t: float) -> tuple[float, float]:
        key, latency, rate = hop
        begin = max(t, self._link_free.get(key, t))
        busy = nbytes / rate
        if self._outages:
            begin, busy = self._through_outages(frozenset([frozenset(key)]), begin, busy)
        done = begin + busy
        self._link_free[key] = done
        return begin, done + latency

    # ------------------------------------------------------------------ completing a micro-batch

    def _complete(self, sc: _Sched, mb, t: float) -> None:
        running, chunks, _ = mb
        n = running.size
        if n == 1:                            # scalar updates: far cheaper than array ops on one element
            sc.comp[0] += 1
            sc.left[0] -= 1
            i = int(sc.nxt[0])
            self.tok_t[i] = t
            sc.nxt[0] = i + 1
            sc.ctx += 1
            sc.min_left -= 1
        elif n:
            sc.comp += 1
            sc.left -= 1
            self.tok_t[sc.nxt] = t
            sc.nxt += 1
            sc.ctx += n
            sc.min_left -= 1
        new_dec = [s for s, chunk, _ in chunks if self._prefill_step_done(sc, s, chunk, t)]
        if not n and not new_dec:
            return
        done_dec = sc.left == 0 if sc.min_left == 0 else None
        if self.on_tokens is not None:
            slots = np.concatenate([running, np.array(new_dec, dtype=np.int64)])
            done = self.generated[slots] >= self.target[slots]
            if n:
                done[:n] = sc.left == 0
        if done_dec is not None:
            self._retire(sc, done_dec, t)
        if new_dec:
            self._join(sc, np.array(new_dec, dtype=np.int64), t)
        if self.on_tokens is not None:
            self.on_tokens(t, slots, done)

    def _prefill_step_done(self, sc: _Sched, s: int, chunk: int, t: float) -> bool:
        """Account a prefill chunk; True when the prompt (or recompute) is complete and a token came out."""
        self.computed[s] += chunk
        if self.computed[s] != self.prompt[s] + self.generated[s]:
            return False
        sc.prefilling.remove(s)
        g = self.generated[s] + 1
        self.generated[s] = g
        self.tok_t[self.tok_off[s] + g - 1] = t
        if g == 1:
            self.first_t[s] = t
        return True

    def _join(self, sc: _Sched, new: np.ndarray, t: float) -> None:
        """Sequences whose prefill just ended start decoding (or finish, if one token was all they needed)."""
        done = self.generated[new] >= self.target[new]
        if done.any():
            self._finish(new[done], t)
            new = new[~done]
        if new.size:
            self._sync(sc)
            self._set_running(sc, np.concatenate([sc.running, new]))

    def _finish(self, slots: np.ndarray, t: float) -> None:
        self.end_t[slots] = t
        self.status[slots] = DONE
        self.free_blocks += int(self.blocks[slots].sum())
        self.blocks[slots] = 0
        if self.waiting:
            self._notify()
        if self.on_finish is not None:
            self.on_finish(t, slots)

    def _fail(self, s: int, reason: str) -> None:
        self.status[s] = FAILED
        self.end_t[s] = self.env.now
        self.errors[s] = reason
        if self.on_finish is not None:
            self.on_finish(self.env.now, np.array([s]))

    # ------------------------------------------------------------------ records

    def requests_table(self, source: str = "simulated"):
        """pyarrow Table with harness.metrics.REQUEST_COLUMNS, one row per submitted request."""
        import pyarrow as pa
        for sc in self.scheds:
            self._sync(sc)
        n, hidden = self.n, self.cfg.hidden_tokens
        gen = np.maximum(self.generated[:n] - hidden, 0)      # what the client sees (mlx-lm: one token fewer)
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(gen)
        # visible tokens of request k sit at tok_t[tok_off[k] + hidden : tok_off[k] + generated[k]]; gather them
        idx = np.repeat(self.tok_off[:n] + hidden - offsets[:-1], gen) + np.arange(offsets[-1])
        chunks = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(self.tok_t[idx]))
        first = self.first_t[:n] if not hidden else np.where(gen > 0, self.tok_t[self.tok_off[:n] + hidden], np.nan)
        ok = self.status[:n] == DONE
        errors = [self.errors.get(i, "" if ok[i] else "unfinished") for i in range(n)] if self.errors or not ok.all() \
            else [""] * n
        return pa.table({
            "request_id": pa.array(self.request_ids, pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "scheduled_s": self.sched_t[:n], "start_s": self.start_t[:n], "first_token_s": first,
            "end_s": self.end_t[:n], "prompt_tokens": self.prompt[:n], "output_tokens": gen,
            "cached_tokens": self.cached[:n], "chunk_times_s": chunks.cast(pa.list_(pa.float64())),
            "success": ok, "error": pa.array(errors, pa.string()),
        })

    STEP_KINDS = ("decode", "prefill", "mixed", "send")

    def steps_table(self, source: str = "simulated"):
        """pyarrow Table with harness.metrics.STEP_COLUMNS for the buffered micro-batches (all of them unless a
        step sink took earlier ones): per micro-batch one row per stage, then one per link send (kind "send",
        stage = the sender), micro-batches in the order they were formed."""
        import pyarrow as pa
        from harness.metrics import STEP_COLUMNS, arrow_schema
        if self._rec_times is None or self._summary or self._step == self._rec_base:
            return arrow_schema(STEP_COLUMNS).empty_table()     # summary: see step_summary_table
        m, times, ints, columns = self._record_rows()
        p = len(self.stages)
        per = columns.size                                       # rows per micro-batch
        stage = np.tile(columns, m)
        kind = np.concatenate([np.repeat(ints[:, :1], p, axis=1), np.full((m, per - p), 3)], axis=1).ravel()
        kv_node = np.array([st.kv_bytes_per_token_node * self.block for st in self.stages])
        names = pa.array([st.nodes[0] for st in self.stages])
        n = m * per

        def dict_col(codes, values):     # a take from the few distinct strings: cheaper than a dictionary cast
            return values.take(pa.array(codes.astype(np.int32)))

        return pa.table({
            "step": np.repeat(np.arange(self._rec_base, self._rec_base + m, dtype=np.int64), per),
            "stage": stage, "node": dict_col(stage, names), "kind": dict_col(kind, pa.array(self.STEP_KINDS)),
            "start_s": times[:, 0::2].ravel(), "end_s": times[:, 1::2].ravel(),
            "batch_size": np.repeat(ints[:, 1], per), "tokens": np.repeat(ints[:, 2], per),
            "kv_bytes": (np.repeat(ints[:, 3], per) * kv_node[stage]).astype(np.int64),
            "compute_s": np.where(kind == 3, np.nan, times[:, 1::2].ravel() - times[:, 0::2].ravel()),
            "source": dict_col(np.zeros(n), pa.array([source])),
        })


    def step_summary_table(self, source: str = "simulated"):
        """pyarrow Table with harness.metrics.STEP_SUMMARY_COLUMNS (step_records="summary"; None otherwise): the
        step records steps_table would give, aggregated per window of step_window_s virtual seconds (a record
        counts in the window it starts in), stage or sending stage, and kind; windows in time order."""
        import pyarrow as pa
        from harness.metrics import STEP_SUMMARY_COLUMNS, arrow_schema
        if self._rec_times is None or not self._summary:
            return None
        self.flush_steps()
        if not self._summary_parts:
            return arrow_schema(STEP_SUMMARY_COLUMNS).empty_table()
        key, col, count, busy, low, high, tokens, seqs, kv = (np.concatenate(a) for a in zip(*self._summary_parts))
        columns = self._record_stages()
        per = columns.size
        group, inv = np.unique((key // 4 * per + col) * 4 + key % 4, return_inverse=True)
        window, col, kind = group // 4 // per, group // 4 % per, group % 4

        def total(values):
            return np.bincount(inv, weights=values, minlength=group.size)

        def extreme(ufunc, values, fill):
            out = np.full(group.size, fill, dtype=values.dtype)
            ufunc.at(out, inv, values)
            return out

        stage = columns[col]
        kv_node = np.array([st.kv_bytes_per_token_node * self.block for st in self.stages])
        names = pa.array([st.nodes[0] for st in self.stages])
        width = self.cfg.step_window_s
        return pa.table({
            "window_start_s": window * width, "window_end_s": (window + 1) * width,
            "stage": stage, "node": names.take(pa.array(stage.astype(np.int32))),
            "kind": pa.array(self.STEP_KINDS).take(pa.array(kind.astype(np.int32))),
            "steps": total(count).astype(np.int64),
            "busy_s": total(busy), "min_s": extreme(np.minimum, low, np.inf), "max_s": extreme(np.maximum, high, -np.inf),
            "tokens": total(tokens).astype(np.int64), "sequences": total(seqs).astype(np.int64),
            "kv_bytes_max": (extreme(np.maximum, kv, 0) * kv_node[stage]).astype(np.int64),
            "source": pa.array([source] * group.size, pa.string()),
        })


def _linked(cluster: Cluster, a: str, b: str) -> bool:
    """Whether the cluster has a link between two different nodes a and b."""
    if a == b:
        return False
    try:
        cluster.link(a, b)
    except KeyError:
        return False
    return True
