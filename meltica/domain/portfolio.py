"""Positions and balances."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import Field, model_validator

from meltica.domain.orders import Fill
from meltica.domain.values import Amount, DomainModel, NonNegativeDecimal, to_decimal

Name = Annotated[str, Field(min_length=1, max_length=128)]


def settlement_currency(symbol: str) -> str:
    """Currency PnL is counted in: the settle currency of a derivative ("BTC/USD:BTC" → BTC), else
    the quote ("BTC/USDT" → USDT)."""
    if ":" in symbol:
        return symbol.rsplit(":", 1)[1].split("-", 1)[0]
    return symbol.split("/", 1)[1] if "/" in symbol else symbol


class Position(DomainModel):
    """Net position of one strategy in one market; ``quantity`` > 0 long, < 0 short.

    ``avg_entry_price`` is the average price of the open quantity (``None`` when flat).
    ``realized_pnl`` excludes fees; ``fees`` holds fees paid in the settlement currency, and
    ``other_fees`` those charged in another currency (e.g. BNB), which are not converted here.
    PnL arithmetic assumes a linear contract (value = quantity × price × contract size 1).
    """

    account: Name
    exchange: Name
    symbol: Name
    strategy: Name
    quantity: Amount = Decimal(0)
    avg_entry_price: Amount | None = None
    realized_pnl: Amount = Decimal(0)
    fees: Amount = Decimal(0)
    other_fees: tuple[tuple[str, Decimal], ...] = ()
    fill_count: int = 0
    # Set by a live publisher (the execution stage marks with the last bar's close); None: not marked.
    mark_price: Amount | None = None
    unrealized_pnl_at_mark: Amount | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Position:
        if (self.quantity != 0) != (self.avg_entry_price is not None):
            raise ValueError("avg_entry_price is set exactly when the position is not flat")
        if self.avg_entry_price is not None and self.avg_entry_price <= 0:
            raise ValueError("avg_entry_price must be > 0")
        return self

    @property
    def is_flat(self) -> bool:
        return self.quantity == 0

    @property
    def settlement_currency(self) -> str:
        return settlement_currency(self.symbol)

    def unrealized_pnl(self, mark_price: Decimal | int | str) -> Decimal:
        if self.avg_entry_price is None:
            return Decimal(0)
        return (to_decimal(mark_price) - self.avg_entry_price) * self.quantity

    def notional(self, mark_price: Decimal | int | str) -> Decimal:
        """Absolute market value at ``mark_price``."""
        return abs(self.quantity) * to_decimal(mark_price)

    def apply_fill(self, fill: Fill) -> Position:
        """The position after ``fill``: extends, reduces, closes or flips through zero.

        Reducing realizes ``(price - avg_entry) × closed quantity`` (sign-adjusted for shorts) and
        keeps the average of what remains; a flip opens the rest at the fill price.
        """
        if fill.exchange != self.exchange or fill.symbol != self.symbol:
            raise ValueError(
                f"fill {fill.fill_id} is for {fill.exchange}:{fill.symbol}, position is {self.exchange}:{self.symbol}"
            )
        delta = fill.quantity * fill.side.sign
        old = self.quantity
        new = old + delta
        realized = self.realized_pnl
        avg = self.avg_entry_price
        if old == 0 or (old > 0) == (delta > 0):
            # Opening or adding: weighted average of the old and new entry.
            avg = ((avg or Decimal(0)) * abs(old) + fill.price * fill.quantity) / abs(new)
        else:
            assert avg is not None  # not flat, so it has an entry price
            closed = min(abs(old), fill.quantity)
            direction = 1 if old > 0 else -1
            realized += (fill.price - avg) * closed * direction
            if new == 0:
                avg = None
            elif (new > 0) != (old > 0):
                avg = fill.price  # flipped: the remainder is a fresh position at this price
        fees, other = self.fees, dict(self.other_fees)
        if fill.fee_currency is None or fill.fee_currency == self.settlement_currency:
            fees += fill.fee
        else:
            other[fill.fee_currency] = other.get(fill.fee_currency, Decimal(0)) + fill.fee
        return self.model_copy(
            update={
                "quantity": new,
                "avg_entry_price": avg,
                "realized_pnl": realized,
                "fees": fees,
                "other_fees": tuple(sorted(other.items())),
                "fill_count": self.fill_count + 1,
            }
        )


class Balance(DomainModel):
    """One asset in one account. ``total`` is derived, so it can never disagree."""

    asset: Name
    free: NonNegativeDecimal = Decimal(0)
    locked: NonNegativeDecimal = Decimal(0)

    @property
    def total(self) -> Decimal:
        return self.free + self.locked
