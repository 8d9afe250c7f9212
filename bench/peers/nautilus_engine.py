"""NautilusTrader runner (event-driven, Cython/Rust core). Runs in ``bench/.venv``.

Configuration: low-level ``BacktestEngine``; venue ``BINANCE``, ``OmsType.NETTING``, ``AccountType.MARGIN``,
10,000,000 USDT, leverage 1; a ``CryptoPerpetual`` BTCUSDT-PERP (price increment 0.1, size increment
0.001) with maker and taker fee 0.1 %; 1-minute ``LAST`` bars (``ts_event`` = bar close time) built with
``BarDataWrangler``; ``bar_execution=True`` (Nautilus's default); the library's own
``ExponentialMovingAverage`` (seeded with the first close) registered for the bars; logging at ERROR
(no per-order INFO lines, which would otherwise dominate).

Deviation (documented in bench/README.md): Nautilus fills a market order sent from ``on_bar`` at once,
against the book the bar left behind, i.e. at bar t's **close**, not bar t+1's open (no engine setting
gives next-open fills for bar data; a latency model would fill at t+1's close instead). In this data
close[t] == open[t+1] for 90.5 % of bars.

Timed loop: ``engine.run()``; building the ``Bar`` objects and ``add_data`` (sorting) are data loading.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nautilus_trader
import pandas as pd
from _common import FAST, FEE_RATE, INITIAL_CASH, QUANTITY, SLOW, Timer, emit, load_bars, parse_args, peak_rss_mb
from nautilus_trader.backtest.engine import BacktestEngine, BacktestEngineConfig
from nautilus_trader.config import LoggingConfig, StrategyConfig
from nautilus_trader.indicators import ExponentialMovingAverage
from nautilus_trader.model.currencies import BTC, USDT
from nautilus_trader.model.data import Bar, BarType
from nautilus_trader.model.enums import AccountType, OmsType, OrderSide
from nautilus_trader.model.events import OrderFilled
from nautilus_trader.model.identifiers import InstrumentId, Symbol, TraderId, Venue
from nautilus_trader.model.instruments import CryptoPerpetual
from nautilus_trader.model.objects import Money, Price, Quantity
from nautilus_trader.persistence.wranglers import BarDataWrangler
from nautilus_trader.trading.strategy import Strategy

VENUE = Venue("BINANCE")
INSTRUMENT_ID = InstrumentId(Symbol("BTCUSDT-PERP"), VENUE)
BAR_TYPE = BarType.from_str(f"{INSTRUMENT_ID}-1-MINUTE-LAST-EXTERNAL")


def make_instrument() -> CryptoPerpetual:
    return CryptoPerpetual(
        instrument_id=INSTRUMENT_ID,
        raw_symbol=Symbol("BTCUSDT"),
        base_currency=BTC,
        quote_currency=USDT,
        settlement_currency=USDT,
        is_inverse=False,
        price_precision=1,
        price_increment=Price.from_str("0.1"),
        size_precision=3,
        size_increment=Quantity.from_str("0.001"),
        max_quantity=Quantity.from_str("1000.000"),
        min_quantity=Quantity.from_str("0.001"),
        max_notional=None,
        min_notional=Money(10.00, USDT),
        max_price=Price.from_str("1000000.0"),
        min_price=Price.from_str("0.1"),
        margin_init=Decimal("0.05"),
        margin_maint=Decimal("0.025"),
        maker_fee=Decimal(str(FEE_RATE)),
        taker_fee=Decimal(str(FEE_RATE)),
        ts_event=0,
        ts_init=0,
    )


class EmaCrossConfig(StrategyConfig, frozen=True):
    fast: int = FAST
    slow: int = SLOW


class EmaCross(Strategy):
    def __init__(self, config: EmaCrossConfig) -> None:
        super().__init__(config)
        self.fast = ExponentialMovingAverage(config.fast)
        self.slow = ExponentialMovingAverage(config.slow)
        self.fills = 0
        self.long = False
        self.qty: Quantity | None = None

    def on_start(self) -> None:
        instrument = self.cache.instrument(INSTRUMENT_ID)
        self.qty = instrument.make_qty(QUANTITY)
        self.register_indicator_for_bars(BAR_TYPE, self.fast)
        self.register_indicator_for_bars(BAR_TYPE, self.slow)
        self.subscribe_bars(BAR_TYPE)

    def on_bar(self, bar: Bar) -> None:
        if not self.slow.initialized:
            return
        fast, slow = self.fast.value, self.slow.value
        # Position state from the portfolio, as a Nautilus strategy would (fills are synchronous here).
        long = self.portfolio.is_net_long(INSTRUMENT_ID)
        if not long and fast > slow:
            order = self.order_factory.market(INSTRUMENT_ID, OrderSide.BUY, self.qty)
            self.submit_order(order)
        elif long and fast < slow:
            order = self.order_factory.market(INSTRUMENT_ID, OrderSide.SELL, self.qty)
            self.submit_order(order)

    def on_order_filled(self, event: OrderFilled) -> None:
        self.fills += 1


def main() -> None:
    args = parse_args()
    if args.sweep:
        emit({"engine": "nautilus_trader", "skipped": "no sweep path measured"})
        return
    instrument = make_instrument()
    with Timer() as load:
        bars = load_bars(args.data)
        n = len(bars["ts"])
        frame = pd.DataFrame(
            {k: bars[k] for k in ("open", "high", "low", "close", "volume")},
            # Nautilus stamps a bar at its close: open time + 1 minute.
            index=pd.to_datetime(bars["ts"] + 60_000_000_000, unit="ns", utc=True),
        )
        del bars
        nt_bars = BarDataWrangler(BAR_TYPE, instrument).process(frame)
        del frame
        engine = BacktestEngine(
            config=BacktestEngineConfig(
                trader_id=TraderId("BENCH-001"),
                logging=LoggingConfig(log_level="ERROR"),
            )
        )
        engine.add_venue(
            venue=VENUE,
            oms_type=OmsType.NETTING,
            account_type=AccountType.MARGIN,
            base_currency=USDT,
            starting_balances=[Money(INITIAL_CASH, USDT)],
            default_leverage=Decimal(1),
        )
        engine.add_instrument(instrument)
        engine.add_data(nt_bars)
        del nt_bars
        strategy = EmaCross(EmaCrossConfig())
        engine.add_strategy(strategy)
    rss_before = peak_rss_mb()
    with Timer() as loop:
        engine.run()
    account = engine.portfolio.account(VENUE)
    unrealized = engine.portfolio.unrealized_pnl(INSTRUMENT_ID)
    pnl = float(account.balance_total(USDT)) - INITIAL_CASH + (float(unrealized) if unrealized is not None else 0.0)
    result = {
        "engine": "nautilus_trader",
        "version": nautilus_trader.__version__,
        "bars": n,
        "load_seconds": load.seconds,
        "seconds": loop.seconds,
        "cpu_seconds": loop.cpu_seconds,
        "fills": strategy.fills,
        "pnl": pnl,
        "rss_before_loop_mb": rss_before,
    }
    engine.dispose()
    emit(result)


if __name__ == "__main__":
    main()
