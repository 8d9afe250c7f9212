"""Decode-or-dead-letter, transport-free: the rule every agent applies to what it consumes
(DESIGN.md §3: a message that fails validation goes to the dead-letter topic with the reason; the
agent keeps running). ``streams/`` plugs in the Kafka send."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from meltica.messaging.catalogue import TopicSpec
from meltica.messaging.codec import Codec, MessageRejected
from meltica.messaging.schemas import DeadLetter

log = logging.getLogger(__name__)

# (key bytes, value bytes) → sent
SendRaw = Callable[[bytes, bytes], Awaitable[Any]]


class DeadLetterRouter:
    """Decodes with the codec; on :class:`MessageRejected` sends a :class:`DeadLetter` through
    ``send`` (keyed by the source topic) and counts it per ``(topic, error_type)``."""

    def __init__(self, codec: Codec, send: SendRaw, *, clock: Callable[[], datetime] | None = None) -> None:
        self.codec = codec
        self._send = send
        self._clock = clock or (lambda: datetime.now(UTC))
        self.counts: Counter[tuple[str, str]] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    async def decode_or_dead_letter(
        self,
        topic: str | TopicSpec,
        raw: bytes | None,
        *,
        key: bytes | None = None,
        partition: int = -1,
        offset: int = -1,
        physical_topic: str | None = None,
    ) -> Any | None:
        """The decoded model, or ``None`` after the message went to the DLQ."""
        try:
            return self.codec.decode(topic, raw)
        except MessageRejected as exc:
            source = physical_topic or (
                self.codec.catalogue.topic_name(topic.name) if isinstance(topic, TopicSpec) else topic
            )
            letter = DeadLetter.build(
                topic=source,
                partition=partition,
                offset=offset,
                key=key,
                raw=raw or b"",
                reason=exc.reason,
                error_type=exc.error_type,
                ts=self._clock(),
            )
            await self._send(source.encode(), self.codec.encode(self.codec.catalogue.dlq, letter))
            self.counts[(source, exc.error_type)] += 1
            log.warning("dead-lettered %s[%s]@%s: %s", source, partition, offset, exc.reason)
            return None
