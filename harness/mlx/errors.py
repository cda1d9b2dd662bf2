"""The error types this package raises, from their owners' modules."""
from __future__ import annotations

from harness.backends.base import BackendUnavailable, QueueFull
from harness.specs import UserError

__all__ = ["UserError", "BackendUnavailable", "QueueFull"]
