"""A small name -> function registry. One strategy per file, registered under its --strategy name."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from harness.specs import UserError

_PARTITIONERS: dict[str, Callable] = {}
_CACHE_POLICIES: dict[str, Callable] = {}


def partitioner(name: str):
    """Decorator: register a partitioning strategy; a second strategy with the same name is refused."""
    def register(fn: Callable) -> Callable:
        if name in _PARTITIONERS:
            raise ValueError(f"partitioning strategy {name!r} is registered twice")
        _PARTITIONERS[name] = fn
        return fn
    return register


def cache_policy(name: str):
    """Decorator: register a caching policy factory `make(config) -> policy`; duplicates are refused."""
    def register(fn: Callable) -> Callable:
        if name in _CACHE_POLICIES:
            raise ValueError(f"cache policy {name!r} is registered twice")
        _CACHE_POLICIES[name] = fn
        return fn
    return register


def _load_all() -> None:
    import strategies.caching
    import strategies.partitioning
    for pkg in (strategies.partitioning, strategies.caching):
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")


PREFERRED_ORDER = ("uniform", "ring_memory_weighted", "compute_balanced", "min_latency", "hybrid_optimal")


def strategy_names() -> list[str]:
    """Baselines first, the optimiser last; strategies added later follow in name order."""
    _load_all()
    return sorted(_PARTITIONERS, key=lambda n: (PREFERRED_ORDER.index(n) if n in PREFERRED_ORDER else 99, n))


def get_strategy(name: str) -> Callable:
    _load_all()
    if name not in _PARTITIONERS:
        raise UserError(f"unknown strategy {name!r}; known strategies: {', '.join(_PARTITIONERS)}")
    return _PARTITIONERS[name]


def cache_policy_names() -> list[str]:
    _load_all()
    return sorted(_CACHE_POLICIES)


def get_cache_policy(name: str) -> Callable:
    _load_all()
    if name not in _CACHE_POLICIES:
        raise UserError(f"unknown cache policy {name!r}; known policies: {', '.join(sorted(_CACHE_POLICIES))}")
    return _CACHE_POLICIES[name]
