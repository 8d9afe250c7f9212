"""The risk gate: every strategy request passes ``meltica.risk.RiskEngine`` before it reaches execution.

Inputs and outputs (logical topics, all keyed by account unless said otherwise):

* ``orders.intents`` — ``SubmitRequest`` / ``OrderListRequest``: each intent (each leg) goes through
  ``RiskEngine.check``; a list passes only if every leg does (the legs that passed are then released and
  reported refused, rule ``order_list``). The legs a list ends on are alternatives (an OCO's legs, a
  bracket's exits: one fills, the emulation cancels the rest), so each is checked without its siblings'
  reservations, and a bracket's exits without ``reduce_only`` (they close what the entry opens, once it
  has: today's position is not theirs to reduce); every leg stays reserved. Approved: the request is
  forwarded on ``orders.approved``.
  Refused: a ``RejectionNotice`` takes its place on ``orders.approved`` (so execution reports the
  rejection to the strategy in order), a ``RejectedIntent`` per intent goes to ``orders.rejected``.
  Every decision goes to ``risk.decisions`` and, with a recorder, to ``risk_events`` in PostgreSQL.
  ``CancelRequest`` and ``StrategyProgress`` pass unchanged. ``AmendRequest``: an amend that raises the
  quantity or the notional (remaining quantity x price) is checked like a new order for the amended
  remaining quantity at the amended price, with the order's own reservation set aside for the check;
  approved, the order's reservation becomes the amended one. A refused amend becomes a
  ``RejectionNotice`` on ``orders.approved`` like a refused submit (execution reports its replacement
  rejected, the order unchanged); its decision goes to ``risk.decisions`` and ``orders.rejected``.
  Decreasing amends, and amends of orders the gate does not track, pass.
* ``orders.events`` — ``OrderUpdate``: fills go to the gate's ``Portfolio`` and to ``RiskEngine.on_fill``
  (post-trade checks: daily loss, drawdown, strategy loss → kill switch, as the engine does); an order
  that ends releases its worst-case reservation (``on_order_closed``); an open order the gate did not
  approve (a cancel-replace replacement, an order recovered by execution) is reserved
  (``on_order_open``) for its remaining quantity; a child of a locally emulated order
  (``<parent client order id>.c<n>``) is counted against its parent's reservation; an order list's leg
  that execution's local emulation holds (``OrderUpdate.held``) releases its reservation when it ends.
  ``VenueProgress``: the lock-step watermark (below) and, in lock-step, the reference price.
* ``md.candles.1m`` — the reference price outside lock-step (see "Reference prices").
* ``control`` (key: scope) — ``KillSwitchCommand`` engages / releases the engine's ``KillSwitch``
  (``halt`` | ``reduce_only`` | ``off``; ``global``, ``account:<a>``, ``strategy:<s>``).
* ``control`` — ``MarketStatus`` (from the ingest, key ``market:<exchange>:<symbol>``): while the latest
  status of a market's ``trades`` or ``candles.1m`` stream says ``stale`` (``blocking_streams``: the data
  strategies and reference prices come from; ``ticker``/``book`` staleness is shown, not acted on, as no
  stage reads those topics yet), or when the market's newest status is older than
  three of its heartbeats plus ``status_grace`` at the request's time (the ingest stopped talking), every
  submit and order list on that market is refused, rule ``stale_market_data`` (recorded and published
  like any decision; cancels, amends and progress markers pass). A market the gate never heard a status
  about is fresh: paper replays have no ingest, and a live ingest publishes a status for every stream
  it runs (at its first heartbeat, then every few seconds), so a silent feed is always announced.
* output ``control`` — when a post-trade breach trips the kill switch, the gate publishes the matching
  ``KillSwitchCommand`` (deterministic command id) so execution cancels and strategies stop, as the OMS
  does on a breach in a backtest (``publish_breaches``). With ``kill_switch_store`` (live deployments) the
  halt is stored first, as ``meltica kill`` stores one. Fail closed: a breach or halt that cannot be
  written (database outage) is published all the same and written later (``unrecorded``).

Time: the engine's clock is event time — the request's ``ts`` for a decision (so a redelivery, a replay
and a restored gate decide exactly alike), the event's time for fills and order changes, the bar's
close for a candle, the command's ``ts`` for a kill-switch change.

Lock-step (``lockstep=True``): a request whose ``ts`` is later than the latest ``VenueProgress.ts`` seen
for its account is held — with everything behind it, to keep the order — until that progress arrives,
so every fill up to the decision time is in the state. Before any progress was seen nothing is held
(the strategies' ``on_start`` requests precede the first venue step). Requirement on strategies: a
request's ``ts`` is not later than the venue step it reacts to (else it waits for the next one).

Reference prices (price band, notional of market orders, valuation): in lock-step the bar carried by
``VenueProgress`` (``open`` phase: the open, ``close``/``end``: the close) — it travels in order with
the fills on the account's partition, so a decision never depends on how two topics interleave; the
backtest decides at the next bar's open, the gate at this bar's close (the same instant, a different
print): a limit right at a band or notional edge can differ. Outside lock-step the close of each
``md.candles.1m`` bar (older or repeated bars are ignored). Until a market has a price, the engine
values it at the first approved order's price or the first fill's.

Restarts: ``snapshot(account)`` is a JSON-able record of everything the account's decisions depend
on: filled positions and PnL (portfolio ledgers and holdings), open orders and their worst-case
reservations, the orders-per-minute windows, daily PnL anchors and the equity peak, post-trade breaches
already acted on, the kill-switch scopes that govern it, the prices of its markets, held requests,
and the recent request / event / fill / command ids (``dedupe_window`` of each). ``restore`` rebuilds the
same engine state, so a restarted gate decides exactly as the one that stopped. ``snapshot`` of a scope
key (``global``, ``account:<a>``, ``strategy:<s>``) or a market key (``exchange:symbol``) returns the
kill-switch state or the market's prices; restoring merges by recency, so snapshots of several keys can
be restored in any order. The engine exposes no state export, so this module reads and writes its
internal state (and the portfolio's, as ``meltica.portfolio.store`` does) in one place: the section
"engine and portfolio state" below.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from meltica.domain import Fill, Instrument, OrderIntent
from meltica.domain.market_data import Bar
from meltica.domain.orders import Order, OrderFilled
from meltica.live.processor import Emit, Incoming, Outgoing
from meltica.messaging.catalogue import account_key
from meltica.messaging.schemas import (
    AmendRequest,
    CancelRequest,
    KillSwitchCommand,
    MarketStatus,
    OrderListRequest,
    OrderUpdate,
    PipelineRequest,
    RejectedIntent,
    RejectionNotice,
    RiskDecisionMessage,
    StrategyMessage,
    StrategyProgress,
    SubmitRequest,
    VenueProgress,
)
from meltica.portfolio import Portfolio
from meltica.risk import (
    GLOBAL,
    Breach,
    DecisionSink,
    InMemoryKillSwitchStore,
    KillSwitch,
    KillSwitchChange,
    KillSwitchMode,
    KillSwitchState,
    KillSwitchStorage,
    RiskConfig,
    RiskDecision,
    RiskEngine,
)
from meltica.risk.kill_switch import validate_scope

log = logging.getLogger(__name__)

INTENTS = "orders.intents"
EVENTS = "orders.events"
CONTROL = "control"
CANDLES = "md.candles.1m"
APPROVED = "orders.approved"
REJECTED = "orders.rejected"
DECISIONS = "risk.decisions"

SNAPSHOT_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CHILD = re.compile(r"^(?P<parent>.+)\.c\d+$")  # LocalOrderEmulator child intent id: <parent coid>.c<n>
_REQUEST = TypeAdapter[Any](StrategyMessage)
_NO_MARKET = {"last": None, "bid": None, "ask": None, "ref": None, "ref_kind": "last", "px": None}
ReferencePrices = Literal["progress", "candles"]
STALE_MARKET_DATA = "stale_market_data"


# --- small helpers -------------------------------------------------------------------------------


class _Recent:
    """An insertion-ordered set that forgets its oldest members beyond ``limit``."""

    __slots__ = ("_items", "limit")

    def __init__(self, limit: int, items: Iterable[str] = ()) -> None:
        self.limit = limit
        self._items: dict[str, None] = {}
        for item in items:
            self.add(item)

    def __contains__(self, item: str) -> bool:
        return item in self._items

    def add(self, item: str) -> None:
        self._items[item] = None
        if len(self._items) > self.limit:
            del self._items[next(iter(self._items))]

    def dump(self) -> list[str]:
        return list(self._items)


def _dec(value: Any) -> Decimal:
    return Decimal(str(value))


def _opt_dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _opt_str(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _opt_ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(slots=True)
class _Tracked:
    """What the gate knows of an order it reserved: enough to value an amend."""

    intent: OrderIntent
    quantity: Decimal
    price: Decimal | None
    filled: Decimal
    # the intent's JSON form, made at the first snapshot that holds the order and kept while the intent stays
    # the same: every snapshot dumps every open order, so dumping each intent again made a checkpoint's cost
    # grow with the orders open (read only by json.dumps, never changed)
    intent_json: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of_order(cls, order: Order, previous: _Tracked | None = None) -> _Tracked:
        intent = order.intent
        cached = None
        if previous is not None and (previous.intent is intent or previous.intent == intent):
            intent, cached = previous.intent, previous.intent_json
        return cls(intent, order.quantity, order.price, order.filled_quantity, cached)

    def dump(self) -> dict[str, Any]:
        intent = self.intent_json
        if intent is None:
            intent = self.intent_json = self.intent.model_dump(mode="json")
        return {
            "intent": intent,
            "quantity": str(self.quantity),
            "price": _opt_str(self.price),
            "filled": str(self.filled),
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> _Tracked:
        return cls(
            OrderIntent.model_validate(data["intent"]),
            _dec(data["quantity"]),
            _opt_dec(data["price"]),
            _dec(data["filled"]),
        )


class _Account:
    """The gate's own bookkeeping for one account (the engine holds the risk state proper)."""

    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.requests = _Recent(window)  # request ids decided or forwarded
        self.events = _Recent(window)  # (client order id, event kind, event id) applied
        self.fills = _Recent(window)  # (exchange, fill id) booked
        self.closed = _Recent(window)  # client order ids seen terminal: a stale update never reopens them
        self.held: deque[PipelineRequest] = deque()
        self.held_ids: set[str] = set()
        self.progress_ts: datetime | None = None
        self.orders: dict[str, _Tracked] = {}  # reserved orders, by client order id
        self.children: dict[str, str] = {}  # emulated child coid → parent coid
        self.strategies: set[str] = set()
        self.markets: set[tuple[str, str]] = set()


# --- the gate ------------------------------------------------------------------------------------


class RiskGate:
    """The ``risk-gate`` processor (see the module docstring for the contract).

    ``limits``: the ``risk:`` section (``RiskConfig``); ``instruments``: ``(exchange, symbol) →
    Instrument`` of every market traded (no instrument → every order there is refused, rule
    ``instrument``); ``lockstep``: hold requests for ``VenueProgress`` (paper replays);
    ``recorder``: where decisions and breaches are written (``meltica.risk.RiskRecorder`` →
    ``risk_events``), ``None``: not recorded; ``kill_switch``: default a fresh in-memory one (its state
    is carried by the snapshots; a SQL-backed one would write every command a second time);
    ``kill_switch_store``: the durable kill switch (``meltica.risk.KillSwitchStore``, live deployments)
    — every change the gate makes itself (a post-trade breach, a fail-closed halt) is written there
    before it is published, so a worker that starts later (``kill_switch_at_start``) obeys it; changes
    heard on ``control`` are not written again (their sender stored them). A tightening that cannot be
    written holds anyway and its write is retried (``KillSwitch``'s rule); ignored with ``kill_switch``;
    ``portfolio``: default an empty ``Portfolio`` — pass one with the accounts' starting balances
    (``set_balances``) when drawdown limits must see the equity; ``reference_prices``: ``"progress"``
    (default in lock-step) or ``"candles"`` (default otherwise); ``publish_breaches``: publish a
    ``KillSwitchCommand`` on ``control`` when a breach trips the kill switch; ``dedupe_window``: how
    many recent ids of each kind are remembered per account; ``kill_switch_at_start``: the persisted
    kill-switch state (``KillSwitchStore.load()``) read when the worker starts — applied at once, and a
    restored snapshot older than it (by ``since``) does not undo it; ``status_grace``: added to three
    heartbeats before a market whose ingest fell silent counts as stale (clock offsets and lag between
    processes); ``blocking_streams``: the market-data streams whose staleness refuses new orders;
    ``wall_clock``: when given (live deployments), the ingest's heartbeats expire on it rather than on
    event time.
    """

    name = "risk-gate"
    inputs: tuple[str, ...] = (INTENTS, EVENTS, CONTROL, CANDLES)
    outputs: tuple[str, ...] = (APPROVED, REJECTED, DECISIONS, CONTROL)

    def __init__(
        self,
        limits: RiskConfig,
        instruments: Mapping[tuple[str, str], Instrument],
        *,
        lockstep: bool = False,
        recorder: DecisionSink | None = None,
        kill_switch: KillSwitch | None = None,
        portfolio: Portfolio | None = None,
        reference_prices: ReferencePrices | None = None,
        publish_breaches: bool = True,
        dedupe_window: int = 1024,
        actor: str = "risk-gate",
        kill_switch_at_start: Mapping[str, KillSwitchState] | None = None,
        kill_switch_store: KillSwitchStorage | None = None,
        status_grace: timedelta = timedelta(seconds=15),
        blocking_streams: Iterable[str] = ("trades", "candles.1m"),
        wall_clock: Callable[[], datetime] | None = None,
    ) -> None:
        if dedupe_window < 1:
            raise ValueError("dedupe_window must be >= 1")
        self.lockstep = lockstep
        self.reference_prices: ReferencePrices = reference_prices or ("progress" if lockstep else "candles")
        self.recorder = recorder
        self.publish_breaches = publish_breaches
        self.dedupe_window = dedupe_window
        self.actor = actor
        self._now = _EPOCH  # event time of the message being handled (module docstring)
        self.portfolio = portfolio if portfolio is not None else Portfolio(clock=self._clock)
        if kill_switch is None:
            store: KillSwitchStorage = (
                InMemoryKillSwitchStore() if kill_switch_store is None else _OwnChangesStore(kill_switch_store)
            )
            # a durable change is stamped as `meltica kill` stamps one: on the wall clock when there is one
            stamp = self._clock if kill_switch_store is None or wall_clock is None else wall_clock
            kill_switch = KillSwitch(store, clock=stamp)
        self.kill_switch = kill_switch
        self._breaches: list[Breach] = []
        self._unrecorded: list[Breach] = []  # acted on, not yet written by the recorder (``_record_breaches``)
        self.engine = RiskEngine(
            limits,
            self.portfolio,
            clock=self._clock,
            instruments=instruments,
            kill_switch=self.kill_switch,
            recorder=_EngineSink(self._breaches),
        )
        self._accounts: dict[str, _Account] = {}
        self._commands = _Recent(max(dedupe_window, 256))  # control command ids applied (global)
        self._ks_seq: dict[str, int] = {}  # scope → order of its last change (restore merges by it)
        self._ks_counter = 0
        self.kill_switch.subscribe(self._on_kill_switch_change)
        self._persisted_kill = dict(kill_switch_at_start or {})
        for scope, persisted in self._persisted_kill.items():
            self.kill_switch.restore(scope, persisted)  # the durable state: no listener, nothing changed here
            if persisted.engaged:
                log.warning("risk gate: kill switch %s is %s at start (%s)", scope, persisted.mode, persisted.reason)
        self._prices: dict[tuple[str, str], datetime] = {}  # market → time of the price in use
        self.status_grace = status_grace
        self.blocking_streams = frozenset(blocking_streams)
        self.wall_clock = wall_clock
        self._status: dict[tuple[str, str], dict[str, MarketStatus]] = {}  # market → stream → latest status
        self._emit: Emit | None = None

    def _clock(self) -> datetime:
        return self._now

    # --- Processor -------------------------------------------------------------------------------

    async def start(self, emit: Emit) -> None:
        self._emit = emit

    async def stop(self) -> None:
        flush = getattr(self.recorder, "flush", None)
        if callable(flush):
            flush()

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        value = message.value
        out: list[Outgoing] = []
        if isinstance(value, PipelineRequest):
            out = self._on_request(value)
        elif isinstance(value, OrderUpdate):
            out = self._on_order_update(value)
        elif isinstance(value, VenueProgress):
            out = self._on_venue_progress(value)
        elif isinstance(value, KillSwitchCommand):
            self._on_kill_switch_command(value)
        elif isinstance(value, MarketStatus):
            self._on_market_status(value)
        elif isinstance(value, Bar):
            self._on_candle(value)
        # other control commands and unknown values: not the gate's business
        return out + self._breach_commands()

    # --- requests --------------------------------------------------------------------------------

    def _account(self, name: str) -> _Account:
        acct = self._accounts.get(name)
        if acct is None:
            acct = self._accounts[name] = _Account(name, self.dedupe_window)
        return acct

    def _on_request(self, request: PipelineRequest) -> list[Outgoing]:
        acct = self._account(request.account)
        rid = request.request_id
        if rid in acct.requests or rid in acct.held_ids:
            return []  # redelivered
        if self.lockstep and (acct.held or self._must_wait(acct, request)):
            acct.held.append(request)
            acct.held_ids.add(rid)
            return []
        return self._process(acct, request)

    @staticmethod
    def _needs_state(request: PipelineRequest) -> bool:
        return isinstance(request, SubmitRequest | OrderListRequest | AmendRequest)

    def _must_wait(self, acct: _Account, request: PipelineRequest) -> bool:
        return self._needs_state(request) and acct.progress_ts is not None and request.ts > acct.progress_ts

    def _release_held(self, acct: _Account) -> list[Outgoing]:
        out: list[Outgoing] = []
        while acct.held and not self._must_wait(acct, acct.held[0]):
            request = acct.held.popleft()
            acct.held_ids.discard(request.request_id)
            out.extend(self._process(acct, request))
        return out

    def _process(self, acct: _Account, request: PipelineRequest) -> list[Outgoing]:
        acct.requests.add(request.request_id)
        acct.strategies.add(request.strategy)
        self._now = request.ts
        key = account_key(request.account)
        if isinstance(request, SubmitRequest):
            return self._decide(acct, request, [request.intent])
        if isinstance(request, OrderListRequest):
            return self._decide(acct, request, list(request.legs))
        if isinstance(request, AmendRequest):
            return self._amend(acct, request)
        if isinstance(request, CancelRequest | StrategyProgress):
            return [Outgoing(APPROVED, key, request)]
        log.warning("risk gate: unexpected %s on %s dropped", type(request).__name__, INTENTS)
        return []

    def _check_leg(self, request: OrderListRequest, leg: OrderIntent, approved: list[OrderIntent]) -> RiskDecision:
        """One leg of an order list (``approved``: the legs before it that passed). The legs an order list
        ends on are alternatives, not a sum — the emulation cancels the others once one fills — so each
        is checked without its siblings' reservations (an OCO's legs; a bracket's exits); every leg stays
        reserved afterwards, the worst case for the orders that follow. A bracket's exits act only on what
        its entry filled (the emulation holds them until then and trims them to it), so their
        ``reduce_only`` is not judged against the position the entry has not changed yet: they are checked
        as the orders they are, without it (the venue still gets them reduce-only)."""
        engine = self.engine
        entry = request.legs[0] if request.list_kind == "bracket" else None
        if entry is not None and leg is entry:
            return engine.check(leg)
        siblings = [i for i in approved if i is not entry]
        parked = [engine.suspend(i.client_order_id) for i in siblings if engine.is_reserved(i.client_order_id)]
        try:
            checked = leg
            if entry is not None and leg.reduce_only and leg.side is not entry.side:
                checked = leg.model_copy(update={"reduce_only": False})
            return engine.check(checked)
        finally:
            for reservation in reversed(parked):
                engine.resume(reservation)

    def _decide(
        self, acct: _Account, request: SubmitRequest | OrderListRequest, intents: list[OrderIntent]
    ) -> list[Outgoing]:
        engine = self.engine
        decisions: list[RiskDecision] = []
        approved: list[OrderIntent] = []
        for intent in intents:
            stale = self.stale_reason(intent.exchange, intent.symbol, self._now)
            if intent.account != request.account:
                decision = self._refusal(
                    intent,
                    "request",
                    f"intent account {intent.account} differs from the request's {request.account}",
                )
            elif stale is not None:
                decision = self._refusal(intent, STALE_MARKET_DATA, stale)
            elif isinstance(request, OrderListRequest):
                decision = self._check_leg(request, intent, approved)
            else:
                decision = engine.check(intent)
            decisions.append(decision)
            if decision.approved:
                approved.append(intent)
                acct.markets.add((intent.exchange, intent.symbol))
        key = account_key(request.account)
        if len(approved) == len(intents):
            for intent in intents:
                acct.orders[intent.client_order_id] = _Tracked(intent, intent.quantity, intent.price, Decimal(0))
            out = [Outgoing(APPROVED, key, request)]
            out.extend(self._decision_out(key, decisions))
            return out
        # refused: release what the list's passing legs reserved, newest first
        for intent in reversed(approved):
            engine.undo_approval(intent.client_order_id, self._now)
        failed = next(d for d in decisions if not d.approved)
        final = [
            d
            if not d.approved
            else self._refusal(
                intent,
                "order_list",
                f"order list {getattr(request, 'list_id', request.request_id)} refused: leg {failed.intent_id} "
                f"failed {failed.rule}: {failed.reason}",
            )
            for intent, d in zip(intents, decisions, strict=True)
        ]
        notice = RejectionNotice(
            request_id=request.request_id,
            account=request.account,
            strategy=request.strategy,
            ts=request.ts,
            request=request,
            decision=RiskDecisionMessage.from_decision(failed),
        )
        out = [Outgoing(APPROVED, key, notice)]
        for intent, d in zip(intents, final, strict=True):
            out.append(
                Outgoing(REJECTED, key, RejectedIntent(intent=intent, decision=RiskDecisionMessage.from_decision(d)))
            )
        out.extend(self._decision_out(key, final))
        return out

    def _refusal(self, intent: OrderIntent, rule: str, reason: str) -> RiskDecision:
        return RiskDecision(
            intent.intent_id,
            False,
            rule,
            reason,
            self._now,
            {},
            intent.account,
            intent.strategy,
            intent.exchange,
            intent.symbol,
        )

    def _decision_out(self, key: str, decisions: Iterable[RiskDecision]) -> list[Outgoing]:
        out = []
        for decision in decisions:
            if self.recorder is not None:
                self.recorder.record(decision)
            out.append(Outgoing(DECISIONS, key, RiskDecisionMessage.from_decision(decision)))
        return out

    def _amend(self, acct: _Account, request: AmendRequest) -> list[Outgoing]:
        key = account_key(request.account)
        coid = request.client_order_id
        tracked = acct.orders.get(coid)
        engine = self.engine
        if tracked is None or not engine.is_reserved(coid):
            return [Outgoing(APPROVED, key, request)]  # not reserved here: nothing to compare with
        new_qty = request.quantity if request.quantity is not None else tracked.quantity
        new_price = request.price if request.price is not None else tracked.price
        remaining_before = tracked.quantity - tracked.filled
        remaining_after = new_qty - tracked.filled
        grows = new_qty > tracked.quantity
        if not grows and new_price is not None and tracked.price is not None:
            grows = remaining_after * new_price > remaining_before * tracked.price
        if not grows or remaining_after <= 0:
            return [Outgoing(APPROVED, key, request)]  # a decrease (execution refuses a nonsensical one)
        data = tracked.intent.model_dump()
        data.update(intent_id=request.request_id, quantity=remaining_after, price=new_price, created_at=request.ts)
        try:
            replacement = OrderIntent.model_validate(data)
        except ValidationError as exc:
            decision = self._refusal(tracked.intent, "amend", f"amendment of {coid} is not a valid order: {exc}")
            replacement = tracked.intent
        else:
            held = engine.suspend(coid)
            decision = engine.check(replacement)
            if decision.approved:
                engine.rekey(replacement.client_order_id, coid, held.intent_id)
                tracked.quantity, tracked.price = new_qty, new_price
            else:
                engine.resume(held)
        out: list[Outgoing] = []
        if decision.approved:
            out.append(Outgoing(APPROVED, key, request))
        else:
            refusal = RiskDecisionMessage.from_decision(decision)
            notice = RejectionNotice(
                request_id=request.request_id,
                account=request.account,
                strategy=request.strategy,
                ts=request.ts,
                request=request,
                decision=refusal,
            )
            out.append(Outgoing(APPROVED, key, notice))
            out.append(Outgoing(REJECTED, key, RejectedIntent(intent=replacement, decision=refusal)))
        out.extend(self._decision_out(key, [decision]))
        return out

    # --- order events ----------------------------------------------------------------------------

    def _on_order_update(self, update: OrderUpdate) -> list[Outgoing]:
        acct = self._account(update.account)
        order = update.order
        coid = order.client_order_id
        event = update.event
        if event is not None:
            seen = f"{coid}|{event.kind}|{event.event_id}"
            if seen in acct.events:
                return []
            acct.events.add(seen)
            self._now = event.ts
        else:
            self._now = order.updated_at
        acct.strategies.add(update.strategy)
        acct.markets.add((order.exchange, order.symbol))
        engine = self.engine
        if isinstance(event, OrderFilled):
            self._book_fill(acct, event.fill, update.strategy)
        if order.is_terminal:
            engine.on_order_closed(coid)
            acct.orders.pop(coid, None)
            acct.children.pop(coid, None)
            acct.closed.add(coid)
            self._adopt_children(acct, coid)
        elif coid in acct.closed:
            pass  # a stale update of an order that has ended
        elif engine.is_reserved(coid) or coid in acct.children:
            acct.orders[coid] = _Tracked.of_order(order, acct.orders.get(coid))
        else:
            child = _CHILD.match(order.intent.intent_id)
            if child is not None and engine.is_reserved(child.group("parent")):
                acct.children[coid] = child.group("parent")  # counted in its parent's reservation
            elif order.remaining_quantity > 0:
                # not approved here (a cancel-replace replacement, a recovered order): reserve what is left
                engine.on_order_open(coid, order.intent.model_copy(update={"quantity": order.remaining_quantity}))
            acct.orders[coid] = _Tracked.of_order(order, acct.orders.get(coid))
        return []

    def _adopt_children(self, acct: _Account, parent: str) -> None:
        """A parent that ended before its children: they now stand on their own reservation."""
        for child in [c for c, p in acct.children.items() if p == parent]:
            del acct.children[child]
            tracked = acct.orders.get(child)
            remaining = None if tracked is None else tracked.quantity - tracked.filled
            if tracked is not None and remaining is not None and remaining > 0:
                self.engine.on_order_open(child, tracked.intent.model_copy(update={"quantity": remaining}))

    def _book_fill(self, acct: _Account, fill: Fill, strategy: str) -> None:
        seen = f"{fill.exchange}|{fill.symbol}|{fill.fill_id}|{fill.side.value}"  # a self-trade has two legs
        if seen in acct.fills:
            return
        acct.fills.add(seen)
        self.portfolio.apply_fill(fill, account=acct.name, strategy=strategy)
        parent = acct.children.get(fill.client_order_id)
        if parent is not None and self.engine.is_reserved(parent):
            fill = fill.model_copy(update={"client_order_id": parent})
        self.engine.on_fill(fill, account=acct.name, strategy=strategy)

    def _on_venue_progress(self, progress: VenueProgress) -> list[Outgoing]:
        acct = self._account(progress.account)
        if acct.progress_ts is None or progress.ts > acct.progress_ts:
            acct.progress_ts = progress.ts
        bar = progress.bar
        if bar is not None and self.reference_prices == "progress":
            price = bar.open if progress.phase == "open" else bar.close
            self._now = progress.ts
            self._on_price(progress.exchange, progress.symbol, price, progress.ts)
        return self._release_held(acct)

    # --- prices ----------------------------------------------------------------------------------

    def _on_candle(self, bar: Bar) -> None:
        if self.reference_prices != "candles":
            return
        close_time = bar.ts + bar.tf.delta
        self._now = close_time
        self._on_price(bar.exchange, bar.symbol, bar.close, close_time)

    def _on_price(self, exchange: str, symbol: str, price: Decimal, ts: datetime) -> None:
        market = (exchange, symbol)
        known = self._prices.get(market)
        if known is not None and ts < known:
            return  # older than the price in use (a late or redelivered bar)
        self._prices[market] = ts
        self.portfolio.mark(exchange, symbol, price)
        self.engine.on_market(exchange, symbol, price)

    # --- market-data status ------------------------------------------------------------------------

    def _on_market_status(self, status: MarketStatus) -> None:
        market = (status.exchange, status.symbol)
        streams = self._status.setdefault(market, {})
        known = streams.get(status.stream)
        if known is not None and status.ts < known.ts:
            return  # an older status (redelivered, or overtaken)
        if not status.subscribed:
            streams.pop(status.stream, None)
            if not streams:
                del self._status[market]
            return
        if known is None or known.stale != status.stale:
            log.log(
                logging.WARNING if status.stale else logging.INFO,
                "risk gate: market data %s:%s %s is %s",
                status.exchange,
                status.symbol,
                status.stream,
                "STALE: new orders refused" if status.stale else "fresh",
            )
        streams[status.stream] = status

    def stale_reason(self, exchange: str, symbol: str, now: datetime) -> str | None:
        """Why new orders on the market are refused now (``None``: its market data is fresh or unknown)."""
        streams = self._status.get((exchange, symbol))
        if not streams:
            return None
        for name, status in sorted(streams.items()):
            if status.stale and name in self.blocking_streams:
                heard = status.last_received_ts
                return (
                    f"market data {exchange}:{symbol} {name} is stale: nothing for {status.stale_after_s:g}s "
                    f"(last received {heard.isoformat() if heard else 'never'})"
                )
        newest = max(streams.values(), key=lambda s: s.ts)
        expires = newest.ts + timedelta(seconds=3 * newest.heartbeat_s) + self.status_grace
        # Heartbeats are stamped with the ingest's wall clock: in a live deployment they are compared with
        # this process's wall clock, not with the event time of the request (a replay or a venue whose
        # market time runs faster than the wall clock would expire them at once).
        if (now if self.wall_clock is None else self.wall_clock()) > expires:
            return (
                f"market data {exchange}:{symbol}: no status from the ingest since {newest.ts.isoformat()} "
                f"(expected every {newest.heartbeat_s:g}s)"
            )
        return None

    def market_status(self, exchange: str, symbol: str) -> dict[str, MarketStatus]:
        """The latest status per stream of a market (empty: never heard of)."""
        return dict(self._status.get((exchange, symbol), {}))

    # --- kill switch -----------------------------------------------------------------------------

    def _on_kill_switch_command(self, command: KillSwitchCommand) -> None:
        if command.command_id in self._commands:
            return
        self._commands.add(command.command_id)
        try:
            scope = validate_scope(command.scope)
        except ValueError as exc:
            log.error("risk gate: kill-switch command %s ignored: %s", command.command_id, exc)
            return
        self._now = command.ts
        details = {"command_id": command.command_id, "source": "control"}
        if command.mode == "off":
            self.kill_switch.release(command.actor, command.reason, scope=scope, details=details)
        else:
            self.kill_switch.engage(command.mode, command.reason, command.actor, scope=scope, details=details)

    def _on_kill_switch_change(self, change: KillSwitchChange) -> None:
        self._persisted_kill[change.scope] = change.current  # a snapshot restored later must not undo it
        self._ks_counter += 1
        self._ks_seq[change.scope] = self._ks_counter

    def _record_breaches(self, breaches: Sequence[Breach]) -> None:
        """Store ``breaches`` after those a failure left unstored, oldest first. Fail closed: a breach that
        cannot be written (database outage) does not stop its halt from going out on ``control``; it is
        logged as critical, kept, and written with the next message the gate handles."""
        if self.recorder is None:
            return
        waiting, self._unrecorded = [*self._unrecorded, *breaches], []
        for n, breach in enumerate(waiting):
            try:
                self.recorder.record_breach(breach)
            except Exception as exc:
                self._unrecorded = waiting[n:]
                log.critical(
                    "risk gate: %d breach(es) not recorded yet (%r); their halt goes out anyway, retried with the "
                    "next message: %s",
                    len(self._unrecorded),
                    exc,
                    breach.reason,
                )
                return

    @property
    def unrecorded(self) -> list[Breach]:
        """Breaches acted on (kill switch engaged, command published) whose record is still to be written."""
        return list(self._unrecorded)

    def _breach_commands(self) -> list[Outgoing]:
        if not self._breaches:
            if self._unrecorded:
                self._record_breaches(())
            return []
        breaches, self._breaches[:] = list(self._breaches), []
        self._record_breaches(breaches)
        out: list[Outgoing] = []
        for breach in breaches:
            if self.publish_breaches:
                command = KillSwitchCommand(
                    command_id=f"{self.name}:{breach.rule}:{breach.scope}:{breach.ts.isoformat()}"[:128],
                    actor=self.actor,
                    ts=breach.ts,
                    scope=breach.scope,
                    mode="halt" if breach.action is KillSwitchMode.HALT else "reduce_only",
                    reason=breach.reason[:1000],
                )
                out.append(Outgoing(CONTROL, breach.scope, command))
        return out

    # --- snapshot / restore ----------------------------------------------------------------------

    def snapshot(self, key: str) -> dict[str, Any] | None:
        """The state of one account (``key`` = account), one kill-switch scope or one market."""
        if key == GLOBAL or key.startswith(("account:", "strategy:")):
            return {"v": SNAPSHOT_VERSION, **self._kill_state([key])}
        if key.startswith("market:"):
            return self._status_state(key)
        if ":" in key:
            exchange, _, symbol = key.partition(":")
            return {"v": SNAPSHOT_VERSION, "markets": self._market_state([(exchange, symbol)])}
        acct = self._accounts.get(key)
        if acct is None:
            return None
        scopes = [GLOBAL, f"account:{key}", *(f"strategy:{s}" for s in sorted(acct.strategies))]
        engine_state, engine_markets = self.engine.export_state(key)
        markets = sorted(acct.markets | engine_markets)
        return {
            "v": SNAPSHOT_VERSION,
            "account": key,
            "requests": acct.requests.dump(),
            "events": acct.events.dump(),
            "fills": acct.fills.dump(),
            "closed": acct.closed.dump(),
            "held": [request.model_dump(mode="json") for request in acct.held],
            "progress_ts": None if acct.progress_ts is None else acct.progress_ts.isoformat(),
            "orders": {coid: tracked.dump() for coid, tracked in sorted(acct.orders.items())},
            "children": dict(sorted(acct.children.items())),
            "strategies": sorted(acct.strategies),
            "traded": [list(market) for market in markets],
            "engine": engine_state,
            "portfolio": self.portfolio.export_state(key),
            "markets": self._market_state(markets),
            **self._kill_state(scopes),
        }

    def restore(self, key: str, state: dict[str, Any]) -> None:
        """Reload what :meth:`snapshot` returned (before any message of ``key``); merges by recency."""
        if state.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"risk gate snapshot version {state.get('v')!r} is not {SNAPSHOT_VERSION}")
        self._restore_markets(state.get("markets", {}))
        self._restore_status(state.get("market_status", {}))
        if "kill_switch" in state:
            self._restore_kill(state)
        account = state.get("account")
        if account is None:
            return
        acct = self._accounts[account] = _Account(account, self.dedupe_window)
        acct.requests = _Recent(self.dedupe_window, state["requests"])
        acct.events = _Recent(self.dedupe_window, state["events"])
        acct.fills = _Recent(self.dedupe_window, state["fills"])
        acct.closed = _Recent(self.dedupe_window, state["closed"])
        for data in state["held"]:
            request: PipelineRequest = _REQUEST.validate_python(data)
            acct.held.append(request)
            acct.held_ids.add(request.request_id)
        acct.progress_ts = _opt_ts(state["progress_ts"])
        acct.orders = {coid: _Tracked.load(data) for coid, data in state["orders"].items()}
        acct.children = dict(state["children"])
        acct.strategies = set(state["strategies"])
        acct.markets = {(exchange, symbol) for exchange, symbol in state["traded"]}
        self.portfolio.import_state(account, state["portfolio"])
        self.engine.import_state(account, state["engine"])

    def _kill_state(self, scopes: Iterable[str]) -> dict[str, Any]:
        states = self.kill_switch.states()
        kill: dict[str, Any] = {}
        for scope in scopes:
            ks = states.get(scope)
            if ks is None:
                continue
            kill[scope] = {
                "mode": ks.mode.value,
                "reason": ks.reason,
                "actor": ks.actor,
                "since": ks.since.isoformat(),
                "seq": self._ks_seq.get(scope, 0),
            }
        return {"kill_switch": kill, "kill_seq": self._ks_counter, "commands": self._commands.dump()}

    def _restore_kill(self, state: Mapping[str, Any]) -> None:
        for scope, data in state["kill_switch"].items():
            if data["seq"] <= self._ks_seq.get(scope, 0) and scope in self.kill_switch.states():
                continue  # what we have is as recent
            restored = KillSwitchState(
                mode=KillSwitchMode(data["mode"]), reason=data["reason"], actor=data["actor"], since=_ts(data["since"])
            )
            persisted = self._persisted_kill.get(scope)
            if persisted is not None and persisted.since >= restored.since:
                continue  # the database, read at start, has a later word on this scope
            self.kill_switch.restore(scope, restored)  # no listener: nothing changed, it is remembered
            self._ks_seq[scope] = data["seq"]
        self._ks_counter = max(self._ks_counter, int(state["kill_seq"]))
        for command_id in state["commands"]:
            if command_id not in self._commands:
                self._commands.add(command_id)

    def _market_state(self, markets: Iterable[tuple[str, str]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for exchange, symbol in markets:
            market = self.engine.export_market(exchange, symbol)
            mark = self.portfolio.mark_price(exchange, symbol)
            if market is None and mark is None:
                continue
            ts = self._prices.get((exchange, symbol))
            out[f"{exchange}|{symbol}"] = {
                "ts": None if ts is None else ts.isoformat(),
                **(market if market is not None else _NO_MARKET),
                "mark": _opt_str(mark),
            }
        return out

    def _status_state(self, key: str) -> dict[str, Any] | None:
        """The stale streams of a market (key ``market:<exchange>:<symbol>``): a stale market stays
        blocked across a restart until a fresh status arrives. Fresh ones are not kept (a heartbeat would
        rewrite the state every few seconds; unknown is fresh, and the next heartbeat follows)."""
        exchange, _, symbol = key.removeprefix("market:").partition(":")
        stale = [status for _, status in sorted(self._status.get((exchange, symbol), {}).items()) if status.stale]
        if not stale:
            return None
        return {
            "v": SNAPSHOT_VERSION,
            "market_status": [
                status.model_dump(
                    mode="json",
                    include={"exchange", "symbol", "stream", "last_received_ts", "stale_after_s", "heartbeat_s"},
                )
                for status in stale
            ],
        }

    def _restore_status(self, entries: Sequence[Mapping[str, Any]]) -> None:
        for entry in entries:
            market = (entry["exchange"], entry["symbol"])
            if entry["stream"] in self._status.get(market, {}):
                continue  # a status heard since is newer than any stored one
            self._status.setdefault(market, {})[entry["stream"]] = MarketStatus.model_validate(
                {
                    **entry,
                    "command_id": "restored",
                    "actor": self.actor,
                    "stale": True,
                    "ts": entry.get("last_received_ts") or _EPOCH,  # older than any status still to come
                }
            )

    def _restore_markets(self, markets: Mapping[str, Any]) -> None:
        engine = self.engine
        for name, data in markets.items():
            exchange, _, symbol = name.partition("|")
            ts = _opt_ts(data["ts"])
            known = self._prices.get((exchange, symbol))
            newer = ts is not None and (known is None or ts > known)  # a newer price than ours
            if ts is not None and newer:
                self._prices[(exchange, symbol)] = ts
                if data["mark"] is not None:
                    self.portfolio.restore_mark(exchange, symbol, _dec(data["mark"]))
            # not newer and no price at all: only a first order's valuation price (no market data yet)
            engine.import_market(exchange, symbol, data, newer=newer, first=ts is None and known is None)


class _OwnChangesStore:
    """The gate's kill-switch store in a live deployment: starts empty (the durable state comes in through
    ``kill_switch_at_start`` and snapshots), and writes through to ``durable`` every change the gate makes
    itself — a breach, a fail-closed halt — but not a command heard on ``control`` (``details.source``),
    whose sender stored it already."""

    def __init__(self, durable: KillSwitchStorage) -> None:
        self._durable = durable
        self._memory = InMemoryKillSwitchStore()

    def load(self) -> dict[str, KillSwitchState]:
        return self._memory.load()

    def save(self, change: KillSwitchChange) -> None:
        if change.details.get("source") != "control":
            self._durable.save(change)  # raises when it cannot be written: KillSwitch holds and retries
        self._memory.save(change)


class _EngineSink:
    """The engine's recorder: breaches are collected (the gate records and publishes them); decisions
    are recorded by the gate itself, once final (a list leg approved then released is a refusal)."""

    def __init__(self, breaches: list[Breach]) -> None:
        self._breaches = breaches

    def record(self, decision: RiskDecision) -> None:
        pass

    def record_breach(self, breach: Breach) -> None:
        self._breaches.append(breach)


__all__ = ["APPROVED", "CANDLES", "CONTROL", "DECISIONS", "EVENTS", "INTENTS", "REJECTED", "RiskGate"]
