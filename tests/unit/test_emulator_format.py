"""The emulator's Binance JSON has the keys and value types of Binance's official samples."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meltica.domain.enums import Side
from meltica.emulator import binance_format as fmt
from meltica.emulator.market import Kline
from meltica.emulator.symbols import spec_for
from meltica.matching import EngineOrderType, FeeSchedule, MatchingEngine, NewOrder

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "binance-docs-samples"
NOW = datetime(2024, 1, 1, tzinfo=UTC)


def sample(name: str) -> Any:
    data = json.loads((SAMPLES / name).read_text())
    return data["event"] if isinstance(data, dict) and "event" in data else data


def assert_same_shape(ours: dict[str, Any], theirs: dict[str, Any], optional: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    assert set(theirs) - optional <= set(ours), f"missing: {set(theirs) - set(ours)}"
    assert set(ours) <= set(theirs) | optional, f"extra: {set(ours) - set(theirs)}"
    for key in set(ours) & set(theirs):
        if theirs[key] is None or ours[key] is None:
            continue
        assert type(ours[key]) is type(theirs[key]), f"{key}: {type(ours[key])} vs {type(theirs[key])}"


@pytest.fixture
def engine() -> MatchingEngine:
    eng = MatchingEngine(clock=lambda: NOW, fees=FeeSchedule())
    spec = spec_for("BTCUSDT")
    eng.add_instrument(spec.instrument(Decimal("0.001"), Decimal("0.001")), symbol="BTCUSDT")
    eng.ledger.deposit("a", "USDT", Decimal(100_000))
    eng.ledger.deposit("a", "BTC", Decimal(1))
    eng.on_trade("BTCUSDT", Decimal(40_000), Decimal(1))
    return eng


def limit_order(engine: MatchingEngine) -> Any:
    result = engine.submit(
        NewOrder(
            "a",
            "BTCUSDT",
            Side.BUY,
            EngineOrderType.LIMIT,
            quantity=Decimal("0.01"),
            price=Decimal(30_000),
            client_order_id="c1",
        )
    )
    return result


def test_order_responses_match_samples(engine: MatchingEngine) -> None:
    order = limit_order(engine).order
    assert_same_shape(fmt.order_ack(order), sample("rest_POST_api_v3_order.ACK.response.json"))
    assert_same_shape(fmt.order_result(order), sample("rest_POST_api_v3_order.RESULT.response.json"))
    market = engine.submit(NewOrder("a", "BTCUSDT", Side.SELL, EngineOrderType.MARKET, quantity=Decimal("0.01")))
    full = fmt.order_full(market.order, market.fills)
    theirs = sample("rest_POST_api_v3_order.FULL.response.json")
    assert_same_shape(full, theirs)
    assert full["fills"]
    assert_same_shape(full["fills"][0], theirs["fills"][0])
    assert_same_shape(fmt.order_query(order), sample("rest_GET_api_v3_order.response.json"))
    assert_same_shape(fmt.order_query(order), sample("rest_GET_api_v3_openOrders.response.json")[0])
    cancelled = engine.cancel("a", "BTCUSDT", order_id=order.order_id).order
    assert_same_shape(fmt.cancel_response(cancelled, "x", NOW), sample("rest_DELETE_api_v3_order.response.json"))
    trade = engine.account_trades("a", "BTCUSDT")[0]
    assert_same_shape(fmt.my_trade(trade), sample("rest_GET_api_v3_myTrades.response.json")[0])


def test_account_and_user_events_match_samples(engine: MatchingEngine) -> None:
    account = fmt.account(engine.ledger.balances("a"), Decimal("0.001"), Decimal("0.001"), 1, 7)
    theirs = sample("rest_GET_api_v3_account.response.json")
    assert_same_shape(account, theirs)
    assert_same_shape(account["balances"][0], theirs["balances"][0])
    result = limit_order(engine)
    report = fmt.execution_report(result.order_updates[0], 1, 1)
    # "v" (prevented match id) appears only after a self-trade prevention
    assert_same_shape(report, sample("uds_executionReport.json"), optional={"v"})
    position = fmt.account_position(result.balance_updates, 1)
    assert_same_shape(position, sample("uds_outboundAccountPosition.json"))
    assert_same_shape(position["B"][0], sample("uds_outboundAccountPosition.json")["B"][0])
    assert_same_shape(fmt.balance_update("BTC", Decimal(1), 1), sample("uds_balanceUpdate.json"))


def test_conditional_fields_only_when_they_apply(engine: MatchingEngine) -> None:
    plain = fmt.order_result(limit_order(engine).order)
    assert "stopPrice" not in plain and "icebergQty" not in plain and "trailingDelta" not in plain
    stop = engine.submit(
        NewOrder("a", "BTCUSDT", Side.SELL, EngineOrderType.STOP_LOSS, quantity=Decimal("0.01"), trailing_delta_bps=100)
    ).order
    out = fmt.order_result(stop)
    assert out["trailingDelta"] == 100 and "stopPrice" in out


def test_kline_shapes_match_samples() -> None:
    k = Kline(0, 59_999, *(Decimal(1),) * 6, 3, Decimal(0), Decimal(0))
    row = k.rest_row()
    theirs = sample("rest_GET_api_v3_klines.response.json")[0]
    assert [type(v) for v in row] == [type(v) for v in theirs]
    assert_same_shape(k.stream_payload("BTCUSDT", "1m"), sample("ws_kline.json")["k"])
