"""`meltica live status` against a fresh database filled through the real stores (OrderStore, PortfolioStore,
KillSwitchStore), and `meltica live start` refusing a configuration without risk limits outside dev."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, insert

from meltica.domain import Fill, Order, OrderIntent, OrderType, Side
from meltica.domain.orders import OrderAccepted, OrderFilled, OrderSubmitted
from meltica.execution import OrderStore
from meltica.infra.kafka import KafkaEndpoint
from meltica.live.supervisor import publish_control
from meltica.messaging.admin import create_topics
from meltica.messaging.catalogue import Catalogue
from meltica.portfolio import Portfolio
from meltica.portfolio.store import PortfolioStore
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore
from meltica.storage.tables import candles, trades

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
MELTICA = str(Path(sys.executable).with_name("meltica"))


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def make_intent(
    account: str, strategy: str, symbol: str, side: Side, qty: str, price: str | None = None
) -> OrderIntent:
    return OrderIntent(
        intent_id=f"{strategy}-{symbol}-{side.value}-{qty}-{price}-{account}",
        account=account,
        strategy=strategy,
        exchange="binance",
        symbol=symbol,
        side=side,
        type=OrderType.LIMIT if price else OrderType.MARKET,
        quantity=D(qty),
        price=D(price) if price else None,
        created_at=T0,
    )


def stored_order(store: OrderStore, intent: OrderIntent, *, accepted: bool = False) -> Order:
    order = Order.from_intent(intent)
    assert store.insert_order(order)
    if accepted:
        for event in (
            OrderSubmitted(event_id="sub", client_order_id=order.client_order_id, ts=T0),
            OrderAccepted(event_id="acc", client_order_id=order.client_order_id, ts=T0, exchange_order_id="x1"),
        ):
            order = order.apply(event)
            store.append_event(order, event)
    return order


def filled_order(
    store: OrderStore, portfolio: Portfolio, intent: OrderIntent, legs: list[tuple[str, str, datetime, str]]
) -> None:
    """Store the order with its fills (qty, price, ts, fee) as the OMS does; book them on ``portfolio`` too."""
    order = stored_order(store, intent, accepted=True)
    for n, (qty, price, ts, fee) in enumerate(legs):
        fill = Fill(
            fill_id=f"{order.client_order_id}-t{n}",
            client_order_id=order.client_order_id,
            exchange_order_id="x1",
            exchange="binance",
            symbol=intent.symbol,
            side=intent.side,
            price=D(price),
            quantity=D(qty),
            fee=D(fee),
            fee_currency="USDT",
            ts=ts,
        )
        event = OrderFilled(event_id=f"fill-{n}", client_order_id=order.client_order_id, ts=ts, fill=fill)
        order = order.apply(event)
        store.append_event(order, event)
        portfolio.apply_fill(fill, account=intent.account, strategy=intent.strategy)


def delete_topics(bootstrap: str, prefix: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([n for n in admin.list_topics() if n.startswith(prefix)])
    finally:
        admin.close()


def write_config(path: Path, engine: Engine, prefix: str, **extra: Any) -> Path:
    config = {
        "environment": "dev",
        "database_url": engine.url.render_as_string(hide_password=False),
        "accounts": [{"name": "acct-a", "exchange": "binance"}, {"name": "acct-b", "exchange": "binance"}],
        "risk": {"max_gross_exposure": "1000", "max_open_orders": 4, "max_position_notional": "100"},
        "live": {
            "topic_prefix": prefix,
            "state_dir": str(path.parent / "live-state"),
            "instances": [
                {
                    "instance_id": "mom-1",
                    "strategy": "momentum",
                    "account": "acct-a",
                    "symbols": ["BTC/USDT", "ETH/USDT"],
                },
                {"instance_id": "mm-1", "strategy": "market_making", "account": "acct-a", "symbols": ["BTC/USDT"]},
            ],
        },
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_status_shows_orders_positions_pnl_risk_kill_switch_and_market_data(
    fresh_database: Engine, tmp_path: Path, kafka_endpoint: KafkaEndpoint, unique_name: Callable[[str], str]
) -> None:
    engine = fresh_database
    store = OrderStore(engine)
    seen = Portfolio()
    buy, sell = Side.BUY, Side.SELL
    filled_order(
        store,
        seen,
        make_intent("acct-a", "mom-1", "BTC/USDT", buy, "0.5"),
        [("0.3", "100", minutes(1), "0"), ("0.2", "110", minutes(2), "0")],
    )
    filled_order(
        store, seen, make_intent("acct-a", "mom-1", "BTC/USDT", sell, "0.2"), [("0.2", "120", minutes(3), "0.05")]
    )
    filled_order(
        store, seen, make_intent("acct-a", "mm-1", "BTC/USDT", buy, "0.1"), [("0.1", "115", minutes(3.5), "0")]
    )
    filled_order(store, seen, make_intent("acct-a", "mm-1", "BTC/USDT", sell, "0.1"), [("0.1", "112", minutes(4), "0")])
    filled_order(store, seen, make_intent("acct-a", "mom-1", "ETH/USDT", buy, "1"), [("1", "10", minutes(6), "0")])
    resting_buy = stored_order(store, make_intent("acct-a", "mom-1", "BTC/USDT", buy, "0.2", "90"))
    resting_sell = stored_order(store, make_intent("acct-a", "mm-1", "BTC/USDT", sell, "0.1", "130"), accepted=True)
    stored_order(store, make_intent("someone-else", "x", "BTC/USDT", buy, "1", "50"))  # not this deployment's

    # A snapshot before the last candle: BTC is then valued at the (later) candle, ETH at the snapshot's mark.
    seen.mark("binance", "BTC/USDT", D("120"))
    seen.mark("binance", "ETH/USDT", D("12"))
    PortfolioStore(engine).save_snapshot(seen, ts=minutes(7))
    with engine.begin() as conn:
        conn.execute(
            insert(candles),
            [
                {
                    "exchange": "binance",
                    "symbol": "BTC/USDT",
                    "timeframe": "1m",
                    "ts": minutes(m),
                    "open": c,
                    "high": c,
                    "low": c,
                    "close": c,
                    "volume": D(1),
                }
                for m, c in ((9, D("124")), (10, D("125")))
            ],
        )
        conn.execute(
            insert(trades),
            [
                {
                    "exchange": "binance",
                    "symbol": "BTC/USDT",
                    "ts": minutes(12),
                    "trade_id": "p1",
                    "price": D("125.5"),
                    "amount": D("0.01"),
                    "side": "buy",
                }
            ],
        )
    KillSwitch(KillSwitchStore(engine)).engage(KillSwitchMode.HALT, "drill", "tester", scope="account:acct-a")

    prefix = unique_name("status") + "."
    config = write_config(tmp_path / "live.yaml", engine, prefix)
    env = {**os.environ, "MELTICA_KAFKA_BOOTSTRAP": kafka_endpoint.bootstrap_servers}
    # A market status message on the control topic (its schema belongs to the ingest stage; read loosely).
    catalogue = Catalogue(prefix=prefix)
    create_topics(kafka_endpoint.bootstrap_servers, catalogue)
    status_message = {"exchange": "binance", "symbol": "BTC/USDT", "command": "market_status", "state": "stale"}
    try:
        publish_control(
            kafka_endpoint.bootstrap_servers,
            catalogue.topic_name("control"),
            "binance:BTC/USDT",
            json.dumps({"schema": "MarketStatus", "version": 1, "data": status_message}).encode(),
        )
        run = subprocess.run(
            [MELTICA, "live", "status", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        delete_topics(kafka_endpoint.bootstrap_servers, prefix)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)

    accounts = {a["account"]: a for a in report["accounts"]}
    assert set(accounts) == {"acct-a", "acct-b"}
    a = accounts["acct-a"]
    assert {o["client_order_id"] for o in a["open_orders"]} == {
        resting_buy.client_order_id,
        resting_sell.client_order_id,
    }
    assert {o["status"] for o in a["open_orders"]} == {"new", "open"}

    positions = {p["symbol"]: p for p in a["positions"]}
    btc, eth = positions["BTC/USDT"], positions["ETH/USDT"]
    # Account ledger (average cost over both strategies' fills): 0.3 left at cost 32.025.
    assert (btc["quantity"], btc["avg_entry_price"]) == ("0.3", "106.75")
    assert (btc["mark_price"], btc["mark_source"], btc["unrealized_pnl"]) == ("125", "candle 1m", "5.475")
    assert btc["snapshot_quantity"] == "0.3"
    assert (eth["quantity"], eth["mark_price"], eth["mark_source"]) == ("1", "12", "position snapshot")
    assert eth["unrealized_pnl"] == "2"

    strategies = {s["strategy"]: s for s in a["strategies"]}
    assert strategies["mom-1"]["realized_pnl"] == "3.2"  # 0.2 x 120 - 0.2 x 104
    assert strategies["mom-1"]["unrealized_pnl"] == "8.3"  # BTC 0.3 x (125 - 104) + ETH 1 x (12 - 10)
    assert strategies["mom-1"]["fees"] == "0.05"
    assert strategies["mm-1"]["realized_pnl"] == "-0.3"
    assert a["unbooked_fills"] == []
    assert a["pnl"] == {"realized": "3.725", "unrealized": "7.475", "fees": "0.05", "total": "11.15"}

    risk = a["risk"]
    # Worst case, open orders counted as filled: BTC 0.3 + 0.2 bought = 0.5 x 125; ETH 1 x 12.
    assert risk["gross_exposure"] == {
        "used": "74.5",
        "limit": "1000",
        "source": "risk.max_gross_exposure",
        "utilisation": "0.0745",
    }
    assert (risk["open_orders"]["used"], risk["open_orders"]["limit"], risk["open_orders"]["utilisation"]) == (
        "2",
        "4",
        "0.5000",
    )
    assert btc["position_limit"]["used"] == "62.5" and btc["position_limit"]["utilisation"] == "0.6250"
    assert risk["net_exposure"]["limit"] is None

    assert a["kill_switch"]["scopes"]["account:acct-a"]["mode"] == "halt"
    assert a["kill_switch"]["effective"] == {
        "mom-1": {"mode": "halt", "scope": "account:acct-a"},
        "mm-1": {"mode": "halt", "scope": "account:acct-a"},
    }
    assert report["kill_switch"]["account:acct-a"]["reason"] == "drill"

    b = accounts["acct-b"]
    assert b["open_orders"] == [] and b["positions"] == [] and b["strategies"] == []

    markets = {m["symbol"]: m for m in report["market_data"]}
    assert markets["BTC/USDT"]["last_candle_ts"] == "2026-01-05T12:10:00Z"
    assert markets["BTC/USDT"]["last_trade_ts"] == "2026-01-05T12:12:00Z"
    assert markets["BTC/USDT"]["stale"] is True  # recorded long ago
    assert markets["ETH/USDT"]["last_candle_ts"] is None and markets["ETH/USDT"]["stale"] is True
    assert markets["BTC/USDT"]["status"] == status_message and markets["ETH/USDT"]["status"] is None

    assert report["supervisor"]["running"] is False and report["supervisor"]["state"] == "never started"
    assert report["workers"] == {"stats_topic": f"{report['topic_prefix']}meltica.worker-stats", "groups": []}

    text_run = subprocess.run(
        [MELTICA, "live", "status", "--config", str(config)], capture_output=True, text=True, env=env, timeout=120
    )
    assert text_run.returncode == 0, text_run.stderr
    assert "account acct-a" in text_run.stdout and "kill switch account:acct-a: halt (drill)" in text_run.stdout


def test_start_refuses_a_config_without_limits_outside_dev(tmp_path: Path) -> None:
    config = tmp_path / "paper.yaml"
    state = tmp_path / "state"
    config.write_text(
        yaml.safe_dump(
            {
                "environment": "paper",
                "accounts": [{"name": "acct-a", "exchange": "binance"}],
                "live": {
                    "state_dir": str(state),
                    "instances": [
                        {"instance_id": "m", "strategy": "momentum", "account": "acct-a", "symbols": ["BTC/USDT"]}
                    ],
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MELTICA_ENV", "MELTICA_ENVIRONMENT")}
    run = subprocess.run(
        [MELTICA, "live", "start", "--config", str(config)], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 2, run.stderr
    for name in ("max_order_notional", "max_position_notional", "max_gross_exposure", "daily_loss_limit"):
        assert f"risk.{name}: required to trade live in paper" in run.stderr
    assert not state.exists()  # nothing started, nothing written
