"""SQL persistence of the local order emulator: ``emulated_orders`` (state JSONB) and ``order_lists``.

Each managed order's whole state (``ManagedOrder.to_json()``: the intent, trigger progress, trailing
peak, children, list membership) is one JSONB document, upserted on every change; ``active`` is false
once the order is terminal, so ``load_active_orders`` is an index-free scan of what is still working.

``emulated_orders.client_order_id`` references ``orders``: the OMS writes the order row (write-ahead)
before it hands the order to the emulator. When the emulator is used without the OMS (tests, tools) or
manages a list leg the OMS has not stored, ``save_order`` first inserts a minimal ``orders`` row
(``ON CONFLICT DO NOTHING``: the OMS's row, when there, is never touched).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from meltica.execution.emulation import EmulatedOrderList, EmulationStore, ManagedOrder, MemoryEmulationStore
from meltica.storage import tables as t


def _order_row(order: ManagedOrder) -> dict[str, Any]:
    intent = order.intent
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
        "quantity": intent.quantity,
        "price": intent.price,
        "trigger_price": intent.trigger_price,
        "display_quantity": intent.display_quantity,
        "params": {"intent": intent.model_dump(mode="json")},
        # Held locally = accepted by "the venue" that is this process; a native leg is not sent yet.
        "status": "open" if order.mode == "emulated" else "new",
        "filled_quantity": 0,
        "post_only": intent.post_only,
        "reduce_only": intent.reduce_only,
        "expire_at": intent.expire_at,
        "emulated": order.mode == "emulated",
        "order_list_id": order.list_id,
        "created_at": intent.created_at,
        "updated_at": intent.created_at,
    }


class SqlEmulationStore:
    """``EmulationStore`` on PostgreSQL (tables from migration 0003)."""

    def __init__(self, engine: Engine, *, account: str | None = None) -> None:
        """``account``: load only that account's orders and lists (one emulator per account shares the
        tables with the others, and must restore only its own); ``None``: every account's."""
        self.engine = engine
        self.account = account
        self._known: set[str] = set()  # order rows already ensured by this instance

    def save_order(self, order: ManagedOrder) -> None:
        state = order.to_json()
        active = not order.status.is_terminal
        with self.engine.begin() as conn:
            if order.client_order_id not in self._known:
                conn.execute(pg_insert(t.orders).values(**_order_row(order)).on_conflict_do_nothing())
            stmt = pg_insert(t.emulated_orders).values(
                client_order_id=order.client_order_id, state=state, active=active
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[t.emulated_orders.c.client_order_id],
                    set_={"state": stmt.excluded.state, "active": stmt.excluded.active, "updated_at": func.now()},
                )
            )
        self._known.add(order.client_order_id)

    def load_active_orders(self) -> list[ManagedOrder]:
        query = select(t.emulated_orders.c.state).where(t.emulated_orders.c.active.is_(True))
        if self.account is not None:
            query = query.join(t.orders, t.orders.c.client_order_id == t.emulated_orders.c.client_order_id).where(
                t.orders.c.account == self.account
            )
        with self.engine.connect() as conn:
            rows = conn.execute(
                query.order_by(t.emulated_orders.c.updated_at, t.emulated_orders.c.client_order_id)
            ).all()
        return [ManagedOrder.from_json(row.state) for row in rows]

    def load_orders(self, client_order_ids: Sequence[str]) -> list[ManagedOrder]:
        if not client_order_ids:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.emulated_orders.c.state).where(t.emulated_orders.c.client_order_id.in_(list(client_order_ids)))
            ).all()
        return [ManagedOrder.from_json(row.state) for row in rows]

    def save_list(self, order_list: EmulatedOrderList) -> None:
        values = {
            "list_id": order_list.list_id,
            "kind": order_list.kind,
            "account": order_list.account,
            "strategy": order_list.strategy,
            "status": order_list.status,
            "params": order_list.to_json(),
        }
        stmt = pg_insert(t.order_lists).values(**values)
        with self.engine.begin() as conn:
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[t.order_lists.c.list_id],
                    set_={"status": stmt.excluded.status, "params": stmt.excluded.params, "updated_at": func.now()},
                )
            )

    def load_active_lists(self) -> list[EmulatedOrderList]:
        query = select(t.order_lists).where(
            t.order_lists.c.status == "active", t.order_lists.c.kind.in_(["oco", "bracket"])
        )
        if self.account is not None:
            query = query.where(t.order_lists.c.account == self.account)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t.order_lists.c.created_at)).all()
        return [EmulatedOrderList.from_row(r.list_id, r.kind, r.account, r.strategy, r.status, r.params) for r in rows]


class DurableHeldOrderStore:
    """The emulation store of a durable execution stage: the orders the OMS hands to its local emulation
    (stops, trailing stops, icebergs … a venue does not take as they are; each is already an ``orders``
    row of the OMS's) in PostgreSQL (``durable``), so they come back after a restart; order lists and
    their legs in ``memory``.

    Why lists are not made durable here: :class:`SqlEmulationStore` writes an ``orders`` row for a leg
    when it first saves it, and a native leg is sent later by the OMS under that same client order id —
    the OMS would take the row for an earlier submit of its own and send nothing. Until the two writers
    share that row, a restart loses the legs an execution stage holds."""

    def __init__(self, durable: SqlEmulationStore, memory: EmulationStore | None = None) -> None:
        self.durable = durable
        self.memory: EmulationStore = MemoryEmulationStore() if memory is None else memory

    def _for(self, order: ManagedOrder) -> EmulationStore:
        return self.durable if order.list_id is None else self.memory

    def save_order(self, order: ManagedOrder) -> None:
        self._for(order).save_order(order)

    def load_active_orders(self) -> list[ManagedOrder]:
        return self.durable.load_active_orders() + self.memory.load_active_orders()

    def load_orders(self, client_order_ids: Sequence[str]) -> list[ManagedOrder]:
        return self.durable.load_orders(client_order_ids) + self.memory.load_orders(client_order_ids)

    def save_list(self, order_list: EmulatedOrderList) -> None:
        self.memory.save_list(order_list)

    def load_active_lists(self) -> list[EmulatedOrderList]:
        return self.memory.load_active_lists()
