"""A small name -> function registry. One strategy per file, registered under its --strategy name.

The registered names are the single list of what exists: `--strategy` / `--cache` help texts and the shared
property tests read them, so adding a strategy or a policy is its own file (plus its own exact-table test).
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Callable

from harness.specs import UserError

_PARTITIONERS: dict[str, Callable] = {}
_CACHE_POLICIES: dict[str, Callable] = {}
PREFERRED_ORDER = ("uniform", "ring_memory_weighted", "compute_balanced", "min_latency", "hybrid_optimal")


def _registrar(table: dict, kind: str, name: str):
    def register(fn: Callable) -> Callable:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = fn
        return fn
    return register


def partitioner(name: str):
    """Decorator: register a partitioning strategy; a second strategy with the same name is refused."""
    return _registrar(_PARTITIONERS, "partitioning strategy", name)


def cache_policy(name: str):
    """Decorator: register a caching policy factory `make(config) -> policy`; duplicates are refused."""
    return _registrar(_CACHE_POLICIES, "cache policy", name)


def unregister_strategy(name: str) -> None:
    """Take a strategy out again (one registered for a while, e.g. by a test, must not stay behind)."""
    _unregister(_PARTITIONERS, "strategy", name)


def unregister_cache_policy(name: str) -> None:
    _unregister(_CACHE_POLICIES, "cache policy", name)


def _unregister(table: dict, kind: str, name: str) -> None:
    if table.pop(name, None) is None:
        raise ValueError(f"{kind} {name!r} is not registered")


@cache
def _load_all() -> None:
    """Import every strategy module once, so their decorators have run."""
    import strategies.caching
    import strategies.partitioning
    for pkg in (strategies.partitioning, strategies.caching):
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")


def _lookup(table: dict, kind: str, plural: str, name: str) -> Callable:
    _load_all()
    if name not in table:
        raise UserError(f"unknown {kind} {name!r}; known {plural}: {', '.join(sorted(table))}")
    return table[name]


def strategy_names() -> list[str]:
    """Baselines first, the optimiser last; strategies added later follow in name order."""
    _load_all()
    return sorted(_PARTITIONERS, key=lambda n: (PREFERRED_ORDER.index(n) if n in PREFERRED_ORDER else 99, n))


def get_strategy(name: str) -> Callable:
    return _lookup(_PARTITIONERS, "strategy", "strategies", name)


def cache_policy_names() -> list[str]:
    """In name order; "none" is a policy like the others (the baseline)."""
    _load_all()
    return sorted(_CACHE_POLICIES)


def get_cache_policy(name: str) -> Callable:
    return _lookup(_CACHE_POLICIES, "cache policy", "policies", name)
