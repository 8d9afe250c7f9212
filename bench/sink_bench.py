"""Sink benchmark: rows per second that ``meltica.live.sinks.SinkWriter`` writes to PostgreSQL.

Workloads, each in batches of ``--batch`` (default 500) messages, one transaction per batch (the way the
Faust sink agents call it):

* ``candles``        — ``Bar`` messages (md.candles.1m) → ``candles``;
* ``fills``          — ``AccountFill`` messages (fills) → ``fills``;
* ``orders``         — ``OrderUpdate`` messages, 4 per order (submitted, accepted, 2 fills) → ``orders`` +
  ``order_events`` + ``fills`` (rows counted: the messages);
* ``*-redelivered``  — the same batches written a second time (they write nothing: the cost of
  at-least-once redelivery).

Timing covers ``SinkWriter.write`` only (decoding, building the messages and the database set-up are
excluded). The database is a new one on the server ``meltica infra up`` provides (or
``MELTICA_DATABASE_URL``'s server), migrated to head, dropped afterwards. Not a test: nothing asserts on
speed.

Usage::

    .venv/bin/python bench/sink_bench.py                 # 40 batches of 500 per workload
    .venv/bin/python bench/sink_bench.py --batches 10 --batch 100
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from pydantic import BaseModel
from sqlalchemy import text

from meltica.domain import Fill, LiquiditySide, Order, OrderIntent, OrderType, Side
from meltica.domain.market_data import Bar
from meltica.domain.orders import OrderAccepted, OrderFilled, OrderSubmitted
from meltica.infra.postgres import ensure_postgres
from meltica.live.sinks import SinkWriter
from meltica.messaging import AccountFill, OrderUpdate
from meltica.storage import migrate
from meltica.storage.engine import make_engine

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def candles(n: int) -> list[BaseModel]:
    out: list[BaseModel] = []
    for i in range(n):
        price = Decimal("42000.12") + Decimal(i % 500) / 100
        out.append(
            Bar(
                exchange="binance",
                symbol=f"SYM{i % 20}/USDT",
                timeframe="1m",
                ts=T0 + timedelta(minutes=i // 20),
                open=price,
                high=price + 5,
                low=price - 5,
                close=price + 1,
                volume=Decimal("12.3456"),
            )
        )
    return out


def _fill(i: int, coid: str, qty: str = "0.01", prefix: str = "tr") -> Fill:
    return Fill(
        fill_id=f"{prefix}-{i}",
        client_order_id=coid,
        exchange_order_id=f"x-{i}",
        exchange="binance",
        symbol="BTC/USDT",
        side=Side.BUY,
        price=Decimal("42000.01"),
        quantity=Decimal(qty),
        fee=Decimal("0.00001"),
        fee_currency="BTC",
        liquidity=LiquiditySide.TAKER,
        ts=T0 + timedelta(milliseconds=i),
    )


def fills(n: int) -> list[BaseModel]:
    return [
        AccountFill(account=f"acc{i % 4}", strategy="bench", fill=_fill(i, f"mlt-bench-{i // 2}")) for i in range(n)
    ]


def order_updates(n: int) -> list[BaseModel]:
    out: list[BaseModel] = []
    for k in range(n // 4):
        intent = OrderIntent(
            intent_id=f"bench-{k}",
            account=f"acc{k % 4}",
            strategy="bench",
            exchange="binance",
            symbol="BTC/USDT",
            side=Side.BUY,
            type=OrderType.LIMIT,
            quantity=Decimal("0.02"),
            price=Decimal("42000.01"),
            created_at=T0,
        )
        order = Order.from_intent(intent)
        coid = order.client_order_id
        ts = T0 + timedelta(seconds=k)
        events = [
            OrderSubmitted(event_id="s", client_order_id=coid, ts=ts),
            OrderAccepted(event_id="a", client_order_id=coid, ts=ts, exchange_order_id=f"x{k}"),
            OrderFilled(event_id="f1", client_order_id=coid, ts=ts, fill=_fill(2 * k, coid, prefix="of")),
            OrderFilled(event_id="f2", client_order_id=coid, ts=ts, fill=_fill(2 * k + 1, coid, prefix="of")),
        ]
        for event in events:
            order = order.apply(event)
            out.append(OrderUpdate(account=intent.account, strategy="bench", order=order, event=event))
    return out


def run(writer: SinkWriter, batches: Sequence[Sequence[BaseModel]]) -> tuple[float, int]:
    written = 0
    t0 = time.perf_counter()
    for batch in batches:
        written += writer.write(batch).total_written
    return time.perf_counter() - t0, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()

    endpoint = ensure_postgres()
    name = f"meltica_sinkbench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(endpoint.url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(endpoint.url_for(name))
    try:
        migrate.upgrade(engine)
        writer = SinkWriter(engine)
        writer.write(candles(12))  # warm the pool and the plans
        workloads: dict[str, Callable[[int], list[BaseModel]]] = {
            "candles": candles,
            "fills": fills,
            "orders": order_updates,
        }
        print(f"SinkWriter, {args.batches} batches of {args.batch} messages, PostgreSQL {endpoint.kind}")
        print(f"{'workload':<22}{'messages':>10}{'rows written':>14}{'seconds':>10}{'messages/s':>12}{'ms/batch':>10}")
        for label, build in workloads.items():
            messages = build(args.batch * args.batches + 12)[12:]  # skip the warm-up's keys
            batches = [messages[i : i + args.batch] for i in range(0, len(messages), args.batch)]
            for suffix in ("", "-redelivered"):
                seconds, written = run(writer, batches)
                print(
                    f"{label + suffix:<22}{len(messages):>10}{written:>14}{seconds:>10.2f}"
                    f"{len(messages) / seconds:>12,.0f}{1000 * seconds / len(batches):>10.1f}"
                )
    finally:
        engine.dispose()
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
