"""``NotifyingOrderStore``: an order store that tells its owner about every stored order change;
``NotifyingEmulationStore``: the same for the orders the local order emulation holds.

A simulated context (the backtest's) and the live execution stage keep their view of the orders — and
queue the strategies' callbacks — from what the OMS stores, at the moment it stores it: the in-memory store
in a backtest and a paper run, the PostgreSQL ``OrderStore`` when the execution stage has one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from meltica.domain import Fill, Order, OrderEvent
from meltica.execution import MemoryOrderStore
from meltica.execution.emulation import EmulatedOrderList, EmulationStore, ManagedOrder, MemoryEmulationStore
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


class NotifyingEmulationStore:
    """``inner`` (default a new ``MemoryEmulationStore``), calling ``listener`` after every saved change of
    an order the local order emulation holds (an emulated order, a leg of an order list)."""

    def __init__(self, listener: Callable[[ManagedOrder], None], inner: EmulationStore | None = None) -> None:
        self.inner: EmulationStore = MemoryEmulationStore() if inner is None else inner
        self._listener = listener

    def save_order(self, order: ManagedOrder) -> None:
        self.inner.save_order(order)
        self._listener(order)

    def load_active_orders(self) -> list[ManagedOrder]:
        return self.inner.load_active_orders()

    def load_orders(self, client_order_ids: Sequence[str]) -> list[ManagedOrder]:
        return self.inner.load_orders(client_order_ids)

    def save_list(self, order_list: EmulatedOrderList) -> None:
        self.inner.save_list(order_list)

    def load_active_lists(self) -> list[EmulatedOrderList]:
        return self.inner.load_active_lists()
