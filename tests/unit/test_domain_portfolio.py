from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meltica.domain import Fill, Position, Side

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def fill(
    side: str,
    qty: str | Decimal,
    price: str | Decimal,
    fee: str | Decimal = "0",
    fee_currency: str | None = "USDT",
    n: int = 0,
) -> Fill:
    return Fill(
        fill_id=f"t{n}",
        client_order_id="mlt-x",
        exchange="binance",
        symbol="BTC/USDT",
        side=side,
        price=price,
        quantity=qty,
        fee=fee,
        fee_currency=fee_currency,
        ts=T0,
    )


def flat() -> Position:
    return Position(account="main", exchange="binance", symbol="BTC/USDT", strategy="sma")


def test_long_add_reduce_close() -> None:
    p = flat().apply_fill(fill("buy", "1", "100")).apply_fill(fill("buy", "1", "110"))
    assert (p.quantity, p.avg_entry_price) == (Decimal(2), Decimal(105))
    p = p.apply_fill(fill("sell", "0.5", "120"))
    assert (p.quantity, p.avg_entry_price, p.realized_pnl) == (Decimal("1.5"), Decimal(105), Decimal("7.5"))
    assert p.unrealized_pnl("100") == Decimal("-7.5")
    p = p.apply_fill(fill("sell", "1.5", "100"))
    assert p.is_flat
    assert p.avg_entry_price is None
    assert p.realized_pnl == Decimal("0")


def test_short_and_flip_through_zero() -> None:
    p = flat().apply_fill(fill("sell", "2", "100"))
    assert (p.quantity, p.avg_entry_price) == (Decimal(-2), Decimal(100))
    p = p.apply_fill(fill("buy", "3", "90"))  # closes 2 short at +10 each, opens 1 long at 90
    assert (p.quantity, p.avg_entry_price, p.realized_pnl) == (Decimal(1), Decimal(90), Decimal(20))
    p = p.apply_fill(fill("sell", "4", "95"))  # closes 1 long at +5, opens 3 short at 95
    assert (p.quantity, p.avg_entry_price, p.realized_pnl) == (Decimal(-3), Decimal(95), Decimal(25))


def test_fees_by_currency_and_wrong_market() -> None:
    p = (
        flat()
        .apply_fill(fill("buy", "1", "100", fee="0.1"))
        .apply_fill(fill("buy", "1", "100", fee="0.01", fee_currency="BNB"))
    )
    p = p.apply_fill(fill("sell", "1", "100", fee="-0.02"))  # maker rebate
    assert p.fees == Decimal("0.08")
    assert p.other_fees == (("BNB", Decimal("0.01")),)
    other = Fill(
        fill_id="t",
        client_order_id="c",
        exchange="binance",
        symbol="ETH/USDT",
        side="buy",
        price="1",
        quantity="1",
        ts=T0,
    )
    with pytest.raises(ValueError, match="ETH/USDT"):
        p.apply_fill(other)


fills_strategy = st.lists(
    st.tuples(
        st.sampled_from([Side.BUY, Side.SELL]),
        st.decimals(min_value="0.001", max_value=1000, places=3),
        st.decimals(min_value="0.01", max_value=100_000, places=2),
        st.decimals(min_value=-1, max_value=10, places=4),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300)
@given(fills=fills_strategy, mark=st.decimals(min_value="0.01", max_value=100_000, places=2))
def test_pnl_conservation(fills: list[tuple[Side, Decimal, Decimal, Decimal]], mark: Decimal) -> None:
    """Cash flow + position value at the mark == realized + unrealized − fees, for any fill sequence."""
    position = flat()
    cash = Decimal(0)
    quantity = Decimal(0)
    for n, (side, qty, price, fee) in enumerate(fills):
        position = position.apply_fill(fill(side.value, qty, price, fee=fee, n=n))
        cash += -side.sign * qty * price - fee
        quantity += side.sign * qty
    assert position.quantity == quantity
    with localcontext() as ctx:
        ctx.prec = 50
        lhs = cash + quantity * mark
        rhs = position.realized_pnl + position.unrealized_pnl(mark) - position.fees
    # The average entry price is a 28-digit quotient; allow that rounding and nothing more.
    scale = sum(q * p for _, q, p, _ in fills) + abs(quantity) * mark + 1
    assert abs(lhs - rhs) <= scale * Decimal("1e-20")
    if quantity == 0:
        assert position.avg_entry_price is None
    else:
        assert position.avg_entry_price is not None
        assert position.avg_entry_price > 0
