"""``NotifyingOrderStore``: an order store that tells its owner about every stored order change.

A simulated context (the backtest's) and the live execution stage keep their view of the orders — and
queue the strategies' callbacks — from what the OMS stores, at the moment it stores it: the in-memory store
in a backtest and a paper run, the PostgreSQL ``OrderStore`` when the execution stage has one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from meltica.domain import Fill, Order, OrderEvent
from meltica.execution import MemoryOrderStore
from meltica.execution.store import OrderStoreProtocol

OrderListener = Callable[[Order, OrderEvent | None], None]
"""``listener(order, event)``: the order as stored now, and the event that made it so (``None``: none)."""


class NotifyingOrderStore:
    """``inner`` (default a new ``MemoryOrderStore``), calling ``listener`` after every stored change."""

    def __init__(self, listener: OrderListener, inner: OrderStoreProtocol | None = None) -> None:
        self.inner: OrderStoreProtocol = MemoryOrderStore() if inner is None else inner
        self._listener = listener

    def insert_order(
        self,
        order: Order,
        event: OrderEvent | None = None,
        *,
        emulated: bool = False,
        parent_client_order_id: str | None = None,
        order_list_id: str | None = None,
    ) -> bool:
        inserted = self.inner.insert_order(
            order, event, emulated=emulated, parent_client_order_id=parent_client_order_id, order_list_id=order_list_id
        )
        if inserted:
            self._listener(order, event)
        return inserted

    def append_event(self, order: Order, event: OrderEvent) -> int | None:
        seq = self.inner.append_event(order, event)
        self._listener(order, event)
        return seq

    def record_note(self, order: Order, kind: str, ts: datetime, payload: Mapping[str, Any]) -> int:
        return self.inner.record_note(order, kind, ts, payload)

    def record_fill(self, fill: Fill, account: str, strategy: str | None) -> bool:
        return self.inner.record_fill(fill, account, strategy)

    def get(self, client_order_id: str) -> Order | None:
        return self.inner.get(client_order_id)

    def load_open(self, account: str | None = None, *, include_emulated: bool = True) -> list[Order]:
        return self.inner.load_open(account, include_emulated=include_emulated)

    def is_emulated(self, client_order_id: str) -> bool:
        return self.inner.is_emulated(client_order_id)

    def count_children(self, parent_client_order_id: str) -> int:
        return self.inner.count_children(parent_client_order_id)

    def order_row(self, client_order_id: str) -> dict[str, Any] | None:
        return self.inner.order_row(client_order_id)

    def events_of(self, client_order_id: str) -> list[dict[str, Any]]:
        return self.inner.events_of(client_order_id)

    def fills_of(self, client_order_id: str) -> list[dict[str, Any]]:
        return self.inner.fills_of(client_order_id)
