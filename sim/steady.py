"""Steady decode of several schedulers at once: one SimPy event instead of one per micro-batch.

While nobody waits and the pipeline is not degraded, every scheduler ("virtual engine") that only decodes
repeats: wait for its token ids, account them, wait for the first stage, form a decode micro-batch, send it
through the stages. Until the next event from outside the schedulers (an arrival, a fault, a probe, a stop), until
a sequence finishes, or until the KV pool runs short, that is fully determined. `run_window` replays it in plain
Python on local state, in exactly the order SimPy would (same wake-up times, computed with the same float
operations, ties broken by event creation order), then hands each scheduler its next wake-up as a real event.
The result is bit for bit the step-by-step one (tests/sim/test_steady.py compares them row for row).

The schedulers' own pending wake-ups are told apart from outside events by identity (`_Sched.wake`), and a
wake-up that a window replaced is marked `stale`: its process wakes, sees it was replaced, and waits for the new
one. Reading SimPy's event queue (`env._queue`) is the SimPy internals used here; a
replaced wake-up is put in that queue at its exact time (`_wake_at`).
"""
from __future__ import annotations

import functools
import math
from heapq import heappop, heappush

import numpy as np
from simpy.events import NORMAL

from harness.costmodel import TOKEN_ID_BYTES

MAX_STEPS = 4096          # micro-batches per window: bounds the record block (below Engine.STREAM_ROWS)
NEAR_END = 2             # tokens left below which a window is not tried (it would stop at that finish)
MIN_STEPS = 2             # one step: its set-up and hand-back cost about what stepping it does
NEW = 1 << 60             # event order of wake-ups created in a window: after every event already queued
FLIGHT, FLIGHT_FF, WAIT = 0, 1, 2   # what a pending wake-up lands: a decode micro-batch, a single-FF run, nothing


def can_start(engine, trigger) -> bool:
    """Cheap conditions, checked at every scheduler loop top before anything is built. The window replays the
    schedulers that only decode; one that prefills takes part as an outside event (its wake-up ends the window).
    At least two schedulers must be awake: with one alone Engine._fast_forward runs instead (the step-by-step
    loop top would take it), and a window must not change which of the two runs."""
    cfg = engine.cfg
    if not (cfg.fast_forward_schedulers and cfg.scheduler == "continuous" and engine._steady_decode(trigger)):
        return False
    if engine._idle > len(engine.scheds) - 2:
        return False
    for sc in engine.scheds:
        if sc.running.size and not sc.prefilling and sc.min_left <= NEAR_END:
            return False          # a sequence finishes within a round or two: the window would end there
    return True


def run_window(engine, trigger) -> bool:
    """Advance every busy scheduler's steady decode up to the next outside event; True when it did (then the
    trigger's next wake-up is `trigger.wake`), False when too little qualifies (nothing changed)."""
    window = _Window(engine, trigger)
    if not window.collect() or window.replay() < MIN_STEPS:
        return False
    window.commit()
    return True


class _Window:
    def __init__(self, engine, trigger):
        self.e, self.trigger = engine, trigger
        self.scheds = [sc for sc in engine.scheds if sc.running.size and not sc.prefilling]   # steady decoders

    # ------------------------------------------------------------------ the state at the window's start

    def collect(self) -> bool:
        """Horizon (first outside event) and each scheduler's pending wake-up; False if one is missing."""
        e, now = self.e, self.e.env.now
        index = {id(sc.wake): j for j, sc in enumerate(self.scheds) if sc is not self.trigger and sc.wake is not None}
        self.horizon = math.inf
        self.heap = []
        self.phase = [WAIT] * len(self.scheds)
        for time, _prio, eid, ev in e.env._queue:
            j = index.get(id(ev))
            if j is not None:                 # that scheduler's own wake-up (ids of live objects are unique)
                self.heap.append((time, eid, j))
                flight = self.scheds[j].flight
                self.phase[j] = WAIT if flight is None else (FLIGHT_FF if flight[0] is None else FLIGHT)
            elif not getattr(ev, "stale", False):
                self.horizon = min(self.horizon, time)
        if len(self.heap) != len(self.scheds) - 1 or self.horizon <= now:
            return False
        # formations before the horizon are at least a first-stage decode step apart (one sequence, no context):
        # when fewer than MIN_STEPS fit, the window is not worth building its tables
        if (self.horizon - now) < (MIN_STEPS - 1) * e._stage_decode_terms(1)[0].at(0.0):
            return False
        jt = self.scheds.index(self.trigger)
        self.heap.append((now, -1, jt))       # the trigger forms now, before anything else due now
        self.heap.sort()
        self._tables(now)
        return True

    def _tables(self, now: float) -> None:
        """Per scheduler: decode times per stage and cumulative KV blocks, indexed by completions so far."""
        e = self.e
        self.n = [int(sc.running.size) for sc in self.scheds]
        self.durs, self.cum_blocks, self.limit = [], [], []
        for sc, n in zip(self.scheds, self.n):
            table = sc.table
            first = -1 if table is None or table.running is not sc.running else (sc.ctx - table.ctx0) // n
            if not 0 <= first < len(table.cum_blocks if table else ()):    # a new decoding set, or run out
                table, first = _Table(e, sc), 0
                sc.table = table
            k = min(len(table.cum_blocks) - first, int(sc.min_left))
            trip = sum(table.durs[first])                # the shortest round trip (times grow with the context)
            if math.isfinite(self.horizon) and trip > 0:
                k = min(k, int((self.horizon - now) / trip) + 2)
            self.durs.append(table.durs[first:first + k])
            self.cum_blocks.append(table.cum_blocks[first:first + k])
            self.limit.append(k)
        # link i follows stage i: the forward hops, then (when there is one) the token ids' way back
        hops, back = e._hops, e._back
        links = hops + ([back] if back is not None else [])
        self.link_keys = [key for key, _, _ in links]
        self.link_lat = [lat for _, lat, _ in links]
        self.link_busy = [[n * e._act_bytes / rate for _, _, rate in hops]
                          + ([TOKEN_ID_BYTES * n / back[2]] if back is not None else []) for n in self.n]

    # ------------------------------------------------------------------ replaying the events

    def replay(self) -> int:
        """Process the schedulers' events in SimPy's order while they stay steady decode; returns the steps."""
        e, scheds, heap, phase = self.e, self.scheds, self.heap, self.phase
        m = len(scheds)
        sf = list(e._stage_free)
        keys = list(dict.fromkeys(self.link_keys))
        lfree = [e._link_free.get(k, -math.inf) for k in keys]
        slot = [keys.index(k) for k in self.link_keys]
        link_lat, gap, last, links = self.link_lat, e.profile.iteration_gap_s, len(sf) - 1, len(slot)
        c = [0] * m                                   # completions accounted in the window
        left = [int(sc.min_left) for sc in scheds]
        blk = [int(sc.blk.sum()) for sc in scheds]
        emit = [sc.flight[1] if sc.flight is not None else 0.0 for sc in scheds]
        emits = [[] for _ in range(m)]
        formed_at_c = [-1] * m                        # completions before each scheduler's last formation
        free, total, peak = e.free_blocks, e.total_blocks, e.peak_blocks
        stage_times, link_times, used, who = [], [], [], []        # per step, in record column order
        stage_app, link_app, used_app, who_app = stage_times.append, link_times.append, used.append, who.append
        durs, link_busy, limit, cum_blocks = self.durs, self.link_busy, self.limit, self.cum_blocks
        stages = range(len(sf))
        order = NEW
        steps = 0
        horizon = self.horizon
        while heap:
            T, _, j = heap[0]
            ph = phase[j]
            if T >= horizon:
                break
            cj = c[j]
            if ph == FLIGHT:
                if left[j] == 1:
                    break                             # that completion retires a sequence: membership changes
                cj += 1
            elif ph == FLIGHT_FF and left[j] == 0:
                break
            form = not sf[0] > T
            if form:
                if cj >= limit[j] or steps >= MAX_STEPS:
                    break
                need = cum_blocks[j][cj] - blk[j]
                if need > free:
                    break                             # the pool is short: a preemption, step by step
            heappop(heap)
            if ph == FLIGHT:
                emits[j].append(emit[j])
                c[j] = cj
                left[j] -= 1
            order += 1
            if not form:                              # wait for the first stage, as the loop top does
                heappush(heap, (T + (sf[0] - T), order, j))
                phase[j] = WAIT
                continue
            blk[j] += need
            free -= need
            if total - free > peak:
                peak = total - free
            d, lb = durs[j][cj], link_busy[j]
            t = T
            for i in stages:                          # Lindley recursion, as Engine._traverse; max as there
                f = sf[i]
                if f > t:
                    t = f
                stage_app(t)
                t += d[i]
                sf[i] = t
                stage_app(t)
                if i < links:                         # as Engine._send: FIFO per direction, then latency
                    s = slot[i]
                    lf = lfree[s]
                    if lf > t:
                        t = lf
                    link_app(t)
                    done = t + lb[i]
                    lfree[s] = done
                    t = done + link_lat[i]
                    link_app(t)
            emit[j] = sf[last]                        # tokens ready: the last stage's end, before the way back
            used_app(total - free)
            who_app(j)
            formed_at_c[j] = cj
            steps += 1
            heappush(heap, (T + ((t + gap) - T), order, j))
            phase[j] = FLIGHT
        times = (stage_times, link_times)
        self.result = (sf, keys, lfree, c, emit, emits, formed_at_c, free, peak, times, (used, who), steps)
        return steps

    # ------------------------------------------------------------------ handing the state back

    def commit(self) -> None:
        e = self.e
        sf, keys, lfree, c, emit, emits, formed_at_c, free, peak, times, ints, steps = self.result
        e._stage_free[:] = sf
        for k, v in zip(keys, lfree):
            if v != -math.inf:
                e._link_free[k] = v
        self._write_records(times, ints, steps)
        for j, sc in enumerate(self.scheds):
            self._advance_sched(j, sc, c[j], emits[j], formed_at_c[j], emit[j])
        e.free_blocks, e.peak_blocks = free, peak
        self._reschedule()

    def _write_records(self, times: tuple, ints: tuple, steps: int) -> None:
        """Step records in Engine._traverse's layout: stage begin/end pairs, then the links'; kind 0 (decode),
        batch and tokens = the scheduler's sequences, KV blocks in use."""
        e = self.e
        if e._rec_times is not None:      # fromiter with a count: no type discovery pass over the lists
            row = e._reserve_rows(steps)
            rows = e._rec_times[row:row + steps]
            col = e._link_col
            stage, link = times
            rows[:, :col] = np.fromiter(stage, np.float64, len(stage)).reshape(steps, col)
            if col < rows.shape[1]:
                rows[:, col:] = np.fromiter(link, np.float64, len(link)).reshape(steps, -1)
            used, who = ints
            ints = e._rec_ints[row:row + steps]
            ints[:, 0] = 0
            ints[:, 1] = ints[:, 2] = np.fromiter(map(self.n.__getitem__, who), np.int64, steps)
            ints[:, 3] = np.fromiter(used, np.int64, steps)
        e._step += steps
        e.steady_steps += steps

    def _advance_sched(self, j: int, sc, done: int, emits: list, formed_at: int, last_emit: float) -> None:
        """Apply `done` completions (as Engine._complete would) and the blocks of the last formation."""
        B, n = self.e.block, self.n[j]
        comp0 = sc.comp
        if done:
            tok_t = self.e.tok_t
            for start in sc.nxt.tolist():         # a slice per sequence: few sequences, each a run of tokens
                tok_t[start:start + done] = emits
            sc.nxt = sc.nxt + done
            sc.comp = sc.comp + done
            sc.left = sc.left - done
            sc.ctx += done * n
            sc.min_left -= done
        if formed_at >= 0:
            sc.blk = (comp0 + formed_at + B) // B
        if formed_at >= 0 and self.phase[j] == FLIGHT:     # its last micro-batch is in flight
            sc.flight = ((sc.running, [], 0.0), last_emit)
        elif self.phase[j] == WAIT:                          # it waits for the first stage, tokens accounted
            sc.flight = None

    def _reschedule(self) -> None:
        """Real wake-ups for the pending events the window created, in the order it created them (ties in
        time then resolve as SimPy would have)."""
        new = sorted((order, time, j) for time, order, j in self.heap if order >= NEW or order == -1)
        for _, time, j in new:
            sc = self.scheds[j]
            if sc.wake is not None and sc is not self.trigger:
                sc.wake.stale = True
            sc.wake = _wake_at(self.e.env, time)


def _wake_at(env, at: float):
    """A triggered event due at exactly `at`, as Event.succeed would schedule it but at an absolute time: a
    Timeout from now lands on now + delay, and some times are no such sum (from a small `now`, every sum can be a
    rounding tie that skips them), while the window computed `at` the way the scheduler's own Timeout would have."""
    ev = env.event()
    ev._ok, ev._value = True, None
    heappush(env._queue, (at, NORMAL, next(env._eid), ev))
    return ev


class _Table:
    """A decoding set's future, built once per membership (a window reuses it where the last one stopped): per
    number of completions c from now, every stage's decode time at the context it will have, and the KV blocks
    the set holds once it grew for that step."""

    def __init__(self, engine, sc):
        n, B = int(sc.running.size), engine.block
        self.running, self.ctx0 = sc.running, sc.ctx
        c = np.arange(max(1, min(int(sc.min_left), MAX_STEPS)), dtype=np.int64)
        ctx = (sc.ctx + c * n).astype(np.float64)
        self.durs = decode_times(engine._stage_decode_terms(n), ctx).T.tolist()
        self.cum_blocks = ((sc.comp[None, :] + c[:, None] + B) // B).sum(axis=1).tolist()


def decode_times(terms: list, ctx: np.ndarray) -> np.ndarray:
    """(stages, len(ctx)) decode times, bit for bit DecodeTerms.at per stage and context: one array expression
    over all stages (members padded by repeating the first, which leaves the max unchanged) instead of a
    DecodeTerms.vector call per stage. Attention priced apart goes through DecodeTerms.vector."""
    if any(t.attn_s_per_ctx for t in terms):
        return np.array([t.vector(ctx) for t in terms])
    base, per_ctx, bw, fl, exposed, fixed = _stacked(tuple(terms))
    load = base + ctx * per_ctx                                  # (2, stages, contexts): bytes, FLOPs
    memory, compute = load[0][:, None, :] / bw, load[1][:, None, :] / fl
    t = np.maximum(memory, compute) + exposed * np.minimum(memory, compute) + fixed
    return t.max(axis=1)


@functools.lru_cache(maxsize=256)
def _stacked(terms: tuple):
    """The stages' decode terms as arrays shaped for decode_times (built once per batch size)."""
    width = max(len(t.members) for t in terms)
    members = np.array([list(t.members) + [t.members[0]] * (width - len(t.members)) for t in terms])
    base = np.array([[t.nbytes for t in terms], [t.flops for t in terms]])[:, :, None]
    per_ctx = np.array([[t.kv_bytes for t in terms], [t.attn_flops for t in terms]])[:, :, None]
    return (base, per_ctx, *(members[:, :, i, None] for i in range(4)))
