"""``LiveDriver`` + ``ExecutionService`` (live) + PostgreSQL ``OrderStore`` against the Binance emulator
(ccxt's own classes), with faults: the user stream dropped by the server, user-stream messages held
back, REST 5xx, 429 with ``Retry-After``, a lost order response. Never a duplicate order, never a lost
fill (the venue's ``fetch_my_trades`` equals the ``fills`` table, leg for leg), never a crash.

Fills that only the user stream would tell (a resting order hit while the stream is down or late) are
made with self-trades: a resting buy of ours, then a sell of ours at its price. That is also the test
of a self-trade's two legs (one venue trade id, a buy and a sell fill), which must both be stored and
booked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from meltica.adapters.ccxt import CcxtAdapter, RetryPolicy
from meltica.adapters.registry import create_adapter
from meltica.domain import Bar, OrderIntent, OrderStatus, OrderType, Side
from meltica.domain.portfolio import Position
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer, ccxt_urls_for
from meltica.errors import MelticaError
from meltica.execution import OrderStore
from meltica.live.config import AccountVenueConfig, PipelineConfig, StrategyInstanceConfig
from meltica.live.execution import ExecutionService
from meltica.live.live_driver import LiveDriver
from meltica.live.processor import Incoming, Outgoing
from meltica.messaging.schemas import AmendRequest, CancelRequest, PipelineRequest, SubmitRequest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
TRADES = DATA / "btcusdt-trades.parquet"
KEY, SECRET = "live-key", "live-secret"
SYMBOL = "BTC/USDT"
CCXT_STATUS = {
    "open": "open",
    "closed": "filled",
    "canceled": "cancelled",
    "expired": "expired",
    "rejected": "rejected",
}
FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, max_rate_limit_wait=5)


def adapter_for(emu: EmulatorServer) -> CcxtAdapter:
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
        retry=FAST,
    )
    assert isinstance(adapter, CcxtAdapter)
    return adapter


def config() -> PipelineConfig:
    return PipelineConfig(
        instances=(
            StrategyInstanceConfig(
                instance_id="s", strategy="manual", account="main", exchange="binance", symbols=(SYMBOL,)
            ),
        ),
        accounts={"main": AccountVenueConfig(exchange="binance", venue="emulator")},
    )


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


class Live:
    """The emulator, a started live execution service on it, and a ccxt checker of the venue."""

    def __init__(self, emu: EmulatorServer, engine: Engine) -> None:
        self.emu = emu
        self.engine = engine
        self.driver = LiveDriver(adapter_for(emu), account="main", poll_interval=0.2, stale_after=1.0)
        self.service = ExecutionService(config(), {"main": self.driver}, store=OrderStore(engine))
        self.venue = adapter_for(emu)
        self.published: list[Outgoing] = []
        self.reconnect_hooks = 0
        self.lane_starts: list[tuple[str, list[str]]] = []

    async def start(self) -> None:
        async def emit(out: Outgoing) -> None:
            self.published.append(out)

        async def on_reconnect() -> None:
            self.reconnect_hooks += 1

        async def on_lane_start(account: str, adapter: Any, oms: Any, portfolio: Any) -> None:
            assert adapter is self.driver.adapter and portfolio is self.service.lanes[account].portfolio
            self.lane_starts.append((account, [o.client_order_id for o in oms.open_orders()]))

        self.driver.on_reconnect = on_reconnect
        self.service.on_lane_start = on_lane_start
        await self.service.start(emit)
        await self.venue.connect()

    async def stop(self) -> None:
        await self.service.stop()
        await self.venue.close()

    @property
    def oms(self) -> Any:
        return self.service.lanes["main"].oms

    async def last_price(self) -> Decimal:
        last = (await self.venue.fetch_ticker(SYMBOL)).last
        assert last is not None
        return last

    async def send(self, request: PipelineRequest) -> None:
        await self.service.handle(Incoming("orders.approved", "main", request))

    async def submit(self, side: Side, price: Decimal, quantity: str = "0.01") -> str:
        now = datetime.now(UTC)
        intent = OrderIntent(
            intent_id=f"live-{uuid.uuid4().hex[:12]}",
            account="main",
            strategy="s",
            exchange="binance",
            symbol=SYMBOL,
            side=side,
            type=OrderType.LIMIT,
            quantity=Decimal(quantity),
            price=price,
            created_at=now,
        )
        await self.send(SubmitRequest(request_id=intent.intent_id, account="main", strategy="s", ts=now, intent=intent))
        return intent.client_order_id

    async def cancel(self, coid: str) -> None:
        now = datetime.now(UTC)
        await self.send(
            CancelRequest(request_id=f"cancel-{coid}", account="main", strategy="s", ts=now, client_order_id=coid)
        )

    def children_of(self, coid: str) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT client_order_id FROM orders WHERE parent_client_order_id = :p"), {"p": coid}
            ).all()
        return [str(r[0]) for r in rows]

    def status(self, coid: str) -> OrderStatus:
        status: OrderStatus = self.oms.order(coid).status
        return status

    def db_fills(self) -> set[tuple[str, str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT trade_id, side, client_order_id FROM fills")).all()
        return {(str(r[0]), str(r[1]), str(r[2])) for r in rows}

    async def venue_fills(self) -> set[tuple[str, str, str]]:
        return {(f.fill_id, f.side.value, f.client_order_id) for f in await self.venue.fetch_my_trades(SYMBOL)}

    async def venue_order_counts(self) -> Counter[str]:
        raw = await self.venue.exchange.fetch_orders(SYMBOL)
        return Counter(str(o["clientOrderId"]) for o in raw)

    def db_statuses(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {str(r[0]): str(r[1]) for r in conn.execute(text("SELECT client_order_id, status FROM orders"))}

    async def venue_statuses(self) -> dict[str, str]:
        raw = await self.venue.exchange.fetch_orders(SYMBOL)
        return {str(o["clientOrderId"]): CCXT_STATUS[str(o["status"])] for o in raw}


async def started(engine: Engine) -> Live:
    emu = EmulatorServer(
        EmulatorConfig.single(
            KEY, SECRET, data=[TRADES], default_balances={"USDT": Decimal(100_000), "BTC": Decimal(2)}
        )
    )
    await emu.start()
    await emu.step(20)  # a last price
    live = Live(emu, engine)
    try:
        await live.start()
    except BaseException:
        await emu.stop()
        raise
    return live


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=150))


def delay_user_stream(emu: EmulatorServer, seconds: float) -> Callable[[], None]:
    """Hold back every user-data event the emulator sends for ``seconds`` (a slow stream); returns undo."""
    hub = emu.hub
    original = hub.publish_user
    loop = asyncio.get_running_loop()

    def delayed(account: str, event: dict[str, Any]) -> None:
        loop.call_later(seconds, original, account, event)

    hub.publish_user = delayed  # type: ignore[method-assign]

    def undo() -> None:
        hub.publish_user = original  # type: ignore[method-assign]

    return undo


def test_fills_while_the_user_stream_is_down_or_late_are_taken_once(fresh_database: Engine) -> None:
    async def body() -> None:
        live = await started(fresh_database)
        try:
            bid = (await live.last_price() * Decimal("0.9999")).quantize(Decimal("0.01"))

            # the stream dropped by the server: the resting buy is hit while ccxt reconnects
            buy1 = await live.submit(Side.BUY, bid)
            assert live.status(buy1) is OrderStatus.OPEN
            assert await live.emu.drop_websockets() >= 1
            sell1 = await live.submit(Side.SELL, bid)  # crosses our own buy: a self-trade
            await eventually(lambda: live.status(buy1) is OrderStatus.FILLED, "the maker leg after a drop")
            await eventually(lambda: live.reconnect_hooks >= 1, "on_reconnect after the drop")

            # the stream late (3 s, the driver calls it stale after 1 s): REST takes the fill first
            undo = delay_user_stream(live.emu, 3.0)
            messages = live.driver.health()["messages"]
            buy2 = await live.submit(Side.BUY, bid - 1)
            sell2 = await live.submit(Side.SELL, bid - 1)
            await eventually(lambda: live.status(buy2) is OrderStatus.FILLED, "the maker leg, stream late")
            # ... and the late messages, arriving after it, change nothing
            await eventually(lambda: live.driver.health()["messages"] >= messages + 4, "the late stream messages")
            undo()

            assert live.status(sell1) is OrderStatus.FILLED
            assert live.status(sell2) is OrderStatus.FILLED
            venue_fills = await live.venue_fills()
            assert len(venue_fills) == 4  # two trades, two legs each
            assert {trade for trade, _side, _coid in venue_fills} == {t for t, _s, _c in live.db_fills()}
            assert live.db_fills() == venue_fills
            assert await live.venue_order_counts() == Counter({buy1: 1, sell1: 1, buy2: 1, sell2: 1})
            assert live.db_statuses() == await live.venue_statuses()
            position = live.service.lanes["main"].portfolio.position("main", "binance", SYMBOL, strategy="s")
            assert position.fill_count == 4 and position.quantity == 0
            health = live.driver.health()
            assert health["reconnects"] >= 1 and health["polls"] >= 1 and health["connected"]
            assert live.service.lanes["main"].oms.anomalies == []
            assert live.lane_starts == [("main", [])]

            # a bar marks the position: published with its mark price and the unrealized PnL at it
            close = bid + 100
            bar = Bar(
                exchange="binance",
                symbol=SYMBOL,
                timeframe="1m",
                ts=datetime(2024, 1, 1, tzinfo=UTC),
                open=close,
                high=close,
                low=close,
                close=close,
                volume=Decimal(1),
            )
            out = await live.service.handle(Incoming("md.candles.1m", "binance:BTC/USDT", bar))
            (marked,) = [o.value for o in out if isinstance(o.value, Position)]
            assert marked.mark_price == close and marked.unrealized_pnl_at_mark == 0 and marked.fill_count == 4
        finally:
            await live.stop()
            await live.emu.stop()

    run(body)


def test_rest_faults_and_a_lost_order_response_never_duplicate_an_order(fresh_database: Engine) -> None:
    async def body() -> None:
        live = await started(fresh_database)
        try:
            bid = (await live.last_price() * Decimal("0.95")).quantize(Decimal("0.01"))
            faults = live.emu.faults
            faults.fail_next = 1  # 503, not executed
            a = await live.submit(Side.BUY, bid)
            faults.rate_limit_next = 1  # 429 -1003 + Retry-After: 1
            faults.retry_after_s = 1
            b = await live.submit(Side.BUY, bid - 1)
            faults.lose_next_order_response = 1  # executed, the answer lost (connection closed)
            c = await live.submit(Side.BUY, bid - 2)
            assert [live.status(x) for x in (a, b, c)] == [OrderStatus.OPEN] * 3
            assert (faults.fail_next, faults.rate_limit_next, faults.lose_next_order_response) == (0, 0, 0)
            faults.fail_next = 1  # the cancel answered 503 (not executed): asked, then sent again
            await live.cancel(a)
            faults.lose_next_order_response = 1  # a taker order whose answer is lost: its fill comes anyway
            d = await live.submit(Side.BUY, (bid * Decimal("1.1")).quantize(Decimal("0.01")))
            await eventually(lambda: live.status(d) is OrderStatus.FILLED, "the taker order's fill")
            assert live.status(a) is OrderStatus.CANCELLED
            faults.lose_next_order_response = 1  # an amendment (cancel-replace) whose answer is lost
            await live.send(
                AmendRequest(
                    request_id=f"amend-{b}",
                    account="main",
                    strategy="s",
                    ts=datetime.now(UTC),
                    client_order_id=b,
                    price=bid - 3,
                )
            )
            assert faults.lose_next_order_response == 0  # the fault was hit
            (replacement,) = live.children_of(b)
            assert live.status(b) is OrderStatus.CANCELLED
            assert live.status(replacement) is OrderStatus.OPEN
            assert await live.venue_order_counts() == Counter({a: 1, b: 1, c: 1, d: 1, replacement: 1})
            assert live.db_statuses() == await live.venue_statuses()
            assert live.db_fills() == await live.venue_fills() != set()
            assert live.driver.health()["connected"]
        finally:
            await live.stop()
            await live.emu.stop()

    run(body)


def test_a_venue_that_cannot_be_reached_stops_the_stage_from_starting(
    fresh_database: Engine, free_port: Callable[[], int]
) -> None:
    async def body() -> None:
        adapter = create_adapter(
            "binance",
            account="main",
            credentials={"apiKey": KEY, "secret": SECRET},
            urls={"api": ccxt_urls_for(f"http://127.0.0.1:{free_port()}")},
            options=dict(CCXT_OPTIONS),
            retry=FAST,
        )
        driver = LiveDriver(adapter, account="main")
        service = ExecutionService(config(), {"main": driver}, store=OrderStore(fresh_database))

        async def emit(out: Outgoing) -> None:
            raise AssertionError(f"nothing may be published: {out}")

        with pytest.raises(MelticaError):
            await service.start(emit)
        assert driver.health()["connected"] is False
        await service.stop()

    run(body)


def test_a_failing_lane_start_hook_stops_the_stage_before_any_request(fresh_database: Engine) -> None:
    async def body() -> None:
        emu = EmulatorServer(EmulatorConfig.single(KEY, SECRET, data=[TRADES]))
        await emu.start()
        try:
            driver = LiveDriver(adapter_for(emu), account="main")

            async def refuse(account: str, adapter: Any, oms: Any, portfolio: Any) -> None:
                raise MelticaError(f"reconciliation of {account} found unexplained exposure")

            service = ExecutionService(
                config(), {"main": driver}, store=OrderStore(fresh_database), on_lane_start=refuse
            )

            async def emit(out: Outgoing) -> None:
                return None

            with pytest.raises(MelticaError, match="unexplained exposure"):
                await service.start(emit)
            await service.stop()
        finally:
            await emu.stop()

    run(body)


def test_a_halt_whose_cancels_fail_keeps_cancelling_until_nothing_rests(fresh_database: Engine) -> None:
    """Fail closed: the venue answers 503 to everything while the kill switch fires, so every cancel of
    the halt fails (after the adapter's own retries); once the venue answers again the stage, which kept
    cancelling with back-off, clears it — a halt is not a single attempt."""
    from meltica.messaging.schemas import KillSwitchCommand

    async def body() -> None:
        live = await started(fresh_database)
        try:
            price = await live.last_price()
            resting = [await live.submit(Side.BUY, price * Decimal("0.9") - i) for i in range(3)]
            await eventually(lambda: all(live.status(c) is OrderStatus.OPEN for c in resting), "three orders resting")
            live.emu.faults.fail_next = 100_000  # an outage: every request fails
            kill = KillSwitchCommand(
                command_id="kill-retry", actor="test", ts=datetime.now(UTC), mode="halt", reason="drill"
            )
            await live.service.handle(Incoming("control", "global", kill))
            assert live.emu.faults.fail_next < 100_000  # the outage was hit
            assert not any(live.status(c) is OrderStatus.CANCELLED for c in resting)
            live.emu.faults.fail_next = 0  # the venue is back

            async def venue_clear() -> bool:
                return await live.venue.fetch_open_orders(SYMBOL) == []

            await eventually(venue_clear, "no order of ours resting on the venue", timeout=60)
            await eventually(
                lambda: all(live.status(c) is OrderStatus.CANCELLED for c in resting), "every order cancelled"
            )
            assert set((await live.venue_statuses()).values()) == {"cancelled"}
        finally:
            await live.stop()
            await live.emu.stop()

    run(body)


async def _handled(live: Live, request: PipelineRequest) -> None:
    """``request`` handled by the stage; what it returns to publish is kept with what it emitted."""
    live.published.extend(await live.service.handle(Incoming("orders.approved", "main", request)))


def _published_update(live: Live, coid: str) -> Any:
    """The last ``OrderUpdate`` the stage published for ``coid`` (``orders.events``), or ``None``."""
    from meltica.messaging.schemas import OrderUpdate

    updates = [
        o.value
        for o in live.published
        if o.topic == "orders.events" and isinstance(o.value, OrderUpdate) and o.value.order.client_order_id == coid
    ]
    return updates[-1] if updates else None


def _amend(coid: str, n: int, **change: Any) -> AmendRequest:
    return AmendRequest(
        request_id=f"amend-{n}-{coid}",
        account="main",
        strategy="s",
        ts=datetime.now(UTC),
        client_order_id=coid,
        **change,
    )


def test_an_amend_the_venue_refuses_reaches_the_strategy_as_a_rejected_replacement(fresh_database: Engine) -> None:
    """The emulator (ccxt's binance, cancelReplace) refuses an amendment past its NOTIONAL filter: the
    replacement the strategy was told about ends ``rejected`` with the venue's reason, stored and published
    on ``orders.events`` like a refused submit — not silently ``cancelled``."""
    from meltica.domain import OrderRejected, client_order_id_for

    async def body() -> None:
        live = await started(fresh_database)
        try:
            price = (await live.last_price() * Decimal("0.9")).quantize(Decimal("0.01"))
            coid = await live.submit(Side.BUY, price)
            assert live.status(coid) is OrderStatus.OPEN
            carrier = client_order_id_for(f"{live.oms.order(coid).intent.intent_id}~a1")
            await _handled(live, _amend(coid, 1, quantity=Decimal(500), replacement_client_order_id=carrier))
            assert live.children_of(coid) == [carrier]
            assert live.status(carrier) is OrderStatus.REJECTED
            update = _published_update(live, carrier)
            assert update is not None and update.order.status is OrderStatus.REJECTED
            assert isinstance(update.event, OrderRejected)
            assert '"code":-1013' in (update.event.reason or "")  # the venue's own refusal (a NOTIONAL filter)
            assert live.db_statuses()[carrier] == "rejected"
            assert {k: v for k, v in live.db_statuses().items() if k != carrier} == await live.venue_statuses()
        finally:
            await live.stop()
            await live.emu.stop()

    run(body)


def test_an_amend_refused_by_risk_reaches_the_strategy_as_a_rejected_replacement(fresh_database: Engine) -> None:
    """The risk gate's ``RejectionNotice`` for an amend: the replacement the strategy was told about is
    stored ``rejected`` with the risk reason and published; the order rests unchanged on the venue; the
    next amendment gets the next replacement id (as the strategy's context counts them)."""
    from meltica.domain import OrderRejected, client_order_id_for
    from meltica.messaging.schemas import RejectionNotice, RiskDecisionMessage

    async def body() -> None:
        live = await started(fresh_database)
        try:
            price = (await live.last_price() * Decimal("0.9")).quantize(Decimal("0.01"))
            coid = await live.submit(Side.BUY, price)
            intent_id = live.oms.order(coid).intent.intent_id
            first = client_order_id_for(f"{intent_id}~a1")
            refused = _amend(coid, 1, quantity=Decimal("0.5"), replacement_client_order_id=first)
            decision = RiskDecisionMessage(
                intent_id=refused.request_id,
                approved=False,
                rule="max_position_notional",
                reason="position notional 45000 > limit 10000",
                ts=refused.ts,
            )
            notice = RejectionNotice(
                request_id=refused.request_id,
                account="main",
                strategy="s",
                ts=refused.ts,
                request=refused,
                decision=decision,
            )
            await _handled(live, notice)
            await _handled(live, notice)  # redelivered: recorded once
            assert live.children_of(coid) == [first]
            update = _published_update(live, first)
            assert update is not None and update.order.status is OrderStatus.REJECTED and update.strategy == "s"
            assert isinstance(update.event, OrderRejected)
            assert update.event.reason == "risk: max_position_notional: position notional 45000 > limit 10000"
            assert live.status(coid) is OrderStatus.OPEN
            assert (await live.venue_statuses())[coid] == "open"  # never sent

            second = client_order_id_for(f"{intent_id}~a2")
            await _handled(live, _amend(coid, 2, price=price - 1, replacement_client_order_id=second))
            assert sorted(live.children_of(coid)) == sorted([first, second])
            assert live.status(second) is OrderStatus.OPEN
        finally:
            await live.stop()
            await live.emu.stop()

    run(body)


def test_a_failed_after_reconnect_hook_refuses_every_request_until_the_hook_succeeds(fresh_database: Engine) -> None:
    """The stream really drops; the reconciliation hook after it raises twice. Meanwhile the execution stage
    refuses (raises) and nothing reaches the venue; the hook is retried, and once it succeeds orders go again."""

    async def body() -> None:
        live = await started(fresh_database)
        try:
            failures_left = [2]
            calls: list[str] = []

            async def flaky_reconcile() -> None:
                calls.append("hook")
                if failures_left[0] > 0:
                    failures_left[0] -= 1
                    raise ConnectionError("reconciliation: the database is away")

            live.driver.on_reconnect = flaky_reconcile
            bid = (await live.last_price() * Decimal("0.9")).quantize(Decimal("0.01"))
            assert live.driver.untrusted() is None
            assert await live.emu.drop_websockets() >= 1
            await eventually(lambda: live.driver.untrusted() is not None, "the hook's failure after the drop")
            before = await live.venue_order_counts()
            with pytest.raises(MelticaError, match="after-reconnect hook failed") as refused:
                await live.submit(Side.BUY, bid)
            assert isinstance(refused.value.__cause__, ConnectionError)
            assert live.driver.health()["last_error"].startswith("on_reconnect failed")
            assert await live.venue_order_counts() == before  # nothing went to the venue

            await eventually(lambda: live.driver.untrusted() is None, "the hook retried until it succeeds")
            assert calls == ["hook", "hook", "hook"]
            coid = await live.submit(Side.BUY, bid)
            assert live.status(coid) is OrderStatus.OPEN
            assert (await live.venue_order_counts())[coid] == 1
        finally:
            await live.stop()
            await live.emu.stop()

    run(body)
