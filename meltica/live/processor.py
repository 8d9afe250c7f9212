"""The contract between a pipeline stage (core) and whatever carries its messages (a shell).

A :class:`Processor` consumes decoded messages from one or more logical topics, one at a time and in
arrival order, and answers each with the messages to publish (in that order). The Faust shell
(``streams/worker.py``) runs processors as agents over Kafka; the in-memory bus
(``meltica.live.bus``) runs the same objects in one process for tests and benchmarks. A processor never
touches Kafka, Faust or the codec: it sees pydantic models and returns pydantic models.

Delivery is at least once: after a crash a message may be handed over again. Every processor drops
what it has already handled (by request id, event id, bar time…), so a redelivery publishes nothing
new and changes no state.

State that must survive a restart is either in PostgreSQL (the OMS store, strategy state) or handed to
the shell as a JSON-able ``snapshot(key)`` after each message; the shell keeps it in a changelogged
Faust table and calls ``restore(key, state)`` for every key of its partitions before the first message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class Incoming:
    """One decoded message. ``topic`` is the logical name (``orders.intents``); ``key`` the decoded key."""

    topic: str
    key: str | None
    value: BaseModel
    partition: int = 0
    offset: int = -1
    timestamp: datetime | None = None  # the broker's timestamp, when known


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: logical topic, key (see ``meltica.messaging.catalogue`` key helpers)."""

    topic: str
    key: str
    value: BaseModel
    headers: dict[str, bytes] = field(default_factory=dict)


Emit = Callable[[Outgoing], Awaitable[None]]
"""Publish one message outside of ``handle`` (a venue's user stream, a websocket feed)."""


@runtime_checkable
class Processor(Protocol):
    """One pipeline stage. ``name`` is also the agent's name; ``inputs`` are logical topic names."""

    name: str
    inputs: tuple[str, ...]

    async def start(self, emit: Emit) -> None:
        """Connect what the stage needs (venue, database). ``emit`` publishes spontaneous output."""

    async def stop(self) -> None:
        """Release resources; flush anything buffered. Called once, on graceful shutdown too."""

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        """React to one message; return what to publish, in order. Must not raise for bad business
        input (a rejected order is an output); an exception means a bug or an outage and stops the agent."""

    def snapshot(self, key: str) -> dict[str, Any] | None:
        """JSON-able state for one key (``None``: nothing to keep) — stored after each message."""

    def restore(self, key: str, state: dict[str, Any]) -> None:
        """Reload what :meth:`snapshot` returned, before any message of that key is handled."""
