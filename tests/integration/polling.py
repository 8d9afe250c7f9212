"""Waiting for a condition in a test: poll it, with a deadline, and fail naming what never happened.

A test never sleeps a fixed time hoping something has happened by then (on two shared cores it may not
have), and never retries its own assertions: it polls the condition it needs, here. A sleep that *creates*
a condition (paces a producer, lets a clock reach a boundary on purpose) is not a wait and stays where it
is, with a comment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    what: str,
    timeout: float = 30.0,
    every: float = 0.1,
    state: Callable[[], str] | None = None,
) -> T:
    """Call ``condition`` every ``every`` seconds until it returns something truthy, and return that;
    past ``timeout`` seconds, fail with ``what`` (and ``state()``, when given: what to look at)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}" + ("" if state is None else f"\n{state()}"))
        time.sleep(every)


async def until(
    condition: Callable[[], Any],
    what: str,
    timeout: float = 30.0,
    every: float = 0.1,
    state: Callable[[], str] | None = None,
) -> Any:
    """:func:`wait_until` inside an event loop: ``condition`` may be sync or async; the loop keeps running
    (an emulator or a worker in this process goes on) between the polls."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}" + ("" if state is None else f"\n{state()}"))
        await asyncio.sleep(every)
