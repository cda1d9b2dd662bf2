"""Prefix-cache admission, written once for the simulator in virtual time and the real-time sim backend.

A request's way into the engine: look its prefix blocks up in the cache, wait while lower-tier blocks load into
unified memory (a SimPy process), submit only the uncached part of its prompt, and remember its blocks once its
first token is out (its prefill is done then). Both `sim.simulate` and `harness.backends.sim.SimBackend` drive
a SimPy environment, so the real-time backend runs the very same process on its paced clock.

A request that needs no load is submitted at once, not from a process started for it: a process would enter
the engine one event later, after the scheduler may already have formed its next batch without it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Hashable, Sequence


@dataclass(frozen=True)
class AdmissionRequest:
    prompt_tokens: int
    output_tokens: int
    request_id: str | None = None
    keys: Sequence[Hashable] = ()      # its prompt's prefix blocks, as the cache names them
    scheduled_s: float | None = None   # when the workload wanted it sent (default: now)


class Admission:
    """Submits requests to engines through an optional sim.prefix_cache.PrefixCache."""

    def __init__(self, cache=None):
        self.cache = cache
        self._keys: dict[int, Sequence[Hashable]] = {}   # engine slot -> blocks to remember at its first token

    def submit(self, engine, request: AdmissionRequest, on_submit: Callable[[int], None] | None = None):
        """Submit now, or from a SimPy process once lower-tier blocks have loaded; `on_submit(slot)` runs the
        moment the engine has the request (before any of its tokens). Returns the slot, or the process."""
        if self.cache is None:
            return self._enter(engine, request, 0, None, on_submit)
        hit = self.cache.admit(request.keys, request.prompt_tokens)
        if hit.load_s > 0:
            return engine.env.process(self._after_load(engine, request, hit, on_submit))
        return self._enter(engine, request, hit.cached_tokens, None, on_submit)

    def _after_load(self, engine, request: AdmissionRequest, hit, on_submit):
        """SimPy process: the request arrived now, waits for its blocks, then enters (its TTFT counts the wait)."""
        arrived = engine.env.now
        scheduled = arrived if request.scheduled_s is None else request.scheduled_s
        yield engine.env.timeout(hit.load_s)
        return self._enter(engine, replace(request, scheduled_s=scheduled), hit.cached_tokens, arrived, on_submit)

    def _enter(self, engine, request: AdmissionRequest, cached: int, arrived_s, on_submit) -> int:
        slot = engine.submit(request.prompt_tokens - cached, request.output_tokens, request.request_id,
                             scheduled_s=request.scheduled_s, arrived_s=arrived_s, cached_tokens=cached)
        if self.cache is not None and request.keys:
            self._keys[slot] = request.keys
        if on_submit is not None:
            on_submit(slot)
        return slot

    def on_tokens(self, t: float, slots, finished) -> None:
        """The engine's token callback: a slot's first token ends its prefill, so its blocks are cached now."""
        for slot in slots.tolist():
            keys = self._keys.pop(slot, None)
            if keys:
                self.cache.remember(keys)
