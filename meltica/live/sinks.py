"""The sinks of the live pipeline: decoded messages → PostgreSQL/TimescaleDB, in batches, idempotently.

:class:`SinkWriter` takes a batch of :class:`~meltica.live.processor.Incoming` messages (any mix of
topics) and writes it in **one transaction**: every target table gets its rows with ``COPY`` into a
temporary staging table (``ON COMMIT DROP``, the pattern of ``meltica.storage.candles``), then one
``INSERT … SELECT … ON CONFLICT`` moves them over. A batch that is handed over again (Kafka delivers at
least once) writes nothing twice, so at-least-once delivery + these writes = exactly-once effects.

What goes where (dispatch by the message's type; the topic name is not needed):

============================  ===================  =========================================================
message (topic)               table                key / conflict rule
============================  ===================  =========================================================
``Bar`` (md.candles.1m)       ``candles``          ``(exchange, symbol, timeframe, ts)``: DO NOTHING
``Trade`` (md.trades)         ``trades``           ``(exchange, symbol, ts, trade_id)``: DO NOTHING
``OrderBookSnapshot``         ``order_book_        ``(exchange, symbol, ts, sequence)`` (no sequence: 0):
(md.book)                     snapshots``          DO NOTHING
``OrderUpdate``               ``orders`` +         see below; ``held`` (a list leg the local emulation
(orders.events)               ``order_events``     holds, never a venue order): ignored
                              (+ ``fills`` for an
                              ``OrderFilled``)
``VenueProgress``             —                    ignored (a lock-step watermark, not a fact)
``AccountFill`` (fills)       ``fills``            ``(exchange, account, trade_id, side)``: DO NOTHING (a
                                                   self-trade has both legs under one trade id)
``Position`` (positions)      ``position_          ``(account, exchange, symbol, strategy, ts)`` with ``ts``
                              snapshots``          the broker timestamp of the record: DO UPDATE (latest
                                                   wins), only when something differs (a new mark price
                                                   is a difference: live positions carry one)
``RiskDecisionMessage``       ``risk_events``      ``event_id`` = :func:`decision_event_id`: DO NOTHING
(risk.decisions)
``RejectedIntent``            ``risk_events``      the same row as its decision (same id), so a rejection
(orders.rejected)                                  seen on both topics is stored once, whichever is first
============================  ===================  =========================================================

Orders. ``orders`` holds the latest state, ``order_events`` the facts (append-only: a trigger refuses
``UPDATE``). The rows have exactly the shape ``meltica.execution.store.OrderStore`` writes (``created``
row with the intent at ``seq`` 1, then one row per lifecycle event, ``event_id`` =
``event_uuid(client_order_id, event.event_id)``), so ``OrderStore.get`` rebuilds an order the sink
stored. Per batch:

1. updates whose event is already in ``order_events`` are dropped — a redelivery, or an event the
   OMS's own PostgreSQL store wrote first (the OMS writes before it publishes). That is how **both
   writers coexist**: the event id is the same for both, the first one wins, the second writes nothing
   (not even the snapshot);
2. an order not yet stored is inserted with its ``created`` row;
3. the new events get the next ``seq`` of their order (under the order row's lock, as the OMS does);
4. the snapshot takes the state after the batch's last new event of the order (without one: the last
   state re-published) unless that would regress what is stored:
   a terminal order is final, ``filled_quantity`` never decreases, and an update both older
   (``updated_at``) and earlier in the lifecycle than the stored state is refused. An update without an
   event (state re-published after a recovery) must also not be older than the stored state.

Decisions. ``risk_events.event_id`` is a UUID; :func:`decision_event_id` derives it from the decision's
content, so redeliveries and the ``orders.rejected`` copy collapse into one row. ``RiskRecorder`` uses
the same id (``meltica.risk.store.decision_event_id``): when the risk gate also records to PostgreSQL
directly, each decision is still stored once.

Candle roll-ups (``candles_1h``) are not refreshed per batch: TimescaleDB's continuous-aggregate
policy does it there; on plain PostgreSQL call ``meltica.storage.candles.refresh`` when needed.

Sync SQLAlchemy + psycopg 3; :meth:`SinkWriter.write_async` runs a batch in a worker thread so an event
loop (the Faust shell, ``streams/sinks.py``) keeps heartbeating meanwhile.
"""

# SQL here is assembled from module constants (table and column names), never from input: values go
# through COPY.
# ruff: noqa: S608
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from pydantic import BaseModel
from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc

from meltica.domain import OrderStatus
from meltica.domain.market_data import Bar, OrderBookSnapshot, Trade
from meltica.domain.orders import OrderFilled
from meltica.domain.portfolio import Position
from meltica.execution.store import CREATED, event_uuid, fill_row, order_row
from meltica.live.processor import Incoming
from meltica.messaging.schemas import AccountFill, OrderUpdate, RejectedIntent, RiskDecisionMessage, VenueProgress
from meltica.risk.store import decision_event_id as risk_decision_event_id
from meltica.risk.store import to_json

log = logging.getLogger(__name__)

SINK_TOPICS: tuple[str, ...] = (
    "md.trades",
    "md.book",
    "md.candles.1m",
    "orders.events",
    "fills",
    "positions",
    "risk.decisions",
    "orders.rejected",
)
"""The logical topics the sinks consume (``streams/sinks.py`` runs one agent per topic)."""

# Lifecycle order for the no-regression rule (terminal statuses are final and never compared).
_STATUS_RANK = ("new", "pending_submit", "open", "partially_filled", "pending_cancel")
_TERMINAL = tuple(sorted(s.value for s in OrderStatus if s.is_terminal))


def decision_event_id(decision: RiskDecisionMessage) -> uuid.UUID:
    """The ``risk_events`` key of a decision: a UUID5 of its canonical JSON. The same decision (a
    redelivery, its copy inside a ``RejectedIntent``, or ``RiskRecorder``'s row) always gets the same id."""
    return risk_decision_event_id(decision.to_decision())


FailureKind = Literal["outage", "refused", "bug"]


def failure_kind(error: BaseException) -> FailureKind:
    """How a shell should treat an exception from :meth:`SinkWriter.write`:

    * ``outage`` — the database is unreachable or the transaction was aborted by the server (connection
      lost, deadlock, serialization failure, cancelled): retry the same batch later;
    * ``refused`` — the database (or the writer) refuses the data itself (a constraint, a NUL byte in a
      text, a value out of range): retrying cannot help, isolate the message(s) and dead-letter them;
    * ``bug`` — anything else (wrong SQL, a programming error): stop.
    """
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        error = error.orig
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError | sa_exc.OperationalError):
        return "outage"
    if isinstance(error, sa_exc.InterfaceError | sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return "outage"
    if isinstance(error, psycopg.DataError | psycopg.IntegrityError | sa_exc.DataError | sa_exc.IntegrityError):
        return "refused"
    if isinstance(error, ValueError):
        return "refused"
    return "bug"


@dataclass
class SinkResult:
    """What one batch did. ``written``: rows inserted (or, for ``orders`` and ``position_snapshots``,
    inserted or changed) per table; a redelivered batch gives ``{}``-like zeros."""

    received: int = 0
    ignored: int = 0
    written: dict[str, int] = field(default_factory=dict)

    def add(self, table: str, count: int) -> None:
        if count > 0:
            self.written[table] = self.written.get(table, 0) + count

    @property
    def total_written(self) -> int:
        return sum(self.written.values())


# --- COPY into a stage ------------------------------------------------------------------------------


def copy_into_stage(
    conn: Connection, stage: str, definition: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Create the temporary table ``stage`` (``definition``: its column list, e.g. ``LIKE candles
    INCLUDING DEFAULTS``), dropped at commit, and COPY ``rows`` (tuples in ``columns`` order) into it."""
    conn.exec_driver_sql(f"CREATE TEMP TABLE {stage} ({definition}) ON COMMIT DROP")
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur, cur.copy(f"COPY {stage} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# --- per-table writers (each inside the batch's transaction) ---------------------------------------

_CANDLE_COLUMNS = ("exchange", "symbol", "timeframe", "ts", "open", "high", "low", "close", "volume")
_TRADE_COLUMNS = ("exchange", "symbol", "ts", "trade_id", "price", "amount", "side")
_BOOK_COLUMNS = ("exchange", "symbol", "ts", "sequence", "bid_prices", "bid_sizes", "ask_prices", "ask_sizes")
_FILL_COLUMNS = (
    "exchange",
    "account",
    "trade_id",
    "client_order_id",
    "exchange_order_id",
    "strategy",
    "symbol",
    "side",
    "price",
    "quantity",
    "fee",
    "fee_currency",
    "liquidity",
    "ts",
)
_POSITION_COLUMNS = (
    "account",
    "exchange",
    "symbol",
    "strategy",
    "ts",
    "quantity",
    "average_entry_price",
    "realized_pnl",
    "fees",
    "mark_price",
    "unrealized_pnl",
)
_POSITION_KEY = ("account", "exchange", "symbol", "strategy", "ts")
_RISK_COLUMNS = (
    "event_id",
    "ts",
    "account",
    "strategy",
    "symbol",
    "intent_id",
    "decision",
    "rule",
    "reason",
    "details",
    "actor",
)
# orders columns a sink writes (emulated/parent/list keep their defaults: OrderUpdate does not carry them)
_ORDER_COLUMNS = (
    "client_order_id",
    "intent_id",
    "account",
    "strategy",
    "exchange",
    "symbol",
    "side",
    "order_type",
    "time_in_force",
    "quantity",
    "price",
    "trigger_price",
    "display_quantity",
    "params",
    "status",
    "exchange_order_id",
    "filled_quantity",
    "average_fill_price",
    "post_only",
    "reduce_only",
    "expire_at",
    "created_at",
    "updated_at",
)
_SNAPSHOT_COLUMNS = (
    "quantity",
    "price",
    "trigger_price",
    "status",
    "exchange_order_id",
    "filled_quantity",
    "average_fill_price",
    "updated_at",
)
_ORDER_STAGE_EXTRA = ("pos", "event_id", "event_ts", "event_type", "event_payload", "created_event_id")
_ORDER_STAGE_DEFINITION = """
    pos integer NOT NULL, client_order_id text NOT NULL, intent_id text NOT NULL, account text NOT NULL,
    strategy text, exchange text NOT NULL, symbol text NOT NULL, side text NOT NULL, order_type text NOT NULL,
    time_in_force text, quantity numeric NOT NULL, price numeric, trigger_price numeric,
    display_quantity numeric, params jsonb NOT NULL, status text NOT NULL, exchange_order_id text,
    filled_quantity numeric NOT NULL, average_fill_price numeric, post_only boolean NOT NULL,
    reduce_only boolean NOT NULL, expire_at timestamptz, created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL, event_id uuid, event_ts timestamptz, event_type text,
    event_payload jsonb, created_event_id uuid NOT NULL, seq bigint
"""


def _insert_do_nothing(conn: Connection, table: str, stage: str) -> int:
    return conn.exec_driver_sql(f"INSERT INTO {table} SELECT * FROM {stage} ON CONFLICT DO NOTHING").rowcount


def _write_candles(conn: Connection, bars: Sequence[Bar]) -> int:
    rows = ((b.exchange, b.symbol, b.timeframe, b.ts, b.open, b.high, b.low, b.close, b.volume) for b in bars)
    copy_into_stage(conn, "sink_candles", "LIKE candles INCLUDING DEFAULTS", _CANDLE_COLUMNS, rows)
    return _insert_do_nothing(conn, "candles", "sink_candles")


def _write_trades(conn: Connection, trades: Sequence[Trade]) -> int:
    rows = (
        (
            t.exchange,
            t.symbol,
            t.ts,
            t.trade_id,
            t.price,
            t.quantity,
            None if t.aggressor_side is None else t.aggressor_side.value,
        )
        for t in trades
    )
    copy_into_stage(conn, "sink_trades", "LIKE trades INCLUDING DEFAULTS", _TRADE_COLUMNS, rows)
    return _insert_do_nothing(conn, "trades", "sink_trades")


def _write_books(conn: Connection, books: Sequence[OrderBookSnapshot]) -> int:
    rows = (
        (
            b.exchange,
            b.symbol,
            b.ts,
            b.sequence or 0,
            [level.price for level in b.bids],
            [level.quantity for level in b.bids],
            [level.price for level in b.asks],
            [level.quantity for level in b.asks],
        )
        for b in books
    )
    copy_into_stage(conn, "sink_books", "LIKE order_book_snapshots INCLUDING DEFAULTS", _BOOK_COLUMNS, rows)
    return _insert_do_nothing(conn, "order_book_snapshots", "sink_books")


def _write_fills(conn: Connection, fill_rows: Sequence[dict[str, Any]]) -> int:
    rows = (tuple(r[c] for c in _FILL_COLUMNS) for r in fill_rows)
    copy_into_stage(conn, "sink_fills", "LIKE fills INCLUDING DEFAULTS", _FILL_COLUMNS, rows)
    return conn.exec_driver_sql(
        f"INSERT INTO fills ({', '.join(_FILL_COLUMNS)}) SELECT {', '.join(_FILL_COLUMNS)} FROM sink_fills "
        "ON CONFLICT (exchange, account, trade_id, side) DO NOTHING"
    ).rowcount


def _write_positions(conn: Connection, positions: Sequence[tuple[int, datetime, Position]]) -> int:
    rows = (
        (
            pos,
            p.account,
            p.exchange,
            p.symbol,
            p.strategy,
            ts,
            p.quantity,
            p.avg_entry_price,
            p.realized_pnl,
            p.fees,
            p.mark_price,
            p.unrealized_pnl_at_mark,
        )
        for pos, ts, p in positions
    )
    copy_into_stage(
        conn,
        "sink_positions",
        "LIKE position_snapshots INCLUDING DEFAULTS, pos integer NOT NULL",
        ("pos", *_POSITION_COLUMNS),
        rows,
    )
    cols = ", ".join(_POSITION_COLUMNS)
    key = ", ".join(_POSITION_KEY)
    series = ", ".join(_POSITION_KEY[:-1])
    values = [c for c in _POSITION_COLUMNS if c not in _POSITION_KEY]
    row = ", ".join(values)
    # Per key and timestamp the later record (partition order) wins; a snapshot equal to the one before
    # it (in the batch, or else the latest stored one) is not a change and adds no row, so a position
    # re-published with a new timestamp writes nothing either. (Whether there is a row before it is
    # asked of its ts: a ROW with a NULL field — a flat position, no mark — is not "NOT NULL".)
    return conn.exec_driver_sql(
        f"""
        WITH latest AS (
            SELECT DISTINCT ON ({key}) {cols} FROM sink_positions ORDER BY {key}, pos DESC
        ),
        sequenced AS (
            SELECT l.*, lag(ROW({row})) OVER (PARTITION BY {series} ORDER BY ts) AS previous,
                   lag(ts) OVER (PARTITION BY {series} ORDER BY ts) AS previous_ts
            FROM latest l
        )
        INSERT INTO position_snapshots ({cols})
        SELECT {cols} FROM sequenced s
        WHERE CASE WHEN s.previous_ts IS NOT NULL THEN s.previous IS DISTINCT FROM ROW({row})
                   ELSE NOT EXISTS (
                       SELECT 1 FROM (
                           SELECT {row} FROM position_snapshots p
                           WHERE {" AND ".join(f"p.{c} = s.{c}" for c in _POSITION_KEY[:-1])} AND p.ts < s.ts
                           ORDER BY p.ts DESC LIMIT 1
                       ) stored
                       WHERE ROW({", ".join(f"stored.{c}" for c in values)})
                             IS NOT DISTINCT FROM ROW({", ".join(f"s.{c}" for c in values)})
                   )
              END
        ORDER BY {key}
        ON CONFLICT ({key}) DO UPDATE SET {", ".join(f"{c} = EXCLUDED.{c}" for c in values)}
        WHERE ({", ".join(f"position_snapshots.{c}" for c in values)})
              IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in values)})
        """
    ).rowcount


def _risk_row(decision: RiskDecisionMessage) -> tuple[Any, ...]:
    row = decision.to_decision().as_row()
    row["event_id"] = decision_event_id(decision)
    row["details"] = _json(to_json(row["details"]))
    return tuple(row[c] for c in _RISK_COLUMNS)


def _write_decisions(conn: Connection, decisions: Sequence[RiskDecisionMessage]) -> int:
    copy_into_stage(
        conn, "sink_risk_events", "LIKE risk_events INCLUDING DEFAULTS", _RISK_COLUMNS, map(_risk_row, decisions)
    )
    return conn.exec_driver_sql(
        f"INSERT INTO risk_events ({', '.join(_RISK_COLUMNS)}) SELECT {', '.join(_RISK_COLUMNS)} "
        "FROM sink_risk_events ON CONFLICT DO NOTHING"
    ).rowcount


def _order_stage_rows(updates: Sequence[OrderUpdate]) -> Iterator[tuple[Any, ...]]:
    """Stage rows in batch order. Payloads are serialised by pydantic straight to JSON (the same JSON
    ``model_dump(mode="json")`` gives); an order's intent once per batch."""
    per_order: dict[str, tuple[str, uuid.UUID]] = {}
    for pos, update in enumerate(updates):
        order = update.order
        coid = order.client_order_id
        known = per_order.get(coid)
        if known is None:
            known = per_order[coid] = (
                '{"intent":' + order.intent.model_dump_json() + "}",
                event_uuid(coid, CREATED),
            )
        row = order_row(order, last_event_seq=0, intent_json={})
        row["params"] = known[0]
        event = update.event
        if event is None:
            event_cols: tuple[Any, ...] = (None, None, None, None)
        else:
            event_cols = (event_uuid(coid, event.event_id), event.ts, event.kind, event.model_dump_json())
        yield (pos, *(row[c] for c in _ORDER_COLUMNS), *event_cols, known[1])


def _write_orders(conn: Connection, updates: Sequence[OrderUpdate]) -> tuple[int, int]:
    """(order rows inserted or changed, order_events rows inserted). See the module docstring."""
    copy_into_stage(
        conn,
        "sink_orders",
        _ORDER_STAGE_DEFINITION,
        (*_ORDER_STAGE_EXTRA[:1], *_ORDER_COLUMNS, *_ORDER_STAGE_EXTRA[1:]),
        _order_stage_rows(updates),
    )
    order_cols = ", ".join(_ORDER_COLUMNS)
    # 1. events already stored (redelivered, or written by the OMS first), and repeats within the batch
    conn.exec_driver_sql("DELETE FROM sink_orders s USING order_events e WHERE s.event_id = e.event_id")
    conn.exec_driver_sql(
        "DELETE FROM sink_orders s USING sink_orders d WHERE s.event_id = d.event_id AND s.pos > d.pos"
    )
    # 2. orders seen for the first time, with their ``created`` row (seq 1), as OrderStore.insert_order
    new_rows = conn.exec_driver_sql(
        f"""
        WITH first AS (SELECT DISTINCT ON (client_order_id) * FROM sink_orders ORDER BY client_order_id, pos),
        new_orders AS (
            INSERT INTO orders ({order_cols}, last_event_seq)
            SELECT {order_cols}, 1 FROM first ORDER BY client_order_id
            ON CONFLICT (client_order_id) DO NOTHING
            RETURNING client_order_id
        ),
        created AS (
            INSERT INTO order_events (event_id, client_order_id, seq, ts, event_type, status, payload)
            SELECT f.created_event_id, f.client_order_id, 1, f.created_at, '{CREATED}', 'new', f.params
            FROM first f JOIN new_orders USING (client_order_id)
            ON CONFLICT (event_id) DO NOTHING
            RETURNING 1
        )
        SELECT client_order_id, (SELECT count(*) FROM created) FROM new_orders
        """
    ).all()
    touched = {str(r[0]) for r in new_rows}
    created_events = int(new_rows[0][1]) if new_rows else 0
    # 3. lock the touched orders (OrderStore.append_event takes the same lock), number and append the events
    conn.exec_driver_sql(
        "SELECT 1 FROM orders WHERE client_order_id IN (SELECT client_order_id FROM sink_orders) "
        "ORDER BY client_order_id FOR UPDATE"
    )
    appended = conn.exec_driver_sql(
        """
        WITH numbered AS (
            SELECT s.event_id, s.client_order_id, s.event_ts, s.event_type, s.status, s.event_payload,
                   o.last_event_seq + row_number() OVER (PARTITION BY s.client_order_id ORDER BY s.pos) AS seq
            FROM sink_orders s JOIN orders o USING (client_order_id)
            WHERE s.event_id IS NOT NULL
        ),
        appended AS (
            INSERT INTO order_events (event_id, client_order_id, seq, ts, event_type, status, payload)
            SELECT event_id, client_order_id, seq, event_ts, event_type, status, event_payload
            FROM numbered ORDER BY client_order_id, seq
            ON CONFLICT (event_id) DO NOTHING
            RETURNING event_id, seq
        )
        UPDATE sink_orders s SET seq = a.seq FROM appended a WHERE s.event_id = a.event_id
        """
    ).rowcount
    # An event that another writer stored meanwhile (after step 1) is not ours to apply.
    conn.exec_driver_sql("DELETE FROM sink_orders WHERE event_id IS NOT NULL AND seq IS NULL")
    conn.exec_driver_sql(
        """
        UPDATE orders o SET last_event_seq = m.seq
        FROM (SELECT client_order_id, max(seq) AS seq FROM sink_orders GROUP BY client_order_id) m
        WHERE o.client_order_id = m.client_order_id AND m.seq > o.last_event_seq
        """
    )
    # 4. the latest state of each order (its last new event's, else the last re-published one), unless it
    #    would regress the stored state
    ranks = "ARRAY[" + ", ".join(f"'{s}'" for s in _STATUS_RANK) + "]"
    terminal = ", ".join(f"'{s}'" for s in _TERMINAL)
    changed = conn.exec_driver_sql(
        f"""
        WITH latest AS (
            SELECT DISTINCT ON (client_order_id) * FROM sink_orders
            ORDER BY client_order_id, (seq IS NOT NULL) DESC, pos DESC
        )
        UPDATE orders o SET {", ".join(f"{c} = l.{c}" for c in _SNAPSHOT_COLUMNS)}
        FROM latest l
        WHERE o.client_order_id = l.client_order_id
          AND o.status NOT IN ({terminal})
          AND l.filled_quantity >= o.filled_quantity
          AND CASE WHEN l.seq IS NOT NULL
                   THEN l.updated_at >= o.updated_at
                        OR coalesce(array_position({ranks}, l.status), 99) >= array_position({ranks}, o.status)
                   ELSE l.updated_at > o.updated_at
                        OR (l.updated_at = o.updated_at
                            AND coalesce(array_position({ranks}, l.status), 99) >= array_position({ranks}, o.status))
              END
          AND ({", ".join(f"o.{c}" for c in _SNAPSHOT_COLUMNS)})
              IS DISTINCT FROM ({", ".join(f"l.{c}" for c in _SNAPSHOT_COLUMNS)})
        RETURNING o.client_order_id
        """
    ).all()
    touched.update(str(r[0]) for r in changed)
    return len(touched), created_events + appended


# --- the writer -------------------------------------------------------------------------------------


class SinkWriter:
    """Writes batches of decoded pipeline messages to PostgreSQL; see the module docstring.

    ``SinkWriter(engine).write(batch)`` → :class:`SinkResult`. Thread-safe (one transaction per call on
    a pooled connection). ``written_total`` accumulates the rows written over the writer's life.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batches = 0
        self.received_total = 0
        self.written_total: dict[str, int] = {}

    def write(self, messages: Sequence[Incoming | BaseModel]) -> SinkResult:
        """Write one batch in one transaction. A bare model stands for ``Incoming(topic="", key=None,
        value=model)``; a ``Position`` needs an ``Incoming`` with the record's ``timestamp``."""
        result = SinkResult(received=len(messages))
        bars: list[Bar] = []
        trades: list[Trade] = []
        books: list[OrderBookSnapshot] = []
        updates: list[OrderUpdate] = []
        fills: list[dict[str, Any]] = []
        positions: list[tuple[int, datetime, Position]] = []
        decisions: list[RiskDecisionMessage] = []
        for pos, message in enumerate(messages):
            incoming = message if isinstance(message, Incoming) else None
            value = message.value if isinstance(message, Incoming) else message
            if isinstance(value, Bar):
                bars.append(value)
            elif isinstance(value, Trade):
                trades.append(value)
            elif isinstance(value, OrderBookSnapshot):
                books.append(value)
            elif isinstance(value, OrderUpdate):
                if value.held:
                    result.ignored += 1  # a leg the local emulation holds: not a venue order (its children are)
                    continue
                updates.append(value)
                if isinstance(value.event, OrderFilled):
                    # As OrderStore.append_event: the fill is stored with its event (same key as the fills topic).
                    order = value.order
                    fills.append(fill_row(value.event.fill, account=order.account, strategy=order.intent.strategy))
            elif isinstance(value, AccountFill):
                fills.append(fill_row(value.fill, account=value.account, strategy=value.strategy))
            elif isinstance(value, Position):
                if incoming is None or incoming.timestamp is None:
                    raise ValueError("a Position needs the record's timestamp (Incoming.timestamp) as its ts")
                positions.append((pos, incoming.timestamp.astimezone(UTC), value))
            elif isinstance(value, RiskDecisionMessage):
                decisions.append(value)
            elif isinstance(value, RejectedIntent):
                decisions.append(value.decision)
            else:  # VenueProgress and anything else a sink topic may carry: not a fact to store
                if not isinstance(value, VenueProgress):
                    log.debug("sink ignores %s", type(value).__name__)
                result.ignored += 1
        with self.engine.begin() as conn:
            if bars:
                result.add("candles", _write_candles(conn, bars))
            if trades:
                result.add("trades", _write_trades(conn, trades))
            if books:
                result.add("order_book_snapshots", _write_books(conn, books))
            if updates:
                changed, events = _write_orders(conn, updates)
                result.add("orders", changed)
                result.add("order_events", events)
            if fills:
                result.add("fills", _write_fills(conn, fills))
            if positions:
                result.add("position_snapshots", _write_positions(conn, positions))
            if decisions:
                result.add("risk_events", _write_decisions(conn, decisions))
        self.batches += 1
        self.received_total += result.received
        for table, count in result.written.items():
            self.written_total[table] = self.written_total.get(table, 0) + count
        return result

    async def write_async(self, messages: Sequence[Incoming | BaseModel]) -> SinkResult:
        """:meth:`write` in a worker thread (the event loop keeps running meanwhile)."""
        return await asyncio.to_thread(self.write, messages)
