"""``maybe_await``: the OMS's collaborators (risk gate, emulator, hooks) may be sync or async."""

from __future__ import annotations

import inspect
from typing import Any


async def maybe_await(value: Any) -> Any:
    """``value`` itself, or what it resolves to when it is awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value
