"""Backtest results on real PostgreSQL: save/load round trip, a large curve through COPY, failure modes."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from meltica.backtest import BacktestResult, EquityPoint, OrderRecord
from meltica.domain import Fill, LiquiditySide, OrderType, Side
from meltica.domain.orders import Order, OrderIntent
from meltica.errors import DataValidationError
from meltica.storage import migrate
from meltica.storage.engine import make_engine
from tests.integration.databases import drop_test_database

pytestmark = pytest.mark.integration

T0 = datetime(2022, 1, 1, tzinfo=UTC)
D = Decimal


# A fresh, migrated database for this module (the pattern of tests/integration/storage/conftest.py).
def _create_database(admin_url: str) -> str:
    name = f"meltica_t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(admin_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name


def _drop_database(admin_url: str, name: str) -> None:
    admin = make_engine(admin_url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        drop_test_database(conn, name)
    admin.dispose()


@pytest.fixture(scope="module")
def database(postgres_endpoint) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    name = _create_database(postgres_endpoint.url)
    engine = make_engine(postgres_endpoint.url_for(name))
    migrate.upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()
        _drop_database(postgres_endpoint.url, name)


def _fill(i: int, side: Side, qty: str, price: str, fee: str, minute: int, **extra: object) -> Fill:
    fields: dict[str, object] = {
        "fill_id": f"t{i}",
        "client_order_id": f"o{i}",
        "exchange": "binance",
        "symbol": "BTC/USDT",
        "side": side,
        "price": D(price),
        "quantity": D(qty),
        "fee": D(fee),
        "fee_currency": "USDT",
        "ts": T0 + timedelta(minutes=minute),
        **extra,
    }
    return Fill.model_validate(fields)


def _orders() -> list[OrderRecord | Order]:
    intent = OrderIntent(
        intent_id="i-limit",
        account="bt",
        strategy="sma_cross",
        exchange="binance",
        symbol="BTC/USDT",
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=D("0.25000000"),
        price=D("45999.990000000000000000000001"),
        created_at=T0 + timedelta(minutes=40),
    )
    records: list[OrderRecord | Order] = [
        OrderRecord(
            client_order_id=f"o{i}",
            intent_id=f"i{i}",
            symbol="BTC/USDT",
            side=side,
            order_type="market",
            quantity=D(qty),
            price=None,
            trigger_price=None,
            status="filled",
            filled_quantity=D(qty),
            avg_fill_price=D(price),
            created_at=T0 + timedelta(minutes=minute),
            updated_at=T0 + timedelta(minutes=minute, seconds=1),
        )
        # Not in time or id order: the load must keep the order they were saved in.
        for i, side, qty, price, minute in [
            (10, "sell", "0.8", "45900.25", 30),
            (2, "sell", "0.2", "46100.00", 20),
            (1, "buy", "0.5", "46000.5", 10),
        ]
    ]
    records.append(
        OrderRecord(
            client_order_id="o-stop",
            intent_id="i-stop",
            symbol="BTC/USDT",
            side="sell",
            order_type="stop_market",
            quantity=D("0.5"),
            price=None,
            trigger_price=D("44000.0000"),
            status="cancelled",
            filled_quantity=D("0"),
            avg_fill_price=None,
            created_at=T0 + timedelta(minutes=10),
            updated_at=T0 + timedelta(minutes=35),
            reason="position closed",
        )
    )
    records.append(Order.from_intent(intent))  # a domain order, kept as its record
    return records


def _result(points: int = 500, **overrides: object) -> BacktestResult:
    equity = [
        EquityPoint(
            T0 + timedelta(minutes=i),
            D(10_000) + D(i % 97) - D(i % 13) / 7,  # 28-digit decimals survive NUMERIC unchanged
            D("5000.12345678"),
            D(5000) + D(i % 97) - D(i % 13) / 7,
        )
        for i in range(points)
    ]
    fills = [
        _fill(1, Side.BUY, "0.5", "46000.5", "0.023", 10),
        _fill(2, Side.SELL, "0.2", "46100", "0.00922", 20),
        _fill(3, Side.SELL, "0.8", "45900.25", "0.0367202", 30),  # closes 0.3, opens 0.5 short
    ]
    kwargs: dict[str, object] = {
        "strategy": "sma_cross",
        "symbols": ["BTC/USDT"],
        "equity": equity,
        "fills": fills,
        "params": {"fast": 10, "slow": 30, "size": D("0.5"), "nested": {"on": True}},
        "exchange": "binance",
        "timeframe": "1m",
        "fill_model": {"kind": "bar_close", "slippage_bps": 2},
        "code_version": "v0.1.0-5-g2293f4a-dirty",
        **overrides,
    }
    return BacktestResult.from_run(**kwargs)  # type: ignore[arg-type]


def test_save_and_load_round_trip(database: Engine) -> None:
    result = _result()
    result.save(database)
    loaded = BacktestResult.load(database, result.run_id)

    assert loaded.run_id == result.run_id
    assert loaded.metrics == result.metrics  # every field, floats bit-identical
    assert loaded.equity == result.equity
    assert loaded.round_trips == result.round_trips
    assert len(loaded.round_trips) == 3 and loaded.round_trips[-1].is_open
    assert (loaded.strategy, loaded.symbols, loaded.exchange, loaded.timeframe) == (
        "sma_cross",
        ("BTC/USDT",),
        "binance",
        "1m",
    )
    assert (loaded.data_start, loaded.data_end) == (result.data_start, result.data_end)
    assert loaded.code_version == "v0.1.0-5-g2293f4a-dirty"
    # JSON comes back as JSON: decimals as their exact strings.
    assert loaded.params == {"fast": 10, "slow": 30, "size": "0.5", "nested": {"on": True}}
    assert loaded.fill_model == {"kind": "bar_close", "slippage_bps": 2}
    # The database clock stamps the run.
    assert loaded.started_at is not None and loaded.finished_at is not None
    assert loaded.fills == result.fills and len(loaded.fills) == 3
    assert loaded.orders == ()
    with database.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM backtest_runs WHERE run_id = :r"), {"r": result.run_id}
        ).scalar_one()
    assert status == "finished"


def test_orders_and_fills_round_trip_exactly(database: Engine) -> None:
    fills = [
        _fill(1, Side.BUY, "0.5", "46000.5", "0.023", 10, liquidity=LiquiditySide.TAKER, exchange_order_id="x-1"),
        _fill(10, Side.SELL, "0.20000000", "46100.00", "-0.00922", 20, liquidity=LiquiditySide.MAKER),
        _fill(2, Side.SELL, "0.8", "45900.25", "0.0367202", 20, fee_currency=None),
    ]
    result = _result(points=20, fills=fills, orders=_orders())
    assert len(result.orders) == 5 and result.orders[-1].intent_id == "i-limit"
    result.save(database)
    loaded = BacktestResult.load(database, result.run_id)

    assert loaded.orders == result.orders
    assert loaded.fills == result.fills
    assert loaded.round_trips == result.round_trips
    # Exact: the stored NUMERIC keeps every digit and the scale it was given.
    assert [str(o.quantity) for o in loaded.orders] == [str(o.quantity) for o in result.orders]
    assert [str(o.avg_fill_price) for o in loaded.orders] == [str(o.avg_fill_price) for o in result.orders]
    assert str(loaded.orders[-1].price) == "45999.990000000000000000000001"
    assert str(loaded.orders[3].trigger_price) == "44000.0000"
    assert [(str(f.price), str(f.quantity), str(f.fee)) for f in loaded.fills] == [
        ("46000.5", "0.5", "0.023"),
        ("46100.00", "0.20000000", "-0.00922"),
        ("45900.25", "0.8", "0.0367202"),
    ]
    assert [f.fill_id for f in loaded.fills] == ["t1", "t10", "t2"]


def test_deleting_a_run_deletes_everything_stored_under_it(database: Engine) -> None:
    result = _result(points=10, orders=_orders())
    result.save(database)
    tables = ("backtest_metrics", "backtest_equity", "backtest_trades", "backtest_orders", "backtest_fills")

    def counts() -> dict[str, int]:
        with database.connect() as conn:
            return {
                t: conn.execute(text(f"SELECT count(*) FROM {t} WHERE run_id = :r"), {"r": result.run_id}).scalar_one()
                for t in tables
            }

    assert all(n > 0 for n in counts().values()), counts()
    with database.begin() as conn:
        conn.execute(text("DELETE FROM backtest_runs WHERE run_id = :r"), {"r": result.run_id})
    assert counts() == dict.fromkeys(tables, 0)
    with pytest.raises(DataValidationError, match="no backtest run"):
        BacktestResult.load(database, result.run_id)


def test_infinite_metrics_round_trip(database: Engine) -> None:
    rising = [EquityPoint(T0 + timedelta(days=i), D(100 * 2**i), D(100 * 2**i), D(0)) for i in range(4)]
    result = BacktestResult.from_run(strategy="up", symbols=["X/Y"], equity=rising, code_version="x")
    assert result.metrics.sortino == math.inf and result.metrics.calmar == math.inf
    result.save(database)
    loaded = BacktestResult.load(database, str(result.run_id))
    assert loaded.metrics == result.metrics
    assert loaded.data_start == rising[0].ts


def test_large_curve_is_stored_whole(database: Engine) -> None:
    result = _result(points=200_000)
    result.save(database)
    with database.connect() as conn:
        count, first, last = conn.execute(
            text("SELECT count(*), min(ts), max(ts) FROM backtest_equity WHERE run_id = :r"), {"r": result.run_id}
        ).one()
    assert count == 200_000
    assert (first, last) == (result.equity[0].ts, result.equity[-1].ts)
    loaded = BacktestResult.load(database, result.run_id)
    assert loaded.equity[123_456] == result.equity[123_456]


def test_explicit_timestamps_and_sweep_id(database: Engine) -> None:
    sweep = uuid.uuid4()
    started, finished = T0 + timedelta(days=400), T0 + timedelta(days=400, minutes=3)
    result = _result(points=10, sweep_id=sweep, started_at=started, finished_at=finished)
    result.save(database)
    loaded = BacktestResult.load(database, result.run_id)
    assert (loaded.sweep_id, loaded.started_at, loaded.finished_at) == (sweep, started, finished)


def test_saving_a_run_twice_fails_and_leaves_nothing_half_written(database: Engine) -> None:
    result = _result(points=50)
    result.save(database)
    with pytest.raises(IntegrityError):
        result.save(database)
    assert len(BacktestResult.load(database, result.run_id).equity) == 50


def test_failed_save_rolls_back(database: Engine) -> None:
    # A non-JSON parameter fails before anything is written.
    result = _result(points=5, params={"bad": object()})
    with pytest.raises(TypeError):
        result.save(database)
    with pytest.raises(DataValidationError, match="no backtest run"):
        BacktestResult.load(database, result.run_id)


def test_load_unknown_run(database: Engine) -> None:
    with pytest.raises(DataValidationError, match="no backtest run") as info:
        BacktestResult.load(database, uuid.uuid4())
    assert info.value.reason == "unknown_run"
