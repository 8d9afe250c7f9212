"""Intents per second through ``RiskEngine.check`` with every check on.

Setup: 1 account, 3 strategies, 10 symbols, all limits configured (defaults plus account, strategy
and symbol overrides), instruments with precision and min notional, market data for every symbol,
about 30 open orders kept open (the oldest closed as new ones are approved), a simulated clock that
advances 1 ms per intent, and an intent mix with ~15 % rejections (fat fingers, oversize, bad step).

No peer project has a comparable standalone pre-trade risk engine to time in the same run
(NautilusTrader's RiskEngine is wired into its kernel and message bus; Freqtrade has no pre-trade
gate), so the ratio printed is against a naive in-repo baseline: the same checks written the obvious
way — limits resolved from the pydantic config and exposure recomputed over every open order and
position on each intent, ``Instrument.validate_order`` for the venue rules.

Run: ``.venv/bin/python bench/risk_bench.py [--intents N]``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from meltica.config.settings import RiskLimits
from meltica.domain import Instrument, OrderIntent, OrderType, Side
from meltica.errors import InvalidOrderError
from meltica.risk import RiskEngine

SYMBOLS = [f"C{i}/USDT" for i in range(10)]
STRATEGIES = ["mm", "trend", "arb"]
PRICES = {s: Decimal(100 * (i + 1)) for i, s in enumerate(SYMBOLS)}


def config() -> RiskLimits:
    return RiskLimits.model_validate(
        {
            "max_order_notional": 5000,
            "max_position_notional": 20000,
            "max_gross_exposure": 1_000_000,
            "max_net_exposure": 500_000,
            "max_open_orders": 200,
            "price_band_bps": 300,
            "orders_per_minute": 100_000,
            "daily_loss_limit": 5000,
            "max_drawdown_pct": 20,
            "strategy_loss_limit": 1000,
            "accounts": {"main": {"max_gross_exposure": 900_000}},
            "strategies": {"mm": {"max_open_orders": 100, "orders_per_minute": 60_000}},
            "symbols": {s: {"max_order_quantity": 50} for s in SYMBOLS},
        }
    )


def instruments() -> dict[tuple[str, str], Instrument]:
    return {
        ("binance", s): Instrument(
            exchange="binance",
            symbol=s,
            base=s.split("/")[0],
            quote="USDT",
            tick_size="0.01",
            step_size="0.001",
            min_notional="5",
        )
        for s in SYMBOLS
    }


def make_intents(n: int, start: datetime) -> list[OrderIntent]:
    rng = random.Random(7)  # noqa: S311 (reproducible benchmark data)
    out = []
    for i in range(n):
        symbol = rng.choice(SYMBOLS)
        ref = PRICES[symbol]
        roll = rng.random()
        qty = Decimal(rng.randint(1, 400)) / 1000 * (Decimal(1000) / ref)
        qty = qty.quantize(Decimal("0.001")) or Decimal("0.001")
        price: Decimal | None = (ref * (1 + Decimal(rng.randint(-100, 100)) / 10_000)).quantize(Decimal("0.01"))
        kind = OrderType.LIMIT
        if roll < 0.05:
            price = ref * 2  # fat finger
        elif roll < 0.10:
            qty = Decimal(80)  # oversize
        elif roll < 0.15:
            qty = Decimal("0.0005")  # off the step
        elif roll < 0.25:
            price, kind = None, OrderType.MARKET
        out.append(
            OrderIntent(
                intent_id=f"bench-{i}",
                account="main",
                strategy=rng.choice(STRATEGIES),
                exchange="binance",
                symbol=symbol,
                side=Side.BUY if rng.random() < 0.5 else Side.SELL,
                type=kind,
                quantity=qty,
                price=price,
                created_at=start,
            )
        )
    return out


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def run_engine(intents: list[OrderIntent], start: datetime) -> tuple[float, int]:
    clock = Clock(start)
    engine = RiskEngine(config(), None, clock=clock, instruments=instruments())
    for s in SYMBOLS:
        engine.on_market("binance", s, PRICES[s], PRICES[s] - Decimal("0.01"), PRICES[s] + Decimal("0.01"))
    coids = [intent.client_order_id for intent in intents]
    times = [start + timedelta(milliseconds=i + 1) for i in range(len(intents))]
    open_ids: deque[str] = deque()
    approved = 0
    check, close = engine.check, engine.on_order_closed
    # CPU time of this process: the machine may be shared, wall time would count the waits.
    t0 = time.process_time()
    for intent, coid, now in zip(intents, coids, times, strict=True):
        clock.now = now
        if check(intent).approved:
            approved += 1
            open_ids.append(coid)
            if len(open_ids) > 30:
                close(open_ids.popleft())
    return time.process_time() - t0, approved


class NaiveRisk:
    """The obvious implementation, for the ratio."""

    def __init__(self, limits: RiskLimits, insts: dict[tuple[str, str], Instrument], clock: Clock) -> None:
        self.limits, self.insts, self.clock = limits, insts, clock
        self.open: dict[str, OrderIntent] = {}
        self.times: deque[datetime] = deque()
        self.marks: dict[str, Decimal] = dict(PRICES)

    def _get(self, name: str, intent: OrderIntent) -> Decimal | None:
        value = getattr(self.limits, name)
        acct = self.limits.accounts.get(intent.account)
        if acct is not None and getattr(acct, name, None) is not None:
            value = getattr(acct, name)
        strat = self.limits.strategies.get(intent.strategy)
        if strat is not None and getattr(strat, name, None) is not None:
            value = getattr(strat, name)
        sym = self.limits.symbols.get(intent.symbol)
        if sym is not None and getattr(sym, name, None) is not None:
            value = getattr(sym, name)
        return None if value is None else Decimal(value)

    def check(self, intent: OrderIntent) -> bool:
        now = self.clock()
        px = intent.price if intent.price is not None else self.marks[intent.symbol]
        try:
            self.insts[(intent.exchange, intent.symbol)].validate_order(intent.price, intent.quantity)
        except InvalidOrderError:
            return False
        lim = self._get("max_order_quantity", intent)
        if lim is not None and intent.quantity > lim:
            return False
        lim = self._get("max_order_notional", intent)
        if lim is not None and px * intent.quantity > lim:
            return False
        lim = self._get("price_band_bps", intent)
        ref = self.marks[intent.symbol]
        if lim is not None and intent.price is not None and abs(intent.price - ref) / ref * 10_000 > lim:
            return False
        lim = self._get("max_open_orders", intent)
        if lim is not None and len(self.open) >= lim:
            return False
        lim = self._get("orders_per_minute", intent)
        while self.times and self.times[0] <= now - timedelta(seconds=60):
            self.times.popleft()
        if lim is not None and len(self.times) >= lim:
            return False
        book = [*self.open.values(), intent]
        long: dict[str, Decimal] = {}
        short: dict[str, Decimal] = {}
        for o in book:
            side = long if o.side is Side.BUY else short
            side[o.symbol] = side.get(o.symbol, Decimal(0)) + o.quantity
        gross = sum(
            (max(long.get(s, Decimal(0)), short.get(s, Decimal(0))) * self.marks[s] for s in SYMBOLS), Decimal(0)
        )
        lim = self._get("max_position_notional", intent)
        worst = max(long.get(intent.symbol, Decimal(0)), short.get(intent.symbol, Decimal(0)))
        if lim is not None and worst * self.marks[intent.symbol] > lim:
            return False
        lim = self._get("max_gross_exposure", intent)
        if lim is not None and gross > lim:
            return False
        self.open[intent.client_order_id] = intent
        self.times.append(now)
        return True


def run_naive(intents: list[OrderIntent], start: datetime) -> float:
    clock = Clock(start)
    naive = NaiveRisk(config(), instruments(), clock)
    coids = [intent.client_order_id for intent in intents]
    times = [start + timedelta(milliseconds=i + 1) for i in range(len(intents))]
    open_ids: deque[str] = deque()
    t0 = time.process_time()
    for intent, coid, now in zip(intents, coids, times, strict=True):
        clock.now = now
        if naive.check(intent):
            open_ids.append(coid)
            if len(open_ids) > 30:
                naive.open.pop(open_ids.popleft(), None)
    return time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--intents", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    start = datetime(2024, 1, 1, tzinfo=UTC)
    intents = make_intents(args.intents, start)
    best = min(run_engine(intents, start)[0] for _ in range(args.repeat))
    _, approved = run_engine(intents, start)
    naive_n = min(len(intents), 20_000)
    naive = min(run_naive(intents[:naive_n], start) for _ in range(args.repeat))
    rate = len(intents) / best
    naive_rate = naive_n / naive
    print(f"risk engine: {len(intents)} intents, {approved} approved ({approved / len(intents):.0%})")
    per = best / len(intents) * 1e6
    print(f"RiskEngine.check      {rate:>12,.0f} intents/s  ({per:.2f} µs/intent, CPU time of one core)")
    print(f"naive baseline        {naive_rate:>12,.0f} intents/s")
    print(f"ratio engine / naive  {rate / naive_rate:>12.1f}x")
    print("peers: none comparable (no standalone pre-trade risk engine in NautilusTrader/Freqtrade to time)")


if __name__ == "__main__":
    main()
