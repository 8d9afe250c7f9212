"""The risk engine: every order intent passes ``RiskEngine.check`` before it can reach a venue.

Pre-trade checks, in the order they are applied (the first failing one names the rejection), each one
function ``_check_<rule>`` that returns why it refuses the intent, or ``None``. Every level's limit is
checked (``meltica.risk.limits``): the account's on the account, then a strategy's on the strategy, then
a symbol's on the account's orders in the symbol; per-order limits: the tightest.

==================  ============================================================================
rule                what
==================  ============================================================================
kill_switch         halt: nothing passes; reduce_only: only intents that reduce the position
reduce_only         an intent flagged ``reduce_only`` must reduce the account's position
instrument          venue rules from ``Instrument``: step/tick precision, min/max qty, price, notional
reference_price     a market order needs a last trade / mid to be valued when notional limits apply
max_order_quantity  order quantity
max_order_notional  order quantity x price (x contract size)
price_band_bps      limit price vs mid (bid and ask known) or last trade: the fat-finger guard
max_open_orders     open orders (approved, not yet closed) in each limit's scope
orders_per_minute   approved orders in the sliding 60 s window of the injected clock
max_position_notional  worst-case position in the symbol (per venue): the account's, a strategy's
max_gross_exposure  account: sum over symbols and venues of |worst-case position| x price
max_net_exposure    account: |sum of signed worst-case position x price|
==================  ============================================================================

Worst case: an approved order counts as filled from the moment it is approved until
``on_order_closed`` releases it; ``on_fill`` moves filled quantity from the open order into the
position. So no interleaving of intents, fills, partial fills and cancels can take the approved
exposure beyond a limit (prices held still; a price move can, which the post-trade checks catch).
An intent that does not increase the measured quantity always passes its limit, so a book that is
over a limit (after a price move) can still be reduced.

Post-trade (``on_fill``, ``on_market``, ``evaluate``): daily loss (realized + unrealized since the
daily reset at ``risk.daily_reset_utc``), drawdown from the persisted equity peak, per-strategy daily
loss. A breach engages the kill switch in ``breach_action`` mode for its scope (``account:<a>`` or
``strategy:<s>``), then is recorded. It does not release itself: that is an explicit action.

Fail closed: the switch is engaged before the breach counts as acted on, so a failure never disarms
the breaker. A breach the recorder cannot store halts its scope and is retried (``retry_pending``, also
run by every post-trade call) until stored; a kill-switch change the database refuses holds in the
process and is retried the same way (``KillSwitch.unsaved``). An exception inside a post-trade check
halts the scope being checked (the account; the whole book for a market-wide failure) — when halt
cannot be engaged, reduce-only — and is raised to the caller.

The hot path does no pydantic work: limits are resolved once per (account, strategy, exchange, symbol)
route and kept with direct references to the counters they are measured on.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol, TypedDict

from meltica.domain import Fill, Instrument, OrderIntent, Position, Side, client_order_id_for
from meltica.domain.instrument import is_multiple_of
from meltica.domain.risk import RISK_ACTOR as _ACTOR
from meltica.domain.risk import RiskDecision
from meltica.errors import InvalidOrderError
from meltica.risk.kill_switch import GLOBAL, KillSwitch, KillSwitchChange, KillSwitchMode, system_clock
from meltica.risk.limits import Limit, ResolvedLimits, RiskConfig, resolve_limits
from meltica.risk.store import DecisionSink, InMemoryRiskStateStore, RiskStateStorage

log = logging.getLogger(__name__)

_ZERO = Decimal(0)
_BPS = Decimal(10_000)
_HUNDRED = Decimal(100)
_TWO = Decimal(2)
_WINDOW = timedelta(seconds=60)
_DAY = timedelta(days=1)
_APPROVED_REASON = "all checks passed"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)  # order-rate stamps are kept as integer microseconds since the epoch


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Breach:
    """A post-trade limit found broken, and the kill-switch mode it engaged for ``scope``."""

    rule: str  # daily_loss_limit | max_drawdown_pct | strategy_loss_limit
    scope: str  # account:<a> | strategy:<s>
    value: Decimal  # the measured loss (positive) or drawdown in percent
    limit: Decimal
    source: str
    reason: str
    ts: datetime
    action: KillSwitchMode
    account: str | None = None
    strategy: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "account": self.account,
            "strategy": self.strategy,
            "symbol": None,
            "intent_id": None,
            "decision": "breach",
            "rule": self.rule,
            "reason": self.reason,
            "details": {
                "scope": self.scope,
                "value": self.value,
                "limit": self.limit,
                "source": self.source,
                "action": self.action.value,
            },
            "actor": _ACTOR,
        }


class PnLView(Protocol):
    @property
    def total(self) -> Decimal: ...


class PortfolioView(Protocol):
    """What the engine reads from ``meltica.portfolio.Portfolio`` (post-trade checks, start-up positions)."""

    def pnl(self, *, account: str | None = None, strategy: str | None = None, symbol: str | None = None) -> Any: ...

    def equity(self, account: str) -> Decimal: ...

    def strategies(self, account: str | None = None) -> list[str]: ...

    def positions(self, *, strategy: str | None = None, include_flat: bool = True) -> list[Position]: ...


# --- mutable state (slots: the hot path is attribute access) ------------------------------------


class _MarketPrices:
    """Prices of one (exchange, symbol) and the account legs valued at them."""

    __slots__ = ("ask", "bid", "last", "legs", "mult", "px", "pxm", "ref", "ref_kind")

    def __init__(self, contract_size: Decimal) -> None:
        self.last: Decimal | None = None
        self.bid: Decimal | None = None
        self.ask: Decimal | None = None
        self.ref: Decimal | None = None  # mid, else last: the price-band reference
        self.ref_kind = "last"
        self.px: Decimal | None = None  # valuation price: ref, else the first approved order's price
        self.mult = contract_size
        self.pxm: Decimal | None = None  # px x contract size
        self.legs: list[_Leg] = []


class _Exposure:
    """Running worst-case sums of one account over all its legs."""

    __slots__ = ("gross", "net_hi", "net_lo")

    def __init__(self) -> None:
        self.gross = _ZERO
        self.net_hi = _ZERO  # every open buy filled
        self.net_lo = _ZERO  # every open sell filled


class _Leg:
    """Position and open quantity of one scope (account or account+strategy) in one market."""

    __slots__ = ("buy", "exposure", "g", "hi", "lo", "market", "pos", "sell")

    def __init__(self, market: _MarketPrices, exposure: _Exposure | None) -> None:
        self.pos = _ZERO  # filled, signed
        self.buy = _ZERO  # open buy quantity (approved, not filled, not closed)
        self.sell = _ZERO
        self.market = market
        self.exposure = exposure  # account legs only
        self.g = _ZERO  # contributions last added to the exposure sums
        self.hi = _ZERO
        self.lo = _ZERO

    def revalue(self) -> None:
        pxm = self.market.pxm
        if pxm is None:
            return
        pos = self.pos
        hi = (pos + self.buy) * pxm
        lo = (pos - self.sell) * pxm
        g = hi if hi > -lo else -lo  # max(|hi|, |lo|), as lo <= hi
        exp = self.exposure
        if exp is not None:
            exp.gross += g - self.g
            exp.net_hi += hi - self.hi
            exp.net_lo += lo - self.lo
        self.g, self.hi, self.lo = g, hi, lo


class _Counter:
    """Open orders and recent approvals of one scope."""

    __slots__ = ("open", "times")

    def __init__(self) -> None:
        self.open = 0
        self.times: deque[datetime] = deque()


class _Route:
    """Everything one (account, strategy, exchange, symbol) needs, resolved once."""

    __slots__ = (
        "account",
        "acct_counter",
        "acct_leg",
        "band",
        "exchange",
        "exposure",
        "gross",
        "instrument",
        "limits",
        "market",
        "max_qty",
        "needs_price",
        "net",
        "notional",
        "open_checks",
        "position_checks",
        "rate_checks",
        "rate_counters",
        "strat_counter",
        "strat_leg",
        "strategy",
        "sym_counter",
        "symbol",
    )

    account: str
    strategy: str
    exchange: str
    symbol: str
    limits: ResolvedLimits
    instrument: Instrument | None
    market: _MarketPrices
    acct_leg: _Leg
    strat_leg: _Leg
    pos_leg: _Leg
    exposure: _Exposure
    acct_counter: _Counter
    strat_counter: _Counter
    sym_counter: _Counter
    rate_counters: tuple[_Counter, ...]
    max_qty: Limit | None
    notional: Limit | None
    band: Limit | None
    # every level's measured limit with what it is measured on: (limit, counter or leg, whose, in words)
    open_checks: tuple[tuple[Limit, _Counter, str], ...]
    rate_checks: tuple[tuple[Limit, _Counter, str], ...]
    position_checks: tuple[tuple[Limit, _Leg, str], ...]
    gross: Limit | None
    net: Limit | None
    needs_price: bool


class _Open:
    __slots__ = ("buy", "client_order_id", "intent_id", "remaining", "route")

    def __init__(self, route: _Route, buy: bool, remaining: Decimal, client_order_id: str, intent_id: str) -> None:
        self.route = route
        self.buy = buy
        self.remaining = remaining
        self.client_order_id = client_order_id
        self.intent_id = intent_id


class RiskAccountState(TypedDict):
    """One account's part of a ``RiskEngine`` (``export_state``/``import_state``), JSON-ready: routes
    ``[strategy, exchange, symbol]``; legs ``[.., pos, buy, sell]``; counters ``[key, open, stamps in µs]``;
    open reservations ``[coid, intent id, strategy, exchange, symbol, buy, remaining]``."""

    routes: list[list[str]]
    acct_legs: list[list[str]]
    strat_legs: list[list[str]]
    counters: list[list[Any]]
    open: list[list[Any]]
    anchors: dict[str, str]
    peak: str | None
    tripped: list[list[str]]
    day_start: str


class MarketPrices(TypedDict):
    """The prices a ``RiskEngine`` holds of one market (``export_market``/``import_market``)."""

    last: str | None
    bid: str | None
    ask: str | None
    ref: str | None
    ref_kind: str
    px: str | None


class Reservation:
    """An open order's reservation set aside by ``RiskEngine.suspend``, for ``resume``."""

    __slots__ = ("order",)

    def __init__(self, order: _Open) -> None:
        self.order = order

    @property
    def intent_id(self) -> str:
        return self.order.intent_id


def _opt_str(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _opt_dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


# --- the engine ----------------------------------------------------------------------------------


class RiskEngine:
    """Pre-trade gate and post-trade watchdog of one process (one risk worker sees all intents of an
    account in order: DESIGN.md §3). Not thread-safe: call it from one thread / event loop."""

    def __init__(
        self,
        limits: RiskConfig,
        portfolio: PortfolioView | None = None,
        *,
        clock: Callable[[], datetime] = system_clock,
        instruments: Mapping[tuple[str, str], Instrument] | None = None,
        kill_switch: KillSwitch | None = None,
        recorder: DecisionSink | None = None,
        state_store: RiskStateStorage | None = None,
    ) -> None:
        self.limits = limits
        self.portfolio = portfolio
        self._clock = clock
        self._instruments: dict[tuple[str, str], Instrument] = dict(instruments or {})
        self.kill_switch = kill_switch if kill_switch is not None else KillSwitch(clock=clock)
        self.recorder = recorder
        self._state: RiskStateStorage = state_store if state_store is not None else InMemoryRiskStateStore()

        self._routes: dict[tuple[str, str, str, str], _Route] = {}
        self._markets: dict[tuple[str, str], _MarketPrices] = {}
        self._acct_legs: dict[tuple[str, str, str], _Leg] = {}
        self._strat_legs: dict[tuple[str, str, str, str], _Leg] = {}
        self._exposures: dict[str, _Exposure] = {}
        self._counters: dict[tuple[str, ...], _Counter] = {}
        self._open: dict[str, _Open] = {}  # by client order id
        self._open_by_intent: dict[str, _Open] = {}
        self._seen_fills: dict[tuple[str, str, str, str], None] = {}
        self._rate_scopes = _rate_scopes(limits)

        # post-trade
        reset = datetime.strptime(limits.daily_reset_utc, "%H:%M").time()  # noqa: DTZ007 (a time of day)
        self._reset_time = time(reset.hour, reset.minute, tzinfo=UTC)
        self._day_start = self.day_start_for(clock())
        self._next_reset = self._day_start + _DAY
        self._anchors: dict[str, Decimal] = {}  # "account:<a>" / "strategy:<s>" → PnL at the day's start
        self._peaks: dict[str, Decimal] = {}
        self._tripped: set[tuple[str, str]] = set()  # (rule, scope) already acted on
        self._unrecorded: list[Breach] = []  # breaches the recorder refused: retried until stored
        self._held_failure: BaseException | None = None  # the last exception whose scope was halted
        self._accounts: set[str] = set()
        self._strategies: set[str] = set()
        self._post_limits: dict[tuple[str, str], ResolvedLimits] = {}
        self.kill_switch.subscribe(self._on_kill_switch)
        if portfolio is not None:  # start from the filled positions the portfolio holds (restart)
            for strategy in portfolio.strategies():
                self.load_positions(portfolio.positions(strategy=strategy, include_flat=False))

    # --- pre-trade -------------------------------------------------------------------------------

    def check(self, intent: OrderIntent) -> RiskDecision:
        """Approve or reject ``intent``; an approval reserves it as an open order (worst case). The rule
        checks run in the order of the module docstring's table; the first denial is the decision."""
        now = self._clock()
        if now >= self._next_reset:
            self.new_day(now)
        known = self._open_by_intent.get(intent.intent_id)
        if known is not None:  # a replayed intent whose order is still open: same answer, no new reservation
            return self._decide(intent, now, None, None, {"duplicate": True, "client_order_id": known.client_order_id})
        key = (intent.account, intent.strategy, intent.exchange, intent.symbol)
        route = self._routes.get(key)
        if route is None:
            route = self._route(key)

        buy = intent.side is Side.BUY
        qty = intent.quantity
        price = intent.price
        market = route.market
        # the order's price for notional checks: its limit, else its trigger, else the market's reference
        order_px = (
            price if price is not None else (intent.trigger_price if intent.trigger_price is not None else market.ref)
        )
        # the valuation of a unit of position: the market's, else (no price yet) this order's
        pxm = market.pxm
        if pxm is None and order_px is not None:
            pxm = order_px * market.mult
        ks = self.kill_switch
        # the rarely needed checks are not called at all when they cannot refuse (the hot path)
        denial = (
            (_check_kill_switch(ks, route, buy, qty) if ks.active else None)
            or (_check_reduce_only(route, buy, qty) if intent.reduce_only else None)
            or _check_instrument(route, qty, price, order_px)
            or (_check_reference_price(intent, route) if order_px is None else None)
            or _check_max_order_quantity(route, qty)
            or _check_max_order_notional(route, qty, order_px)
            or _check_price_band(route, price)
            or _check_max_open_orders(route)
            or _check_orders_per_minute(route, now)
            or _check_max_position_notional(route, buy, qty, pxm)
            or _check_max_gross_exposure(route, buy, qty, pxm)
            or _check_max_net_exposure(route, buy, qty, pxm)
        )
        if denial is not None:
            rule, reason, details = denial
            return self._decide(intent, now, rule, reason, details)

        # approved: reserve as if filled
        if market.px is None and order_px is not None:
            self._set_value_price(market, order_px)
        intent_id = intent.intent_id
        self._reserve(route, buy, qty, client_order_id_for(intent_id), intent_id, now)
        decision = RiskDecision(
            intent_id,
            True,
            None,
            _APPROVED_REASON,
            now,
            {},
            route.account,
            route.strategy,
            route.exchange,
            route.symbol,
        )
        if self.recorder is not None:
            self.recorder.record(decision)
        return decision

    def _decide(
        self, intent: OrderIntent, now: datetime, rule: str | None, reason: str | None, details: dict[str, Any]
    ) -> RiskDecision:
        decision = RiskDecision(
            intent.intent_id,
            rule is None,
            rule,
            reason if rule is not None else _APPROVED_REASON,
            now,
            details,
            intent.account,
            intent.strategy,
            intent.exchange,
            intent.symbol,
        )
        if self.recorder is not None:
            self.recorder.record(decision)
        return decision

    # --- open orders -----------------------------------------------------------------------------

    def on_order_open(self, client_order_id: str, intent: OrderIntent) -> None:
        """Count an order as open (worst case). ``check`` already did this for the orders it approved;
        call it for orders found open on start-up (recovery). Idempotent."""
        if client_order_id in self._open:
            return
        key = (intent.account, intent.strategy, intent.exchange, intent.symbol)
        route = self._routes.get(key) or self._route(key)
        market = route.market
        if market.px is None:
            px = intent.price if intent.price is not None else intent.trigger_price
            if px is not None:
                self._set_value_price(market, px)
        self._reserve(route, intent.side is Side.BUY, intent.quantity, client_order_id, intent.intent_id, self._clock())

    def on_order_closed(self, client_order_id: str) -> None:
        """The order is done (cancelled, rejected, expired, filled): release what is left of it.
        Also call it when an approved intent is never sent. Idempotent."""
        order = self._open.pop(client_order_id, None)
        if order is None:
            return
        self._open_by_intent.pop(order.intent_id, None)
        route = order.route
        self._unreserve(route, order.buy, order.remaining)
        route.acct_counter.open -= 1
        route.strat_counter.open -= 1
        route.sym_counter.open -= 1

    def open_order_count(self) -> int:
        return len(self._open)

    def _reserve(
        self, route: _Route, buy: bool, qty: Decimal, client_order_id: str, intent_id: str, now: datetime
    ) -> None:
        acct, strat = route.acct_leg, route.strat_leg
        if buy:
            acct.buy += qty
            strat.buy += qty
        else:
            acct.sell += qty
            strat.sell += qty
        acct.revalue()
        order = _Open(route, buy, qty, client_order_id, intent_id)
        self._open[client_order_id] = order
        self._open_by_intent[intent_id] = order
        route.acct_counter.open += 1
        route.strat_counter.open += 1
        route.sym_counter.open += 1
        if route.rate_counters:
            cutoff = now - _WINDOW
            for counter in route.rate_counters:
                times = counter.times
                times.append(now)
                while times[0] <= cutoff:
                    times.popleft()

    def _unreserve(self, route: _Route, buy: bool, qty: Decimal) -> None:
        if qty <= 0:
            return
        acct, strat = route.acct_leg, route.strat_leg
        if buy:
            acct.buy -= qty
            strat.buy -= qty
        else:
            acct.sell -= qty
            strat.sell -= qty
        acct.revalue()

    # --- fills and market data -------------------------------------------------------------------

    def on_fill(self, fill: Fill, *, account: str, strategy: str) -> list[Breach]:
        """Move the filled quantity from its open order into the position, then run the post-trade
        checks. A redelivered fill (same exchange, account, fill id and side) is ignored. An exception
        halts the account (see the module docstring) and is raised."""
        try:
            return self._on_fill(fill, account, strategy)
        except Exception as exc:
            self._fail_closed(f"account:{account}", f"post-trade check of fill {fill.fill_id}", exc)
            raise

    def _on_fill(self, fill: Fill, account: str, strategy: str) -> list[Breach]:
        self.retry_pending()
        dedupe = (fill.exchange, account, fill.fill_id, fill.side.value)
        if dedupe in self._seen_fills:
            return []
        self._seen_fills[dedupe] = None
        if len(self._seen_fills) > 200_000:  # bounded memory: forget the oldest half
            for old in list(self._seen_fills)[:100_000]:
                del self._seen_fills[old]
        order = self._open.get(fill.client_order_id)
        route = order.route if order is not None else None
        if route is None or route.exchange != fill.exchange or route.symbol != fill.symbol:
            key = (account, strategy, fill.exchange, fill.symbol)
            route = self._routes.get(key) or self._route(key)
            order = None
        signed = fill.quantity if fill.side is Side.BUY else -fill.quantity
        acct, strat = route.acct_leg, route.strat_leg
        acct.pos += signed
        strat.pos += signed
        if order is not None:
            take = min(fill.quantity, order.remaining)
            order.remaining -= take
            if order.buy:
                acct.buy -= take
                strat.buy -= take
            else:
                acct.sell -= take
                strat.sell -= take
        market = route.market
        if market.px is None:
            self._set_value_price(market, fill.price)
        acct.revalue()
        if order is not None and order.remaining <= 0:
            self.on_order_closed(order.client_order_id)
        now = self._clock()
        if now >= self._next_reset:
            self.new_day(now)
        return self._evaluate(route.account, route.strategy, now)

    def on_market(
        self, exchange: str, symbol: str, last: Decimal, bid: Decimal | None = None, ask: Decimal | None = None
    ) -> list[Breach]:
        """New prices: the price-band reference (mid when bid and ask are known, else last) and the
        valuation of every position in the market. Runs the post-trade checks of the accounts that
        hold the market (the portfolio should be marked first). An exception halts the account being
        checked (the whole book when it happens outside one account's check) and is raised."""
        try:
            return self._on_market(exchange, symbol, last, bid, ask)
        except Exception as exc:
            if exc is not self._held_failure:  # not already held by one account's check
                self._fail_closed(GLOBAL, f"market update {exchange} {symbol}", exc)
            raise

    def _on_market(
        self, exchange: str, symbol: str, last: Decimal, bid: Decimal | None, ask: Decimal | None
    ) -> list[Breach]:
        self._held_failure = None
        self.retry_pending()
        market = self._market(exchange, symbol)
        market.last = last
        market.bid, market.ask = bid, ask
        if bid is not None and ask is not None and bid > 0 and ask > 0:
            market.ref, market.ref_kind = (bid + ask) / _TWO, "mid"
        else:
            market.ref, market.ref_kind = last, "last"
        self._set_value_price(market, market.ref)
        now = self._clock()
        if now >= self._next_reset:
            self.new_day(now)
        breaches: list[Breach] = []
        if self.portfolio is None:
            return breaches
        held = {(key[0], key[1]) for key, leg in self._strat_legs.items() if leg.market is market and leg.pos != 0}
        for account, strategy in sorted(held):
            try:
                breaches.extend(self._evaluate(account, strategy, now))
            except Exception as exc:
                self._fail_closed(f"account:{account}", f"post-trade check after {exchange} {symbol} moved", exc)
                self._held_failure = exc
                raise
        return breaches

    def _set_value_price(self, market: _MarketPrices, px: Decimal) -> None:
        if market.px == px:
            return
        market.px = px
        market.pxm = px * market.mult
        for leg in market.legs:
            leg.revalue()

    # --- post-trade ------------------------------------------------------------------------------

    def day_start_for(self, ts: datetime) -> datetime:
        """Start of the risk day containing ``ts`` (the latest ``daily_reset_utc`` at or before it)."""
        ts = ts.astimezone(UTC)
        start = datetime.combine(ts.date(), self._reset_time)
        return start if start <= ts else start - _DAY

    def new_day(self, ts: datetime) -> None:
        """Reset the daily loss counters: today's PnL is measured from here. Called from the clock
        when ``daily_reset_utc`` passes; callable by hand. The kill switch is not released."""
        self._day_start = self.day_start_for(ts)
        self._next_reset = self._day_start + _DAY
        self._tripped = {(rule, scope) for rule, scope in self._tripped if rule == "max_drawdown_pct"}
        self._anchors.clear()
        for account in sorted(self._accounts):
            self._anchor(f"account:{account}", ts)
        for strategy in sorted(self._strategies):
            self._anchor(f"strategy:{strategy}", ts)

    def evaluate(self, account: str, strategy: str | None = None) -> list[Breach]:
        """Run the post-trade checks of ``account`` (and ``strategy``) now. An exception halts the
        account and is raised."""
        try:
            self.retry_pending()
            now = self._clock()
            if now >= self._next_reset:
                self.new_day(now)
            if strategy is None:
                return self._evaluate_account(account, now)
            return self._evaluate(account, strategy, now)
        except Exception as exc:
            self._fail_closed(f"account:{account}", "post-trade check", exc)
            raise

    def _evaluate(self, account: str, strategy: str, now: datetime) -> list[Breach]:
        if self.portfolio is None:
            return []
        breaches = self._evaluate_account(account, now)
        limits = self._scope_limits(account, strategy)
        lim = limits.strategy_loss_limit
        if lim is not None:
            scope = f"strategy:{strategy}"
            loss = self._anchor(scope, now) - self._pnl(scope)
            if loss > lim.value:
                breach = self._breach(
                    "strategy_loss_limit",
                    scope,
                    loss,
                    lim,
                    now,
                    limits.strategy_breach_action,
                    f"strategy {strategy} lost {loss} since {self._day_start.isoformat()}",
                    account=account,
                    strategy=strategy,
                )
                if breach is not None:
                    breaches.append(breach)
        return breaches

    def _evaluate_account(self, account: str, now: datetime) -> list[Breach]:
        if self.portfolio is None:
            return []
        limits = self._scope_limits(account, "")
        breaches: list[Breach] = []
        scope = f"account:{account}"
        lim = limits.daily_loss_limit
        if lim is not None:
            loss = self._anchor(scope, now) - self._pnl(scope)
            if loss > lim.value:
                breach = self._breach(
                    "daily_loss_limit",
                    scope,
                    loss,
                    lim,
                    now,
                    limits.breach_action,
                    f"account {account} lost {loss} (realized + unrealized) since {self._day_start.isoformat()}",
                    account=account,
                )
                if breach is not None:
                    breaches.append(breach)
        lim = limits.max_drawdown_pct
        if lim is not None:
            equity = Decimal(self.portfolio.equity(account))
            peak = self._peak(account, equity, now)
            if peak > 0:
                drawdown = (peak - equity) * _HUNDRED / peak
                if drawdown > lim.value:
                    breach = self._breach(
                        "max_drawdown_pct",
                        scope,
                        drawdown.quantize(Decimal("0.0001")),
                        lim,
                        now,
                        limits.breach_action,
                        f"account {account} equity {equity} is {drawdown.quantize(Decimal('0.01'))}% "
                        f"below its peak {peak}",
                        account=account,
                    )
                    if breach is not None:
                        breaches.append(breach)
        return breaches

    def _scope_limits(self, account: str, strategy: str) -> ResolvedLimits:
        # Account- and strategy-wide limits do not depend on the symbol.
        limits = self._post_limits.get((account, strategy))
        if limits is None:
            limits = self._post_limits[(account, strategy)] = resolve_limits(self.limits, account, strategy, "")
        return limits

    def _breach(
        self,
        rule: str,
        scope: str,
        value: Decimal,
        lim: Limit,
        now: datetime,
        action: str,
        what: str,
        *,
        account: str | None = None,
        strategy: str | None = None,
    ) -> Breach | None:
        if (rule, scope) in self._tripped:
            return None
        mode = KillSwitchMode.parse(action)
        breach = Breach(
            rule=rule,
            scope=scope,
            value=value,
            limit=lim.value,
            source=lim.source,
            reason=f"{what}: exceeds {rule} {lim.value} ({lim.source}); kill switch {mode.value}",
            ts=now,
            action=mode,
            account=account,
            strategy=strategy,
        )
        log.error("risk breach: %s", breach.reason)
        # Engaged first, tripped second: a failure in between leaves the breaker armed.
        self._hold(scope, mode, breach.reason, {"rule": rule, "value": value, "limit": lim.value, "source": lim.source})
        self._tripped.add((rule, scope))
        self._record_breach(breach)
        return breach

    def _hold(self, scope: str, mode: KillSwitchMode, reason: str, details: Mapping[str, object]) -> KillSwitchMode:
        """Engage ``mode`` on ``scope`` (unless a mode at least as strict holds); when that fails, the
        strictest mode that can be engaged. Raises only when no mode could be engaged."""
        current = self.kill_switch.state_of(scope).mode
        if current.severity >= mode.severity:
            return current
        candidates = [mode] + [m for m in (KillSwitchMode.HALT, KillSwitchMode.REDUCE_ONLY) if m is not mode]
        errors: list[str] = []
        for candidate in candidates:
            if candidate.severity <= current.severity:
                break
            try:
                self.kill_switch.engage(candidate, reason, _ACTOR, scope=scope, details=details)
            except Exception as exc:
                if self.kill_switch.state_of(scope).mode.severity >= candidate.severity:
                    # Engaged, then a listener failed (the kill switch logged it): the change stands, and
                    # trying a milder mode now would loosen it.
                    return candidate
                log.critical("kill switch %s could not be engaged on %s: %s", candidate.value, scope, exc)
                errors.append(f"{candidate.value}: {exc}")
                continue
            return candidate
        raise RuntimeError(f"kill switch could not be engaged on {scope} ({'; '.join(errors)}): {reason}")

    def _fail_closed(self, scope: str, what: str, exc: BaseException) -> None:
        """An exception in the risk path: halt ``scope`` (else reduce-only), loudly."""
        reason = f"risk engine failure in {what}: {type(exc).__name__}: {exc}"
        log.critical("%s; halting %s", reason, scope)
        try:
            self._hold(scope, KillSwitchMode.HALT, reason, {"error": type(exc).__name__, "failure": what})
        except Exception:
            log.critical("%s: the kill switch could not be engaged either", reason, exc_info=True)

    def _record_breach(self, breach: Breach) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.record_breach(breach)
        except Exception as exc:
            self._unrecorded.append(breach)
            log.critical("risk breach could not be recorded (%s); it is retried: %s", exc, breach.reason)
            # An unrecorded breach is a failure in the risk path: the scope halts until it is stored.
            self._hold(
                breach.scope,
                KillSwitchMode.HALT,
                f"{breach.reason} (could not be recorded: {type(exc).__name__})",
                {"rule": breach.rule, "error": type(exc).__name__},
            )

    @property
    def unrecorded(self) -> list[Breach]:
        """Breaches the recorder has not stored yet (retried by ``retry_pending``)."""
        return list(self._unrecorded)

    def retry_pending(self) -> int:
        """Store what a failure left unstored: kill-switch changes, then breaches (oldest first).
        Returns how many are still waiting. Every post-trade call runs it first."""
        waiting = self.kill_switch.retry_unsaved() if self.kill_switch.unsaved else 0
        while self._unrecorded and self.recorder is not None:
            breach = self._unrecorded[0]
            try:
                self.recorder.record_breach(breach)
            except Exception as exc:
                # Fail closed: the breach's kill switch was engaged before it was queued (nothing is marked
                # tripped before that); only its record is late. It stays queued and is retried.
                log.critical("risk breach still not recorded (%s), its halt holds: %s", exc, breach.reason)
                break
            self._unrecorded.pop(0)
            log.warning("risk breach recorded after a failed write: %s", breach.reason)
        return waiting + len(self._unrecorded)

    def _pnl(self, scope: str) -> Decimal:
        assert self.portfolio is not None
        kind, _, name = scope.partition(":")
        pnl = self.portfolio.pnl(account=name) if kind == "account" else self.portfolio.pnl(strategy=name)
        return Decimal(pnl.total)

    def _anchor(self, scope: str, now: datetime) -> Decimal:
        anchor = self._anchors.get(scope)
        if anchor is not None:
            return anchor
        key = f"daily_anchor:{scope}"
        day = self._day_start.isoformat()
        stored = self._state.get(key)
        if stored is not None and stored.get("day") == day:
            anchor = Decimal(str(stored["pnl"]))
        else:
            anchor = self._pnl(scope) if self.portfolio is not None else _ZERO
            self._state.put(key, {"day": day, "pnl": anchor}, now)
        self._anchors[scope] = anchor
        return anchor

    def _peak(self, account: str, equity: Decimal, now: datetime) -> Decimal:
        peak = self._peaks.get(account)
        if peak is None:
            stored = self._state.get(f"equity_peak:{account}")
            peak = Decimal(str(stored["peak"])) if stored is not None else None
        if peak is None or equity > peak:
            peak = equity
            self._state.put(f"equity_peak:{account}", {"peak": peak, "ts": now}, now)
        self._peaks[account] = peak
        return peak

    def reset_equity_peak(self, account: str) -> None:
        """Start the drawdown measurement again from the current equity (after a deliberate review)."""
        self._peaks.pop(account, None)
        if self.portfolio is not None:
            equity = Decimal(self.portfolio.equity(account))
            now = self._clock()
            self._peaks[account] = equity
            self._state.put(f"equity_peak:{account}", {"peak": equity, "ts": now}, now)
        self._tripped.discard(("max_drawdown_pct", f"account:{account}"))

    def _on_kill_switch(self, change: KillSwitchChange) -> None:
        # Released by hand: a limit still broken trips it again on the next evaluation.
        if change.current.mode is KillSwitchMode.OFF:
            if change.scope == GLOBAL:
                self._tripped.clear()
            else:
                self._tripped = {t for t in self._tripped if t[1] != change.scope}

    # --- positions -------------------------------------------------------------------------------

    def load_positions(self, positions: Iterable[Position]) -> None:
        """Seed filled strategy positions (sub-ledgers) on start-up. The constructor does this from the
        portfolio it is given; call it only for positions that portfolio does not hold."""
        for position in positions:
            key = (position.account, position.strategy, position.exchange, position.symbol)
            route = self._routes.get(key) or self._route(key)
            route.acct_leg.pos += position.quantity
            route.strat_leg.pos += position.quantity
            if route.market.px is None and position.avg_entry_price is not None:
                self._set_value_price(route.market, position.avg_entry_price)
            route.acct_leg.revalue()

    def worst_case_position(
        self, account: str, exchange: str, symbol: str, strategy: str | None = None
    ) -> tuple[Decimal, Decimal, Decimal]:
        """(filled position, if every open buy fills, if every open sell fills)."""
        leg = (
            self._acct_legs.get((account, exchange, symbol))
            if strategy is None
            else self._strat_legs.get((account, strategy, exchange, symbol))
        )
        if leg is None:
            return _ZERO, _ZERO, _ZERO
        return leg.pos, leg.pos + leg.buy, leg.pos - leg.sell

    def exposure(self, account: str) -> tuple[Decimal, Decimal]:
        """Worst-case (gross, |net|) of ``account`` at the current valuation prices."""
        exp = self._exposures.get(account)
        if exp is None:
            return _ZERO, _ZERO
        return exp.gross, max(abs(exp.net_hi), abs(exp.net_lo))

    def resolved_limits(self, account: str, strategy: str, exchange: str, symbol: str) -> ResolvedLimits:
        key = (account, strategy, exchange, symbol)
        route = self._routes.get(key) or self._route(key)
        return route.limits

    # --- state for restarts (the live risk gate's snapshots) ----------------------------------------
    # Counters and legs are per account; markets are shared. The formats are JSON: Decimals as strings,
    # order-rate stamps as integer microseconds since the epoch.

    def export_state(self, account: str) -> tuple[RiskAccountState, set[tuple[str, str]]]:
        """Everything this engine holds of ``account`` (its routes, legs, counters, open reservations,
        daily anchors, peak and tripped breakers), and the markets its routes trade."""
        routes = sorted(key for key in self._routes if key[0] == account)
        strategies = sorted({key[1] for key in routes})
        scopes = {f"account:{account}", *(f"strategy:{s}" for s in strategies)}
        markets = {(key[2], key[3]) for key in routes}
        state: RiskAccountState = {
            "routes": [list(key[1:]) for key in routes],
            "acct_legs": [
                [key[1], key[2], str(leg.pos), str(leg.buy), str(leg.sell)]
                for key, leg in sorted(self._acct_legs.items())
                if key[0] == account
            ],
            "strat_legs": [
                [key[1], key[2], key[3], str(leg.pos), str(leg.buy), str(leg.sell)]
                for key, leg in sorted(self._strat_legs.items())
                if key[0] == account
            ],
            "counters": [
                [list(key), counter.open, [(t - _EPOCH) // _MICROSECOND for t in counter.times]]
                for key, counter in sorted(self._counters.items())
                if key[1] == account
            ],
            "open": [
                [
                    coid,
                    order.intent_id,
                    order.route.strategy,
                    order.route.exchange,
                    order.route.symbol,
                    order.buy,
                    str(order.remaining),
                ]
                for coid, order in sorted(self._open.items())
                if order.route.account == account
            ],
            "anchors": {scope: str(value) for scope, value in sorted(self._anchors.items()) if scope in scopes},
            "peak": None if (peak := self._peaks.get(account)) is None else str(peak),
            "tripped": sorted([rule, scope] for rule, scope in self._tripped if scope in scopes),
            "day_start": self._day_start.isoformat(),
        }
        return state, markets

    def import_state(self, account: str, data: RiskAccountState | Mapping[str, Any]) -> None:
        """Replace what this engine holds of ``account`` with ``data`` (from ``export_state``); a later
        day start than this engine's moves its daily reset forward."""
        day_start = datetime.fromisoformat(data["day_start"])
        if day_start > self._day_start:
            self._day_start = day_start
            self._next_reset = day_start + _DAY
        for coid in [c for c, order in self._open.items() if order.route.account == account]:
            order = self._open.pop(coid)
            self._open_by_intent.pop(order.intent_id, None)
        for strategy, exchange, symbol in data["routes"]:
            key = (account, strategy, exchange, symbol)
            if key not in self._routes:
                self._route(key)
        for coid, intent_id, strategy, exchange, symbol, buy, remaining in data["open"]:
            route = self._routes[(account, strategy, exchange, symbol)]
            self._reserve(route, buy, Decimal(str(remaining)), coid, intent_id, _EPOCH)
        # the exact counters and legs (overwriting what _reserve counted)
        for key, open_count, times in data["counters"]:
            counter = self._counter(tuple(key))
            counter.open = open_count
            counter.times = deque(_EPOCH + timedelta(microseconds=t) for t in times)
        for strategy, exchange, symbol, pos, buy, sell in data["strat_legs"]:
            leg = self._strat_legs[(account, strategy, exchange, symbol)]
            leg.pos, leg.buy, leg.sell = Decimal(str(pos)), Decimal(str(buy)), Decimal(str(sell))
        for exchange, symbol, pos, buy, sell in data["acct_legs"]:
            leg = self._acct_legs[(account, exchange, symbol)]
            leg.pos, leg.buy, leg.sell = Decimal(str(pos)), Decimal(str(buy)), Decimal(str(sell))
            leg.revalue()
        for scope, value in data["anchors"].items():
            self._anchors[scope] = Decimal(str(value))
        if data["peak"] is not None:
            self._peaks[account] = Decimal(str(data["peak"]))
        scopes = {f"account:{account}", *(f"strategy:{r[0]}" for r in data["routes"])}
        self._tripped = {t for t in self._tripped if t[1] not in scopes} | {(r, s) for r, s in data["tripped"]}

    def export_market(self, exchange: str, symbol: str) -> MarketPrices | None:
        """The prices this engine holds of one market (``None``: it has never heard of it)."""
        market = self._markets.get((exchange, symbol))
        if market is None:
            return None
        return {
            "last": _opt_str(market.last),
            "bid": _opt_str(market.bid),
            "ask": _opt_str(market.ask),
            "ref": _opt_str(market.ref),
            "ref_kind": market.ref_kind,
            "px": _opt_str(market.px),
        }

    def import_market(
        self, exchange: str, symbol: str, data: MarketPrices | Mapping[str, Any], *, newer: bool, first: bool
    ) -> None:
        """Restore one market's prices from ``export_market``: all of them when the snapshot is ``newer``
        than anything heard since; else, when ``first`` (no price heard at all), only a valuation price
        still missing (a first order's price, kept before any market data)."""
        market = self._market(exchange, symbol)
        px = None if data["px"] is None else Decimal(str(data["px"]))
        if newer:
            market.last, market.bid, market.ask = _opt_dec(data["last"]), _opt_dec(data["bid"]), _opt_dec(data["ask"])
            market.ref, market.ref_kind = _opt_dec(data["ref"]), data["ref_kind"]
            if px is not None:
                self._set_value_price(market, px)
        elif first and market.px is None and px is not None:
            self._set_value_price(market, px)

    def is_reserved(self, client_order_id: str) -> bool:
        """Whether an approval of this engine still reserves ``client_order_id`` (approved, not closed)."""
        return client_order_id in self._open

    def undo_approval(self, client_order_id: str, now: datetime) -> None:
        """Take back an approval ``check`` just made: its reservation and its order-rate stamp."""
        order = self._open.get(client_order_id)
        if order is None:
            return
        self.on_order_closed(client_order_id)
        for counter in order.route.rate_counters:
            if counter.times and counter.times[-1] == now:
                counter.times.pop()

    def suspend(self, client_order_id: str) -> Reservation:
        """Set an open order's reservation aside (``resume`` puts it back exactly)."""
        order = self._open[client_order_id]
        self.on_order_closed(client_order_id)
        return Reservation(order)

    def resume(self, reservation: Reservation) -> None:
        """Undo ``on_order_closed`` of a suspended reservation without counting it as a new approval."""
        order = reservation.order
        self._open[order.client_order_id] = order
        self._open_by_intent[order.intent_id] = order
        route = order.route
        if order.remaining > 0:
            for leg in (route.acct_leg, route.strat_leg):
                if order.buy:
                    leg.buy += order.remaining
                else:
                    leg.sell += order.remaining
            route.acct_leg.revalue()
        route.acct_counter.open += 1
        route.strat_counter.open += 1
        route.sym_counter.open += 1

    def rekey(self, new_client_order_id: str, client_order_id: str, intent_id: str) -> None:
        """Move the reservation approved under ``new_client_order_id`` to the order it amends."""
        order = self._open.pop(new_client_order_id)
        self._open_by_intent.pop(order.intent_id, None)
        order.client_order_id, order.intent_id = client_order_id, intent_id
        self._open[client_order_id] = order
        self._open_by_intent[intent_id] = order

    # --- routes ----------------------------------------------------------------------------------

    def _market(self, exchange: str, symbol: str) -> _MarketPrices:
        market = self._markets.get((exchange, symbol))
        if market is None:
            inst = self._instruments.get((exchange, symbol))
            market = _MarketPrices(inst.contract_size if inst is not None else Decimal(1))
            self._markets[(exchange, symbol)] = market
        return market

    def _counter(self, key: tuple[str, ...]) -> _Counter:
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = _Counter()
        return counter

    def _route(self, key: tuple[str, str, str, str]) -> _Route:
        account, strategy, exchange, symbol = key
        limits = resolve_limits(self.limits, account, strategy, symbol)
        market = self._market(exchange, symbol)
        exposure = self._exposures.get(account)
        if exposure is None:
            exposure = self._exposures[account] = _Exposure()
        acct_leg = self._acct_legs.get((account, exchange, symbol))
        if acct_leg is None:
            acct_leg = self._acct_legs[(account, exchange, symbol)] = _Leg(market, exposure)
            market.legs.append(acct_leg)
        strat_leg = self._strat_legs.get(key)
        if strat_leg is None:
            strat_leg = self._strat_legs[key] = _Leg(market, None)

        r = _Route()
        r.account, r.strategy, r.exchange, r.symbol = key
        r.limits = limits
        r.instrument = self._instruments.get((exchange, symbol))
        r.market = market
        r.acct_leg, r.strat_leg, r.exposure = acct_leg, strat_leg, exposure
        r.acct_counter = self._counter(("account", account))
        r.strat_counter = self._counter(("strategy", account, strategy))
        r.sym_counter = self._counter(("symbol", account, symbol))
        scoped = {
            "account": (r.acct_counter, f"account {account}"),
            "strategy": (r.strat_counter, f"strategy {strategy} in account {account}"),
            "symbol": (r.sym_counter, f"{symbol} in account {account}"),
        }
        r.max_qty = limits.max_order_quantity
        r.notional = limits.max_order_notional
        r.band = limits.price_band_bps
        r.gross = limits.max_gross_exposure
        r.net = limits.max_net_exposure
        r.open_checks = tuple((lim, *scoped[lim.scope]) for lim in limits.max_open_orders)
        r.rate_checks = tuple((lim, *scoped[lim.scope]) for lim in limits.orders_per_minute)
        r.rate_counters = tuple(
            scoped[scope][0] for scope in ("account", "strategy", "symbol") if scope in self._rate_scopes
        )
        r.position_checks = tuple(
            (lim, strat_leg, f"strategy {strategy}")
            if lim.scope == "strategy"
            else (lim, acct_leg, f"account {account}")
            for lim in limits.max_position_notional
        )
        inst = r.instrument
        r.needs_price = (
            any(x is not None for x in (r.notional, r.gross, r.net))
            or bool(r.position_checks)
            or (inst is not None and (inst.min_notional is not None or inst.max_notional is not None))
        )
        self._routes[key] = r
        self._accounts.add(account)
        self._strategies.add(strategy)
        return r


def _rate_scopes(config: RiskConfig) -> set[str]:
    """The scopes some ``orders_per_minute`` is measured on: only those keep approval timestamps."""
    scopes: set[str] = set()
    if config.orders_per_minute is not None or any(a.orders_per_minute is not None for a in config.accounts.values()):
        scopes.add("account")
    if any(s.orders_per_minute is not None for s in config.strategies.values()):
        scopes.add("strategy")
    if any(s.orders_per_minute is not None for s in config.symbols.values()):
        scopes.add("symbol")
    return scopes


# --- pre-trade rule checks -----------------------------------------------------------------------
# One per rule of the module docstring's table, run by ``RiskEngine.check`` in that order: each returns
# why it refuses the intent, or ``None``. Plain functions of the route's resolved state (no pydantic
# work): they are the hot path.


_Denial = tuple[str, str, dict[str, Any]]  # why a rule refuses an intent: the decision's rule, reason, details


def _limit_denial(lim: Limit, rule: str, value: Decimal, what: str) -> _Denial:
    reason = f"{what}: exceeds {rule} {lim.value} ({lim.source})"
    return (rule, reason, {"value": str(value), "limit": str(lim.value), "source": lim.source})


def _check_kill_switch(ks: KillSwitch, route: _Route, buy: bool, qty: Decimal) -> _Denial | None:
    """halt: nothing passes; reduce_only: only an intent that reduces the position of the engaged scope.
    Called while some scope is engaged (``ks.active``)."""
    mode, scope = ks.effective(route.account, route.strategy)
    if mode is KillSwitchMode.HALT:
        return ("kill_switch", f"kill switch halt ({scope}): no new orders", {"scope": scope, "mode": "halt"})
    if mode is KillSwitchMode.REDUCE_ONLY:
        leg = route.strat_leg if scope.startswith("strategy:") else route.acct_leg
        problem = _not_reducing(leg, buy, qty)
        if problem is not None:
            return (
                "kill_switch",
                f"kill switch reduce_only ({scope}): {problem}",
                {"scope": scope, "mode": "reduce_only"},
            )
    return None


def _check_reduce_only(route: _Route, buy: bool, qty: Decimal) -> _Denial | None:
    """An intent flagged ``reduce_only`` must reduce the account's position."""
    problem = _not_reducing(route.acct_leg, buy, qty)
    if problem is None:
        return None
    return ("reduce_only", f"reduce-only intent: {problem}", {})


def _check_instrument(route: _Route, qty: Decimal, price: Decimal | None, order_px: Decimal | None) -> _Denial | None:
    """The venue's rules: a known instrument, then its precision, quantity, price and notional bounds."""
    inst = route.instrument
    if inst is None:
        return (
            "instrument",
            f"no instrument known for {route.exchange}:{route.symbol}: "
            "precision and minimum notional cannot be checked",
            {},
        )
    problem_limit = _instrument_problem(inst, qty, price, order_px)
    if problem_limit is None:
        return None
    return _instrument_denial(inst, qty, price, order_px, problem_limit)


def _instrument_denial(
    inst: Instrument, qty: Decimal, price: Decimal | None, order_px: Decimal | None, limit: str
) -> _Denial:
    """Words the venue rule ``_instrument_problem`` found broken (``Instrument.validate_order``'s words)."""
    try:
        inst.validate_order(price, qty)
    except InvalidOrderError as exc:
        return ("instrument", str(exc), {"limit": exc.details.get("limit", limit)})
    # validate_order skips notional without a limit price: a market order valued at the reference
    assert order_px is not None
    notional = order_px * qty * inst.contract_size
    bound = (
        f"below min_notional {inst.min_notional}"
        if limit == "min_notional"
        else f"above max_notional {inst.max_notional}"
    )
    text = f"{inst.key}: notional {notional} at the reference price {order_px} is {bound}"
    return ("instrument", text, {"limit": limit})


def _check_reference_price(intent: OrderIntent, route: _Route) -> _Denial | None:
    """An order without a price (its own, or a last trade or mid) cannot be valued: refused when a notional
    limit applies."""
    if not route.needs_price:
        return None
    return (
        "reference_price",
        f"no price to value a {intent.type.value} order on {route.exchange}:{route.symbol}: no last trade or mid yet",
        {},
    )


def _check_max_order_quantity(route: _Route, qty: Decimal) -> _Denial | None:
    lim = route.max_qty
    if lim is not None and qty > lim.value:
        return _limit_denial(lim, "max_order_quantity", qty, f"order quantity {qty}")
    return None


def _check_max_order_notional(route: _Route, qty: Decimal, order_px: Decimal | None) -> _Denial | None:
    lim = route.notional
    if lim is None:
        return None
    order_notional = _ZERO if order_px is None else order_px * qty * route.market.mult
    if order_notional > lim.value:
        return _limit_denial(lim, "max_order_notional", order_notional, f"order notional {order_notional}")
    return None


def _check_price_band(route: _Route, price: Decimal | None) -> _Denial | None:
    """The fat-finger guard: a limit price within the band of the mid (bid and ask known), else the last
    trade; refused when there is neither."""
    lim = route.band
    if lim is None or price is None:
        return None
    market = route.market
    ref = market.ref
    if ref is None:
        return (
            "price_band_bps",
            f"no last trade or mid for {route.exchange}:{route.symbol} to check the price band "
            f"(price_band_bps {lim.value}, {lim.source})",
            {"limit": str(lim.value), "source": lim.source},
        )
    if abs(price - ref) * _BPS > lim.value * ref:
        bps = (abs(price - ref) * _BPS / ref).quantize(Decimal("0.01"))
        return _limit_denial(
            lim, "price_band_bps", bps, f"limit price {price} is {bps} bps from the {market.ref_kind} {ref}"
        )
    return None


def _check_max_open_orders(route: _Route) -> _Denial | None:
    """Every level's open-order limit on its scope's open orders."""
    for lim, counter, whose in route.open_checks:
        n = counter.open
        if n >= lim.value:
            return _limit_denial(
                lim,
                "max_open_orders",
                Decimal(n + 1),
                f"{n} orders already open for {whose}; this would be {n + 1}",
            )
    return None


def _check_orders_per_minute(route: _Route, now: datetime) -> _Denial | None:
    """Every level's order rate on its scope's approvals in the last 60 s (older ones are dropped here)."""
    for lim, counter, whose in route.rate_checks:
        times = counter.times
        cutoff = now - _WINDOW
        while times and times[0] <= cutoff:
            times.popleft()
        n = len(times)
        if n >= lim.value:
            return _limit_denial(
                lim,
                "orders_per_minute",
                Decimal(n + 1),
                f"{n} orders approved in the last 60 s for {whose}; this would be {n + 1}",
            )
    return None


# Worst-case position and exposure. An intent only moves one side of the worst case (a buy: "every open
# buy fills"), and it is refused only when that side becomes the largest in absolute value and too large:
# for a buy, hi' > -lo and hi' x price > limit. Without a valuation price (``pxm``) there is nothing to value.


def _check_max_position_notional(route: _Route, buy: bool, qty: Decimal, pxm: Decimal | None) -> _Denial | None:
    """Every level's position limit on its leg: the account's position in the symbol, a strategy's own."""
    if pxm is None:
        return None
    for lim, leg, owner in route.position_checks:
        if buy:
            worst = leg.pos + leg.buy + qty
            grows = worst > leg.sell - leg.pos
        else:
            worst = leg.pos - leg.sell - qty
            grows = -worst > leg.pos + leg.buy
        if grows and abs(worst) * pxm > lim.value:
            return _limit_denial(
                lim,
                "max_position_notional",
                abs(worst) * pxm,
                f"worst-case position {worst} {route.symbol} on {route.exchange} ({owner}) "
                f"would be worth {abs(worst) * pxm}",
            )
    return None


def _check_max_gross_exposure(route: _Route, buy: bool, qty: Decimal, pxm: Decimal | None) -> _Denial | None:
    lim = route.gross
    if lim is None or pxm is None:
        return None
    acct = route.acct_leg
    if buy:
        worst = acct.pos + acct.buy + qty
        grows = worst > acct.sell - acct.pos
    else:
        worst = acct.sell - acct.pos + qty
        grows = worst > acct.pos + acct.buy
    if not grows:
        return None
    gross = route.exposure.gross - acct.g + worst * pxm
    if gross > lim.value:
        return _limit_denial(
            lim, "max_gross_exposure", gross, f"worst-case gross exposure of account {route.account} would be {gross}"
        )
    return None


def _check_max_net_exposure(route: _Route, buy: bool, qty: Decimal, pxm: Decimal | None) -> _Denial | None:
    lim = route.net
    if lim is None or pxm is None:
        return None
    exp = route.exposure
    if buy:
        net = exp.net_hi + qty * pxm
        grows = net > -exp.net_lo
    else:
        net = qty * pxm - exp.net_lo
        grows = net > exp.net_hi
    if grows and net > lim.value:
        return _limit_denial(
            lim, "max_net_exposure", net, f"worst-case net exposure of account {route.account} would be {net}"
        )
    return None


def _not_reducing(leg: _Leg, buy: bool, qty: Decimal) -> str | None:
    """Why a ``qty`` order would not reduce ``leg`` even in the worst case (all open reducing orders
    fill too), or ``None`` when it reduces."""
    pos = leg.pos
    if buy:
        if pos < 0 and pos + leg.buy + qty <= 0:
            return None
        return f"buy {qty} would not reduce the position {pos} (open buys {leg.buy})"
    if pos > 0 and pos - leg.sell - qty >= 0:
        return None
    return f"sell {qty} would not reduce the position {pos} (open sells {leg.sell})"


def _instrument_problem(inst: Instrument, qty: Decimal, price: Decimal | None, order_px: Decimal | None) -> str | None:
    """The first venue rule broken (its field name), or ``None``: a fast equivalent of
    ``Instrument.validate_order`` (which then words the rejection)."""
    if not _multiple(qty, inst.step_size):
        return "step_size"
    lo, hi = inst.min_quantity, inst.max_quantity
    if lo is not None and qty < lo:
        return "min_quantity"
    if hi is not None and qty > hi:
        return "max_quantity"
    if price is not None:
        if not _multiple(price, inst.tick_size):
            return "tick_size"
        lo, hi = inst.min_price, inst.max_price
        if lo is not None and lo > 0 and price < lo:
            return "min_price"
        if hi is not None and hi > 0 and price > hi:
            return "max_price"
    if order_px is not None and (inst.min_notional is not None or inst.max_notional is not None):
        notional = order_px * qty * inst.contract_size
        lo, hi = inst.min_notional, inst.max_notional
        if lo is not None and notional < lo:
            return "min_notional"
        if hi is not None and hi > 0 and notional > hi:
            return "max_notional"
    return None


def _multiple(value: Decimal, step: Decimal) -> bool:
    # Exact in the default context while value / step < 10**28; beyond, the slow exact path.
    try:
        return value % step == 0
    except InvalidOperation:
        return is_multiple_of(value, step)
