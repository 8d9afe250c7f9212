"""WebSocket connections and who listens to what: market streams and user data subscriptions.

Each connection has an outgoing queue drained by its own writer task, so publishing is synchronous
(``hub.publish(...)`` from inside request handling keeps the engine's event order) and a slow client
never blocks the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import WSCloseCode, web

ConnKind = Literal["raw", "combined", "wsapi", "listenkey"]


@dataclass(eq=False)
class Connection:
    ws: web.WebSocketResponse
    kind: ConnKind
    streams: set[str] = field(default_factory=set)
    # WebSocket API: subscriptionId → account name (user data stream subscriptions on this connection)
    user_subscriptions: dict[int, str] = field(default_factory=dict)
    next_subscription_id: int = 0
    listen_account: str | None = None  # listenKey connections: the account whose events go here
    queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    writer: asyncio.Task[None] | None = None

    def send(self, payload: Any) -> None:
        self.queue.put_nowait(json.dumps(payload, separators=(",", ":")))

    async def run_writer(self) -> None:
        while True:
            text = await self.queue.get()
            if text is None or self.ws.closed:
                return
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return


class StreamHub:
    def __init__(self) -> None:
        self.connections: set[Connection] = set()

    def add(self, conn: Connection) -> None:
        conn.writer = asyncio.get_running_loop().create_task(conn.run_writer())
        self.connections.add(conn)

    async def remove(self, conn: Connection) -> None:
        self.connections.discard(conn)
        conn.queue.put_nowait(None)
        if conn.writer is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(conn.writer, timeout=1)

    def subscribed(self) -> set[str]:
        out: set[str] = set()
        for conn in self.connections:
            out |= conn.streams
        return out

    def has_subscribers(self, stream: str) -> bool:
        return any(stream in conn.streams for conn in self.connections)

    def publish(self, stream: str, data: Any) -> None:
        for conn in self.connections:
            if stream in conn.streams:
                if conn.kind == "combined":
                    conn.send({"stream": stream, "data": data})
                else:
                    conn.send(data)

    def publish_user(self, account: str, event: dict[str, Any]) -> None:
        for conn in self.connections:
            if conn.kind == "listenkey" and conn.listen_account == account:
                conn.send(event)
            for sub_id, sub_account in conn.user_subscriptions.items():
                if sub_account == account:
                    conn.send({"subscriptionId": sub_id, "event": event})

    async def drop_all(self) -> int:
        """Close every connection now (a network blip): clients must reconnect and resubscribe."""
        conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"emulator: connection dropped")
        return len(conns)
