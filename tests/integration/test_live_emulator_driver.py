"""Lock-step paper parity: the Binance emulator driven bar by bar (``EmulatorDriver``, orders through
ccxt's own binance classes) gives the same fills and order states as the ``InProcessVenue``.

Real recorded bars (the shipped BTC perp minutes, traded as BTC/USDT spot on both venues), one scripted
sequence run the backtester's way on each venue: a request decided on bar t's close is sent at bar
t+1's open, after the open was printed; then the bar's path runs (fills stamped with the close) and GTD
orders expire. The script covers a market order at an open, a resting limit filled on a path, buy and
sell stops triggered by a gap at the open, a GTD order expiring and a cancel.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import pytest

from meltica.adapters.base import ExchangeAdapter, UserEvent
from meltica.adapters.in_process import InProcessAdapter, InProcessVenue
from meltica.backtest import BacktestConfig
from meltica.backtest.intents import ManualClock
from meltica.domain import (
    Bar,
    Instrument,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
    TimeInForce,
    client_order_id_for,
)
from meltica.emulator import EmulatorConfig, EmulatorServer
from meltica.emulator.config import EmulatorAccount
from meltica.execution import MemoryOrderStore, OrderManager
from meltica.live.emulator_driver import EmulatorDriver, EmulatorDriverError, EmulatorSettleError
from meltica.live.venue import VenueDriver
from meltica.matching import FeeSchedule, FillModel

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
FIRST_ROW, N_BARS = 230, 55  # holds a gap up (local bar 20) and a gap down (local bar 48)
SYMBOL, ACCOUNT, KEY, SECRET = "BTC/USDT", "main", "lockstep-key", "lockstep-secret"
BALANCES = {"USDT": Decimal(100_000), "BTC": Decimal(1)}
TICK = Decimal("0.01")

# What a backtest with maker 2 bps, taker 5 bps, fees in quote and 1 bp of slippage uses.
BACKTEST = BacktestConfig.create(
    strategy="momentum",
    params={"symbol": SYMBOL},
    symbol=SYMBOL,
    maker_fee_bps=2,
    taker_fee_bps=5,
    fee_asset="quote",
    slippage_bps=1,
)
FEES: FeeSchedule = BACKTEST.fees()
FILL_MODEL: FillModel = BACKTEST.fill_model()


def load_bars() -> list[Bar]:
    with gzip.open(DATA, "rt") as src:
        rows = list(itertools.islice(src, 1 + FIRST_ROW, 1 + FIRST_ROW + N_BARS))
    bars = []
    for row in rows:
        ts, o, h, lo, c, v = row.strip().split(",")
        bars.append(
            Bar(
                exchange="binance",
                symbol=SYMBOL,
                timeframe="1m",
                ts=datetime.fromisoformat(ts).replace(tzinfo=UTC),
                open=Decimal(o),
                high=Decimal(h),
                low=Decimal(lo),
                close=Decimal(c),
                volume=Decimal(v),
            )
        )
    return bars


def tick(price: Decimal) -> Decimal:
    return price.quantize(TICK, rounding=ROUND_DOWN)


@dataclass
class Request:
    kind: str  # submit | cancel
    intent: OrderIntent | None = None
    target: str = ""  # cancel: the intent id


@dataclass
class Script:
    """Requests per local bar index (sent at that bar's open) and what each is meant to show."""

    due: dict[int, list[Request]] = field(default_factory=dict)

    def add(self, bar: int, request: Request) -> None:
        self.due.setdefault(bar, []).append(request)


def intent(name: str, bars: list[Bar], at: int, side: Side, type_: OrderType, qty: str, **kw: Any) -> OrderIntent:
    return OrderIntent(
        intent_id=f"lockstep-{name}",
        account=ACCOUNT,
        strategy="lockstep",
        exchange="binance",
        symbol=SYMBOL,
        side=side,
        type=type_,
        quantity=Decimal(qty),
        created_at=bars[at - 1].ts + timedelta(minutes=1),  # decided on the previous bar's close
        **kw,
    )


def build_script(bars: list[Bar]) -> Script:
    s = Script()
    o = [b.open for b in bars]
    # 1. market buy at bar 2's open
    s.add(2, Request("submit", intent("market", bars, 2, Side.BUY, OrderType.MARKET, "0.05")))
    # 2. resting limit buy, below bar 3's open, that a later bar's path goes through
    low = min(b.low for b in bars[3:12])
    assert low < o[3]
    limit = tick((low + o[3]) / 2)
    s.add(3, Request("submit", intent("limit", bars, 3, Side.BUY, OrderType.LIMIT, "0.03", price=limit)))
    # 3. buy stop above bar 19's high, below bar 20's open: the gap at bar 20's open triggers it there
    gap_up = 20
    assert o[gap_up] > bars[gap_up - 1].high
    trigger_up = tick((bars[gap_up - 1].high + o[gap_up]) / 2)
    s.add(
        gap_up - 1,
        Request(
            "submit",
            intent("stop-up", bars, gap_up - 1, Side.BUY, OrderType.STOP_MARKET, "0.02", trigger_price=trigger_up),
        ),
    )
    # 4. GTD sell far above, expiring at bar 22's close; sent at bar 20's open (so that open is printed)
    s.add(
        gap_up,
        Request(
            "submit",
            intent(
                "gtd",
                bars,
                gap_up,
                Side.SELL,
                OrderType.LIMIT,
                "0.01",
                price=tick(o[gap_up] * Decimal("1.05")),
                time_in_force=TimeInForce.GTD,
                expire_at=bars[22].ts + timedelta(minutes=1),
            ),
        ),
    )
    # 5. a resting buy far below, cancelled at bar 48's open (so that open is printed)
    s.add(
        30,
        Request(
            "submit",
            intent("cancel-me", bars, 30, Side.BUY, OrderType.LIMIT, "0.01", price=tick(o[30] * Decimal("0.9"))),
        ),
    )
    # 6. sell stop below bar 47's low, above bar 48's open: the gap down at bar 48's open triggers it
    gap_down = 48
    assert o[gap_down] < bars[gap_down - 1].low
    trigger_down = tick((bars[gap_down - 1].low + o[gap_down]) / 2) + TICK
    s.add(
        gap_down - 1,
        Request(
            "submit",
            intent(
                "stop-down", bars, gap_down - 1, Side.SELL, OrderType.STOP_MARKET, "0.04", trigger_price=trigger_down
            ),
        ),
    )
    s.add(gap_down, Request("cancel", target="lockstep-cancel-me"))
    return s


async def drive(driver: VenueDriver, oms: OrderManager, bars: list[Bar], script: Script) -> None:
    """The backtester's per-bar order of things, through a ``VenueDriver``."""
    for i, bar in enumerate(bars):
        due = script.due.get(i)
        if due:
            await driver.open(bar)
            for request in due:
                if request.kind == "submit":
                    assert request.intent is not None
                    await oms.submit(request.intent)
                else:
                    await oms.cancel(client_order_id_of(request.target))
            await driver.settle()
        await driver.path(bar)
        await driver.settle()


def client_order_id_of(intent_id: str) -> str:
    return client_order_id_for(intent_id)


class PaperLockStep:
    """The paper venue driven the backtester's way (``meltica.backtest.engine._drive_bars``)."""

    def __init__(self, instruments: list[Instrument], start: datetime) -> None:
        self.clock = ManualClock(start)
        self.venue = InProcessVenue(
            instruments, clock=self.clock, exchange_id="binance", fees=FEES, fill_model=FILL_MODEL
        )
        for asset, amount in BALANCES.items():
            self.venue.deposit(ACCOUNT, asset, amount)
        self._adapter = InProcessAdapter(self.venue, ACCOUNT)
        self._queue: asyncio.Queue[UserEvent] = asyncio.Queue()
        self.venue.user_queues[ACCOUNT].append(self._queue)  # the private stream, drained in settle()
        self.on_user_event: Callable[[UserEvent], Awaitable[Any]] | None = None

    @property
    def adapter(self) -> ExchangeAdapter:
        return self._adapter

    def now(self) -> datetime:
        return self.clock.now

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def open(self, bar: Bar) -> None:
        self.clock.now = bar.ts
        self.venue.dispatch(self.venue.engine.on_trade(bar.symbol, bar.open, Decimal(0)))

    async def path(self, bar: Bar) -> None:
        self.clock.now = bar.ts + bar.tf.delta
        self.venue.on_bar(bar)
        self.venue.advance()

    async def settle(self) -> None:
        assert self.on_user_event is not None
        while not self._queue.empty():
            await self.on_user_event(self._queue.get_nowait())


@dataclass
class Outcome:
    orders: dict[str, Order]
    fills: list[dict[str, Any]]
    balances: dict[str, Decimal]


async def run_on(driver: VenueDriver, bars: list[Bar], script: Script, set_handler: Callable[[Any], None]) -> Outcome:
    store = MemoryOrderStore()
    oms = OrderManager(store, {ACCOUNT: driver.adapter}, clock=driver.now)
    set_handler(oms.on_user_event)
    await driver.start()
    try:
        await drive(driver, oms, bars, script)
        ids = [r.intent.client_order_id for reqs in script.due.values() for r in reqs if r.intent is not None]
        orders = {coid: oms.order(coid) for coid in ids}
        fills = sorted(store.fills.values(), key=lambda f: (f["ts"], int(f["trade_id"])))
        raw = await driver.adapter.fetch_balances()
        balances = {a: b.free + b.locked for a, b in raw.items() if b.free + b.locked}
    finally:
        await driver.stop()
    return Outcome(orders, fills, balances)


def emulator_config() -> EmulatorConfig:
    # Fees are not configured here: the driver sets the backtest's schedule over the admin API.
    return EmulatorConfig(
        accounts=[EmulatorAccount(ACCOUNT, KEY, SECRET, balances=dict(BALANCES))],
        symbols=["BTCUSDT"],
        fill_model=FILL_MODEL,
    )


def test_emulator_driven_in_lock_step_matches_the_paper_venue() -> None:
    bars = load_bars()
    script = build_script(bars)

    async def body() -> tuple[Outcome, Outcome, list[dict[str, Any]]]:
        async with EmulatorServer(emulator_config()) as emu:
            driver = EmulatorDriver(
                emu.rest_url, account=ACCOUNT, api_key=KEY, api_secret=SECRET, admin_token=emu.admin_token, fees=FEES
            )

            def set_emulator_handler(handler: Any) -> None:
                driver.on_user_event = handler

            emulated = await run_on(driver, bars, script, set_emulator_handler)
            journal = emu.executions(ACCOUNT)
            instruments = list((await instruments_of(emu)).values())
        paper = PaperLockStep(instruments, bars[0].ts)

        def set_paper_handler(handler: Any) -> None:
            paper.on_user_event = handler

        on_paper = await run_on(paper, bars, script, set_paper_handler)
        return emulated, on_paper, journal

    emulated, on_paper, journal = asyncio.run(asyncio.wait_for(body(), 120))

    def coid(name: str) -> str:
        return client_order_id_of(f"lockstep-{name}")

    # What the script is meant to show happened (on the emulator, through ccxt).
    o = {k: emulated.orders[coid(k)] for k in ("market", "limit", "stop-up", "gtd", "cancel-me", "stop-down")}
    assert o["market"].status is OrderStatus.FILLED
    assert o["limit"].status is OrderStatus.FILLED
    assert o["stop-up"].status is OrderStatus.FILLED
    assert o["stop-down"].status is OrderStatus.FILLED
    assert o["gtd"].status is OrderStatus.EXPIRED
    assert o["cancel-me"].status is OrderStatus.CANCELLED
    by_order = {f["client_order_id"]: f for f in emulated.fills}
    assert len(emulated.fills) == 4
    fill_market = by_order[coid("market")]
    assert fill_market["ts"] == bars[2].ts  # at the open it was sent at
    assert fill_market["price"] > bars[2].open  # a taker pays the slippage (1 bp)
    assert fill_market["liquidity"] == "taker"
    assert fill_market["fee_currency"] == "USDT"
    assert fill_market["fee"] == fill_market["price"] * fill_market["quantity"] * FEES.taker
    fill_limit = by_order[coid("limit")]
    assert fill_limit["liquidity"] == "maker" and fill_limit["price"] == o["limit"].price
    assert fill_limit["ts"].second == 0 and fill_limit["ts"] > bars[3].ts  # a bar's close
    assert fill_limit["fee"] == fill_limit["price"] * fill_limit["quantity"] * FEES.maker
    assert by_order[coid("stop-up")]["ts"] == bars[20].ts  # triggered by the gap at the open
    assert by_order[coid("stop-up")]["price"] >= bars[20].open
    assert by_order[coid("stop-down")]["ts"] == bars[48].ts
    assert by_order[coid("stop-down")]["price"] <= bars[48].open
    assert o["gtd"].updated_at == bars[22].ts + timedelta(minutes=1)  # expired at bar 22's close
    # The emulator's journal has every execution, in order: the driver waited for each.
    assert [e["seq"] for e in journal] == sorted(e["seq"] for e in journal)
    assert {e["execution_type"] for e in journal} == {"NEW", "TRADE", "EXPIRED", "CANCELED"}

    # Parity: the same fills (prices, quantities, fees, times, ids) and the same order states.
    assert emulated.fills == on_paper.fills
    for key, order in emulated.orders.items():
        paper_order = on_paper.orders[key]
        assert (order.status, order.filled_quantity, order.avg_fill_price, order.exchange_order_id, order.fill_ids) == (
            paper_order.status,
            paper_order.filled_quantity,
            paper_order.avg_fill_price,
            paper_order.exchange_order_id,
            paper_order.fill_ids,
        ), key
        assert order.updated_at == paper_order.updated_at, key
    assert emulated.balances == on_paper.balances


async def instruments_of(emu: EmulatorServer) -> dict[str, Instrument]:
    """The instruments as ccxt reads them from the emulator (what the paper venue gets too)."""
    from meltica.adapters.ccxt import CcxtAdapter
    from meltica.adapters.registry import create_adapter
    from meltica.emulator import CCXT_OPTIONS

    adapter = create_adapter(
        "binance",
        account=ACCOUNT,
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
    )
    assert isinstance(adapter, CcxtAdapter)
    try:
        await adapter.connect()
        return await adapter.load_instruments()
    finally:
        await adapter.close()


def test_driven_market_refuses_going_back_and_unknown_symbols_and_settle_names_what_is_missing() -> None:
    bars = load_bars()

    async def body() -> None:
        async with EmulatorServer(emulator_config()) as emu:
            driver = EmulatorDriver(
                emu.rest_url,
                account=ACCOUNT,
                api_key=KEY,
                api_secret=SECRET,
                admin_token=emu.admin_token,
                settle_timeout=0.5,
            )
            stuck = asyncio.Event()  # set: the handler never returns (an OMS that hangs)

            async def handler(_event: UserEvent) -> None:
                if stuck.is_set():
                    await asyncio.Event().wait()

            driver.on_user_event = handler
            await driver.start()
            try:
                await driver.open(bars[5])
                assert driver.now() == bars[5].ts
                await driver.path(bars[5])
                assert driver.now() == bars[5].ts + timedelta(minutes=1)
                assert emu.market_now() == driver.now()
                with pytest.raises(EmulatorDriverError, match="cannot go back"):
                    await driver.open(bars[4])
                with pytest.raises(EmulatorDriverError, match="unknown symbol"):
                    await driver.open(bars[6].model_copy(update={"symbol": "ETH/BTC"}))
                assert driver.now() == bars[5].ts + timedelta(minutes=1)
                await driver.settle()  # nothing happened: returns at once

                # An execution the stream does not hand over in time: a clear error naming it.
                await driver.open(bars[6])
                stuck.set()
                order = intent("unsettled", bars, 6, Side.BUY, OrderType.MARKET, "0.01")
                placed = await driver.adapter.create_order(order, order.client_order_id)
                assert placed.status is OrderStatus.FILLED
                with pytest.raises(EmulatorSettleError, match=order.client_order_id) as caught:
                    await driver.settle()
                assert caught.value.details["missing_orders"].keys() == {order.client_order_id}
            finally:
                await driver.stop()

    asyncio.run(asyncio.wait_for(body(), 60))
