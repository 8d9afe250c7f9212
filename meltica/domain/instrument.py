"""Tradable instruments and the venue rules an order must satisfy before it leaves the process."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any, NoReturn

from pydantic import model_validator

from meltica.domain.enums import MarketType, PriceRounding, Side
from meltica.domain.values import (
    Amount,
    DecimalLike,
    DomainModel,
    NonNegativeDecimal,
    PositiveDecimal,
    to_decimal,
)
from meltica.errors import DataValidationError, InvalidOrderError

# ccxt precision modes (ccxt.base.decimal_to_precision); copied so the domain does not import ccxt.
CCXT_DECIMAL_PLACES = 2
CCXT_SIGNIFICANT_DIGITS = 3
CCXT_TICK_SIZE = 4

_ROUNDING = {
    PriceRounding.NEAREST: ROUND_HALF_EVEN,
    PriceRounding.DOWN: ROUND_FLOOR,
    PriceRounding.UP: ROUND_CEILING,
}


def _clean(value: Decimal) -> Decimal:
    """Drop trailing zeros (``0.01000000`` → ``0.01``) without turning ``10`` into ``1E+1``."""
    normal = value.normalize()
    exponent = normal.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0:
        return normal.quantize(Decimal(1))
    return normal


_SNAPPED: dict[tuple[Decimal, Decimal, str], Decimal] = {}
_SNAPPED_MAX = 65_536


def snap_to_step(value: Decimal, step: Decimal, rounding: str) -> Decimal:
    """``value`` rounded to a whole multiple of ``step`` (which need not be a power of ten)."""
    # The result depends on the numeric values only (``_clean`` normalises it), and equal Decimals hash
    # equal: a bounded memo of recent results (backtests snap the same prices and quantities over and over).
    key = (value, step, rounding)
    cached = _SNAPPED.get(key)
    if cached is not None:
        return cached
    with localcontext() as ctx:
        ctx.prec = 60  # exact for any realistic price/step, so floor never lands one step low
        steps = (value / step).to_integral_value(rounding=rounding)
        result = _clean(steps * step)
    if len(_SNAPPED) >= _SNAPPED_MAX:
        _SNAPPED.clear()
    _SNAPPED[key] = result
    return result


_MULTIPLES: dict[tuple[Decimal, Decimal], bool] = {}


def is_multiple_of(value: Decimal, step: Decimal) -> bool:
    key = (value, step)
    cached = _MULTIPLES.get(key)
    if cached is not None:
        return cached
    with localcontext() as ctx:
        ctx.prec = 60
        result = value % step == 0
    if len(_MULTIPLES) >= _SNAPPED_MAX:  # a bounded memo, as snap_to_step's
        _MULTIPLES.clear()
    _MULTIPLES[key] = result
    return result


class Instrument(DomainModel):
    """One market on one venue, with its precision and limits (ccxt's market structure, typed).

    ``tick_size`` is the price increment, ``step_size`` the quantity increment. Limits that the venue
    does not publish are ``None``. Fees are rates (0.001 = 0.1 %); negative means a rebate.
    """

    exchange: str
    symbol: str  # ccxt unified: "BTC/USDT", "BTC/USDT:USDT" for a USDT-margined perpetual
    base: str
    quote: str
    settle: str | None = None
    market_type: MarketType = MarketType.SPOT
    tick_size: PositiveDecimal
    step_size: PositiveDecimal
    min_quantity: NonNegativeDecimal | None = None
    max_quantity: NonNegativeDecimal | None = None
    min_price: NonNegativeDecimal | None = None
    max_price: NonNegativeDecimal | None = None
    min_notional: NonNegativeDecimal | None = None
    max_notional: NonNegativeDecimal | None = None
    maker_fee: Amount = Decimal(0)
    taker_fee: Amount = Decimal(0)
    contract_size: PositiveDecimal = Decimal(1)
    active: bool = True

    @model_validator(mode="after")
    def _check(self) -> Instrument:
        if not self.exchange or not self.symbol:
            raise ValueError("exchange and symbol must not be empty")
        for low, high in (
            ("min_quantity", "max_quantity"),
            ("min_price", "max_price"),
            ("min_notional", "max_notional"),
        ):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low} {lo} is above {high} {hi}")
        return self

    @property
    def key(self) -> str:
        """``exchange:symbol``: the market-data partition key (DESIGN.md §2)."""
        return f"{self.exchange}:{self.symbol}"

    # --- construction from ccxt -----------------------------------------------------------

    @classmethod
    def from_ccxt_market(
        cls, exchange_id: str, market: Mapping[str, Any], *, precision_mode: int = CCXT_TICK_SIZE
    ) -> Instrument:
        """Build from one entry of ``exchange.markets`` (ccxt's unified market structure).

        ``precision_mode`` is the exchange's ``precisionMode``; TICK_SIZE (most venues, incl. Binance)
        and DECIMAL_PLACES are understood. ccxt gives numbers as floats; they go through ``str()``.
        """
        symbol = str(market.get("symbol") or "?")
        try:
            precision = market.get("precision") or {}
            limits = market.get("limits") or {}
            amount = limits.get("amount") or {}
            price = limits.get("price") or {}
            cost = limits.get("cost") or {}
            return cls(
                exchange=exchange_id,
                symbol=symbol,
                base=market["base"],
                quote=market["quote"],
                settle=market.get("settle"),
                market_type=MarketType(market.get("type") or "spot"),
                tick_size=_precision_to_step(precision.get("price"), precision_mode, "price"),
                step_size=_precision_to_step(precision.get("amount"), precision_mode, "amount"),
                min_quantity=_optional(amount.get("min")),
                max_quantity=_optional(amount.get("max")),
                min_price=_optional(price.get("min")),
                max_price=_optional(price.get("max")),
                min_notional=_optional(cost.get("min")),
                max_notional=_optional(cost.get("max")),
                maker_fee=market.get("maker") or 0,
                taker_fee=market.get("taker") or 0,
                contract_size=market.get("contractSize") or 1,
                active=market.get("active") is not False,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DataValidationError(
                f"cannot build instrument {exchange_id}:{symbol} from ccxt market: {exc}",
                source=f"ccxt:{exchange_id}",
            ) from exc

    # --- rounding -------------------------------------------------------------------------

    def round_price(self, price: DecimalLike, side: Side | None = None, mode: PriceRounding | None = None) -> Decimal:
        """``price`` on the tick grid.

        ``mode`` wins when given. Otherwise with a ``side`` the rounding is passive — a buy rounds
        down and a sell rounds up, so rounding never makes a limit order pay more than asked —
        and without one it rounds to the nearest tick (half to even).
        """
        value = to_decimal(price)
        if mode is None:
            if side is None:
                mode = PriceRounding.NEAREST
            else:
                mode = PriceRounding.DOWN if side is Side.BUY else PriceRounding.UP
        return snap_to_step(value, self.tick_size, _ROUNDING[mode])

    def round_quantity(self, quantity: DecimalLike) -> Decimal:
        """``quantity`` floored to the step size: never more than asked for."""
        value = to_decimal(quantity)
        if value < 0:
            raise InvalidOrderError(f"{self.key}: quantity {value} is negative", reason="invalid_quantity")
        return snap_to_step(value, self.step_size, ROUND_FLOOR)

    def notional(self, price: DecimalLike, quantity: DecimalLike) -> Decimal:
        """Quote-currency value of ``quantity`` at ``price`` (contracts × contract size)."""
        return to_decimal(price) * to_decimal(quantity) * self.contract_size

    # --- validation -----------------------------------------------------------------------

    def validate_order(self, price: DecimalLike | None, quantity: DecimalLike) -> None:
        """Raise ``InvalidOrderError`` naming the first venue rule the order breaks.

        ``price`` is the limit price, or a reference price for a market order (``None`` skips the
        price and notional checks). ``details['limit']`` holds the rule's field name.
        """
        qty = to_decimal(quantity)
        if qty <= 0:
            self._violation(f"quantity {qty} must be > 0", "quantity")
        if not is_multiple_of(qty, self.step_size):
            self._violation(f"quantity {qty} is not a multiple of step_size {self.step_size}", "step_size")
        if self.min_quantity is not None and qty < self.min_quantity:
            self._violation(f"quantity {qty} is below min_quantity {self.min_quantity}", "min_quantity")
        if self.max_quantity is not None and qty > self.max_quantity:
            self._violation(f"quantity {qty} is above max_quantity {self.max_quantity}", "max_quantity")
        if price is None:
            return
        px = to_decimal(price)
        if px <= 0:
            self._violation(f"price {px} must be > 0", "price")
        if not is_multiple_of(px, self.tick_size):
            self._violation(f"price {px} is not a multiple of tick_size {self.tick_size}", "tick_size")
        if self.min_price is not None and self.min_price > 0 and px < self.min_price:
            self._violation(f"price {px} is below min_price {self.min_price}", "min_price")
        if self.max_price is not None and self.max_price > 0 and px > self.max_price:
            self._violation(f"price {px} is above max_price {self.max_price}", "max_price")
        notional = self.notional(px, qty)
        if self.min_notional is not None and notional < self.min_notional:
            self._violation(f"notional {notional} is below min_notional {self.min_notional}", "min_notional")
        if self.max_notional is not None and self.max_notional > 0 and notional > self.max_notional:
            self._violation(f"notional {notional} is above max_notional {self.max_notional}", "max_notional")

    def _violation(self, problem: str, limit: str) -> NoReturn:
        raise InvalidOrderError(f"{self.key}: {problem}", reason=f"violates_{limit}", limit=limit)


def _optional(value: object) -> Decimal | None:
    return None if value is None else to_decimal(value)


def _precision_to_step(value: object, mode: int, what: str) -> Decimal:
    if value is None:
        raise ValueError(f"precision.{what} is missing")
    if mode == CCXT_TICK_SIZE:
        return _clean(to_decimal(value))
    if mode == CCXT_DECIMAL_PLACES:
        places = int(to_decimal(value))
        return _clean(Decimal(1).scaleb(-places))
    raise ValueError(f"ccxt precision mode {mode} is not supported (TICK_SIZE or DECIMAL_PLACES only)")
