"""The load generator spread over worker processes (`run_load(..., workers=N)`, `bench --workers N`).

One Python process parses SSE for one core's worth of chunks/s; a bare server on a bigger machine streams
more than that, so a single process cannot tell a fast server from its own ceiling. Here N spawned
processes each run their own event loop and HTTP client over a fixed share of the requests, on ONE clock:

  - open loop (workload, constant, poisson): the parent computes the one global schedule; request i goes to
    worker i % N with its scheduled time, so every request is due at the very instant the 1-worker run
    would send it;
  - closed loop (concurrent, synchronous): the concurrency is split into slots; request i goes to slot
    i % c and slot s to worker s % N, so each worker owns requests in proportion to its slots;
  - t=0 is one perf_counter instant chosen by the parent shortly ahead of now and sent to every worker
    (perf_counter and monotonic are system-wide clocks), after every worker has warmed up.

Each finished row comes back to the parent at once (the sink journals it, the progress line counts it), and
the rows are merged in request order, exactly as the 1-worker run orders them. A worker that dies does not
take the others' rows with it: they finish, then `LoadWorkerError` is raised, carrying the partial result
and naming the worker and its exit. Ctrl-C and SIGTERM reach the parent, which stops the workers (they
run in their own session and ignore SIGINT) and keeps every row that had come back. A worker whose
parent dies sees its socket close and stops.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Sequence

from harness.serving.loadgen import (ClientShards, LoadMode, LoadResult, LoadSink, Target, _Clock, _client,
                                     _concurrency,
                                     _begin, _dispatch, _Tally, _warmup, client_hint, discover_model,
                                     endpoint_url, gc_frozen, request_body, schedule, send_one, warmup_specs)
from harness.specs import UserError
from harness.workloads import RequestSpec

# How far ahead of "now" the parent puts t=0: long enough for every worker to read the go message before
# its first request is due (a few ms on a busy 2-core machine), short enough to cost nothing.
START_LEAD_S = 0.05
STOP_WAIT_S = 2.0   # a stopped worker gets this long to exit before it is terminated


class LoadWorkerError(UserError):
    """A worker process failed. `result` holds every row the other workers (and it, before failing) finished,
    or None when it failed before t=0."""

    def __init__(self, message: str, result: LoadResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class WorkerJob:
    """One worker's share of a run; `positions` are its requests' indices in the workload."""
    number: int
    of: int
    target: Target
    model: str
    mode: LoadMode
    positions: tuple[int, ...]
    specs: tuple[RequestSpec, ...]
    times: tuple[float, ...] | None     # open loop: the global schedule's send times of these requests
    concurrency: int                    # closed loop: this worker's slots
    warm: tuple[tuple[int, RequestSpec], ...]
    seed: int
    max_duration_s: float | None


def split_jobs(target: Target, model: str, specs: Sequence[RequestSpec], mode: LoadMode, workers: int, *,
               warmup: int, seed: int, max_duration_s: float | None) -> list[WorkerJob]:
    """The deterministic shares (module docstring); workers left without a request are dropped."""
    times = schedule(mode, specs)
    if times is None:
        slots = _concurrency(mode)
        owner = [(i % slots) % workers for i in range(len(specs))]
        concurrency = [len(range(k, slots, workers)) for k in range(workers)]
    else:
        owner = [i % workers for i in range(len(specs))]
        concurrency = [0] * workers
    shares = [[i for i in range(len(specs)) if owner[i] == k] for k in range(workers)]
    busy = [k for k in range(workers) if shares[k]]
    warm = warmup_specs(specs, warmup) if specs else []
    return [WorkerJob(number=n, of=len(busy), target=target, model=model, mode=mode,
                      positions=tuple(shares[k]), specs=tuple(specs[i] for i in shares[k]),
                      times=None if times is None else tuple(float(times[i]) for i in shares[k]),
                      concurrency=concurrency[k], warm=tuple(warm[n::len(busy)]), seed=seed,
                      max_duration_s=max_duration_s)
            for n, k in enumerate(busy)]


# ---------------------------------------------------------------------------------------------- the worker

def worker_main(fd: int) -> None:
    """Entry point of a worker process (`python -m harness.serving.loadgen_workers FD`): its job comes as the
    first message on the socket FD, then rows go back on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C hits the whole process group; the parent stops us
    conn = Connection(fd)
    try:
        asyncio.run(_work(conn, conn.recv()))
    except BaseException as exc:   # anything at all: the parent must hear why this share stopped
        _tell(conn, ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None


def _tell(conn, message) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):   # the parent is gone: nobody left to tell
        pass


class _PipeTally(_Tally):
    """Sends each finished row to the parent at once, with its workload position; remembers the rows that
    never finished (cut off by the time bound), which the parent gets at the end."""

    def __init__(self, conn, position_of_body: dict[int, int]):
        super().__init__(0, None, LoadSink())
        self.conn, self.position_of_body = conn, position_of_body
        self.position_of_row: dict[int, int] = {}
        self.sent: set[int] = set()

    async def send(self, client, url, body, row, clock) -> None:
        position = self.position_of_body[id(body)]   # the very body object built for that position
        self.position_of_row[id(row)] = position
        await send_one(client, url, body, row, clock)
        if self.stopping:
            return
        self.sent.add(id(row))
        self.conn.send(("row", position, row))

    def unsent(self, rows: list[dict]) -> list[tuple[int, dict]]:
        return [(self.position_of_row[id(r)], r) for r in rows if id(r) not in self.sent]


async def _work(conn, job: WorkerJob) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    loop.add_reader(conn.fileno(), _drain, conn, inbox)
    hint = job.concurrency if job.times is None else client_hint(job.mode)
    async with ClientShards(job.target, hint) as clients:
        url = endpoint_url(job.target)
        bodies = [request_body(job.target, job.model, s, i, job.seed) for s, i in zip(job.specs, job.positions)]
        if job.warm:
            await _warmup(clients, url, job.target, job.model, list(job.warm), job.seed, hint)
        with gc_frozen():   # as in run_load: no full collection of the whole heap inside the run
            conn.send(("ready",))
            go = await inbox.get()
            if go[0] != "go":
                return
            clock = _Clock.shared(go[1], go[2])
            tally = _PipeTally(conn, {id(b): p for b, p in zip(bodies, job.positions)})
            rows = await _run_until_stopped(clients, url, job, bodies, clock, tally, inbox)
    if rows is not None:
        conn.send(("done", tally.unsent(rows)))


def _drain(conn, inbox: asyncio.Queue) -> None:
    """Reader callback: every message the parent sent; its exit (EOF) reads as "stop"."""
    try:
        while conn.poll():
            inbox.put_nowait(conn.recv())
    except (EOFError, OSError):
        asyncio.get_running_loop().remove_reader(conn.fileno())
        inbox.put_nowait(("stop",))


async def _run_until_stopped(clients, url, job: WorkerJob, bodies, clock, tally: _PipeTally, inbox):
    """This share's rows, or None when the parent said stop first."""
    await asyncio.sleep(max(0.0, -clock.now()))   # t=0 is a little ahead (START_LEAD_S)
    if job.times is None:
        specs, mode = list(job.specs), LoadMode("concurrent", float(job.concurrency))
    else:   # the global schedule's own times, sent as "workload" arrivals
        specs = [replace(s, arrival_s=at) for s, at in zip(job.specs, job.times)]
        mode = LoadMode("workload")
    run = asyncio.ensure_future(_dispatch(clients, url, specs, bodies, mode, clock, job.max_duration_s, tally))
    stop = asyncio.ensure_future(inbox.get())
    await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        stop.cancel()
        return run.result()
    tally.stopping = True
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    return None


# ---------------------------------------------------------------------------------------------- the parent

@dataclass
class _Member:
    job: WorkerJob
    process: subprocess.Popen
    conn: Connection
    ready: bool = False
    done: bool = False
    closed: bool = False
    finished: int = 0
    error: str = ""


def _spawn(job: WorkerJob) -> _Member:
    """A fresh interpreter running worker_main, joined to us by a socket pair. Not multiprocessing's spawn:
    that re-runs the caller's main script in the child, which breaks any caller without a __main__ guard."""
    ours, theirs = socket.socketpair()
    package_root = str(Path(__file__).resolve().parents[2])   # so `-m harness...` imports this very tree
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "harness.serving.loadgen_workers", str(theirs.fileno())],
                               pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                               start_new_session=True)   # a terminal's Ctrl-C goes to the parent alone; it stops us
    theirs.close()
    conn = Connection(ours.detach())
    conn.send(job)
    return _Member(job, process, conn)


@dataclass
class _Fleet:
    """The worker processes and what they sent back."""
    members: list[_Member]
    on_row: Callable[[dict], None]
    rows: list[tuple[int, dict]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def launch(self, jobs: list[WorkerJob]) -> None:
        loop = asyncio.get_running_loop()
        for job in jobs:
            member = _spawn(job)
            self.members.append(member)
            loop.add_reader(member.conn.fileno(), self._read, member)

    def _read(self, member: _Member) -> None:
        try:
            while member.conn.poll():
                self._take(member, member.conn.recv())
        except (EOFError, OSError):   # the worker exited (or died): its pipe closed
            asyncio.get_running_loop().remove_reader(member.conn.fileno())
            member.closed = True
        self.changed.set()

    def _take(self, member: _Member, message: tuple) -> None:
        kind = message[0]
        if kind == "row":
            member.finished += 1
            self.rows.append((message[1], message[2]))
            self.on_row(message[2])
        elif kind == "done":
            self.rows.extend(message[1])
            member.done = True
        elif kind == "ready":
            member.ready = True
        elif kind == "error":
            member.error = message[1]

    async def wait_until(self, settled: Callable[[_Member], bool]) -> None:
        while not all(settled(m) for m in self.members):
            await self.changed.wait()
            self.changed.clear()

    def go(self, clock: _Clock) -> None:
        for member in self.members:
            member.conn.send(("go", clock.t0, clock.t0_monotonic))

    def failures(self) -> list[str]:
        """One line per worker that did not finish its share: which, why, and what of its share is kept."""
        return [self._failure(m) for m in self.members if not m.done]

    def _failure(self, member: _Member) -> str:
        code = _wait(member.process)
        how = member.error or (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        job = member.job
        if not member.ready:
            return f"load generator worker {job.number + 1} of {job.of} failed before the run started ({how})"
        return (f"load generator worker {job.number + 1} of {job.of} stopped before finishing ({how}): "
                f"{member.finished} of its {len(job.positions)} requests finished and are kept, "
                f"the rest are not recorded")

    def stop(self) -> None:
        """Every worker still running is told to stop, then terminated if it does not."""
        loop = asyncio.get_event_loop()
        for member in self.members:
            if not member.closed:
                loop.remove_reader(member.conn.fileno())
                _tell(member.conn, ("stop",))
        for member in self.members:
            if _wait(member.process) is None:
                member.process.terminate()
                if _wait(member.process) is None:
                    member.process.kill()
                    member.process.wait()
            member.conn.close()

    def merged(self, closed_loop: bool) -> list[dict]:
        """Rows in request order, as the 1-worker run orders them (closed loop: by request id)."""
        rows = [row for _, row in sorted(self.rows, key=lambda pair: pair[0])]
        return sorted(rows, key=lambda r: r["request_id"]) if closed_loop else rows


async def run_in_workers(target: Target, specs: list[RequestSpec], mode: LoadMode, *, workers: int, warmup: int,
                         seed: int, max_duration_s: float | None, progress, sink: LoadSink | None) -> LoadResult:
    """`run_load` over `workers` processes; `mode` is already the effective one."""
    async with _client(target, 1) as client:
        model = await discover_model(client, target)
    sink = sink or LoadSink()
    _begin(sink, mode, model, warmup)
    jobs = split_jobs(target, model, specs, mode, workers, warmup=warmup, seed=seed, max_duration_s=max_duration_s)
    counted = _Counter(len(specs), progress, sink)
    fleet = _Fleet([], counted.row)
    try:
        fleet.launch(jobs)
        sink.workers_started([m.process.pid for m in fleet.members])
        await fleet.wait_until(lambda m: m.ready or m.closed)
        if not all(m.ready for m in fleet.members):
            raise LoadWorkerError("; ".join(fleet.failures()))
        clock, wall_start = _begin(sink, mode, model, warmup, lead_s=START_LEAD_S)
        fleet.go(clock)
        await fleet.wait_until(lambda m: m.closed)
        duration = clock.now()
    finally:
        fleet.stop()
    note = f"{len(jobs)} load generator worker process{'es' if len(jobs) != 1 else ''}"
    result = LoadResult(mode=mode, rows=fleet.merged(closed_loop=jobs[0].times is None if jobs else False),
                        wall_start_unix=wall_start, duration_s=duration, t0_monotonic=clock.t0_monotonic,
                        model=model, warmup_requests=warmup, notes=[note])
    failures = fleet.failures()
    if failures:
        raise LoadWorkerError("; ".join(failures), result)
    return result


def _wait(process: subprocess.Popen) -> int | None:
    """Its exit code once it exits within STOP_WAIT_S; None if it still runs."""
    try:
        return process.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        return None


class _Counter:
    """Hands each finished row to the sink and the progress callback, in the parent."""

    def __init__(self, total: int, progress, sink: LoadSink):
        self.total, self.progress, self.sink, self.done = total, progress, sink, 0

    def row(self, row: dict) -> None:
        self.sink.row(row)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
