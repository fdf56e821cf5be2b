"""What start-up tells a person: one line per failure, never a traceback of nested groups.

Every nursery level wraps an exception in an exception group; a failure to start (the queue
out of reach, another server on the queue, a worker that could not start) is reported by
the exceptions at the leaves, each on one line.
"""

from __future__ import annotations

__all__ = ["leaves"]


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions in a (nested) group."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found
