"""The status line that `run` and `bench` print on stderr while a load runs: elapsed time, requests finished,
failed and in flight, and the request and output-token rates over the last few seconds.

On a terminal the line is redrawn in place every second; in a log file (no terminal) one line is written every
`every_s` seconds (10 by default) so a long run leaves a readable trace without flooding the log.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque


def backend_stats(backend) -> dict:
    """The backend's stats, or {} when there is none or asking fails: a status line must not stop the run."""
    try:
        return backend.stats() if backend is not None else {}
    except Exception:
        return {}


class LoadProgress:
    """Context manager drawing the status line. Feed it finished requests with `follow(sink)` (or `row(row)`);
    `update(done, total)` (run_load's progress callback) gives counts only: no failures, no rates."""

    def __init__(self, backend, total: int, *, every_s: float | None = None, window_s: float = 5.0):
        self.backend, self.total, self.done, self.failed = backend, total, 0, 0
        self.every_s, self.window_s = every_s, window_s
        self._recent: deque[tuple[float, int]] = deque()   # (finish time, output tokens) inside the window
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def update(self, done: int, total: int) -> None:
        self.done = max(self.done, done)

    def follow(self, sink) -> None:
        """Count each request a LoadSink sees finish, after its own hook (a run folder's journal, which must
        keep the row whatever the status line does)."""
        keep = sink.on_row

        def hook(row: dict) -> None:
            if keep is not None:
                keep(row)
            self.row(row)
        sink.on_row = hook

    def row(self, row: dict) -> None:
        with self._lock:
            self.done += 1
            self.failed += 0 if row.get("success") else 1
            self._recent.append((time.monotonic(), int(row.get("output_tokens") or 0)))

    def rates(self) -> tuple[float, float]:
        """Requests/s and output tokens/s finished over the last `window_s` seconds (or since the start)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            span = max(min(self.window_s, now - self._t0), 1e-9)
            return len(self._recent) / span, sum(tokens for _, tokens in self._recent) / span

    def line(self) -> str:
        req_rate, tok_rate = self.rates()
        return (f"  {time.monotonic() - self._t0:6.1f} s{self._in_flight()}  finished {self.done}/{self.total}"
                f"  failed {self.failed}  {req_rate:.2f} req/s  {tok_rate:.1f} output tok/s")

    def _in_flight(self) -> str:
        """Sent and in flight come from the embedded backend's queue; an outside server does not say them."""
        if self.backend is None:
            return ""
        stats = backend_stats(self.backend)
        running, waiting = stats.get("num_requests_running", 0), stats.get("num_requests_waiting", 0)
        return (f"  sent {self.done + running + waiting}  in flight {running + waiting}"
                f" (running {running}, waiting {waiting})")

    def __enter__(self):
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _loop(self):
        tty = sys.stderr.isatty()
        every = self.every_s or (1.0 if tty else 10.0)
        while not self._stop.wait(every):
            sys.stderr.write(f"\r{self.line()}   " if tty else self.line() + "\n")
            sys.stderr.flush()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if sys.stderr.isatty():
            sys.stderr.write("\n")
