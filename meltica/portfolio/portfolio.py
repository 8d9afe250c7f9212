"""The in-memory portfolio: positions, PnL, fees, balances, reservations, exposure and equity.

Ledgers
    One ledger per ``(account, exchange, symbol, strategy)`` — the strategy's *sub-ledger* — plus one
    *account ledger* per ``(account, exchange, symbol)`` that every fill of every strategy also goes
    through (``strategy == ACCOUNT_LEDGER`` in memory, ``''`` in ``position_snapshots``). The account
    ledger is what the venue sees. It is the sum of its sub-ledgers: the quantity, the fees, the fill
    count and realized + unrealized PnL at any mark are exactly the sums over the strategies. Only the
    *split* between realized and unrealized can differ, when strategies trade against each other (A
    buys 1 @ 100, B sells 1 @ 110: the account ledger realizes +10, the sub-ledgers hold +10 unrealized).

Arithmetic
    Average cost. Each ledger keeps its cost basis ``cost`` (signed: Σ signed quantity × price of
    the open quantity) rather than a rounded average, and realizes ``proceeds − removed cost`` on a
    reduction. Sums run in a 80-digit context, so with ``unrealized(mark) = quantity × mark − cost``
    this identity holds exactly, without rounding, for every ledger and any mark::

        realized + unrealized(mark) == Σ over fills (−signed quantity × price) + quantity × mark

    ``Position.avg_entry_price`` (= cost / quantity) is the one rounded number, for display;
    ``Portfolio.pnl`` uses the exact cost. The numbers agree with ``Position.apply_fill`` up to the
    rounding of its average price. Contracts are linear (value = quantity × price); inverse
    contracts (settled in the base, "BTC/USD:BTC") are refused.

Fees
    ``Position.fees`` are fees charged in the settlement currency (a fill without ``fee_currency`` is
    in the settlement currency); fees in another currency (BNB) are summed per currency in
    ``other_fees`` and never converted. Negative fees are rebates.

Balances (``Holding``)
    Per ``(account, exchange, asset)``. ``set_balances`` installs the venue's truth for one account on
    one exchange (replacing every asset there). Fills then move them locally until the next
    ``set_balances``: spot — a buy adds the base and takes quantity × price from the quote, a sell the
    reverse; derivatives ("BTC/USDT:USDT") — the settle currency receives the PnL the fill realizes on
    the account ledger (the venue's view, not a strategy's). In both, the fee is taken from the fee's
    currency. A debit takes from ``free`` first, then from ``locked``; a local ledger may go below zero
    (e.g. a backtest started without balances), so ``Holding`` allows what ``Balance`` refuses.

Conservation (property-tested, with ``==``, in tests/unit/test_portfolio_properties.py)
    For one account, markets quoted and settled in Q, and marks ``m`` (``m[Q] = 1``), summing over its
    account ledgers — or equally over all its strategies' sub-ledgers::

        spot, every fee in Q:
            Σ realized + Σ unrealized(m) − Σ fees  ==  Δcash_Q + Σ quantity × m

        in general (fees in BNB or in the base; linear perpetuals):
            Σ realized + Σ unrealized(m) − Σ fees − Σ_X other_fees[X] × m[X]
                ==  Σ_assets Δholding[a] × m[a] + Σ_perpetuals unrealized(m)  ==  Δequity(m)

    where Δ is the change since the last ``set_balances`` (cash and value move only by fills and fees).

Valuation currency
    Every value (exposure, unrealized PnL) is in the *quote of the market's mark*, never converted
    between quotes: mixing USDT and USDC markets sums them as they are. ``equity`` values holdings in
    one currency (``quote=`` or the portfolio's ``valuation_currency``, else the single quote shared
    by the marks on the account's exchanges, else by the markets it traded; ambiguous → ``ValueError``):
    an asset is priced by a mark of ``ASSET/QUOTE`` (spot first, then a derivative with that base and
    quote) or the inverse of ``QUOTE/ASSET``, on the same exchange first, then on any (one hop only).
    Assets with no such path are reported in ``Valuation.unvalued`` and left out of ``equity`` —
    never counted as zero silently (``equity(..., strict=True)`` raises instead).

Reservations
    ``reserve(key, ...)`` sets (or replaces) the amount an open order holds back; ``release(key)``
    drops it (unknown keys are ignored, so both are idempotent). ``available = free − reserved``.
    When the venue already reports the order's funds as ``locked``, the reservation counts them a
    second time: conservative, never optimistic. Reservations are not persisted — the OMS reserves its
    open orders again on recovery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Context, Decimal, localcontext
from functools import lru_cache
from typing import Any, TypedDict

from meltica.domain.orders import Fill
from meltica.domain.portfolio import Balance, Position, settlement_currency
from meltica.domain.values import DecimalLike, construct, slot_setters, to_decimal

ACCOUNT_LEDGER = "*"
"""``Position.strategy`` of an account-level ledger (stored as ``''`` in ``position_snapshots``)."""

_ZERO = Decimal(0)
# Wide enough that sums of prices × quantities and of 28-digit cost shares are exact.
_EXACT = Context(prec=80)

LedgerKey = tuple[str, str, str, str]  # account, exchange, symbol, strategy
HoldingKey = tuple[str, str, str]  # account, exchange, asset


# --- symbols -------------------------------------------------------------------------------------


_settlement_currency = lru_cache(maxsize=1024)(settlement_currency)
"""``settlement_currency``, remembered per symbol (read several times per booked fill)."""


@lru_cache(maxsize=1024)
def split_symbol(symbol: str) -> tuple[str, str, str | None]:
    """``"BTC/USDT"`` → ``("BTC", "USDT", None)``; ``"BTC/USDT:USDT"`` → ``("BTC", "USDT", "USDT")``."""
    market, _, settle = symbol.partition(":")
    base, sep, quote = market.partition("/")
    if not sep or not base or not quote:
        raise ValueError(f"symbol {symbol!r} is not a unified BASE/QUOTE[:SETTLE] symbol")
    return base, quote, (settlement_currency(symbol) if settle else None)


_split_symbol = lru_cache(maxsize=1024)(split_symbol)
"""``split_symbol``, remembered per symbol (every booked fill and mark; a refused symbol raises each time)."""


def is_derivative(symbol: str) -> bool:
    return ":" in symbol


# --- result types --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holding:
    """One asset of one account on one exchange, as the portfolio knows it. May be negative (see module doc)."""

    asset: str
    free: Decimal = _ZERO
    locked: Decimal = _ZERO

    @property
    def total(self) -> Decimal:
        with localcontext(_EXACT):
            return self.free + self.locked

    def to_balance(self) -> Balance:
        """As a domain ``Balance``; ``ValueError`` if a part is negative."""
        return Balance(asset=self.asset, free=self.free, locked=self.locked)


_new = object.__new__
_HOLDING_SLOTS = slot_setters(Holding, ("asset", "free", "locked"))


@dataclass(frozen=True, slots=True)
class PnL:
    """``total = realized + unrealized − fees``; ``other_fees`` (not in the settlement currency) are apart."""

    realized: Decimal = _ZERO
    unrealized: Decimal = _ZERO
    fees: Decimal = _ZERO
    other_fees: Mapping[str, Decimal] = field(default_factory=dict)

    @property
    def total(self) -> Decimal:
        with localcontext(_EXACT):
            return self.realized + self.unrealized - self.fees


@dataclass(frozen=True, slots=True)
class Exposure:
    """Quote-currency values at the marks (avg entry price where a market has no mark).

    ``gross = Σ |value|`` and ``net = Σ value`` over positions; ``per_asset`` (by base asset) and
    ``per_symbol`` (across exchanges) are signed net values; ``per_market`` is keyed by
    ``(exchange, symbol)``; ``at_entry`` lists the markets valued at their entry price for want of a mark.
    """

    gross: Decimal = _ZERO
    net: Decimal = _ZERO
    per_asset: Mapping[str, Decimal] = field(default_factory=dict)
    per_symbol: Mapping[str, Decimal] = field(default_factory=dict)
    per_market: Mapping[tuple[str, str], Decimal] = field(default_factory=dict)
    at_entry: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Valuation:
    """``equity`` in ``currency``: holdings at marks plus unrealized PnL of derivative positions.

    ``by_asset`` holds each valued asset's contribution (holdings, keyed by asset); ``unrealized``
    the derivatives' part; ``unvalued`` the amounts that have no mark path to ``currency`` and are
    therefore *not* in ``equity``.
    """

    account: str
    currency: str
    equity: Decimal
    by_asset: Mapping[str, Decimal]
    unrealized: Decimal
    unvalued: Mapping[str, Decimal]


# --- ledger --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Ledger:
    account: str
    exchange: str
    symbol: str
    strategy: str
    quantity: Decimal = _ZERO
    cost: Decimal = _ZERO  # Σ signed quantity × price of the open quantity; 0 when flat
    realized: Decimal = _ZERO
    fees: Decimal = _ZERO
    other_fees: dict[str, Decimal] = field(default_factory=dict)
    fill_count: int = 0
    # ``position()`` validates the first Position it builds; later ones skip it (``checked``), unless the
    # numbers were restored from outside (``restore_ledger``), which may not be Decimals.
    checked: bool = field(default=False, repr=False, compare=False)
    restored: bool = field(default=False, repr=False, compare=False)

    def apply(self, fill: Fill) -> Decimal:
        """Apply ``fill``; return the PnL it realized. Caller holds the exact context."""
        delta = fill.quantity * fill.side.sign
        old = self.quantity
        realized = _ZERO
        if old == 0 or (old > 0) == (delta > 0):
            self.cost += delta * fill.price
        else:
            closed = min(abs(old), fill.quantity)
            if closed == abs(old):
                removed = self.cost
            else:
                with localcontext() as ctx:
                    ctx.prec = 28  # a 28-digit share keeps the exact sums below well inside 80 digits
                    removed = self.cost * closed / abs(old)
            closed_signed = closed if delta > 0 else -closed
            realized = -closed_signed * fill.price - removed
            self.cost -= removed
            rest = delta - closed_signed
            if rest != 0:  # flipped through zero: the rest opens at this price
                self.cost = rest * fill.price
        self.quantity = old + delta
        if self.quantity == 0:
            self.cost = _ZERO
        self.realized += realized
        settle = _settlement_currency(self.symbol)
        currency = fill.fee_currency or settle
        if currency == settle:
            self.fees += fill.fee
        else:
            self.other_fees[currency] = self.other_fees.get(currency, _ZERO) + fill.fee
        self.fill_count += 1
        return realized

    def unrealized(self, mark: Decimal | None) -> Decimal:
        if mark is None or self.quantity == 0:
            return _ZERO
        with localcontext(_EXACT):
            return self.quantity * mark - self.cost

    def value(self, mark: Decimal | None) -> Decimal:
        """Signed value at ``mark``; at the entry price (= the cost basis) without one."""
        if mark is None:
            return self.cost
        with localcontext(_EXACT):
            return self.quantity * mark

    def position(self) -> Position:
        avg = None if self.quantity == 0 else self.cost / self.quantity
        if self.checked and (avg is None or avg > 0):
            # Built from this ledger's own Decimal arithmetic, on names already validated once: the same
            # Position validation would give, without re-running it on every fill.
            return construct(
                Position,
                {
                    "account": self.account,
                    "exchange": self.exchange,
                    "symbol": self.symbol,
                    "strategy": self.strategy,
                    "quantity": self.quantity,
                    "avg_entry_price": avg,
                    "realized_pnl": self.realized,
                    "fees": self.fees,
                    "other_fees": tuple(sorted(self.other_fees.items())),
                    "fill_count": self.fill_count,
                },
            )
        position = Position(
            account=self.account,
            exchange=self.exchange,
            symbol=self.symbol,
            strategy=self.strategy,
            quantity=self.quantity,
            avg_entry_price=avg,
            realized_pnl=self.realized,
            fees=self.fees,
            other_fees=tuple(sorted(self.other_fees.items())),
            fill_count=self.fill_count,
        )
        self.checked = not self.restored
        return position


@dataclass(slots=True)
class _Reservation:
    account: str
    exchange: str
    asset: str
    amount: Decimal


# --- the portfolio -------------------------------------------------------------------------------


class PortfolioAccountState(TypedDict):
    """One account's part of a ``Portfolio`` (``export_state``/``import_state``)."""

    ledgers: list[list[Any]]
    holdings: list[list[str]]


class Portfolio:
    """Positions, PnL, balances and reservations of any number of accounts and venues. Not thread-safe."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = None,
        valuation_currency: str | None = None,
    ) -> None:
        self._clock = clock
        self.valuation_currency = valuation_currency
        self._ledgers: dict[LedgerKey, _Ledger] = {}
        self._marks: dict[tuple[str, str], Decimal] = {}
        self._holdings: dict[HoldingKey, Holding] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._seen_fills: set[tuple[str, str, str, str, str]] = set()
        self.updated_at: datetime | None = None

    @property
    def clock(self) -> Callable[[], datetime] | None:
        return self._clock

    def _touch(self) -> None:
        if self._clock is not None:
            self.updated_at = self._clock()

    # --- fills and marks ----------------------------------------------------------------------

    def apply_fill(self, fill: Fill, *, account: str, strategy: str) -> Position:
        """Book ``fill`` on the strategy's sub-ledger, the account ledger and the balances.

        Returns the sub-ledger's new position. A fill seen before (same account, exchange, symbol,
        fill id and side) changes nothing and returns the current position.
        """
        return self._book(fill, account, strategy).position()

    def book_fill(self, fill: Fill, *, account: str, strategy: str) -> None:
        """``apply_fill`` without building the position it returns (a caller that does not read it)."""
        self._book(fill, account, strategy)

    def _book(self, fill: Fill, account: str, strategy: str) -> _Ledger:
        if not account or not strategy:
            raise ValueError("account and strategy must not be empty")
        if strategy == ACCOUNT_LEDGER:
            raise ValueError(f"{ACCOUNT_LEDGER!r} names the account ledger and cannot be a strategy")
        base, quote, settle = _split_symbol(fill.symbol)
        if settle is not None and settle != quote:
            raise ValueError(f"{fill.symbol}: inverse contracts (settled in {settle}) are not supported")
        seen = (account, fill.exchange, fill.symbol, fill.fill_id, fill.side.value)  # a self-trade: two legs
        sub = self._ledger(account, fill.exchange, fill.symbol, strategy)
        if seen in self._seen_fills:
            return sub
        total = self._ledger(account, fill.exchange, fill.symbol, ACCOUNT_LEDGER)
        with localcontext(_EXACT):
            sub.apply(fill)
            realized = total.apply(fill)  # what the venue realizes (and pays out) for the account
            fee_currency = fill.fee_currency or _settlement_currency(fill.symbol)
            if settle is None:
                self._move(account, fill.exchange, base, fill.quantity * fill.side.sign)
                self._move(account, fill.exchange, quote, -fill.quantity * fill.side.sign * fill.price)
            elif realized != 0:
                self._move(account, fill.exchange, settle, realized)
            if fill.fee != 0:
                self._move(account, fill.exchange, fee_currency, -fill.fee)
        self._seen_fills.add(seen)
        self._touch()
        return sub

    def mark(self, exchange: str, symbol: str, price: DecimalLike) -> None:
        """Set the mark price of a market (for unrealized PnL, exposure and equity)."""
        _split_symbol(symbol)  # refuse a symbol the valuation could not read
        value = to_decimal(price)
        if value <= 0:
            raise ValueError(f"mark price must be > 0, got {value}")
        self._marks[(exchange, symbol)] = value
        self._touch()

    def mark_price(self, exchange: str, symbol: str) -> Decimal | None:
        return self._marks.get((exchange, symbol))

    @property
    def marks(self) -> Mapping[tuple[str, str], Decimal]:
        return dict(self._marks)

    # --- positions ----------------------------------------------------------------------------

    def position(self, account: str, exchange: str, symbol: str, strategy: str | None = None) -> Position:
        """The strategy's sub-ledger, or with ``strategy=None`` the account ledger; flat if never traded."""
        name = ACCOUNT_LEDGER if strategy is None else strategy
        ledger = self._ledgers.get((account, exchange, symbol, name))
        if ledger is None:
            return Position(account=account, exchange=exchange, symbol=symbol, strategy=name)
        return ledger.position()

    def positions(
        self,
        *,
        account: str | None = None,
        strategy: str | None = None,
        exchange: str | None = None,
        include_flat: bool = True,
    ) -> list[Position]:
        """Account ledgers (``strategy=None``) or one strategy's sub-ledgers, sorted by key."""
        return [ledger.position() for ledger in self._select(account, strategy, exchange, include_flat=include_flat)]

    def strategies(self, account: str | None = None) -> list[str]:
        return sorted({k[3] for k in self._ledgers if k[3] != ACCOUNT_LEDGER and account in (None, k[0])})

    def accounts(self) -> list[str]:
        return sorted({k[0] for k in self._ledgers} | {k[0] for k in self._holdings})

    def unrealized_pnl(self, account: str, exchange: str, symbol: str, strategy: str | None = None) -> Decimal:
        """Exact unrealized PnL of one ledger at the market's mark (0 without a mark)."""
        ledger = self._ledgers.get((account, exchange, symbol, ACCOUNT_LEDGER if strategy is None else strategy))
        return _ZERO if ledger is None else ledger.unrealized(self._marks.get((exchange, symbol)))

    # --- PnL and exposure ---------------------------------------------------------------------

    def pnl(self, *, account: str | None = None, strategy: str | None = None, symbol: str | None = None) -> PnL:
        """Summed over account ledgers (``strategy=None``) or one strategy's sub-ledgers, in their settlement
        currencies as they are. Unrealized at the marks (0 for a market without a mark)."""
        realized = unrealized = fees = _ZERO
        other: dict[str, Decimal] = {}
        with localcontext(_EXACT):
            for ledger in self._select(account, strategy, None, symbol=symbol):
                realized += ledger.realized
                unrealized += ledger.unrealized(self._marks.get((ledger.exchange, ledger.symbol)))
                fees += ledger.fees
                for currency, amount in ledger.other_fees.items():
                    other[currency] = other.get(currency, _ZERO) + amount
        return PnL(realized=realized, unrealized=unrealized, fees=fees, other_fees=dict(sorted(other.items())))

    def exposure(self, *, account: str | None = None, strategy: str | None = None) -> Exposure:
        """Gross and net position value of the account ledgers (``strategy=None``) or one strategy's sub-ledgers."""
        gross = net = _ZERO
        per_asset: dict[str, Decimal] = {}
        per_symbol: dict[str, Decimal] = {}
        per_market: dict[tuple[str, str], Decimal] = {}
        at_entry: set[tuple[str, str]] = set()
        with localcontext(_EXACT):
            for ledger in self._select(account, strategy, None, include_flat=False):
                market = (ledger.exchange, ledger.symbol)
                mark = self._marks.get(market)
                if mark is None:
                    at_entry.add(market)
                value = ledger.value(mark)
                gross += abs(value)
                net += value
                base = split_symbol(ledger.symbol)[0]
                per_asset[base] = per_asset.get(base, _ZERO) + value
                per_symbol[ledger.symbol] = per_symbol.get(ledger.symbol, _ZERO) + value
                per_market[market] = per_market.get(market, _ZERO) + value
        return Exposure(
            gross=gross,
            net=net,
            per_asset=per_asset,
            per_symbol=per_symbol,
            per_market=per_market,
            at_entry=tuple(sorted(at_entry)),
        )

    # --- balances and reservations ------------------------------------------------------------

    def set_balances(self, account: str, exchange: str, balances: Mapping[str, Balance]) -> None:
        """Install the venue's balances of ``account`` on ``exchange``, replacing every asset held there."""
        for asset, balance in balances.items():
            if asset != balance.asset:
                raise ValueError(f"balance for {balance.asset} given under key {asset}")
        for key in [k for k in self._holdings if k[0] == account and k[1] == exchange]:
            del self._holdings[key]
        for asset, balance in balances.items():
            self._holdings[(account, exchange, asset)] = Holding(asset, balance.free, balance.locked)
        self._touch()

    def holding(self, account: str, exchange: str, asset: str) -> Holding:
        return self._holdings.get((account, exchange, asset), Holding(asset))

    def holdings(self, account: str, exchange: str | None = None) -> dict[tuple[str, str], Holding]:
        """``{(exchange, asset): Holding}`` of one account."""
        return {
            (k[1], k[2]): h for k, h in sorted(self._holdings.items()) if k[0] == account and exchange in (None, k[1])
        }

    def balances(self, account: str, exchange: str) -> dict[str, Balance]:
        """Domain ``Balance`` per asset; ``ValueError`` if the local ledger went negative somewhere."""
        return {asset: h.to_balance() for (_, asset), h in self.holdings(account, exchange).items()}

    def reserve(self, key: str, account: str, exchange: str, asset: str, amount: DecimalLike) -> None:
        """Hold back ``amount`` of ``asset`` for ``key`` (an open order); a second call replaces the amount."""
        value = to_decimal(amount)
        if value < 0:
            raise ValueError(f"reservation must be >= 0, got {value}")
        self._reservations[key] = _Reservation(account, exchange, asset, value)

    def release(self, key: str) -> None:
        self._reservations.pop(key, None)

    def reserved(self, account: str, exchange: str, asset: str) -> Decimal:
        with localcontext(_EXACT):
            return sum(
                (
                    r.amount
                    for r in self._reservations.values()
                    if (r.account, r.exchange, r.asset) == (account, exchange, asset)
                ),
                _ZERO,
            )

    def reservations(self) -> dict[str, tuple[str, str, str, Decimal]]:
        return {k: (r.account, r.exchange, r.asset, r.amount) for k, r in self._reservations.items()}

    def available(self, account: str, exchange: str, asset: str) -> Decimal:
        """``free − reserved`` (may be negative)."""
        with localcontext(_EXACT):
            return self.holding(account, exchange, asset).free - self.reserved(account, exchange, asset)

    # --- equity -------------------------------------------------------------------------------

    def equity(self, account: str, *, quote: str | None = None, strict: bool = False) -> Decimal:
        """Holdings valued at the marks plus derivatives' unrealized PnL, in one currency (module doc).

        Assets without a mark path are left out; ``strict=True`` raises ``ValueError`` naming them,
        ``valuation()`` lists them.
        """
        valuation = self.valuation(account, quote=quote)
        if strict and valuation.unvalued:
            raise ValueError(
                f"account {account}: no mark path to {valuation.currency} for {', '.join(valuation.unvalued)}"
            )
        return valuation.equity

    def valuation(self, account: str, *, quote: str | None = None) -> Valuation:
        currency = quote or self.valuation_currency or self._infer_quote(account)
        by_asset: dict[str, Decimal] = {}
        unvalued: dict[str, Decimal] = {}
        unrealized = _ZERO
        with localcontext(_EXACT):
            for (exchange, asset), holding in self.holdings(account).items():
                if holding.total == 0:
                    continue
                price = self._price(exchange, asset, currency)
                if price is None:
                    unvalued[asset] = unvalued.get(asset, _ZERO) + holding.total
                else:
                    by_asset[asset] = by_asset.get(asset, _ZERO) + holding.total * price
            for ledger in self._select(account, None, None, include_flat=False):
                if not is_derivative(ledger.symbol):
                    continue
                pnl = ledger.unrealized(self._marks.get((ledger.exchange, ledger.symbol)))
                settle = settlement_currency(ledger.symbol)
                price = self._price(ledger.exchange, settle, currency)
                if price is None:
                    unvalued[settle] = unvalued.get(settle, _ZERO) + pnl
                else:
                    unrealized += pnl * price
            equity = sum(by_asset.values(), _ZERO) + unrealized
        return Valuation(
            account=account,
            currency=currency,
            equity=equity,
            by_asset=dict(sorted(by_asset.items())),
            unrealized=unrealized,
            unvalued=dict(sorted(unvalued.items())),
        )

    # --- internals ----------------------------------------------------------------------------

    def _ledger(self, account: str, exchange: str, symbol: str, strategy: str) -> _Ledger:
        key = (account, exchange, symbol, strategy)
        ledger = self._ledgers.get(key)
        if ledger is None:
            ledger = self._ledgers[key] = _Ledger(account, exchange, symbol, strategy)
        return ledger

    def _select(
        self,
        account: str | None,
        strategy: str | None,
        exchange: str | None,
        *,
        symbol: str | None = None,
        include_flat: bool = True,
    ) -> Iterable[_Ledger]:
        name = ACCOUNT_LEDGER if strategy is None else strategy
        for key in sorted(self._ledgers):
            ledger = self._ledgers[key]
            if (
                key[3] == name
                and account in (None, key[0])
                and exchange in (None, key[1])
                and symbol in (None, key[2])
                and (include_flat or ledger.quantity != 0)
            ):
                yield ledger

    def _move(self, account: str, exchange: str, asset: str, amount: Decimal) -> None:
        """Credit (> 0) to free, or debit (< 0) from free then locked; caller holds the exact context."""
        key = (account, exchange, asset)
        held = self._holdings.get(key)
        if held is None:  # (as ``Holding(asset)``'s zeros, without building one)
            free, locked = _ZERO + amount, _ZERO
        else:
            free, locked = held.free + amount, held.locked
        if free < 0 < locked:
            take = min(-free, locked)
            free, locked = free + take, locked - take
        # ``Holding(asset, free, locked)`` through its slots' setters (a frozen dataclass's ``__init__`` goes
        # through ``object.__setattr__``): every booked fill moves one or two
        holding = _new(Holding)
        set_asset, set_free, set_locked = _HOLDING_SLOTS
        set_asset(holding, asset)
        set_free(holding, free)
        set_locked(holding, locked)
        self._holdings[key] = holding

    def _price(self, exchange: str, asset: str, currency: str) -> Decimal | None:
        """Price of one ``asset`` in ``currency`` from the marks (module doc), or ``None``."""
        if asset == currency:
            return Decimal(1)
        for same_venue in (True, False):
            derivative: Decimal | None = None
            inverse: Decimal | None = None
            for (venue, symbol), mark in sorted(self._marks.items()):
                if (venue == exchange) != same_venue:
                    continue
                try:
                    base, quote, _ = split_symbol(symbol)
                except ValueError:
                    continue
                if (base, quote) == (asset, currency):
                    if not is_derivative(symbol):
                        return mark
                    derivative = derivative or mark
                elif (base, quote) == (currency, asset) and not is_derivative(symbol):
                    inverse = inverse or mark
            if derivative is not None:
                return derivative
            if inverse is not None:
                return Decimal(1) / inverse
        return None

    def _infer_quote(self, account: str) -> str:
        exchanges = {k[1] for k in self._holdings if k[0] == account} | {k[1] for k in self._ledgers if k[0] == account}
        quotes = {split_symbol(symbol)[1] for (venue, symbol) in self._marks if venue in exchanges}
        if not quotes:  # no marks yet: the quotes of the markets the account traded
            quotes = {split_symbol(k[2])[1] for k in self._ledgers if k[0] == account}
        if len(quotes) != 1:
            found = ", ".join(sorted(quotes)) or "no marks"
            raise ValueError(
                f"account {account}: cannot choose a valuation currency ({found}); pass quote= "
                "or set Portfolio(valuation_currency=...)"
            )
        return quotes.pop()

    # --- state for restarts (stores and snapshots) ------------------------------------------------

    def restore_ledger(
        self,
        account: str,
        exchange: str,
        symbol: str,
        strategy: str,
        *,
        quantity: Decimal,
        cost: Decimal,
        realized: Decimal,
        fees: Decimal,
        other_fees: Mapping[str, Decimal] | None = None,
        fill_count: int | None = None,
    ) -> None:
        """Set one ledger's numbers as a store or snapshot kept them (``other_fees``/``fill_count``: left
        as they are when not given)."""
        ledger = self._ledger(account, exchange, symbol, strategy)
        ledger.quantity, ledger.cost, ledger.realized, ledger.fees = quantity, cost, realized, fees
        if other_fees is not None:
            ledger.other_fees = dict(other_fees)
        if fill_count is not None:
            ledger.fill_count = fill_count
        ledger.restored = True
        ledger.checked = False

    def ledger_state(self) -> list[tuple[LedgerKey, Decimal, Decimal, Decimal, Decimal, Decimal | None]]:
        """``(key, quantity, cost, realized, fees, mark)`` per ledger, for the store."""
        return [
            (key, lg.quantity, lg.cost, lg.realized, lg.fees, self._marks.get((key[1], key[2])))
            for key, lg in sorted(self._ledgers.items())
        ]

    def restore_holding(self, account: str, exchange: str, holding: Holding) -> None:
        """Set one balance as a store or snapshot kept it."""
        self._holdings[(account, exchange, holding.asset)] = holding

    def restore_mark(self, exchange: str, symbol: str, price: Decimal) -> None:
        """Set one market's mark price as a store or snapshot kept it."""
        self._marks[(exchange, symbol)] = price

    def export_state(self, account: str) -> PortfolioAccountState:
        """One account's ledgers and balances, JSON-ready (Decimals as strings), for ``import_state``.
        Ledgers: ``[exchange, symbol, strategy, quantity, cost, realized, fees, other fees, fill count]``;
        holdings: ``[exchange, asset, free, locked]``."""
        ledgers: list[list[Any]] = []
        for (acct, exchange, symbol, strategy), ledger in sorted(self._ledgers.items()):
            if acct != account:
                continue
            ledgers.append(
                [
                    exchange,
                    symbol,
                    strategy,
                    str(ledger.quantity),
                    str(ledger.cost),
                    str(ledger.realized),
                    str(ledger.fees),
                    {k: str(v) for k, v in sorted(ledger.other_fees.items())},
                    ledger.fill_count,
                ]
            )
        holdings: list[list[str]] = [
            [exchange, asset, str(h.free), str(h.locked)]
            for (exchange, asset), h in sorted(self.holdings(account).items())
        ]
        return {"ledgers": ledgers, "holdings": holdings}

    def import_state(self, account: str, data: PortfolioAccountState | Mapping[str, Any]) -> None:
        """Restore what ``export_state`` returned for ``account`` (ledgers and balances it names)."""
        for exchange, symbol, strategy, qty, cost, realized, fees, other_fees, fill_count in data["ledgers"]:
            self.restore_ledger(
                account,
                exchange,
                symbol,
                strategy,
                quantity=Decimal(str(qty)),
                cost=Decimal(str(cost)),
                realized=Decimal(str(realized)),
                fees=Decimal(str(fees)),
                other_fees={k: Decimal(str(v)) for k, v in other_fees.items()},
                fill_count=fill_count,
            )
        for exchange, asset, free, locked in data["holdings"]:
            self.restore_holding(account, exchange, Holding(asset, Decimal(str(free)), Decimal(str(locked))))
