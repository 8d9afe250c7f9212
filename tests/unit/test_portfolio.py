"""Portfolio: hand-worked examples (every number below is worked out in the comments)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meltica.domain import Balance, Fill
from meltica.portfolio import ACCOUNT_LEDGER, Holding, Portfolio

T0 = datetime(2024, 1, 1, tzinfo=UTC)
D = Decimal
_ids = itertools.count()


def fill(
    side: str,
    qty: str,
    price: str,
    fee: str = "0",
    fee_currency: str | None = "USDT",
    symbol: str = "BTC/USDT",
    exchange: str = "binance",
) -> Fill:
    return Fill(
        fill_id=f"t{next(_ids)}",
        client_order_id="mlt-x",
        exchange=exchange,
        symbol=symbol,
        side=side,
        price=price,
        quantity=qty,
        fee=fee,
        fee_currency=fee_currency,
        ts=T0,
    )


def usdt(amount: str) -> dict[str, Balance]:
    return {"USDT": Balance(asset="USDT", free=D(amount))}


@pytest.fixture
def pf() -> Portfolio:
    p = Portfolio(clock=lambda: T0)
    p.set_balances("main", "binance", usdt("1000"))
    return p


def test_long_add_partial_close_flip_short_close(pf: Portfolio) -> None:
    book = pf.apply_fill
    p = book(fill("buy", "1", "100", fee="0.1"), account="main", strategy="sma")
    assert (p.quantity, p.avg_entry_price, p.realized_pnl) == (D(1), D(100), D(0))
    p = book(fill("buy", "1", "110", fee="0.11"), account="main", strategy="sma")
    assert (p.quantity, p.avg_entry_price) == (D(2), D(105))  # (100 + 110) / 2
    p = book(fill("sell", "0.5", "120", fee="0.06"), account="main", strategy="sma")
    assert (p.quantity, p.avg_entry_price, p.realized_pnl) == (D("1.5"), D(105), D("7.5"))  # (120 − 105) × 0.5
    pf.mark("binance", "BTC/USDT", "100")
    assert pf.pnl(strategy="sma").unrealized == D("-7.5")  # (100 − 105) × 1.5
    # Sell 2.5 @ 100: closes 1.5 long at −5 each (−7.5), opens 1 short at 100.
    p = book(fill("sell", "2.5", "100", fee="0.25"), account="main", strategy="sma")
    assert (p.quantity, p.avg_entry_price, p.realized_pnl) == (D(-1), D(100), D(0))
    pf.mark("binance", "BTC/USDT", "95")
    assert pf.pnl(strategy="sma").unrealized == D(5)  # short 1 from 100, mark 95
    # Buy 1 @ 90 closes the short: +10.
    p = book(fill("buy", "1", "90", fee="0.09"), account="main", strategy="sma")
    assert p.is_flat
    assert p.avg_entry_price is None
    assert p.realized_pnl == D(10)
    assert p.fees == D("0.61")  # 0.1 + 0.11 + 0.06 + 0.25 + 0.09
    assert p.fill_count == 5
    pnl = pf.pnl(account="main")
    assert (pnl.realized, pnl.unrealized, pnl.fees, pnl.total) == (D(10), D(0), D("0.61"), D("9.39"))
    # Cash: −100 −110 +60 +250 −90 = +10, less 0.61 fees; BTC back to 0.
    assert pf.holding("main", "binance", "USDT").total == D("1009.39")
    assert pf.holding("main", "binance", "BTC").total == D(0)
    assert pf.equity("main") == D("1009.39")


def test_fees_in_bnb_are_kept_apart_and_valued_only_with_a_mark(pf: Portfolio) -> None:
    pf.set_balances("main", "binance", {**usdt("1000"), "BNB": Balance(asset="BNB", free=D(1), locked=D("0.5"))})
    pf.apply_fill(fill("buy", "1", "100", fee="0.002", fee_currency="BNB"), account="main", strategy="s")
    p = pf.apply_fill(fill("sell", "1", "110", fee="0.1"), account="main", strategy="s")
    assert p.fees == D("0.1")
    assert p.other_fees == (("BNB", D("0.002")),)
    pnl = pf.pnl(account="main")
    assert (pnl.realized, pnl.fees, pnl.total) == (D(10), D("0.1"), D("9.9"))
    assert dict(pnl.other_fees) == {"BNB": D("0.002")}
    assert pf.holding("main", "binance", "BNB") == Holding("BNB", D("0.998"), D("0.5"))
    assert pf.holding("main", "binance", "USDT").total == D("1009.9")
    pf.mark("binance", "BTC/USDT", "110")
    valuation = pf.valuation("main")
    assert valuation.currency == "USDT"
    assert dict(valuation.unvalued) == {"BNB": D("1.498")}  # no BNB mark: listed, not counted as 0
    assert pf.equity("main") == D("1009.9")
    with pytest.raises(ValueError, match="BNB"):
        pf.equity("main", strict=True)
    pf.mark("binance", "BNB/USDT", "300")
    assert pf.equity("main", strict=True) == D("1009.9") + D("1.498") * 300


def test_fee_without_currency_is_in_the_settlement_currency(pf: Portfolio) -> None:
    p = pf.apply_fill(fill("buy", "1", "100", fee="0.5", fee_currency=None), account="main", strategy="s")
    assert (p.fees, p.other_fees) == (D("0.5"), ())
    assert pf.holding("main", "binance", "USDT").total == D("899.5")


def test_two_strategies_on_one_account_net(pf: Portfolio) -> None:
    pf.apply_fill(fill("buy", "2", "100"), account="main", strategy="a")
    pf.apply_fill(fill("sell", "1", "110"), account="main", strategy="b")
    a = pf.position("main", "binance", "BTC/USDT", "a")
    b = pf.position("main", "binance", "BTC/USDT", "b")
    acct = pf.position("main", "binance", "BTC/USDT")
    assert (a.quantity, a.avg_entry_price) == (D(2), D(100))
    assert (b.quantity, b.avg_entry_price) == (D(-1), D(110))
    # The venue sees one long of 2 reduced by 1 at 110: +10 realized, 1 left at 100.
    assert (acct.strategy, acct.quantity, acct.avg_entry_price, acct.realized_pnl) == (
        ACCOUNT_LEDGER,
        D(1),
        D(100),
        D(10),
    )
    assert acct.quantity == a.quantity + b.quantity
    pf.mark("binance", "BTC/USDT", "120")
    sa, sb, total = pf.pnl(strategy="a"), pf.pnl(strategy="b"), pf.pnl(account="main")
    assert (sa.unrealized, sb.unrealized) == (D(40), D(-10))
    assert (total.realized, total.unrealized) == (D(10), D(20))
    assert total.total == sa.total + sb.total == D(30)  # same money, split differently
    # Exposure nets on the account ledger, not across the strategies' sub-ledgers.
    ex = pf.exposure(account="main")
    assert (ex.gross, ex.net) == (D(120), D(120))
    assert (pf.exposure(strategy="a").gross, pf.exposure(strategy="b").net) == (D(240), D(-120))
    assert [p.strategy for p in pf.positions(account="main")] == [ACCOUNT_LEDGER]
    assert [p.strategy for p in pf.positions(strategy="b")] == ["b"]
    assert pf.strategies("main") == ["a", "b"]


def test_exposure_per_asset_and_symbol_with_entry_price_fallback(pf: Portfolio) -> None:
    pf.apply_fill(fill("buy", "1", "100"), account="main", strategy="s")
    pf.apply_fill(fill("sell", "2", "10", symbol="ETH/USDT"), account="main", strategy="s")
    pf.apply_fill(fill("buy", "1", "101", symbol="BTC/USDT:USDT"), account="main", strategy="s")
    pf.mark("binance", "BTC/USDT", "150")
    ex = pf.exposure()
    # BTC spot 150 (mark), ETH −20 (no mark: entry 10), BTC perp 101 (no mark: entry).
    assert dict(ex.per_market) == {
        ("binance", "BTC/USDT"): D(150),
        ("binance", "ETH/USDT"): D(-20),
        ("binance", "BTC/USDT:USDT"): D(101),
    }
    assert dict(ex.per_asset) == {"BTC": D(251), "ETH": D(-20)}
    assert ex.per_symbol["ETH/USDT"] == D(-20)
    assert (ex.gross, ex.net) == (D(271), D(231))
    assert ex.at_entry == (("binance", "BTC/USDT:USDT"), ("binance", "ETH/USDT"))
    assert pf.pnl(symbol="ETH/USDT").unrealized == D(0)  # no mark, no unrealized PnL


def test_derivative_fills_settle_realized_pnl_not_the_base(pf: Portfolio) -> None:
    perp = "BTC/USDT:USDT"
    pf.apply_fill(fill("buy", "2", "100", fee="0.2", symbol=perp), account="main", strategy="s")
    assert pf.holding("main", "binance", "USDT").total == D("999.8")
    assert pf.holding("main", "binance", "BTC").total == D(0)
    pf.apply_fill(fill("sell", "1", "130", fee="0.13", symbol=perp), account="main", strategy="s")
    assert pf.holding("main", "binance", "USDT").total == D("999.8") + 30 - D("0.13")
    pf.mark("binance", perp, "140")
    # Equity = wallet + unrealized of the open perp (1 × (140 − 100)).
    assert pf.valuation("main").unrealized == D(40)
    assert pf.equity("main") == D("1029.67") + 40


def test_balances_replace_debit_locked_and_may_go_negative() -> None:
    pf = Portfolio()
    pf.set_balances("main", "binance", {"USDT": Balance(asset="USDT", free=D(50), locked=D(100)), **{}})
    pf.apply_fill(fill("buy", "1", "120"), account="main", strategy="s")
    assert pf.holding("main", "binance", "USDT") == Holding("USDT", D(0), D(30))  # 50 free, then 70 of locked
    pf.apply_fill(fill("buy", "1", "100"), account="main", strategy="s")
    assert pf.holding("main", "binance", "USDT") == Holding("USDT", D(-70), D(0))
    with pytest.raises(ValueError, match="free"):
        pf.balances("main", "binance")
    pf.set_balances("main", "binance", {"BTC": Balance(asset="BTC", free=D(2))})  # venue truth replaces all
    assert pf.holding("main", "binance", "USDT") == Holding("USDT")
    assert pf.balances("main", "binance") == {"BTC": Balance(asset="BTC", free=D(2))}
    with pytest.raises(ValueError, match="under key"):
        pf.set_balances("main", "binance", {"ETH": Balance(asset="BTC")})


def test_reservations(pf: Portfolio) -> None:
    pf.reserve("o1", "main", "binance", "USDT", "300")
    pf.reserve("o2", "main", "binance", "USDT", "200")
    pf.reserve("o3", "main", "binance", "BTC", "1")
    assert pf.available("main", "binance", "USDT") == D(500)
    pf.reserve("o1", "main", "binance", "USDT", "100")  # amended order: replaces
    assert pf.available("main", "binance", "USDT") == D(700)
    pf.release("o1")
    pf.release("o1")
    pf.release("unknown")
    assert pf.reserved("main", "binance", "USDT") == D(200)
    assert pf.available("main", "binance", "BTC") == D(-1)
    with pytest.raises(ValueError, match=">= 0"):
        pf.reserve("o4", "main", "binance", "USDT", "-1")


def test_replayed_fill_changes_nothing(pf: Portfolio) -> None:
    f = fill("buy", "1", "100", fee="0.1")
    first = pf.apply_fill(f, account="main", strategy="s")
    again = pf.apply_fill(f, account="main", strategy="s")
    assert first == again
    assert pf.holding("main", "binance", "USDT").total == D("899.9")
    assert pf.position("main", "binance", "BTC/USDT").fill_count == 1


def test_refusals() -> None:
    pf = Portfolio()
    with pytest.raises(ValueError, match="account ledger"):
        pf.apply_fill(fill("buy", "1", "1"), account="main", strategy=ACCOUNT_LEDGER)
    with pytest.raises(ValueError, match="inverse"):
        pf.apply_fill(fill("buy", "1", "1", symbol="BTC/USD:BTC"), account="main", strategy="s")
    with pytest.raises(ValueError, match="> 0"):
        pf.mark("binance", "BTC/USDT", "0")
    assert pf.position("main", "binance", "BTC/USDT", "s").is_flat


def test_valuation_currency_rules() -> None:
    pf = Portfolio()
    pf.set_balances(
        "main", "binance", {"USDT": Balance(asset="USDT", free=D(1000)), "BTC": Balance(asset="BTC", free=D(1))}
    )
    with pytest.raises(ValueError, match="valuation currency"):
        pf.equity("main")  # no marks: nothing to infer the currency from
    pf.mark("binance", "BTC/USDT", "20000")
    assert pf.equity("main") == D(21000)
    assert pf.equity("main", quote="BTC") == D("1.05")  # USDT through the inverse of BTC/USDT
    pf.mark("kraken", "ETH/BTC", "0.05")
    pf.set_balances("main", "kraken", {"ETH": Balance(asset="ETH", free=D(10))})
    with pytest.raises(ValueError, match="BTC, USDT"):
        pf.equity("main")  # marks in two quotes: ambiguous
    valuation = pf.valuation("main", quote="BTC")
    assert valuation.equity == D("1.55")  # 1 BTC + 1000 USDT (0.05 BTC) + 10 ETH (0.5 BTC)
    assert dict(valuation.unvalued) == {}
    # ETH has no path to USDT (ETH/BTC is not ETH/USDT; only one hop): listed as unvalued.
    assert dict(Portfolio(valuation_currency="USDT").valuation("nobody").by_asset) == {}
    assert dict(pf.valuation("main", quote="USDT").unvalued) == {"ETH": D(10)}
