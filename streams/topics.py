"""Faust topic objects built from the catalogue, and decode-or-dead-letter for agents.

Topics carry raw bytes (``key_serializer``/``value_serializer="raw"``): the one codec in
``meltica.messaging.codec`` does the decoding, so a malformed message reaches our code (rather than
failing inside Faust's serializer) and can be dead-lettered while the agent keeps running.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import faust
from faust.types import EventT

from meltica.live.processor import Incoming
from meltica.messaging.catalogue import Catalogue, TopicSpec
from meltica.messaging.codec import Codec
from meltica.messaging.dlq import DeadLetterRouter


def faust_topic(app: faust.App, catalogue: Catalogue, spec: TopicSpec) -> faust.TopicT:
    retention = None if spec.retention_ms is None else spec.retention_ms / 1000.0
    return app.topic(
        catalogue.topic_name(spec.name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=spec.partitions,
        retention=retention,
        compacting=spec.compacted,
        deleting=not spec.compacted,
    )


class StreamTopics:
    """All catalogue topics of one app: ``topics["md.trades"]``, plus :meth:`decode_or_dead_letter`."""

    def __init__(self, app: faust.App, catalogue: Catalogue | None = None, codec: Codec | None = None) -> None:
        self.app = app
        self.codec = codec or Codec(catalogue)
        self.catalogue = self.codec.catalogue
        self.topics: dict[str, faust.TopicT] = {
            spec.name: faust_topic(app, self.catalogue, spec) for spec in self.catalogue
        }
        self.dead_letters = DeadLetterRouter(self.codec, self._send_dead_letter)

    def __getitem__(self, name: str) -> faust.TopicT:
        return self.topics[name]

    @property
    def dlq(self) -> faust.TopicT:
        return self.topics[self.catalogue.dlq.name]

    async def _send_dead_letter(self, key: bytes, value: bytes) -> Any:
        return await self.dlq.send(key=key, value=value)

    async def send(self, name: str, key: str, model: Any) -> Any:
        """Encode ``model`` with the topic's codec and send it keyed by ``key``."""
        return await self.topics[name].send(key=key.encode(), value=self.codec.encode(name, model))

    async def decode_or_dead_letter(self, topic: str | TopicSpec, raw: bytes | None, **where: Any) -> Any | None:
        """The model, or ``None`` after the message went to the DLQ (and was counted)."""
        return await self.dead_letters.decode_or_dead_letter(topic, raw, **where)

    async def decode_event(self, name: str, event: EventT[Any]) -> Any | None:
        """Decode a Faust event (from ``stream.events()``), dead-lettering with partition/offset/key."""
        message = event.message
        return await self.dead_letters.decode_or_dead_letter(
            name,
            event.value,
            key=message.key,
            partition=message.partition,
            offset=message.offset,
            physical_topic=message.topic,
        )

    @property
    def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        return dict(self.dead_letters.counts)


async def decode_or_dead_letter(
    topics: StreamTopics, topic: str | TopicSpec, raw: bytes | None, **where: Any
) -> Any | None:
    """Module-level form of :meth:`StreamTopics.decode_or_dead_letter`."""
    return await topics.decode_or_dead_letter(topic, raw, **where)


def incoming_of(message: Any, logical: str, model: Any) -> Incoming:
    """A fetched Kafka message (Faust's) with its decoded value, as a processor takes it."""
    raw_key = message.key
    key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes | bytearray) else raw_key
    timestamp = datetime.fromtimestamp(message.timestamp, UTC) if message.timestamp and message.timestamp > 0 else None
    return Incoming(
        topic=logical,
        key=key,
        value=model,
        partition=message.partition,
        offset=message.offset,
        timestamp=timestamp,
    )
