"""PortfolioStore against the real PostgreSQL: snapshots round-trip, are idempotent per ts, latest wins."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, func, select

from meltica.domain import Balance, Fill
from meltica.portfolio import Portfolio, PortfolioStore
from meltica.storage.tables import balance_snapshots, position_snapshots

pytestmark = pytest.mark.integration

T1 = datetime(2024, 3, 1, 12, tzinfo=UTC)
T2 = T1 + timedelta(minutes=5)
T3 = T2 + timedelta(minutes=5)
D = Decimal
_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(module_runtime_database: Engine) -> Engine:
    """A fresh database migrated to head, shared by this module's tests, as the runtime role (the rights the
    application has in production; tests/integration/conftest.py)."""
    return module_runtime_database


@pytest.fixture
def store(engine: Engine) -> PortfolioStore:
    with engine.begin() as conn:
        conn.execute(position_snapshots.delete())
        conn.execute(balance_snapshots.delete())
    return PortfolioStore(engine)


def fill(side: str, qty: str, price: str, symbol: str = "BTC/USDT", fee: str = "0", fee_currency: str = "USDT") -> Fill:
    return Fill(
        fill_id=f"t{next(_ids)}",
        client_order_id="mlt-x",
        exchange="binance",
        symbol=symbol,
        side=side,
        price=price,
        quantity=qty,
        fee=fee,
        fee_currency=fee_currency,
        ts=T1,
    )


def sample() -> Portfolio:
    pf = Portfolio(clock=lambda: T1)
    pf.set_balances(
        "main",
        "binance",
        {"USDT": Balance(asset="USDT", free=D(10_000), locked=D(5)), "BNB": Balance(asset="BNB", free=D(2))},
    )
    pf.set_balances("alt", "kraken", {"USD": Balance(asset="USD", free=D(500))})
    pf.apply_fill(fill("buy", "3", "100", fee="0.3"), account="main", strategy="a")
    pf.apply_fill(
        fill("sell", "1", "110", fee="0.01", fee_currency="BNB"), account="main", strategy="a"
    )  # cost 2/3 left
    pf.apply_fill(fill("sell", "1", "120"), account="main", strategy="b")
    pf.apply_fill(fill("buy", "3", "10", symbol="ETH/USDT"), account="main", strategy="a")
    pf.apply_fill(fill("sell", "1", "11", symbol="ETH/USDT"), account="main", strategy="a")  # no mark: avg path
    pf.apply_fill(fill("buy", "2", "50", symbol="SOL/USDT:USDT"), account="main", strategy="b")
    pf.apply_fill(fill("sell", "1", "51", symbol="SOL/USDT:USDT"), account="main", strategy="b")
    pf.mark("binance", "BTC/USDT", "115")
    pf.mark("binance", "SOL/USDT:USDT", "49")
    return pf


def comparable(pf: Portfolio) -> list[tuple[object, ...]]:
    """Everything the tables hold (other_fees and fill counts have no column)."""
    out: list[tuple[object, ...]] = []
    for strategy in [None, *pf.strategies()]:
        for p in pf.positions(strategy=strategy):
            out.append((p.account, p.exchange, p.symbol, p.strategy, p.quantity, p.realized_pnl, p.fees))
            out.append(("avg", p.avg_entry_price))
            unrealized = pf.unrealized_pnl(p.account, p.exchange, p.symbol, None if strategy is None else p.strategy)
            out.append(("unrealized", unrealized))
    for account in pf.accounts():
        out.append((account, sorted(pf.holdings(account).items())))
    out.append(("marks", sorted(pf.marks.items())))
    return out


def test_round_trip(store: PortfolioStore, engine: Engine) -> None:
    pf = sample()
    # Ledgers: BTC a, b, account; ETH a, account; SOL b, account. Holdings: USDT, BNB, BTC, ETH; USD.
    assert store.save_snapshot(pf, T1) == 7 + 5
    loaded = store.load_latest()
    assert comparable(loaded) == comparable(pf)
    for strategy in (None, "a", "b"):
        want, got = pf.pnl(strategy=strategy), loaded.pnl(strategy=strategy)
        assert (got.realized, got.unrealized, got.fees, got.total) == (
            want.realized,
            want.unrealized,
            want.fees,
            want.total,
        )
        assert loaded.exposure(strategy=strategy) == pf.exposure(strategy=strategy)
    assert dict(loaded.pnl().other_fees) == {}  # no column for fees in other currencies (module doc)
    assert loaded.valuation("main", quote="USDT") == pf.valuation("main", quote="USDT")
    with engine.connect() as conn:
        strategies = conn.execute(
            select(position_snapshots.c.strategy).where(position_snapshots.c.symbol == "BTC/USDT")
        ).scalars()
        assert sorted(strategies) == ["", "a", "b"]  # '' is the account ledger


def test_idempotent_per_ts(store: PortfolioStore, engine: Engine) -> None:
    pf = sample()
    first = store.save_snapshot(pf, T1)
    again = store.save_snapshot(pf, T1)
    assert first == again

    def count() -> tuple[int, int]:
        with engine.connect() as conn:
            return (
                conn.execute(select(func.count()).select_from(position_snapshots)).scalar_one(),
                conn.execute(select(func.count()).select_from(balance_snapshots)).scalar_one(),
            )

    before = count()
    assert before[0] + before[1] == first
    # The venue now reports USDT only: BNB, BTC and ETH are gone, and so are their rows at T1.
    pf.set_balances("main", "binance", {"USDT": Balance(asset="USDT", free=D(1))})
    store.save_snapshot(pf, T1)
    assert count() == (before[0], before[1] - 3)
    assert store.load_latest().holding("main", "binance", "BNB").total == 0


def test_latest_snapshot_wins_and_at_reads_the_past(store: PortfolioStore) -> None:
    pf = sample()
    store.save_snapshot(pf, T1)
    old = comparable(pf)
    pf.apply_fill(fill("buy", "5", "90"), account="main", strategy="c")
    pf.mark("binance", "BTC/USDT", "91")
    store.save_snapshot(pf, T2)
    assert comparable(store.load_latest()) == comparable(pf)
    assert comparable(store.load_latest(at=T1)) == old
    assert store.latest_ts() == {"main": T2, "alt": T2}
    # Each account's own latest snapshot counts: a process that only owns "alt" saves it later.
    alt_only = Portfolio()
    alt_only.set_balances("alt", "kraken", {"USD": Balance(asset="USD", free=D(7))})
    store.save_snapshot(alt_only, T3)
    assert store.latest_ts() == {"main": T2, "alt": T3}
    loaded = store.load_latest()
    assert loaded.holding("alt", "kraken", "USD").total == D(7)
    assert loaded.holdings("main") == pf.holdings("main")  # main still from T2
    [got], [want] = loaded.positions(account="main", strategy="c"), pf.positions(account="main", strategy="c")
    assert got.model_dump(exclude={"fill_count"}) == want.model_dump(exclude={"fill_count"})
    assert store.load_latest(account="alt").accounts() == ["alt"]


def test_empty_database_loads_an_empty_portfolio(store: PortfolioStore) -> None:
    assert store.latest_ts() == {}
    assert store.load_latest().accounts() == []
    with pytest.raises(ValueError, match="needs ts"):
        store.save_snapshot(Portfolio())
