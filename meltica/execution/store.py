"""Persistence of the order manager: ``orders`` (current snapshot), ``order_events`` (append-only
facts), ``fills`` (append-only, idempotent by venue trade id and side: a self-trade's two legs share
one trade id) — DESIGN.md §4, §6.

Rules the OMS relies on:

* ``insert_order`` commits the order row and its first event rows in one transaction, and the OMS
  calls it *before* anything is sent to the venue (write-ahead). A second insert of the same client
  order id changes nothing and returns ``False`` (a replayed intent finds its order).
* ``append_event`` appends one event row (next ``seq`` of the order) and updates the snapshot row in
  the same transaction; a fill event also inserts its ``fills`` row there. An event whose id was
  already stored is a replay: nothing is written.
* ``record_note`` appends a non-lifecycle row (``illegal_transition``, ``amend_requested``,
  ``recovered`` …) with the order's unchanged status: errors are recorded, never silently applied.
* An order is rebuilt by replaying its stored lifecycle events over ``Order.from_intent`` (the
  ``created`` row carries the intent), so ``fill_ids`` and amendments survive a restart exactly.

``OrderStore`` is the PostgreSQL implementation (sync SQLAlchemy core; every call is one short
transaction). ``MemoryOrderStore`` keeps the very same rows in dicts, for backtests and unit tests.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Engine, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from meltica.domain import (
    TERMINAL_STATUSES,
    Fill,
    Order,
    OrderEvent,
    OrderFilled,
    OrderIntent,
    OrderStatus,
    parse_order_event,
)
from meltica.errors import DataValidationError
from meltica.storage import tables as t

# Non-lifecycle rows in order_events (``event_type``); lifecycle rows use the domain event's ``kind``.
CREATED = "created"
ILLEGAL_TRANSITION = "illegal_transition"
AMEND_REQUESTED = "amend_requested"
RECOVERED = "recovered"
ANOMALY = "anomaly"
NEVER_REACHED_VENUE = "never reached venue"
"""The reason of an order rejected because it never reached its venue (halted before sending, or lost in a
crash before the venue saw it)."""
LIFECYCLE_KINDS = frozenset(
    {
        "submitted",
        "accepted",
        "rejected",
        "filled",
        "cancel_requested",
        "cancel_rejected",
        "cancelled",
        "expired",
        "amended",
    }
)
_OPEN_STATUSES = tuple(s.value for s in OrderStatus if s not in TERMINAL_STATUSES)

_NAMESPACE = uuid.UUID("6c1f9a3e-5b0e-4f43-9d8e-0b7a1c2d3e4f")


_NAMESPACE_BYTES = _NAMESPACE.bytes
_UUID5_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID5_SET = (0x8000 << 48) | (5 << 76)
_new_uuid = object.__new__
_set_attr = object.__setattr__


def event_uuid(client_order_id: str, event_id: str) -> uuid.UUID:
    """The ``order_events`` primary key of a domain event: stable, so a replayed event is a no-op.

    ``uuid.uuid5(_NAMESPACE, f"{client_order_id}/{event_id}")``, built without ``UUID.__init__``'s
    argument checks (one per stored event).
    """
    name = f"{client_order_id}/{event_id}".encode()
    digest = hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()  # as uuid.uuid5
    value = (int.from_bytes(digest[:16], "big") & _UUID5_CLEAR) | _UUID5_SET
    out = _new_uuid(uuid.UUID)
    _set_attr(out, "int", value)
    _set_attr(out, "is_safe", uuid.SafeUUID.unknown)
    return out


def _intent_json(intent: OrderIntent) -> dict[str, Any]:
    return intent.model_dump(mode="json")


def order_row(
    order: Order,
    *,
    last_event_seq: int,
    emulated: bool = False,
    parent_client_order_id: str | None = None,
    order_list_id: str | None = None,
    intent_json: dict[str, Any] | None = None,
) -> dict[str, Any]:
    intent = order.intent
    if intent_json is None:
        intent_json = _intent_json(intent)
    return {
        "client_order_id": order.client_order_id,
        "intent_id": intent.intent_id,
        "account": intent.account,
        "strategy": intent.strategy,
        "exchange": intent.exchange,
        "symbol": intent.symbol,
        "side": intent.side.value,
        "order_type": intent.type.value,
        "time_in_force": intent.time_in_force.value,
        "display_quantity": intent.display_quantity,
        "params": {"intent": intent_json},
        "post_only": intent.post_only,
        "reduce_only": intent.reduce_only,
        "expire_at": intent.expire_at,
        "emulated": emulated,
        "parent_client_order_id": parent_client_order_id,
        "order_list_id": order_list_id,
        "created_at": order.created_at,
        **snapshot_columns(order),
        "last_event_seq": last_event_seq,
    }


def snapshot_columns(order: Order) -> dict[str, Any]:
    """The columns of ``orders`` that change as events are applied."""
    return {
        "quantity": order.quantity,
        "price": order.price,
        "trigger_price": order.trigger_price,
        "status": order.status.value,
        "exchange_order_id": order.exchange_order_id,
        "filled_quantity": order.filled_quantity,
        "average_fill_price": order.avg_fill_price,
        "updated_at": order.updated_at,
    }


def fill_row(fill: Fill, *, account: str, strategy: str | None) -> dict[str, Any]:
    return {
        "exchange": fill.exchange,
        "account": account,
        "trade_id": fill.fill_id,
        "client_order_id": fill.client_order_id,
        "exchange_order_id": fill.exchange_order_id,
        "strategy": strategy,
        "symbol": fill.symbol,
        "side": fill.side.value,
        "price": fill.price,
        "quantity": fill.quantity,
        "fee": fill.fee,
        "fee_currency": fill.fee_currency,
        "liquidity": None if fill.liquidity is None else fill.liquidity.value,
        "ts": fill.ts,
    }


def rebuild(events: Iterable[tuple[str, Mapping[str, Any]]]) -> Order:
    """Replay ``(event_type, payload)`` rows, in ``seq`` order, into the order they describe."""
    order: Order | None = None
    for event_type, payload in events:
        if event_type == CREATED:
            order = Order.from_intent(OrderIntent.model_validate(payload["intent"]))
        elif event_type in LIFECYCLE_KINDS:
            if order is None:
                raise DataValidationError(f"order event {event_type} stored before the order's created row")
            order = order.apply(parse_order_event(dict(payload)))
    if order is None:
        raise DataValidationError("order has no created row")
    return order


class OrderStoreProtocol(Protocol):
    """What the OMS needs from its store (``OrderStore`` on PostgreSQL, ``MemoryOrderStore`` in memory)."""

    def insert_order(
        self,
        order: Order,
        event: OrderEvent | None = None,
        *,
        emulated: bool = False,
        parent_client_order_id: str | None = None,
        order_list_id: str | None = None,
    ) -> bool: ...

    def append_event(self, order: Order, event: OrderEvent) -> int | None: ...

    def record_note(self, order: Order, kind: str, ts: datetime, payload: Mapping[str, Any]) -> int: ...

    def record_fill(self, fill: Fill, account: str, strategy: str | None) -> bool: ...

    def get(self, client_order_id: str) -> Order | None: ...

    def load_open(self, account: str | None = None, *, include_emulated: bool = True) -> list[Order]: ...

    def is_emulated(self, client_order_id: str) -> bool: ...

    def count_children(self, parent_client_order_id: str) -> int: ...

    def order_row(self, client_order_id: str) -> dict[str, Any] | None: ...

    def events_of(self, client_order_id: str) -> list[dict[str, Any]]: ...

    def fills_of(self, client_order_id: str) -> list[dict[str, Any]]: ...


def _event_rows(
    order: Order, event: OrderEvent | None, first_seq: int, intent_json: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    created = {
        "event_id": event_uuid(order.client_order_id, CREATED),
        "client_order_id": order.client_order_id,
        "seq": first_seq,
        "ts": order.created_at,
        "event_type": CREATED,
        "status": "new",
        "payload": {"intent": _intent_json(order.intent) if intent_json is None else intent_json},
    }
    rows = [created]
    if event is not None:
        rows.append(_lifecycle_row(order, event, first_seq + 1))
    return rows


def _lifecycle_row(order: Order, event: OrderEvent, seq: int) -> dict[str, Any]:
    payload = event.model_dump(mode="json")
    return {
        "event_id": event_uuid(order.client_order_id, event.event_id),
        "client_order_id": order.client_order_id,
        "seq": seq,
        "ts": event.ts,
        "event_type": str(payload["kind"]),
        "status": order.status.value,
        "payload": payload,
    }


def _note_row(order: Order, kind: str, ts: datetime, payload: Mapping[str, Any], seq: int) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4(),
        "client_order_id": order.client_order_id,
        "seq": seq,
        "ts": ts,
        "event_type": kind,
        "status": order.status.value,
        "payload": dict(payload),
    }


class OrderStore:
    """The OMS's tables on PostgreSQL. Each method is one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- writes ------------------------------------------------------------------------------

    def insert_order(
        self,
        order: Order,
        event: OrderEvent | None = None,
        *,
        emulated: bool = False,
        parent_client_order_id: str | None = None,
        order_list_id: str | None = None,
    ) -> bool:
        events = _event_rows(order, event, 1)
        row = order_row(
            order,
            last_event_seq=len(events),
            emulated=emulated,
            parent_client_order_id=parent_client_order_id,
            order_list_id=order_list_id,
        )
        with self.engine.begin() as conn:
            inserted = conn.execute(
                pg_insert(t.orders).values(**row).on_conflict_do_nothing().returning(t.orders.c.client_order_id)
            ).first()
            if inserted is None:
                return False
            conn.execute(t.order_events.insert(), events)
            if emulated:
                conn.execute(
                    pg_insert(t.emulated_orders)
                    .values(client_order_id=order.client_order_id, updated_at=order.updated_at)
                    .on_conflict_do_nothing()
                )
        return True

    def _next_seq(self, conn: Connection, client_order_id: str) -> int:
        current = conn.execute(
            select(t.orders.c.last_event_seq).where(t.orders.c.client_order_id == client_order_id).with_for_update()
        ).scalar_one_or_none()
        if current is None:
            raise DataValidationError(f"order {client_order_id} is not stored", client_order_id=client_order_id)
        return int(current) + 1

    def append_event(self, order: Order, event: OrderEvent) -> int | None:
        with self.engine.begin() as conn:
            seq = self._next_seq(conn, order.client_order_id)
            row = _lifecycle_row(order, event, seq)
            stored = conn.execute(
                pg_insert(t.order_events).values(**row).on_conflict_do_nothing().returning(t.order_events.c.seq)
            ).first()
            if stored is None:
                return None  # this event was stored before: a replay
            conn.execute(
                t.orders.update()
                .where(t.orders.c.client_order_id == order.client_order_id)
                .values(**snapshot_columns(order), last_event_seq=seq)
            )
            if isinstance(event, OrderFilled):
                conn.execute(
                    pg_insert(t.fills)
                    .values(**fill_row(event.fill, account=order.account, strategy=order.intent.strategy))
                    .on_conflict_do_nothing()
                )
        return seq

    def record_note(self, order: Order, kind: str, ts: datetime, payload: Mapping[str, Any]) -> int:
        with self.engine.begin() as conn:
            seq = self._next_seq(conn, order.client_order_id)
            conn.execute(t.order_events.insert().values(**_note_row(order, kind, ts, payload, seq)))
            conn.execute(
                t.orders.update().where(t.orders.c.client_order_id == order.client_order_id).values(last_event_seq=seq)
            )
        return seq

    def record_fill(self, fill: Fill, account: str, strategy: str | None) -> bool:
        with self.engine.begin() as conn:
            inserted = conn.execute(
                pg_insert(t.fills)
                .values(**fill_row(fill, account=account, strategy=strategy))
                .on_conflict_do_nothing()
                .returning(t.fills.c.trade_id)
            ).first()
        return inserted is not None

    # --- reads -------------------------------------------------------------------------------

    def _rebuild_many(self, conn: Connection, client_order_ids: list[str]) -> list[Order]:
        if not client_order_ids:
            return []
        rows = conn.execute(
            select(t.order_events.c.client_order_id, t.order_events.c.event_type, t.order_events.c.payload)
            .where(t.order_events.c.client_order_id.in_(client_order_ids))
            .order_by(t.order_events.c.client_order_id, t.order_events.c.seq)
        ).all()
        by_order: dict[str, list[tuple[str, Mapping[str, Any]]]] = {coid: [] for coid in client_order_ids}
        for coid, event_type, payload in rows:
            by_order[coid].append((event_type, payload))
        return [rebuild(by_order[coid]) for coid in client_order_ids]

    def get(self, client_order_id: str) -> Order | None:
        with self.engine.connect() as conn:
            exists = conn.execute(
                select(t.orders.c.client_order_id).where(t.orders.c.client_order_id == client_order_id)
            ).first()
            if exists is None:
                return None
            return self._rebuild_many(conn, [client_order_id])[0]

    def load_open(self, account: str | None = None, *, include_emulated: bool = True) -> list[Order]:
        query = select(t.orders.c.client_order_id).where(t.orders.c.status.in_(_OPEN_STATUSES))
        if account is not None:
            query = query.where(t.orders.c.account == account)
        if not include_emulated:
            query = query.where(t.orders.c.emulated.is_(False))
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(query.order_by(t.orders.c.created_at, t.orders.c.client_order_id))]
            return self._rebuild_many(conn, ids)

    def is_emulated(self, client_order_id: str) -> bool:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(t.orders.c.emulated).where(t.orders.c.client_order_id == client_order_id)
            ).scalar_one_or_none()
        return bool(value)

    def count_children(self, parent_client_order_id: str) -> int:
        with self.engine.connect() as conn:
            n = conn.execute(
                select(func.count())
                .select_from(t.orders)
                .where(t.orders.c.parent_client_order_id == parent_client_order_id)
            ).scalar_one()
        return int(n)

    def order_row(self, client_order_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.orders).where(t.orders.c.client_order_id == client_order_id)).mappings().first()
        return None if row is None else dict(row)

    def events_of(self, client_order_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.order_events)
                .where(t.order_events.c.client_order_id == client_order_id)
                .order_by(t.order_events.c.seq)
            ).mappings()
            return [dict(r) for r in rows]

    def fills_of(self, client_order_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.fills).where(t.fills.c.client_order_id == client_order_id).order_by(t.fills.c.ts)
            ).mappings()
            return [dict(r) for r in rows]


class MemoryOrderStore:
    """The same rows as ``OrderStore``, kept in dicts: for backtests and unit tests (no database)."""

    def __init__(self) -> None:
        self.orders: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.event_ids: set[uuid.UUID] = set()
        self.fills: dict[tuple[str, str, str, str], dict[str, Any]] = {}

    def insert_order(
        self,
        order: Order,
        event: OrderEvent | None = None,
        *,
        emulated: bool = False,
        parent_client_order_id: str | None = None,
        order_list_id: str | None = None,
    ) -> bool:
        if order.client_order_id in self.orders:
            return False
        intent_json = _intent_json(order.intent)  # flat (JSON scalars): the order row gets its own copy
        events = _event_rows(order, event, 1, intent_json)
        self.orders[order.client_order_id] = order_row(
            order,
            last_event_seq=len(events),
            emulated=emulated,
            parent_client_order_id=parent_client_order_id,
            order_list_id=order_list_id,
            intent_json=dict(intent_json),
        )
        self.events[order.client_order_id] = events
        self.event_ids.update(e["event_id"] for e in events)
        return True

    def _row(self, client_order_id: str) -> dict[str, Any]:
        try:
            return self.orders[client_order_id]
        except KeyError:
            raise DataValidationError(
                f"order {client_order_id} is not stored", client_order_id=client_order_id
            ) from None

    def append_event(self, order: Order, event: OrderEvent) -> int | None:
        row = self._row(order.client_order_id)
        seq = int(row["last_event_seq"]) + 1
        ev = _lifecycle_row(order, event, seq)
        if ev["event_id"] in self.event_ids:
            return None
        self.event_ids.add(ev["event_id"])
        self.events[order.client_order_id].append(ev)
        row.update(snapshot_columns(order), last_event_seq=seq)
        if isinstance(event, OrderFilled):
            self.record_fill(event.fill, order.account, order.intent.strategy)
        return seq

    def record_note(self, order: Order, kind: str, ts: datetime, payload: Mapping[str, Any]) -> int:
        row = self._row(order.client_order_id)
        seq = int(row["last_event_seq"]) + 1
        self.events[order.client_order_id].append(_note_row(order, kind, ts, copy.deepcopy(dict(payload)), seq))
        row["last_event_seq"] = seq
        return seq

    def record_fill(self, fill: Fill, account: str, strategy: str | None) -> bool:
        key = (fill.exchange, account, fill.fill_id, fill.side.value)
        if key in self.fills:
            return False
        self.fills[key] = fill_row(fill, account=account, strategy=strategy)
        return True

    def get(self, client_order_id: str) -> Order | None:
        if client_order_id not in self.orders:
            return None
        return rebuild((e["event_type"], e["payload"]) for e in self.events[client_order_id])

    def load_open(self, account: str | None = None, *, include_emulated: bool = True) -> list[Order]:
        out: list[Order] = []
        for coid, row in sorted(self.orders.items(), key=lambda kv: (kv[1]["created_at"], kv[0])):
            if row["status"] not in _OPEN_STATUSES or (account is not None and row["account"] != account):
                continue
            if row["emulated"] and not include_emulated:
                continue
            order = self.get(coid)
            assert order is not None
            out.append(order)
        return out

    def is_emulated(self, client_order_id: str) -> bool:
        row = self.orders.get(client_order_id)
        return bool(row and row["emulated"])

    def count_children(self, parent_client_order_id: str) -> int:
        return sum(1 for r in self.orders.values() if r["parent_client_order_id"] == parent_client_order_id)

    def order_row(self, client_order_id: str) -> dict[str, Any] | None:
        row = self.orders.get(client_order_id)
        return None if row is None else copy.deepcopy(row)

    def events_of(self, client_order_id: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.events.get(client_order_id, []))

    def fills_of(self, client_order_id: str) -> list[dict[str, Any]]:
        rows = [r for r in self.fills.values() if r["client_order_id"] == client_order_id]
        return sorted(rows, key=lambda r: r["ts"])
