"""The matching engine: one fill logic for the emulator, the paper venue and the backtester.

Plain, synchronous and deterministic: the caller passes the clock, market data and requests; every
call returns a ``MatchResult`` listing what happened in order. See README.md in this package for the
contract; the comments here say why the code does what it does.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from meltica.domain.enums import Side
from meltica.domain.instrument import Instrument, snap_to_step
from meltica.domain.values import slot_setters
from meltica.errors import InvalidOrderError
from meltica.matching.book import MarketSide, OrderSide
from meltica.matching.ledger import Ledger
from meltica.matching.types import (
    Account,
    BalanceUpdate,
    BookView,
    CancelReplacePartialFailureError,
    EngineFill,
    EngineOrder,
    EngineOrderStatus,
    EngineOrderType,
    EngineRejection,
    EngineTimeInForce,
    ExecutionReport,
    ExecutionType,
    FeeSchedule,
    FillModel,
    MatchResult,
    NewOrder,
    PublicTrade,
    RejectReason,
    SelfTradePrevention,
)

_ZERO = Decimal(0)
_ONE = Decimal(1)
_BPS = Decimal(10_000)

_LOT_SIZE_LIMITS = frozenset({"quantity", "step_size", "min_quantity", "max_quantity"})
_PRICE_LIMITS = frozenset({"price", "tick_size", "min_price", "max_price"})
_ICEBERG_TYPES = frozenset(
    {
        EngineOrderType.LIMIT,
        EngineOrderType.LIMIT_MAKER,
        EngineOrderType.STOP_LOSS_LIMIT,
        EngineOrderType.TAKE_PROFIT_LIMIT,
    }
)

PriceLevels = Iterable[tuple[Decimal, Decimal]]


def _reject(reason: RejectReason, message: str) -> EngineRejection:
    return EngineRejection.of(reason, message)


@dataclass(slots=True, eq=False)
class _Order:
    """Mutable working state of one order (identity equality: it sits in level queues)."""

    order_id: int
    client_order_id: str
    account: Account
    symbol: str
    side: Side
    type: EngineOrderType
    tif: EngineTimeInForce
    quantity: Decimal
    quote_quantity: Decimal | None
    price: Decimal | None
    stop_price: Decimal | None
    trailing_delta_bps: int | None
    iceberg: Decimal | None
    expire_at: datetime | None
    time: datetime
    update_time: datetime
    reserve_asset: str
    reserve_price: Decimal  # buy: quote locked per unit of remaining quantity (amend recomputes from it)
    reserved: Decimal = _ZERO  # still locked for this order
    status: EngineOrderStatus = EngineOrderStatus.NEW
    executed: Decimal = _ZERO
    cum_quote: Decimal = _ZERO
    working: bool = True
    working_time: datetime | None = None
    trailing_time: datetime | None = None
    trail_extreme: Decimal | None = None
    hit: bool = False  # stop condition met by an observed price; triggers at the next stop pass
    visible: Decimal = _ZERO  # displayed remainder while resting (iceberg slice, else all of it)
    resting: bool = False
    stp: SelfTradePrevention = SelfTradePrevention.NONE

    @property
    def remaining(self) -> Decimal:
        return self.quantity - self.executed

    def snapshot(self) -> EngineOrder:
        # ``EngineOrder(...)`` field by field (its frozen ``__init__`` sets each through
        # ``object.__setattr__``; the slots' own setters are the same stores, cheaper): every order event.
        snap = _new(EngineOrder)
        (
            set_order_id, set_client_order_id, set_account, set_symbol, set_side, set_type, set_tif,
            set_quantity, set_price, set_stop_price, set_trailing, set_iceberg, set_quote_quantity,
            set_executed, set_cum_quote, set_status, set_time, set_update_time, set_working,
            set_working_time, set_trailing_time, set_expire_at, set_stp,
        ) = _ENGINE_ORDER_SLOTS  # fmt: skip
        set_order_id(snap, self.order_id)
        set_client_order_id(snap, self.client_order_id)
        set_account(snap, self.account)
        set_symbol(snap, self.symbol)
        set_side(snap, self.side)
        set_type(snap, self.type)
        set_tif(snap, self.tif)
        set_quantity(snap, self.quantity)
        set_price(snap, self.price if self.price is not None else _ZERO)
        set_stop_price(snap, self.stop_price if self.stop_price is not None else _ZERO)
        set_trailing(snap, self.trailing_delta_bps)
        set_iceberg(snap, self.iceberg if self.iceberg is not None else _ZERO)
        set_quote_quantity(snap, self.quote_quantity if self.quote_quantity is not None else _ZERO)
        set_executed(snap, self.executed)
        set_cum_quote(snap, self.cum_quote)
        set_status(snap, self.status)
        set_time(snap, self.time)
        set_update_time(snap, self.update_time)
        set_working(snap, self.working)
        set_working_time(snap, self.working_time)
        set_trailing_time(snap, self.trailing_time)
        set_expire_at(snap, self.expire_at)
        set_stp(snap, self.stp)
        return snap


_new = object.__new__
_ENGINE_ORDER_SLOTS = slot_setters(
    EngineOrder,
    (
        "order_id", "client_order_id", "account", "symbol", "side", "type", "time_in_force", "quantity", "price",
        "stop_price", "trailing_delta_bps", "iceberg_quantity", "quote_quantity", "executed_quantity",
        "cumulative_quote_quantity", "status", "time", "update_time", "working", "working_time", "trailing_time",
        "expire_at", "self_trade_prevention",
    ),
)  # fmt: skip
"""The slot setters of ``EngineOrder``'s fields (``_Order.snapshot``)."""
_ENGINE_FILL_SLOTS = slot_setters(
    EngineFill,
    (
        "account", "symbol", "order_id", "client_order_id", "side", "trade_id", "price", "quantity",
        "quote_quantity", "commission", "commission_asset", "is_maker", "time",
    ),
)  # fmt: skip
_REPORT_SLOTS = slot_setters(ExecutionReport, ("order", "execution", "fill"))

_PASSED_FILTERS: dict[tuple[int, Decimal | None, Decimal | None], Instrument] = {}
_PASSED_FILTERS_SIZE = 4096
"""(id(instrument), price, quantity) → the instrument, for the checks it passed (``_check_filters``)."""

_SYNTHETIC_CACHE_SIZE = 65_536
_NOTHING = MatchResult()
"""The result of a call that changed no order, fill or balance (immutable: shared)."""


class _Market:
    __slots__ = (
        "asks",
        "bids",
        "instrument",
        "last_price",
        "recorded_book",
        "stops",
        "symbol",
        "trade_seq",
        "update_id",
        "user_asks",
        "user_bids",
    )

    def __init__(self, instrument: Instrument, symbol: str) -> None:
        self.instrument = instrument
        self.symbol = symbol
        self.bids = MarketSide(is_bid=True)
        self.asks = MarketSide(is_bid=False)
        self.user_bids: OrderSide[_Order] = OrderSide(is_bid=True)
        self.user_asks: OrderSide[_Order] = OrderSide(is_bid=False)
        self.stops: dict[int, _Order] = {}  # not yet triggered, by order id (= placement order)
        self.last_price: Decimal | None = None
        self.recorded_book = False
        self.trade_seq = 0
        self.update_id: int | None = None

    def next_trade_id(self) -> int:
        self.trade_seq += 1
        return self.trade_seq

    def user_side(self, side: Side) -> OrderSide[_Order]:
        return self.user_bids if side is Side.BUY else self.user_asks

    def market_side(self, side: Side) -> MarketSide:
        return self.bids if side is Side.BUY else self.asks


@dataclass(slots=True)
class _Plan:
    """What admission decided: the lock, and for a market order the quantity it will fill."""

    reserve_asset: str
    reserve_amount: Decimal
    reserve_price: Decimal
    quantity: Decimal


class _Collector:
    __slots__ = ("fills", "public_trades", "touched", "updates")

    def __init__(self) -> None:
        self.updates: list[ExecutionReport] = []
        self.fills: list[EngineFill] = []
        self.public_trades: list[PublicTrade] = []
        self.touched: dict[tuple[Account, str], None] = {}

    def touch(self, account: Account, asset: str) -> None:
        self.touched[(account, asset)] = None

    def result(self, ledger: Ledger) -> MatchResult:
        balances = []
        for account, asset in self.touched:
            bal = ledger.balance(account, asset)
            balances.append(BalanceUpdate(account, asset, bal.free, bal.locked))
        return MatchResult(tuple(self.updates), tuple(self.fills), tuple(balances), tuple(self.public_trades))


class MatchingEngine:
    """Price-time matching of user orders against each other and against recorded market liquidity."""

    def __init__(
        self,
        clock: Callable[[], datetime],
        fees: FeeSchedule | None = None,
        fill_model: FillModel | None = None,
        *,
        max_open_orders: int = 200,
    ) -> None:
        self._clock = clock
        self._fees = fees if fees is not None else FeeSchedule()
        self._account_fees: dict[Account, FeeSchedule] = {}
        self.fill_model = fill_model if fill_model is not None else FillModel()
        self.max_open_orders = max_open_orders
        self.ledger = Ledger()
        self._markets: dict[str, _Market] = {}
        self._orders: dict[int, _Order] = {}
        self._open: dict[Account, dict[int, _Order]] = {}
        self._open_count: dict[tuple[Account, str], int] = {}
        self._history: dict[tuple[Account, str], list[int]] = {}
        self._trades: dict[tuple[Account, str], list[EngineFill]] = {}
        self._by_client_id: dict[tuple[Account, str, str], int] = {}
        self._expiries: list[tuple[datetime, int]] = []
        self._next_order_id = 0
        self._now: datetime | None = None
        self._c: _Collector | None = None
        self._reports = True  # build execution reports (``submit_taker`` needs none)
        # orders triggered by a recorded print rest only after that print filled resting limits: the
        # print that triggered a stop-limit cannot also fill it
        self._deferred: list[_Order] | None = None
        # synthetic book per (last price, tick, fill-model book parameters): (bid prices, bid levels,
        # ask prices, ask levels), copied into a market's book by ``_synthesize``; never mutated
        self._synthetic_books: dict[
            tuple[Decimal, Decimal, int, Decimal, Decimal],
            tuple[list[Decimal], dict[Decimal, Decimal], list[Decimal], dict[Decimal, Decimal]],
        ] = {}

    # ==========================================================================================
    # configuration
    # ==========================================================================================

    def add_instrument(self, instrument: Instrument, symbol: str | None = None) -> None:
        key = symbol if symbol is not None else instrument.symbol
        if key not in self._markets:
            self._markets[key] = _Market(instrument, key)
        else:
            self._markets[key].instrument = instrument

    def instrument(self, symbol: str) -> Instrument:
        return self._market(symbol).instrument

    def set_fees(self, account: Account, fees: FeeSchedule) -> None:
        self._account_fees[account] = fees

    def fees(self, account: Account) -> FeeSchedule:
        return self._account_fees.get(account, self._fees)

    # ==========================================================================================
    # queries
    # ==========================================================================================

    def get_order(
        self, account: Account, symbol: str, order_id: int | None = None, client_order_id: str | None = None
    ) -> EngineOrder:
        return self._find(account, symbol, order_id, client_order_id).snapshot()

    def open_orders(self, account: Account, symbol: str | None = None) -> list[EngineOrder]:
        orders = self._open.get(account, {})
        return [o.snapshot() for o in orders.values() if symbol is None or o.symbol == symbol]

    def all_orders(self, account: Account, symbol: str) -> list[EngineOrder]:
        return [self._orders[i].snapshot() for i in self._history.get((account, symbol), [])]

    def account_trades(self, account: Account, symbol: str) -> list[EngineFill]:
        return list(self._trades.get((account, symbol), []))

    def has_open_orders(self, account: Account) -> bool:
        """Whether ``account`` has any open order (``open_orders(account)`` is not empty)."""
        return bool(self._open.get(account))

    def depth(self, symbol: str, side: Side) -> Decimal:
        """The quantity a ``side`` taker could meet now: the opposite side of ``book(symbol)``, summed."""
        m = self._market(symbol)
        market, user = (m.asks, m.user_asks) if side is Side.BUY else (m.bids, m.user_bids)
        total = sum(market.levels.values(), _ZERO)
        for queue in user.levels.values():
            total += sum((o.visible for o in queue), _ZERO)
        return total

    def fills_whole(self, symbol: str, side: Side, quantity: Decimal) -> bool:
        """``depth(symbol, side) >= quantity``, without the sum when the best market level holds it."""
        m = self._market(symbol)
        market = m.asks if side is Side.BUY else m.bids
        best = market.best()
        if best is not None and market.levels[best] >= quantity:
            return True  # (every level holds a positive quantity: the sum is at least this one)
        return self.depth(symbol, side) >= quantity

    def last_price(self, symbol: str) -> Decimal | None:
        return self._market(symbol).last_price

    def book(self, symbol: str, depth: int | None = None) -> BookView:
        m = self._market(symbol)
        return BookView(
            bids=self._merged_side(m.bids, m.user_bids, depth),
            asks=self._merged_side(m.asks, m.user_asks, depth),
            last_price=m.last_price,
        )

    @staticmethod
    def _merged_side(
        market: MarketSide, user: OrderSide[_Order], depth: int | None
    ) -> tuple[tuple[Decimal, Decimal], ...]:
        levels: dict[Decimal, Decimal] = dict(market.levels)
        for price, queue in user.levels.items():
            levels[price] = levels.get(price, _ZERO) + sum((o.visible for o in queue), _ZERO)
        prices = sorted(levels, reverse=market.is_bid)
        if depth is not None:
            prices = prices[:depth]
        return tuple((p, levels[p]) for p in prices)

    # ==========================================================================================
    # order entry
    # ==========================================================================================

    def submit(self, new: NewOrder) -> MatchResult:
        m = self._market(new.symbol)
        self._validate(new, m)
        plan = self._admit(new, m)
        c = self._begin()
        try:
            self._place(new, m, plan)
            self._run_stops(m)
            return c.result(self.ledger)
        finally:
            self._end()

    def submit_taker(self, new: NewOrder) -> tuple[int, EngineOrderStatus, tuple[EngineFill, ...]]:
        """``submit`` for a caller that reads only the order's id, how it ended and its fills (the
        backtest's in-process path): the same checks, state changes, ids and history, without the
        execution reports, order snapshots, balance updates and ``MatchResult`` it would not read. Only
        on a quiet market — no stop and no resting order of any user, so nothing but this order can
        happen — else ``EngineRejection`` (``INVALID_PARAMETERS``) before anything changes: use ``submit``."""
        m = self._market(new.symbol)
        if m.stops or m.user_bids or m.user_asks:
            raise _reject(RejectReason.INVALID_PARAMETERS, "submit_taker needs a market without user orders")
        self._validate(new, m)
        quick = self._quick_taker(new, m)
        if quick is not None:
            return quick
        plan = self._admit(new, m)
        c = self._begin()
        self._reports = False
        try:
            order = self._place(new, m, plan)
            self._run_stops(m)
            return order.order_id, order.status, tuple(c.fills)
        finally:
            self._reports = True
            self._end()

    def _quick_taker(self, new: NewOrder, m: _Market) -> tuple[int, EngineOrderStatus, tuple[EngineFill, ...]] | None:
        """``submit_taker``'s common case in a straight line: a market order for a quantity that the best
        level of market liquidity holds more than, no expiry, on a market without user orders (the
        caller checked). ``_admit`` then ``_place`` (``_take`` → one ``_fill``) for that case: the same
        checks and refusals in the same order, the same state changes, numbers and ids, without the
        operation scope, plan and level walk. ``None`` (nothing changed): any other order."""
        quantity = new.quantity
        if new.type is not EngineOrderType.MARKET or quantity is None or new.expire_at is not None:
            return None
        buy = new.side is Side.BUY
        liquidity = m.asks if buy else m.bids
        price = liquidity.best()
        if price is None:
            return None
        available = liquidity.levels[price]
        # ``_fillable``: what the walk would take from the best level (all of it here) and its cost
        want = quantity - _ZERO
        if not (_ZERO < want < available):
            return None
        got = _ZERO + want
        cost = _ZERO + want * price
        inst = m.instrument
        account = new.account
        if buy:
            asset, amount, price_per_unit = inst.quote, cost, cost / got
            # ``_take``'s budget: what the locked quote buys at the price, in lots; all of it, or the walk
            affordable = snap_to_step(amount / price, inst.step_size, ROUND_FLOOR)
            if affordable < want:
                return None
        else:
            asset, amount, price_per_unit = inst.base, quantity, _ONE
        # ``_admit`` (nothing changed yet when it refuses)
        coid = new.client_order_id
        symbol = new.symbol
        if coid is not None:
            existing = self._by_client_id.get((account, symbol, coid))
            if existing is not None and self._orders[existing].status.is_open:
                raise _reject(RejectReason.DUPLICATE_CLIENT_ORDER_ID, "Duplicate order sent.")
        needed = amount
        fees = self.fees(account)
        if buy and fees.quote_commission:
            needed = amount * (_ONE + max(fees.maker, fees.taker, _ZERO))
        ledger = self.ledger
        if needed > ledger.free(account, asset):
            raise _reject(RejectReason.INSUFFICIENT_BALANCE, "Account has insufficient balance for requested action.")
        # ``_place``: the order, its lock and registrations, working at once
        now = self._clock()
        order = self._register(new, quantity, None, asset, price_per_unit, amount, now)
        order.working_time = now
        # ``_take``: the whole quantity at the best level, then the print seen (no stop to hit)
        liquidity.set(price, available - want)
        fill = self._settle(m, order, price, want, False, m.next_trade_id(), now)
        m.last_price = price
        if order.status is not EngineOrderStatus.FILLED:  # ruled out above; the engine already changed
            raise RuntimeError(f"quick taker {order.order_id}: left {order.status}")
        return order.order_id, order.status, (fill,)

    def cancel(
        self, account: Account, symbol: str, order_id: int | None = None, client_order_id: str | None = None
    ) -> MatchResult:
        order = self._find(account, symbol, order_id, client_order_id)
        if not order.status.is_open:
            raise _reject(RejectReason.UNKNOWN_ORDER, "Unknown order sent.")
        c = self._begin()
        try:
            self._close(order, EngineOrderStatus.CANCELED, ExecutionType.CANCELED)
            return c.result(self.ledger)
        finally:
            self._end()

    def cancel_all(self, account: Account, symbol: str) -> MatchResult:
        self._market(symbol)
        orders = [o for o in self._open.get(account, {}).values() if o.symbol == symbol]
        if not orders:
            raise _reject(RejectReason.UNKNOWN_ORDER, "Unknown order sent.")
        c = self._begin()
        try:
            for order in orders:
                self._close(order, EngineOrderStatus.CANCELED, ExecutionType.CANCELED)
            return c.result(self.ledger)
        finally:
            self._end()

    def cancel_replace(
        self,
        account: Account,
        symbol: str,
        new_order: NewOrder,
        *,
        cancel_order_id: int | None = None,
        cancel_client_order_id: str | None = None,
    ) -> MatchResult:
        """Binance ``cancelReplaceMode=STOP_ON_FAILURE``.

        The new order's parameters and filters are checked first (failure: ``EngineRejection``, nothing
        changed); then the cancel (unknown/closed order: ``EngineRejection``, nothing changed); then the
        placement — if that fails (balance, ``WOULD_TAKE``, …) the old order *stays cancelled* and
        ``CancelReplacePartialFailureError`` carries the cancel's result.
        """
        if new_order.account != account or new_order.symbol != symbol:
            raise _reject(RejectReason.INVALID_PARAMETERS, "new order must be for the same account and symbol")
        m = self._market(symbol)
        self._validate(new_order, m)
        old = self._find(account, symbol, cancel_order_id, cancel_client_order_id)
        if not old.status.is_open:
            raise _reject(RejectReason.UNKNOWN_ORDER, "Unknown order sent.")
        c = self._begin()
        try:
            self._close(old, EngineOrderStatus.CANCELED, ExecutionType.CANCELED)
            try:
                plan = self._admit(new_order, m)
            except EngineRejection as exc:
                raise CancelReplacePartialFailureError(exc.reject_reason, exc.message, c.result(self.ledger)) from exc
            self._place(new_order, m, plan)
            self._run_stops(m)
            return c.result(self.ledger)
        finally:
            self._end()

    def amend_quantity(
        self,
        account: Account,
        symbol: str,
        new_quantity: Decimal,
        *,
        order_id: int | None = None,
        client_order_id: str | None = None,
    ) -> MatchResult:
        """Reduce an open order's quantity keeping its priority (Binance ``order.amend.keepPriority``).

        ``new_quantity`` must be below the current quantity and not below the executed quantity; equal to
        the executed quantity makes the order FILLED. Execution type ``REPLACED``.
        """
        m = self._market(symbol)
        order = self._find(account, symbol, order_id, client_order_id)
        if not order.status.is_open:
            raise _reject(RejectReason.UNKNOWN_ORDER, "Unknown order sent.")
        if not new_quantity < order.quantity or new_quantity < order.executed or new_quantity <= 0:
            raise _reject(
                RejectReason.INVALID_PARAMETERS,
                f"new quantity {new_quantity} must be below {order.quantity} and not below executed {order.executed}",
            )
        self._check_filters(m.instrument, None, new_quantity)
        if order.iceberg is not None and order.iceberg >= new_quantity:
            raise _reject(RejectReason.INVALID_PARAMETERS, "iceberg quantity must stay below the order quantity")
        c = self._begin()
        try:
            order.quantity = new_quantity
            order.update_time = self._time()
            remaining = order.remaining
            if order.resting:
                order.visible = min(order.visible, remaining)
            if remaining == 0:
                order.status = EngineOrderStatus.FILLED
                self._unbook(order)
                self._release(order)
                self._forget_open(order)
            else:
                keep = remaining if order.side is Side.SELL else min(order.reserved, order.reserve_price * remaining)
                self.ledger.unlock(order.account, order.reserve_asset, order.reserved - keep)
                order.reserved = keep
            c.updates.append(ExecutionReport(order.snapshot(), ExecutionType.REPLACED))
            return c.result(self.ledger)
        finally:
            self._end()

    # ==========================================================================================
    # market data
    # ==========================================================================================

    def on_book_snapshot(
        self, symbol: str, bids: PriceLevels, asks: PriceLevels, update_id: int | None = None
    ) -> MatchResult:
        m = self._market(symbol)
        c = self._begin()
        try:
            m.recorded_book = True
            m.bids.clear()
            m.asks.clear()
            self._apply_levels(m, bids, asks)
            m.update_id = update_id
            self._cross_resting(m)
            return c.result(self.ledger)
        finally:
            self._end()

    def on_book_delta(
        self, symbol: str, bids: PriceLevels, asks: PriceLevels, update_id: int | None = None
    ) -> MatchResult:
        m = self._market(symbol)
        c = self._begin()
        try:
            if not m.recorded_book:  # first recorded data replaces the synthetic book
                m.bids.clear()
                m.asks.clear()
                m.recorded_book = True
            self._apply_levels(m, bids, asks)
            if update_id is not None:
                m.update_id = update_id
            self._cross_resting(m)
            return c.result(self.ledger)
        finally:
            self._end()

    def on_trade(self, symbol: str, price: Decimal, quantity: Decimal, taker_side: Side | None = None) -> MatchResult:
        """A recorded public trade: stops see the price first, then resting limits it went through fill."""
        m = self._market(symbol)
        if not (m.stops or m.user_bids or m.user_asks):
            # Nothing of any user's can trigger or fill: the print moves the last price (and the synthetic
            # book) and does nothing else — what ``_print`` does then, without its bookkeeping.
            m.last_price = price
            if not m.recorded_book:
                self._synthesize(m, price)
            return _NOTHING
        c = self._begin()
        try:
            self._print(m, price, [quantity], taker_side)
            return c.result(self.ledger)
        finally:
            self._end()

    def on_bar(
        self, symbol: str, open: Decimal, high: Decimal, low: Decimal, close: Decimal, volume: Decimal
    ) -> MatchResult:
        """A recorded bar as a price path: open, nearer extreme, other extreme, close.

        Ties go to the low first. Along each leg the fixed stop prices the price passes are visited in
        travel order, so a stop fills near its stop price rather than at the leg's end; at every point
        stops run before resting limits fill (conservative). The bar's volume is the quantity available
        to resting limits over the whole path.
        """
        m = self._market(symbol)
        c = self._begin()
        try:
            high_first = (high - open) < (open - low)
            path = [open, high, low, close] if high_first else [open, low, high, close]
            share = self.fill_model.bar_volume_share
            pool = [volume if share is None else volume * share]
            previous: Decimal | None = None
            stale: Decimal | None = None  # the last print, when the synthetic book was left behind it
            for point in path:
                if previous is not None and point == previous:
                    continue
                waypoints: list[Decimal] = []
                if previous is not None:
                    lo, hi = min(previous, point), max(previous, point)
                    inner = {
                        o.stop_price
                        for o in m.stops.values()
                        if o.trailing_delta_bps is None and o.stop_price is not None and lo < o.stop_price < hi
                    }
                    waypoints = sorted(inner, reverse=point < previous)
                for waypoint in [*waypoints, point]:
                    stale = None if self._print(m, waypoint, pool, None, book=False) else waypoint
                previous = point
            if stale is not None:
                self._synthesize(m, stale)
            return c.result(self.ledger)
        finally:
            self._end()

    def advance(self) -> MatchResult:
        """Time moved: expire GTD orders whose ``expire_at`` has passed (``<=`` now)."""
        c = self._begin()
        try:
            now = self._time()
            while self._expiries and self._expiries[0][0] <= now:
                _, order_id = heapq.heappop(self._expiries)
                order = self._orders[order_id]
                if order.status.is_open:
                    self._close(order, EngineOrderStatus.EXPIRED, ExecutionType.EXPIRED)
            return c.result(self.ledger)
        finally:
            self._end()

    # ==========================================================================================
    # internals: operation scope
    # ==========================================================================================

    def _begin(self) -> _Collector:
        c = _Collector()
        self._c = c
        self._now = self._clock()
        self.ledger.on_touch = c.touch
        return c

    def _end(self) -> None:
        self._c = None
        self._now = None
        self.ledger.on_touch = None

    def _time(self) -> datetime:
        return self._now if self._now is not None else self._clock()

    def _col(self) -> _Collector:
        assert self._c is not None
        return self._c

    def next_trade_id(self, symbol: str) -> int:
        """Take the next id of ``symbol``'s trade sequence (the one its fills use), for a print made
        outside the engine (the emulator's real-time path trades)."""
        return self._market(symbol).next_trade_id()

    def _market(self, symbol: str) -> _Market:
        m = self._markets.get(symbol)
        if m is None:
            raise _reject(RejectReason.UNKNOWN_SYMBOL, f"Invalid symbol: {symbol}")
        return m

    def _find(self, account: Account, symbol: str, order_id: int | None, client_order_id: str | None) -> _Order:
        self._market(symbol)
        order: _Order | None = None
        if order_id is not None:
            order = self._orders.get(order_id)
            if order is not None and client_order_id is not None and order.client_order_id != client_order_id:
                order = None
        elif client_order_id is not None:
            found = self._by_client_id.get((account, symbol, client_order_id))
            order = self._orders.get(found) if found is not None else None
        else:
            raise _reject(RejectReason.INVALID_PARAMETERS, "order_id or client_order_id is required")
        if order is None or order.account != account or order.symbol != symbol:
            raise _reject(RejectReason.UNKNOWN_ORDER, "Order does not exist.")
        return order

    # ==========================================================================================
    # internals: validation and admission (raise before anything changes)
    # ==========================================================================================

    def _validate(self, new: NewOrder, m: _Market) -> None:
        """Parameters and symbol filters: what Binance checks before touching the book."""
        bad = RejectReason.INVALID_PARAMETERS
        t = new.type
        inst = m.instrument
        if (
            t is EngineOrderType.MARKET
            and new.quantity is not None
            and new.quote_quantity is None
            and new.price is None
            and new.stop_price is None
            and new.trailing_delta_bps is None
            and new.iceberg_quantity is None
            and new.expire_at is None
            and new.time_in_force is not EngineTimeInForce.GTD
        ):
            # A plain market order for a quantity (the common case): of the checks below only the filters
            # apply, against the last price as below.
            last = m.last_price
            reference = None if last is None else (snap_to_step(last, inst.tick_size, ROUND_FLOOR) or inst.tick_size)
            self._check_filters(inst, reference, new.quantity)
            return
        if t is EngineOrderType.MARKET:
            if (new.quantity is None) == (new.quote_quantity is None):
                raise _reject(bad, "MARKET needs exactly one of quantity and quote_quantity")
        elif new.quantity is None or new.quote_quantity is not None:
            raise _reject(bad, f"{t} needs quantity (quote_quantity is for MARKET only)")
        if t.is_limit_priced and new.price is None:
            raise _reject(bad, f"{t} needs a price")
        if not t.is_limit_priced and new.price is not None:
            raise _reject(bad, f"{t} takes no price")
        if t.is_conditional:
            if new.stop_price is None and new.trailing_delta_bps is None:
                raise _reject(bad, f"{t} needs stop_price or trailing_delta_bps")
        elif new.stop_price is not None or new.trailing_delta_bps is not None:
            raise _reject(bad, f"{t} takes no stop_price or trailing_delta_bps")
        if new.trailing_delta_bps is not None and not 0 < new.trailing_delta_bps < 10_000:
            raise _reject(bad, "trailing_delta_bps must be within 1..9999")
        if (new.time_in_force is EngineTimeInForce.GTD) != (new.expire_at is not None):
            raise _reject(bad, "GTD needs expire_at, and expire_at needs GTD")
        if t is EngineOrderType.LIMIT_MAKER and new.time_in_force not in (
            EngineTimeInForce.GTC,
            EngineTimeInForce.GTD,
        ):
            raise _reject(bad, "LIMIT_MAKER rests: time in force must be GTC (or GTD)")
        if new.iceberg_quantity is not None:
            if t not in _ICEBERG_TYPES or new.time_in_force not in (EngineTimeInForce.GTC, EngineTimeInForce.GTD):
                raise _reject(bad, "iceberg needs a limit-priced type with GTC")
            assert new.quantity is not None
            if not _ZERO < new.iceberg_quantity < new.quantity:
                raise _reject(bad, "iceberg quantity must be positive and below the order quantity")
            self._check_filters(inst, None, new.iceberg_quantity)
        if new.stop_price is not None:
            self._check_filters(inst, new.stop_price, None)
        if new.quantity is not None:
            reference = new.price if new.price is not None else new.stop_price
            if reference is None and t is EngineOrderType.MARKET and m.last_price is not None:
                # only the notional matters here: a recorded print need not sit on this venue's tick
                reference = snap_to_step(m.last_price, inst.tick_size, ROUND_FLOOR) or inst.tick_size
            self._check_filters(inst, reference, new.quantity)
        if new.quote_quantity is not None:
            if new.quote_quantity <= 0:
                raise _reject(bad, "quote_quantity must be > 0")
            if inst.min_notional is not None and new.quote_quantity < inst.min_notional:
                raise _reject(RejectReason.MIN_NOTIONAL, "Filter failure: NOTIONAL")

    @staticmethod
    def _check_filters(inst: Instrument, price: Decimal | None, quantity: Decimal | None) -> None:
        # An instrument is frozen, so a (price, quantity) it passed once passes again: remembered (bounded),
        # keyed by the instrument's identity and kept with it (the id cannot be reused while it is held).
        key = (id(inst), price, quantity)
        if _PASSED_FILTERS.get(key) is inst:
            return
        MatchingEngine._check_filters_uncached(inst, price, quantity)
        if len(_PASSED_FILTERS) >= _PASSED_FILTERS_SIZE:
            _PASSED_FILTERS.clear()
        _PASSED_FILTERS[key] = inst

    @staticmethod
    def _check_filters_uncached(inst: Instrument, price: Decimal | None, quantity: Decimal | None) -> None:
        try:
            if quantity is None:
                assert price is not None
                # price-only check: a quantity of one step cannot fail the price rules' notional part
                if price <= 0:
                    raise _reject(RejectReason.PRICE_FILTER, "Filter failure: PRICE_FILTER")
                inst.validate_order(price, max(inst.step_size, inst.min_quantity or _ZERO))
            else:
                inst.validate_order(price, quantity)
        except EngineRejection:
            raise
        except InvalidOrderError as exc:
            limit = str(exc.details.get("limit", ""))
            if limit in _PRICE_LIMITS:
                raise _reject(RejectReason.PRICE_FILTER, f"Filter failure: PRICE_FILTER ({exc.message})") from exc
            if limit in _LOT_SIZE_LIMITS:
                if quantity is None:  # price-only check: only the price matters
                    return
                raise _reject(RejectReason.LOT_SIZE, f"Filter failure: LOT_SIZE ({exc.message})") from exc
            if quantity is None:
                return
            raise _reject(RejectReason.MIN_NOTIONAL, f"Filter failure: NOTIONAL ({exc.message})") from exc

    def _admit(self, new: NewOrder, m: _Market) -> _Plan:
        """State-dependent checks and the reservation: still nothing changed when this raises."""
        inst = m.instrument
        t = new.type
        if new.client_order_id is not None:
            existing = self._by_client_id.get((new.account, new.symbol, new.client_order_id))
            if existing is not None and self._orders[existing].status.is_open:
                raise _reject(RejectReason.DUPLICATE_CLIENT_ORDER_ID, "Duplicate order sent.")
        if t is not EngineOrderType.MARKET and self._open_count.get((new.account, new.symbol), 0) >= (
            self.max_open_orders
        ):
            raise _reject(RejectReason.MAX_NUM_ORDERS, "Filter failure: MAX_NUM_ORDERS")
        if (
            t.is_conditional
            and new.stop_price is not None
            and m.last_price is not None
            and self._stop_condition(new.side, t, m.last_price, new.stop_price)
        ):
            raise _reject(RejectReason.STOP_PRICE_WOULD_TRIGGER_IMMEDIATELY, "Stop price would trigger immediately.")
        if t is EngineOrderType.LIMIT_MAKER:
            assert new.price is not None
            best = self._best_opposite(m, new.side)
            if best is not None and (best <= new.price if new.side is Side.BUY else best >= new.price):
                raise _reject(RejectReason.WOULD_TAKE, "Order would immediately match and take.")

        quantity = new.quantity if new.quantity is not None else _ZERO
        if new.side is Side.SELL:
            asset, price_per_unit = inst.base, _ONE
        else:
            asset = inst.quote
            price_per_unit = new.price if new.price is not None else _ZERO
        if t is EngineOrderType.MARKET:
            qty, cost = self._fillable(m, new.side, None, new.quantity, new.quote_quantity)
            if new.quantity is None:
                quantity = qty
            amount = cost if new.side is Side.BUY else (new.quantity if new.quantity is not None else qty)
            if new.side is Side.BUY:
                price_per_unit = (cost / qty) if qty else _ZERO
        elif new.side is Side.BUY and not t.is_limit_priced:  # stop-market buy: reference price + buffer
            reference = new.stop_price if new.stop_price is not None else m.last_price
            if reference is None:
                raise _reject(RejectReason.INVALID_PARAMETERS, "no stop price and no last price to reserve against")
            factor = _ONE + self.fill_model.market_reserve_bps / _BPS
            if new.trailing_delta_bps is not None:
                factor *= _ONE + Decimal(new.trailing_delta_bps) / _BPS
            price_per_unit = reference * factor
            amount = price_per_unit * quantity
        else:
            amount = price_per_unit * quantity
        needed = amount
        fees = self.fees(new.account)
        if new.side is Side.BUY and fees.quote_commission:
            needed = amount * (_ONE + max(fees.maker, fees.taker, _ZERO))
        if needed > self.ledger.free(new.account, asset):
            raise _reject(RejectReason.INSUFFICIENT_BALANCE, "Account has insufficient balance for requested action.")
        return _Plan(asset, amount, price_per_unit, quantity)

    # ==========================================================================================
    # internals: placing and executing
    # ==========================================================================================

    def _register(
        self,
        new: NewOrder,
        quantity: Decimal,
        expire_at: datetime | None,
        reserve_asset: str,
        reserve_price: Decimal,
        reserve_amount: Decimal,
        now: datetime,
    ) -> _Order:
        """A new order with the next id, its reservation locked, registered as open (not yet working)."""
        self._next_order_id += 1
        oid = self._next_order_id
        order = _Order(
            order_id=oid,
            client_order_id=new.client_order_id if new.client_order_id is not None else f"engine-{oid}",
            account=new.account,
            symbol=new.symbol,
            side=new.side,
            type=new.type,
            tif=new.time_in_force,
            quantity=quantity,
            quote_quantity=new.quote_quantity,
            price=new.price,
            stop_price=new.stop_price,
            trailing_delta_bps=new.trailing_delta_bps,
            iceberg=new.iceberg_quantity,
            expire_at=expire_at,
            time=now,
            update_time=now,
            reserve_asset=reserve_asset,
            reserve_price=reserve_price,
            stp=new.self_trade_prevention,
        )
        self.ledger.lock(order.account, reserve_asset, reserve_amount)
        order.reserved = reserve_amount
        self._orders[oid] = order
        self._open.setdefault(order.account, {})[oid] = order
        key = (order.account, order.symbol)
        self._open_count[key] = self._open_count.get(key, 0) + 1
        self._history.setdefault(key, []).append(oid)
        self._by_client_id[(order.account, order.symbol, order.client_order_id)] = oid
        return order

    def _place(self, new: NewOrder, m: _Market, plan: _Plan) -> _Order:
        now = self._time()
        order = self._register(
            new, plan.quantity, new.expire_at, plan.reserve_asset, plan.reserve_price, plan.reserve_amount, now
        )
        if order.expire_at is not None:
            heapq.heappush(self._expiries, (order.expire_at, order.order_id))

        if order.type.is_conditional:
            order.working = False
            if order.trailing_delta_bps is not None and order.stop_price is None and m.last_price is not None:
                order.trailing_time = now
                order.trail_extreme = m.last_price
            m.stops[order.order_id] = order
            self._emit(order, ExecutionType.NEW)
            return order
        order.working_time = now
        self._emit(order, ExecutionType.NEW)
        self._execute(m, order)
        return order

    def _execute(self, m: _Market, order: _Order) -> None:
        """Run a working order: take what it can, then rest or expire the remainder."""
        if order.type.is_limit_priced:
            assert order.price is not None
            if order.tif is EngineTimeInForce.FOK:
                fillable, _ = self._fillable(m, order.side, order.price, order.remaining, None)
                if fillable < order.remaining:
                    self._close(order, EngineOrderStatus.EXPIRED, ExecutionType.EXPIRED)
                    return
            self._take(m, order, order.price)
            if order.remaining == 0 or order.status is EngineOrderStatus.EXPIRED_IN_MATCH:
                return
            if order.tif in (EngineTimeInForce.IOC, EngineTimeInForce.FOK):
                self._close(order, EngineOrderStatus.EXPIRED, ExecutionType.EXPIRED)
            elif self._deferred is not None:
                self._deferred.append(order)
            else:
                self._rest(m, order)
            return
        self._take(m, order, None)
        if order.status is EngineOrderStatus.EXPIRED_IN_MATCH:
            return
        if order.remaining > 0 or order.executed == 0:
            self._close(order, EngineOrderStatus.EXPIRED, ExecutionType.EXPIRED)

    def _take(self, m: _Market, taker: _Order, limit: Decimal | None) -> None:
        """Match ``taker`` against resting user orders and market liquidity, best price first.

        At equal price resting user orders go first (they were there). A buy without a limit price
        (market) may spend no more quote than it has locked.
        """
        inst = m.instrument
        buy = taker.side is Side.BUY
        users = m.user_side(taker.side.opposite)
        liquidity = m.market_side(taker.side.opposite)
        budget = limit is None and buy
        while True:
            want = taker.remaining
            if want <= 0:
                return
            up, mp = users.best(), liquidity.best()
            if up is None and mp is None:
                return
            use_user = mp is None or (up is not None and (up <= mp if buy else up >= mp))
            price = up if use_user else mp
            assert price is not None
            if limit is not None and (price > limit if buy else price < limit):
                return
            if budget:
                affordable = snap_to_step(taker.reserved / price, inst.step_size, ROUND_FLOOR)
                want = min(want, affordable)
                if want <= 0:
                    return
            if use_user:
                queue = users.levels[price]
                maker = queue[0]
                if maker.account == taker.account and taker.stp is not SelfTradePrevention.NONE:
                    if taker.stp is not SelfTradePrevention.EXPIRE_TAKER:  # EXPIRE_MAKER, EXPIRE_BOTH
                        self._close(maker, EngineOrderStatus.EXPIRED_IN_MATCH, ExecutionType.TRADE_PREVENTION)
                    if taker.stp is not SelfTradePrevention.EXPIRE_MAKER:  # EXPIRE_TAKER, EXPIRE_BOTH
                        self._close(taker, EngineOrderStatus.EXPIRED_IN_MATCH, ExecutionType.TRADE_PREVENTION)
                        return
                    continue
                qty = min(want, maker.visible)
                self._trade(m, taker, maker, price, qty)
                self._after_maker_fill(users, price, queue, maker, qty)
            else:
                available = liquidity.quantity(price)
                qty = min(want, available)
                liquidity.set(price, available - qty)
                self._fill(m, taker, price, qty, is_maker=False, trade_id=m.next_trade_id())
                self._observe(m, price)

    def _trade(self, m: _Market, taker: _Order, maker: _Order, price: Decimal, qty: Decimal) -> None:
        trade_id = m.next_trade_id()
        self._fill(m, taker, price, qty, is_maker=False, trade_id=trade_id)
        self._fill(m, maker, price, qty, is_maker=True, trade_id=trade_id)
        buyer, seller = (taker, maker) if taker.side is Side.BUY else (maker, taker)
        self._col().public_trades.append(
            PublicTrade(
                symbol=m.symbol,
                trade_id=trade_id,
                price=price,
                quantity=qty,
                buyer_order_id=buyer.order_id,
                seller_order_id=seller.order_id,
                is_buyer_maker=maker.side is Side.BUY,
                time=self._time(),
            )
        )
        self._observe(m, price)

    @staticmethod
    def _after_maker_fill(
        users: OrderSide[_Order], price: Decimal, queue: deque[_Order], maker: _Order, qty: Decimal
    ) -> None:
        maker.visible -= qty
        if maker.remaining == 0:
            queue.popleft()
            maker.resting = False
            users.drop_level_if_empty(price)
        elif maker.visible == 0:  # iceberg slice done: refill, and the refill goes to the back
            assert maker.iceberg is not None
            maker.visible = min(maker.iceberg, maker.remaining)
            queue.popleft()
            queue.append(maker)

    def _fill(self, m: _Market, order: _Order, price: Decimal, qty: Decimal, *, is_maker: bool, trade_id: int) -> None:
        fill = self._settle(m, order, price, qty, is_maker, trade_id, self._time())
        c = self._col()
        c.fills.append(fill)
        if not self._reports:
            return
        report = _new(ExecutionReport)
        set_order, set_execution, set_fill = _REPORT_SLOTS
        set_order(report, order.snapshot())
        set_execution(report, ExecutionType.TRADE)
        set_fill(report, fill)
        c.updates.append(report)

    def _settle(
        self, m: _Market, order: _Order, price: Decimal, qty: Decimal, is_maker: bool, trade_id: int, now: datetime
    ) -> EngineFill:
        """One fill of ``order``: the money moved, the order's state, the trade kept; the fill returned."""
        inst = m.instrument
        fees = self.fees(order.account)
        rate = fees.maker if is_maker else fees.taker
        quote_amount = price * qty
        ledger = self.ledger
        if order.side is Side.BUY:
            ledger.spend_locked(order.account, inst.quote, quote_amount)
            order.reserved -= quote_amount
            if fees.quote_commission:
                commission, asset = quote_amount * rate, inst.quote
                ledger.credit(order.account, inst.base, qty)
                self._charge_quote(order, inst.quote, commission)
            else:
                commission, asset = qty * rate, inst.base
                ledger.credit(order.account, inst.base, qty - commission)
        else:
            ledger.spend_locked(order.account, inst.base, qty)
            order.reserved -= qty
            commission, asset = quote_amount * rate, inst.quote
            ledger.credit(order.account, inst.quote, quote_amount - commission)
        order.executed += qty
        order.cum_quote += quote_amount
        order.update_time = now
        if order.remaining == 0:
            order.status = EngineOrderStatus.FILLED
            self._release(order)
            self._forget_open(order)
        else:
            order.status = EngineOrderStatus.PARTIALLY_FILLED
        # ``EngineFill(...)`` / ``ExecutionReport(...)`` through their slots' setters (as ``snapshot``): every fill
        fill = _new(EngineFill)
        (
            set_account, set_symbol, set_order_id, set_client_order_id, set_side, set_trade_id, set_price,
            set_quantity, set_quote_quantity, set_commission, set_commission_asset, set_is_maker, set_time,
        ) = _ENGINE_FILL_SLOTS  # fmt: skip
        set_account(fill, order.account)
        set_symbol(fill, order.symbol)
        set_order_id(fill, order.order_id)
        set_client_order_id(fill, order.client_order_id)
        set_side(fill, order.side)
        set_trade_id(fill, trade_id)
        set_price(fill, price)
        set_quantity(fill, qty)
        set_quote_quantity(fill, quote_amount)
        set_commission(fill, commission)
        set_commission_asset(fill, asset)
        set_is_maker(fill, is_maker)
        set_time(fill, now)
        self._trades.setdefault((order.account, order.symbol), []).append(fill)
        return fill

    def _charge_quote(self, order: _Order, asset: str, commission: Decimal) -> None:
        """A buy's quote commission: from the free balance, the rest from the order's own reservation."""
        ledger = self.ledger
        if commission <= 0:  # a rebate
            ledger.credit(order.account, asset, -commission)
            return
        from_free = min(commission, ledger.free(order.account, asset))
        if from_free > 0:
            ledger.credit(order.account, asset, -from_free)
        rest = commission - from_free
        if rest > 0:
            ledger.spend_locked(order.account, asset, rest)
            order.reserved -= rest

    def _rest(self, m: _Market, order: _Order) -> None:
        assert order.price is not None
        order.visible = min(order.iceberg, order.remaining) if order.iceberg is not None else order.remaining
        order.resting = True
        m.user_side(order.side).append(order.price, order)

    def _unbook(self, order: _Order) -> None:
        m = self._markets[order.symbol]
        if order.resting:
            assert order.price is not None
            m.user_side(order.side).remove(order.price, order)
            order.resting = False
        m.stops.pop(order.order_id, None)

    def _release(self, order: _Order) -> None:
        if order.reserved:
            self.ledger.unlock(order.account, order.reserve_asset, order.reserved)
            order.reserved = _ZERO

    def _forget_open(self, order: _Order) -> None:
        opened = self._open.get(order.account)
        if opened is not None and opened.pop(order.order_id, None) is not None:
            key = (order.account, order.symbol)
            self._open_count[key] -= 1

    def _close(self, order: _Order, status: EngineOrderStatus, execution: ExecutionType) -> None:
        self._unbook(order)
        self._release(order)
        self._forget_open(order)
        order.status = status
        order.update_time = self._time()
        self._emit(order, execution)

    def _emit(self, order: _Order, execution: ExecutionType) -> None:
        if self._reports:
            self._col().updates.append(ExecutionReport(order.snapshot(), execution))

    # ==========================================================================================
    # internals: liquidity
    # ==========================================================================================

    def _best_opposite(self, m: _Market, side: Side) -> Decimal | None:
        up = m.user_side(side.opposite).best()
        mp = m.market_side(side.opposite).best()
        if up is None:
            return mp
        if mp is None:
            return up
        return min(up, mp) if side is Side.BUY else max(up, mp)

    def _levels_best_first(self, m: _Market, side: Side) -> Iterator[tuple[Decimal, Decimal]]:
        """Opposite-side liquidity for a ``side`` taker, aggregated per price, best first."""
        users = m.user_side(side.opposite)
        liquidity = m.market_side(side.opposite)
        if not users.levels:  # no resting user order there: the market's levels alone (as merged below)
            levels = liquidity.levels
            for price in liquidity.prices_best_first():
                yield price, _ZERO + levels[price]
            return
        buy = side is Side.BUY
        merged = heapq.merge(users.prices_best_first(), liquidity.prices_best_first(), reverse=not buy)
        previous: Decimal | None = None
        for price in merged:
            if price == previous:
                continue
            previous = price
            queue = users.levels.get(price)
            user_qty = sum((o.remaining for o in queue), _ZERO) if queue else _ZERO
            yield price, user_qty + liquidity.quantity(price)

    def _fillable(
        self, m: _Market, side: Side, limit: Decimal | None, quantity: Decimal | None, quote: Decimal | None
    ) -> tuple[Decimal, Decimal]:
        """(quantity, quote cost) a taker could fill now, without changing anything."""
        step = m.instrument.step_size
        got = cost = _ZERO
        for price, available in self._levels_best_first(m, side):
            if limit is not None and (price > limit if side is Side.BUY else price < limit):
                break
            take = available
            if quantity is not None:
                take = min(take, quantity - got)
            if quote is not None:
                take = min(take, snap_to_step((quote - cost) / price, step, ROUND_FLOOR))
            if take <= 0:
                break
            got += take
            cost += take * price
        return got, cost

    @staticmethod
    def _apply_levels(m: _Market, bids: PriceLevels, asks: PriceLevels) -> None:
        for price, qty in bids:
            m.bids.set(Decimal(price), Decimal(qty))
        for price, qty in asks:
            m.asks.set(Decimal(price), Decimal(qty))

    def _synthesize(self, m: _Market, last: Decimal) -> None:
        """Replace the market's book with the synthetic one around ``last`` (built once per distinct
        price and fill model, then copied: bar paths revisit the same prices over and over)."""
        fm = self.fill_model
        key = (
            last,
            m.instrument.tick_size,
            fm.synthetic_levels,
            fm.synthetic_spread_bps,
            fm.synthetic_level_quantity,
        )
        cached = self._synthetic_books.get(key)
        if cached is None:
            bids, asks = MarketSide(is_bid=True), MarketSide(is_bid=False)
            self._build_synthetic(bids, asks, m.instrument, last)
            if len(self._synthetic_books) >= _SYNTHETIC_CACHE_SIZE:
                self._synthetic_books.clear()
            cached = (bids.prices, bids.levels, asks.prices, asks.levels)
            self._synthetic_books[key] = cached
        bid_prices, bid_levels, ask_prices, ask_levels = cached
        m.bids.prices[:] = bid_prices
        m.bids.levels.clear()
        m.bids.levels.update(bid_levels)
        m.asks.prices[:] = ask_prices
        m.asks.levels.clear()
        m.asks.levels.update(ask_levels)

    def _build_synthetic(self, bids: MarketSide, asks: MarketSide, inst: Instrument, last: Decimal) -> None:
        fm = self.fill_model
        prev_bid: Decimal | None = None
        prev_ask: Decimal | None = None
        for i in range(fm.synthetic_levels):
            offset = fm.synthetic_spread_bps * (2 * i + 1) / 2 / _BPS
            bid = snap_to_step(last * (_ONE - offset), inst.tick_size, ROUND_FLOOR)
            ask = snap_to_step(last * (_ONE + offset), inst.tick_size, ROUND_CEILING)
            if prev_bid is not None and bid >= prev_bid:
                bid = prev_bid - inst.tick_size
            if prev_ask is not None and ask <= prev_ask:
                ask = prev_ask + inst.tick_size
            if prev_ask is None and ask <= bid and fm.synthetic_spread_bps > 0:
                ask = bid + inst.tick_size
            if bid > 0:
                bids.set(bid, fm.synthetic_level_quantity)
            asks.set(ask, fm.synthetic_level_quantity)
            prev_bid, prev_ask = bid, ask

    def _cross_resting(self, m: _Market) -> None:
        """Recorded liquidity that arrives at or through a resting user order fills it (maker, its price)."""
        for side in (Side.BUY, Side.SELL):
            users = m.user_side(side)
            liquidity = m.market_side(side.opposite)
            while True:
                up, mp = users.best(), liquidity.best()
                if up is None or mp is None or (up < mp if side is Side.BUY else up > mp):
                    break
                queue = users.levels[up]
                maker = queue[0]
                available = liquidity.quantity(mp)
                qty = min(maker.visible, available)
                liquidity.set(mp, available - qty)
                self._fill(m, maker, up, qty, is_maker=True, trade_id=m.next_trade_id())
                self._after_maker_fill(users, up, queue, maker, qty)

    # ==========================================================================================
    # internals: recorded prints, stops
    # ==========================================================================================

    def _print(
        self, m: _Market, price: Decimal, pool: list[Decimal], taker_side: Side | None, *, book: bool = True
    ) -> bool:
        """One recorded price print: stops first, then resting limits it went through (up to ``pool``).

        Without a recorded book the synthetic one moves to ``price``. Only triggered stops read the book
        during a print, so with ``book=False`` (a caller that rebuilds it after its last print) it is
        rebuilt only when a stop was hit. Returns whether the book now reflects ``price``.
        """
        self._observe(m, price)
        synthesized = m.recorded_book
        if not synthesized and (book or any(o.hit for o in m.stops.values())):
            self._synthesize(m, price)
            synthesized = True
        self._deferred = []
        try:
            self._run_stops(m)
        finally:
            deferred, self._deferred = self._deferred, None
        touch = self.fill_model.fill_on_touch
        sides: Sequence[Side] = (Side.BUY, Side.SELL) if taker_side is None else (taker_side.opposite,)
        for side in sides:
            users = m.user_side(side)
            while pool[0] > 0:
                best = users.best()
                if best is None:
                    break
                through = best > price if side is Side.BUY else best < price
                if not (through or (touch and best == price)):
                    break
                queue = users.levels[best]
                maker = queue[0]
                qty = min(maker.visible, pool[0])
                pool[0] -= qty
                self._fill(m, maker, best, qty, is_maker=True, trade_id=m.next_trade_id())
                self._after_maker_fill(users, best, queue, maker, qty)
        m.last_price = price
        for order in deferred:
            if order.status.is_open:
                self._rest(m, order)
        return synthesized

    @staticmethod
    def _stop_condition(side: Side, type_: EngineOrderType, price: Decimal, stop: Decimal) -> bool:
        """Binance: STOP_LOSS BUY / TAKE_PROFIT SELL trigger at or above the stop, the others at or below."""
        rising = (side is Side.BUY) == (type_ in (EngineOrderType.STOP_LOSS, EngineOrderType.STOP_LOSS_LIMIT))
        return price >= stop if rising else price <= stop

    def _observe(self, m: _Market, price: Decimal) -> None:
        """A trade printed at ``price``: last price, trailing state, and which stops it hits."""
        m.last_price = price
        for order in m.stops.values():
            if not order.hit and self._stop_hits(order, price):
                order.hit = True

    def _stop_hits(self, order: _Order, price: Decimal) -> bool:
        if order.trailing_delta_bps is None:
            assert order.stop_price is not None
            return self._stop_condition(order.side, order.type, price, order.stop_price)
        if order.trailing_time is None:  # not tracking yet: the stop price is the activation price
            if order.stop_price is None or self._stop_condition(order.side, order.type, price, order.stop_price):
                order.trailing_time = self._time()
                order.trail_extreme = price
            return False
        assert order.trail_extreme is not None
        delta = Decimal(order.trailing_delta_bps) / _BPS
        if order.side is Side.SELL:  # a sell trails the peak and fires on a fall of delta from it
            order.trail_extreme = max(order.trail_extreme, price)
            return price <= order.trail_extreme * (_ONE - delta)
        order.trail_extreme = min(order.trail_extreme, price)
        return price >= order.trail_extreme * (_ONE + delta)

    def _run_stops(self, m: _Market) -> None:
        """Trigger the stops observed prices hit, oldest first; their fills may hit further stops."""
        while True:
            hit = next((o for o in m.stops.values() if o.hit), None)
            if hit is None:
                return
            del m.stops[hit.order_id]
            now = self._time()
            hit.working = True
            hit.working_time = now
            hit.update_time = now
            self._emit(hit, ExecutionType.NEW)
            self._execute(m, hit)
