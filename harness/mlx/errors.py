"""The error types this package raises, from their owners' modules."""
from __future__ import annotations

try:
    from harness.specs import UserError
except ImportError:  # specs not present in this checkout yet: keep the package importable
    class UserError(Exception):
        """Bad user input: the CLI prints the message and exits with status 2."""

from harness.backend import BackendUnavailable, QueueFull

__all__ = ["UserError", "BackendUnavailable", "QueueFull"]
