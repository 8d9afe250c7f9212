"""Property tests of the portfolio: conservation of money, ledger sums, exposure bounds.

The conservation law, exactly (no tolerance — the ledgers keep an exact cost basis). Take one account
that starts with cash only, random fills across strategies and markets, and marks ``m`` for every
asset (``m[USDT] = 1``). Over the account ledgers — or equally over all strategies' sub-ledgers:

    spot, fees in the quote:
        Σ realized + Σ unrealized(m) − Σ fees  ==  Δcash + Σ quantity × m

    in general (fees in BNB or in the base, perpetuals settled in USDT):
        Σ realized + Σ unrealized(m) − Σ fees − Σ_X other_fees[X] × m[X]
            ==  Σ_assets Δholding[a] × m[a] + Σ_perpetuals unrealized(m)  ==  Δequity(m)
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meltica.domain import Balance, Fill, Position, Side
from meltica.portfolio import PnL, Portfolio, split_symbol

T0 = datetime(2024, 1, 1, tzinfo=UTC)
ACCOUNT, VENUE, QUOTE = "main", "binance", "USDT"
START = Decimal(1_000_000)
STRATEGIES = ("a", "b", "c")
SPOT = ("BTC/USDT", "ETH/USDT", "BNB/USDT")
ALL = (*SPOT, "BTC/USDT:USDT")
ASSETS = ("USDT", "BTC", "ETH", "BNB")

prices = st.decimals(min_value="0.01", max_value=100_000, places=2)
FillSpec = tuple[str, str, Side, Decimal, Decimal, Decimal, str | None]


def fill_specs(symbols: tuple[str, ...], fee_currencies: tuple[str | None, ...]) -> st.SearchStrategy[list[FillSpec]]:
    return st.lists(
        st.tuples(
            st.sampled_from(STRATEGIES),
            st.sampled_from(symbols),
            st.sampled_from([Side.BUY, Side.SELL]),
            st.decimals(min_value="0.001", max_value=1000, places=3),
            prices,
            st.decimals(min_value=-1, max_value=10, places=4),
            st.sampled_from(fee_currencies),
        ),
        min_size=1,
        max_size=40,
    )


marks_strategy = st.fixed_dictionaries({symbol: prices for symbol in ALL})


def exact() -> Any:
    """The test's own sums: wide enough to be exact, so the identities are checked with ``==``."""
    return localcontext(prec=100)


def run(specs: list[FillSpec]) -> Portfolio:
    pf = Portfolio(valuation_currency=QUOTE)
    pf.set_balances(ACCOUNT, VENUE, {QUOTE: Balance(asset=QUOTE, free=START)})
    for n, (strategy, symbol, side, qty, price, fee, fee_currency) in enumerate(specs):
        currency = split_symbol(symbol)[0] if fee_currency == "base" else fee_currency
        fill = Fill(
            fill_id=f"t{n}",
            client_order_id="mlt-x",
            exchange=VENUE,
            symbol=symbol,
            side=side,
            price=price,
            quantity=qty,
            fee=fee,
            fee_currency=currency,
            ts=T0,
        )
        pf.apply_fill(fill, account=ACCOUNT, strategy=strategy)
    return pf


def apply_marks(pf: Portfolio, marks: dict[str, Decimal]) -> dict[str, Decimal]:
    for symbol, price in marks.items():
        pf.mark(VENUE, symbol, price)
    return {QUOTE: Decimal(1), **{split_symbol(s)[0]: marks[s] for s in SPOT}}


def sub_ledger_pnl(pf: Portfolio) -> list[PnL]:
    return [pf.pnl(account=ACCOUNT, strategy=s) for s in pf.strategies(ACCOUNT)]


@settings(max_examples=150, deadline=None)
@given(specs=fill_specs(SPOT, (None, QUOTE)), marks=marks_strategy)
def test_conservation_spot_fees_in_quote(specs: list[FillSpec], marks: dict[str, Decimal]) -> None:
    pf = run(specs)
    with exact():
        apply_marks(pf, marks)
        cash_delta = pf.holding(ACCOUNT, VENUE, QUOTE).total - START
        position_value = sum(
            (p.quantity * marks[p.symbol] for p in pf.positions(account=ACCOUNT)),
            Decimal(0),
        )
        for pnls in ([pf.pnl(account=ACCOUNT)], sub_ledger_pnl(pf)):
            realized = sum((p.realized for p in pnls), Decimal(0))
            unrealized = sum((p.unrealized for p in pnls), Decimal(0))
            fees = sum((p.fees for p in pnls), Decimal(0))
            assert realized + unrealized - fees == cash_delta + position_value
        # Every base holding is exactly the position (no fee was taken in a base).
        for symbol in SPOT:
            base = split_symbol(symbol)[0]
            assert pf.holding(ACCOUNT, VENUE, base).total == pf.position(ACCOUNT, VENUE, symbol).quantity


@settings(max_examples=150, deadline=None)
@given(specs=fill_specs(ALL, (None, QUOTE, "BNB", "base")), marks=marks_strategy)
def test_conservation_with_other_fees_and_perpetuals(specs: list[FillSpec], marks: dict[str, Decimal]) -> None:
    pf = run(specs)
    with exact():
        m = apply_marks(pf, marks)
        perp_unrealized = pf.pnl(account=ACCOUNT, symbol="BTC/USDT:USDT").unrealized
        holdings_value = sum(
            ((pf.holding(ACCOUNT, VENUE, a).total - (START if a == QUOTE else 0)) * m[a] for a in ASSETS),
            Decimal(0),
        )
        valuation = pf.valuation(ACCOUNT)
        assert dict(valuation.unvalued) == {}
        for pnls in ([pf.pnl(account=ACCOUNT)], sub_ledger_pnl(pf)):
            total = sum((p.total for p in pnls), Decimal(0))
            other = sum((amount * m[c] for p in pnls for c, amount in p.other_fees.items()), Decimal(0))
            assert total - other == holdings_value + perp_unrealized == valuation.equity - START


@settings(max_examples=150, deadline=None)
@given(specs=fill_specs(ALL, (None, QUOTE, "BNB")), marks=st.one_of(st.none(), marks_strategy))
def test_account_ledger_is_the_sum_of_sub_ledgers(specs: list[FillSpec], marks: dict[str, Decimal] | None) -> None:
    pf = run(specs)
    with exact():
        if marks is not None:
            apply_marks(pf, marks)
        for symbol in ALL:
            account = pf.position(ACCOUNT, VENUE, symbol)
            subs = [pf.position(ACCOUNT, VENUE, symbol, s) for s in STRATEGIES]
            assert account.quantity == sum((p.quantity for p in subs), Decimal(0))
            assert account.fees == sum((p.fees for p in subs), Decimal(0))
            assert account.fill_count == sum(p.fill_count for p in subs)
            other: dict[str, Decimal] = {}
            for p in subs:
                for currency, amount in p.other_fees:
                    other[currency] = other.get(currency, Decimal(0)) + amount
            assert dict(account.other_fees) == other
            if marks is None:
                continue  # without a mark each ledger is valued at its own entry price: no common yardstick
            total = pf.pnl(account=ACCOUNT, symbol=symbol)
            parts = [pf.pnl(account=ACCOUNT, strategy=s, symbol=symbol) for s in STRATEGIES]
            assert total.realized + total.unrealized == sum((p.realized + p.unrealized for p in parts), Decimal(0))
        # The domain's Position.apply_fill agrees, up to the rounding of its average price.
        for symbol in ALL:
            reference = Position(account=ACCOUNT, exchange=VENUE, symbol=symbol, strategy="ref")
            for n, (_, sym, side, qty, price, fee, fee_ccy) in enumerate(specs):
                if sym == symbol:
                    reference = reference.apply_fill(
                        Fill(
                            fill_id=f"r{n}",
                            client_order_id="mlt-x",
                            exchange=VENUE,
                            symbol=symbol,
                            side=side,
                            price=price,
                            quantity=qty,
                            fee=fee,
                            fee_currency=fee_ccy,
                            ts=T0,
                        )
                    )
            ours = pf.position(ACCOUNT, VENUE, symbol)
            assert (ours.quantity, ours.fees, ours.other_fees) == (
                reference.quantity,
                reference.fees,
                reference.other_fees,
            )
            scale = sum((q * p for _, s, _, q, p, _, _ in specs if s == symbol), Decimal(1))
            assert abs(ours.realized_pnl - reference.realized_pnl) <= scale * Decimal("1e-20")


@settings(max_examples=150, deadline=None)
@given(specs=fill_specs(ALL, (None,)), marks=st.one_of(st.none(), marks_strategy))
def test_gross_bounds_net(specs: list[FillSpec], marks: dict[str, Decimal] | None) -> None:
    pf = run(specs)
    with exact():
        if marks is not None:
            apply_marks(pf, marks)
        views = [pf.exposure(account=ACCOUNT), *(pf.exposure(account=ACCOUNT, strategy=s) for s in STRATEGIES)]
        for ex in views:
            assert ex.gross >= abs(ex.net)
            assert ex.gross >= 0
            assert sum(ex.per_asset.values(), Decimal(0)) == ex.net
            assert sum(ex.per_symbol.values(), Decimal(0)) == ex.net
            assert sum((abs(v) for v in ex.per_market.values()), Decimal(0)) == ex.gross
        if marks is None:
            return  # at entry prices, the account's and the strategies' values differ by realized PnL
        # At marks, netting across strategies never increases gross exposure and keeps the net.
        assert views[0].gross <= sum((ex.gross for ex in views[1:]), Decimal(0))
        assert views[0].net == sum((ex.net for ex in views[1:]), Decimal(0))
