"""Waiting on state that has no event to wait on (a SQLite file, another process)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], within: float = 20
) -> T:
    """Call ``probe`` until ``done(result)``; fail the test when ``within`` seconds pass."""
    with trio.fail_after(within):
        while True:
            value = await probe()
            if done(value):
                return value
            await trio.sleep(0.02)  # ok-sleep: a poll interval inside a deadline
