"""The topic catalogue, the one codec and decode-or-dead-letter (no broker)."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from meltica.domain import (
    Bar,
    BookLevel,
    Fill,
    Order,
    OrderAccepted,
    OrderBookSnapshot,
    OrderCancelled,
    OrderFilled,
    OrderIntent,
    Position,
    Side,
    TopOfBook,
    Trade,
)
from meltica.messaging import (
    SPECS,
    AccountFill,
    AmendRequest,
    CancelRequest,
    Catalogue,
    Codec,
    DeadLetter,
    DeadLetterRouter,
    EndOfReplayCommand,
    KillSwitchCommand,
    MarketStatus,
    MessageRejected,
    OrderListRequest,
    OrderUpdate,
    RejectedIntent,
    RejectionNotice,
    RiskDecisionMessage,
    SchemaMismatchError,
    SetParamsCommand,
    StrategyCommand,
    StrategyProgress,
    SubmitRequest,
    SubscribeCommand,
    VenueProgress,
    account_key,
    market_key,
    position_key,
)
from meltica.risk import RiskDecision

TS = datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
CODEC = Codec(Catalogue(prefix=""))


def _intent() -> OrderIntent:
    return OrderIntent(
        intent_id="i-1",
        account="acc1",
        strategy="sma",
        exchange="binance",
        symbol="BTC/USDT",
        side=Side.BUY,
        type="limit",
        quantity=Decimal("0.00100000"),
        price=Decimal("65000.12345678"),
        created_at=TS,
    )


def _fill() -> Fill:
    return Fill(
        fill_id="f-1",
        client_order_id="mlt-i-1",
        exchange="binance",
        symbol="BTC/USDT",
        side=Side.SELL,
        price=Decimal("65000.10"),
        quantity=Decimal("0.5"),
        fee=Decimal("-0.0000001"),
        fee_currency="USDT",
        ts=TS,
    )


def _order() -> Order:
    return Order.from_intent(_intent())


def _decision(approved: bool) -> RiskDecisionMessage:
    return RiskDecisionMessage.from_decision(
        RiskDecision(
            intent_id="i-1",
            approved=approved,
            rule=None if approved else "max_notional",
            reason="all checks passed" if approved else "notional 70000 above 50000",
            ts=TS,
            details={} if approved else {"limit": "50000", "n": 3},
            account="acc1",
            strategy="sma",
            exchange="binance",
            symbol="BTC/USDT",
        )
    )


SAMPLES: dict[str, list[BaseModel]] = {
    "md.trades": [
        Trade(exchange="binance", symbol="BTC/USDT", trade_id="t1", price="0.1", quantity="3", ts=TS),
        Trade(
            exchange="okx",
            symbol="ETH/USDT:USDT",
            trade_id="t2",
            price=Decimal("1E-12"),
            quantity=Decimal("123456789.123456789123456789"),
            aggressor_side=Side.SELL,
            ts=TS,
        ),
    ],
    "md.book": [
        OrderBookSnapshot(
            exchange="binance",
            symbol="BTC/USDT",
            bids=(BookLevel(price="100.10", quantity="1"), BookLevel(price="100.00", quantity="2.5")),
            asks=(BookLevel(price="100.20", quantity="0.001"),),
            sequence=42,
            ts=TS,
        )
    ],
    "md.candles.1m": [
        Bar(
            exchange="binance",
            symbol="BTC/USDT",
            timeframe="1m",
            ts=TS.replace(second=0, microsecond=0),
            open="10.00",
            high="11.5",
            low="9.999",
            close="10.10",
            volume="0",
        )
    ],
    "md.ticker": [
        TopOfBook(
            exchange="binance",
            symbol="BTC/USDT",
            bid="100.10",
            bid_quantity="1",
            ask="100.20",
            ask_quantity="0.5",
            ts=TS,
        ),
        TopOfBook(exchange="binance", symbol="BTC/USDT", bid="100.10", ts=TS),
    ],
    "orders.intents": [
        SubmitRequest(request_id="s1:1", account="acc1", strategy="s1", ts=TS, intent=_intent()),
        CancelRequest(request_id="s1:c1", account="acc1", strategy="s1", ts=TS, client_order_id="mlt-i-1"),
        AmendRequest(request_id="s1:a1", account="acc1", strategy="s1", ts=TS, client_order_id="x", price="1.5"),
        OrderListRequest(
            request_id="s1:l1",
            account="acc1",
            strategy="s1",
            ts=TS,
            list_kind="oco",
            list_id="l1",
            legs=(_intent(), _intent()),
        ),
        StrategyProgress(request_id="s1:p0", account="acc1", strategy="s1", ts=TS, exchange="binance", seq=0),
    ],
    "orders.approved": [
        SubmitRequest(request_id="s1:1", account="acc1", strategy="s1", ts=TS, intent=_intent()),
        RejectionNotice(
            request_id="s1:2",
            account="acc1",
            strategy="s1",
            ts=TS,
            request=SubmitRequest(request_id="s1:2", account="acc1", strategy="s1", ts=TS, intent=_intent()),
            decision=_decision(False),
        ),
    ],
    "orders.rejected": [RejectedIntent(intent=_intent(), decision=_decision(False))],
    "orders.events": [
        OrderUpdate(
            account="acc1",
            strategy="s1",
            order=_order(),
            event=OrderAccepted(event_id="e1", client_order_id="mlt-i-1", ts=TS, exchange_order_id="x-1"),
        ),
        OrderUpdate(
            account="acc1",
            strategy="s1",
            order=_order(),
            event=OrderFilled(event_id="e2", client_order_id="mlt-i-1", ts=TS, fill=_fill()),
        ),
        OrderUpdate(
            account="acc1",
            strategy="s1",
            order=_order(),
            event=OrderCancelled(event_id="e3", client_order_id="mlt-i-1", ts=TS, reason=None),
        ),
        VenueProgress(account="acc1", exchange="binance", symbol="BTC/USDT", seq=3, phase="close", ts=TS),
    ],
    "fills": [AccountFill(account="acc1", strategy="s1", fill=_fill())],
    "positions": [
        Position(
            account="acc1",
            exchange="binance",
            symbol="BTC/USDT",
            strategy="sma",
            quantity=Decimal("-0.30"),
            avg_entry_price=Decimal("64000.5"),
            realized_pnl=Decimal("12.000000001"),
            fill_count=3,
        )
    ],
    "risk.decisions": [_decision(True), _decision(False)],
    "control": [
        KillSwitchCommand(command_id="c1", actor="ops", ts=TS, scope="account:acc1", mode="halt", reason="drill"),
        SubscribeCommand(
            command_id="c2", actor="ops", ts=TS, exchange="binance", symbol="BTC/USDT", channels=("trades", "book")
        ),
        SetParamsCommand(command_id="c3", actor="ops", ts=TS, strategy="sma", params={"fast": 10, "mode": "x"}),
        StrategyCommand(command_id="c4", actor="ops", ts=TS, instance="sma", action="pause"),
        EndOfReplayCommand(command_id="c5", actor="replay", ts=TS, exchange="binance", symbol="BTC/USDT", count=3),
        MarketStatus(
            command_id="c6",
            actor="ingest",
            ts=TS,
            exchange="binance",
            symbol="BTC/USDT",
            stream="candles.1m",
            stale=True,
            last_event_ts=TS,
            last_received_ts=TS,
            stale_after_s=30,
            heartbeat_s=5,
        ),
    ],
    "dlq": [
        DeadLetter.build(
            topic="md.trades",
            partition=2,
            offset=17,
            key=b"binance:\xffBTC",
            raw=b"\x00\x01 not json",
            reason="invalid JSON",
            error_type="invalid_json",
            ts=TS,
        )
    ],
}


# --- catalogue ---------------------------------------------------------------------------------------


def test_catalogue_covers_every_topic_once() -> None:
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names))
    assert set(names) == set(SAMPLES)
    by_name = {spec.name: spec for spec in SPECS}
    assert by_name["positions"].compacted and by_name["positions"].topic_configs() == {"cleanup.policy": "compact"}
    assert by_name["control"].partitions == 1
    assert by_name["orders.intents"].key == by_name["orders.approved"].key == "account"
    assert by_name["md.trades"].key == "exchange:symbol"
    assert by_name["md.trades"].topic_configs() == {"cleanup.policy": "delete", "retention.ms": str(7 * 86_400_000)}


def test_prefix_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MELTICA_TOPIC_PREFIX", "paper.")
    catalogue = Catalogue()
    assert catalogue.topic_name("md.trades") == "paper.md.trades"
    assert catalogue.spec("paper.fills") is catalogue.spec("fills")
    assert Catalogue(prefix="").topic_name("md.trades") == "md.trades"
    with pytest.raises(KeyError):
        catalogue.spec("nope")
    with pytest.raises(ValueError, match="invalid Kafka topic name"):
        Catalogue(prefix="bad prefix ")


def test_keys() -> None:
    assert market_key("binance", "BTC/USDT:USDT") == "binance:BTC/USDT:USDT"
    assert account_key("acc1") == "acc1"
    assert position_key("acc1", "binance", "BTC/USDT", "sma") == "acc1:binance:sma:BTC/USDT"
    with pytest.raises(ValueError, match="exchange"):
        market_key("bin:ance", "BTC/USDT")
    with pytest.raises(ValueError, match="account"):
        account_key("")


# --- codec round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("topic", "model"), [(t, m) for t, ms in SAMPLES.items() for m in ms])
def test_round_trip_every_schema(topic: str, model: BaseModel) -> None:
    raw = CODEC.encode(topic, model)
    envelope = json.loads(raw)
    assert envelope["schema"] == CODEC.spec(topic).schema_name
    assert envelope["version"] == 1
    back = CODEC.decode(topic, raw)
    assert type(back) is type(model)
    assert back == model
    assert CODEC.encode(topic, back) == raw  # stable bytes


def test_decimals_are_strings_and_times_utc() -> None:
    raw = CODEC.encode("md.trades", SAMPLES["md.trades"][1])
    data = json.loads(raw)["data"]
    assert data["price"] == "1E-12"
    assert data["quantity"] == "123456789.123456789123456789"
    assert data["ts"] == "2024-03-01T12:30:15.123456Z"
    back = CODEC.decode("md.trades", raw)
    assert back.quantity == Decimal("123456789.123456789123456789")
    assert back.ts.tzinfo is not None and back.ts.utcoffset() == timedelta(0)


def test_other_offsets_become_utc_and_naive_is_rejected() -> None:
    plus_two = TS.astimezone(timezone(timedelta(hours=2))).isoformat().encode()
    assert plus_two == b"2024-03-01T14:30:15.123456+02:00"
    raw = CODEC.encode("md.trades", SAMPLES["md.trades"][0]).replace(b"2024-03-01T12:30:15.123456Z", plus_two)
    assert CODEC.decode("md.trades", raw).ts == TS
    assert CODEC.decode("md.trades", raw).ts.tzinfo == UTC
    naive = raw.replace(b"+02:00", b"")
    with pytest.raises(MessageRejected, match=r"data\.ts: .*naive") as info:
        CODEC.decode("md.trades", naive)
    assert info.value.error_type == "validation_error"


def test_risk_decision_round_trip_to_dataclass() -> None:
    decision = CODEC.decode("risk.decisions", CODEC.encode("risk.decisions", _decision(False))).to_decision()
    assert isinstance(decision, RiskDecision)
    assert decision.rule == "max_notional" and decision.details == {"limit": "50000", "n": 3}


def test_encode_checks_the_model_matches_the_topic() -> None:
    with pytest.raises(SchemaMismatchError, match=r"md\.trades carries Trade, not Fill"):
        CODEC.encode("md.trades", _fill())
    with pytest.raises(TypeError):  # SchemaMismatchError is a TypeError too
        CODEC.encode("orders.events", _intent())


positive_decimals = st.decimals(
    min_value=Decimal("1E-18"), max_value=Decimal("1E+12"), allow_nan=False, allow_infinity=False, places=None
).filter(lambda d: d > 0)
# hypothesis takes naive bounds and attaches the timezone itself
timestamps = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
names = st.text(
    st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_characters="\x7f"), min_size=1, max_size=20
)


@settings(max_examples=200, deadline=None)
@given(price=positive_decimals, quantity=positive_decimals, ts=timestamps, trade_id=names, symbol=names)
def test_trade_round_trip_is_exact(price: Decimal, quantity: Decimal, ts: datetime, trade_id: str, symbol: str) -> None:
    trade = Trade(exchange="binance", symbol=symbol, trade_id=trade_id, price=price, quantity=quantity, ts=ts)
    back = CODEC.decode("md.trades", CODEC.encode("md.trades", trade))
    assert back == trade
    assert str(back.price) == str(price) and str(back.quantity) == str(quantity)  # same digits and exponent
    assert back.ts == ts


@settings(max_examples=200, deadline=None)
@given(
    price=positive_decimals,
    quantity=positive_decimals,
    fee=st.decimals(min_value=Decimal("-1E6"), max_value=Decimal("1E6"), allow_nan=False, allow_infinity=False),
    ts=timestamps,
    side=st.sampled_from(list(Side)),
)
def test_fill_round_trip_is_exact(price: Decimal, quantity: Decimal, fee: Decimal, ts: datetime, side: Side) -> None:
    fill = _fill().replace(price=price, quantity=quantity, fee=fee, ts=ts, side=side)
    back = CODEC.decode("fills", CODEC.encode("fills", AccountFill(account="a", strategy="s", fill=fill))).fill
    assert back == fill
    assert (str(back.price), str(back.quantity), str(back.fee)) == (str(price), str(quantity), str(fee))


# --- malformed input -----------------------------------------------------------------------------------------

GOOD = CODEC.encode("md.trades", SAMPLES["md.trades"][0])


def _mutate(field: str, value: str) -> bytes:
    envelope = json.loads(GOOD)
    envelope["data"][field] = value
    return json.dumps(envelope).encode()


def _drop(field: str) -> bytes:
    envelope = json.loads(GOOD)
    del envelope["data"][field]
    return json.dumps(envelope).encode()


MALFORMED: list[tuple[str, bytes, str, str]] = [
    ("non-JSON", b"not json at all {", "invalid_json", "invalid JSON"),
    ("not UTF-8", b"\xff\xfe\x00garbage", "not_utf8", "not UTF-8"),
    ("empty", b"", "invalid_json", "invalid JSON"),
    ("JSON but no envelope", b'{"price": "1"}', "not_an_envelope", "envelope"),
    ("JSON array", b"[1, 2]", "not_an_envelope", "envelope"),
    ("missing version", b'{"schema": "Trade", "data": {}}', "not_an_envelope", "version"),
    (
        "wrong schema",
        CODEC.encode("fills", AccountFill(account="a", strategy="s", fill=_fill())),
        "wrong_schema",
        "schema: got 'AccountFill'",
    ),
    ("future version", GOOD.replace(b'"version":1', b'"version":2'), "unsupported_version", "v2"),
    ("missing field", _drop("trade_id"), "validation_error", "data.trade_id: Field required"),
    ("NaN price (JSON NaN)", GOOD.replace(b'"price":"0.1"', b'"price":NaN'), "validation_error", "data.price"),
    ("NaN price (string)", _mutate("price", "NaN"), "validation_error", "data.price"),
    ("negative quantity", _mutate("quantity", "-1"), "validation_error", "data.quantity"),
    ("unknown field", GOOD.replace(b'"symbol"', b'"extra":1,"symbol"'), "validation_error", "data.extra"),
    ("extra envelope key", GOOD.replace(b'"version"', b'"hack":1,"version"'), "validation_error", "hack"),
]


@pytest.mark.parametrize(("label", "raw", "error_type", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_messages_are_rejected_with_a_reason(label: str, raw: bytes, error_type: str, reason: str) -> None:
    with pytest.raises(MessageRejected) as info:
        CODEC.decode("md.trades", raw)
    assert info.value.error_type == error_type, info.value.reason
    assert reason in info.value.reason, info.value.reason


def test_nan_reason_names_the_field_and_the_rule() -> None:
    with pytest.raises(MessageRejected) as info:
        CODEC.decode("md.trades", GOOD.replace(b'"price":"0.1"', b'"price":NaN'))
    assert info.value.reason == "invalid Trade: data.price: Value error, NaN and infinity are not allowed"


def test_union_topics_reject_unknown_kinds() -> None:
    raw = CODEC.encode("control", SAMPLES["control"][0]).replace(b'"kill_switch"', b'"reboot"')
    with pytest.raises(MessageRejected, match=r"data: .*tag 'reboot'"):
        CODEC.decode("control", raw)


def test_none_and_unknown_topic_are_rejected_not_raised() -> None:
    with pytest.raises(MessageRejected) as info:
        CODEC.decode("md.trades", None)
    assert info.value.error_type == "not_an_envelope"
    with pytest.raises(MessageRejected) as info:
        CODEC.decode("no.such.topic", GOOD)
    assert info.value.error_type == "unknown_topic"


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300) | st.builds(lambda b: GOOD[: len(b)], st.binary(max_size=len(GOOD))))
def test_decode_never_raises_anything_else(raw: bytes) -> None:
    try:
        CODEC.decode("md.trades", raw)
    except MessageRejected as exc:
        reason = exc.reason
    else:
        reason = "decoded"
    assert reason


# --- decode or dead-letter --------------------------------------------------------------------------------


def test_router_dead_letters_and_counts() -> None:
    sent: list[tuple[bytes, bytes]] = []

    async def send(key: bytes, value: bytes) -> None:
        sent.append((key, value))

    router = DeadLetterRouter(CODEC, send, clock=lambda: TS)

    async def run() -> list[Any]:
        out = []
        for i, raw in enumerate([GOOD, b"nope", _drop("trade_id"), GOOD]):
            out.append(
                await router.decode_or_dead_letter("md.trades", raw, key=b"binance:BTC/USDT", partition=1, offset=i)
            )
        return out

    results = asyncio.run(run())
    assert [r is not None for r in results] == [True, False, False, True]
    assert router.total == 2
    assert router.counts == {("md.trades", "invalid_json"): 1, ("md.trades", "validation_error"): 1}
    letters = [CODEC.decode("dlq", value) for _, value in sent]
    assert [key for key, _ in sent] == [b"md.trades", b"md.trades"]
    assert [(d.offset, d.error_type) for d in letters] == [(1, "invalid_json"), (2, "validation_error")]
    assert letters[0].original_bytes() == b"nope"
    assert base64.b64decode(letters[1].original) == _drop("trade_id")
    assert letters[1].key == "binance:BTC/USDT" and letters[1].partition == 1
    assert "data.trade_id" in letters[1].reason


def test_cli_registers_streams() -> None:
    from typer.testing import CliRunner

    from meltica.cli import app

    result = CliRunner().invoke(app, ["streams", "topics", "--help"])
    assert result.exit_code == 0
    assert "create" in result.stdout and "list" in result.stdout


def test_core_does_not_import_faust() -> None:
    import subprocess
    import sys

    code = "import sys, meltica.messaging, meltica.messaging.admin, meltica.cli; print('faust' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"
