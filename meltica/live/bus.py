"""``InMemoryBus``: the pipeline's processors in one asyncio loop, without Kafka (tests, benchmarks).

Every published message (``publish`` by a source, a processor's ``handle`` output, its ``emit``) goes
to every processor whose ``inputs`` include the topic, one message at a time. Each processor has one
FIFO per topic — the guarantee Kafka gives per partition, and nothing more: across topics the order a
processor sees is free. By default it is the publication order (deterministic); with ``seed`` the next
topic is drawn at random (reproducibly) among those with something waiting, which exercises the
cross-topic interleavings a real broker may produce. ``redeliver=True`` hands every message over twice
in a row (at-least-once delivery after a crash): the processors must drop the second copy.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count

from pydantic import BaseModel

from meltica.live.processor import Incoming, Outgoing, Processor


@dataclass
class _Inbox:
    processor: Processor
    queues: dict[str, deque[tuple[int, Incoming]]] = field(default_factory=dict)
    handled: int = 0

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())


class InMemoryBus:
    """Runs ``processors`` (started in the given order) over in-process topics."""

    def __init__(
        self,
        processors: Sequence[Processor],
        *,
        seed: int | None = None,
        redeliver: bool = False,
        on_publish: Callable[[Outgoing], None] | None = None,
    ) -> None:
        self.processors = list(processors)
        self._inboxes = [_Inbox(p, {topic: deque() for topic in p.inputs}) for p in self.processors]
        self._rng = random.Random(seed) if seed is not None else None  # noqa: S311 - test interleavings
        self.redeliver = redeliver
        self.on_publish = on_publish
        self.published: list[Outgoing] = []
        self._seq = count()
        self._offsets: dict[str, int] = {}
        self._started = False

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        for processor in self.processors:
            await processor.start(self._emit)
        self._started = True

    async def stop(self) -> None:
        for processor in reversed(self.processors):
            await processor.stop()
        self._started = False

    async def __aenter__(self) -> InMemoryBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- publishing --------------------------------------------------------------------------
    async def _emit(self, message: Outgoing) -> None:
        self._route(message)

    def _route(self, message: Outgoing) -> None:
        self.published.append(message)
        if self.on_publish is not None:
            self.on_publish(message)
        offset = self._offsets.get(message.topic, 0)
        self._offsets[message.topic] = offset + 1
        incoming = Incoming(topic=message.topic, key=message.key, value=message.value, offset=offset)
        seq = next(self._seq)
        for inbox in self._inboxes:
            queue = inbox.queues.get(message.topic)
            if queue is not None:
                queue.append((seq, incoming))

    async def publish(self, topic: str, key: str, value: BaseModel) -> None:
        """Publish one message from outside (a source: bars, control commands)."""
        self._route(Outgoing(topic=topic, key=key, value=value))

    def messages(self, topic: str) -> list[BaseModel]:
        """Everything published on ``topic`` so far, in order."""
        return [m.value for m in self.published if m.topic == topic]

    # --- delivery ----------------------------------------------------------------------------
    def _next(self, inbox: _Inbox) -> Incoming | None:
        waiting = [q for q in inbox.queues.values() if q]
        if not waiting:
            return None
        queue = min(waiting, key=lambda q: q[0][0]) if self._rng is None else self._rng.choice(waiting)
        return queue.popleft()[1]

    async def run_until_idle(self, max_messages: int | None = None) -> int:
        """Deliver until no processor has anything waiting; returns the number of deliveries."""
        if not self._started:
            await self.start()
        delivered = 0
        while True:
            progressed = False
            for inbox in self._inboxes:
                message = self._next(inbox)
                if message is None:
                    continue
                progressed = True
                for _ in range(2 if self.redeliver else 1):
                    for out in await inbox.processor.handle(message):
                        self._route(out)
                    inbox.handled += 1
                    delivered += 1
                if max_messages is not None and delivered >= max_messages:
                    return delivered
            if not progressed:
                return delivered
