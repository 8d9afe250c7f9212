"""``ExecutionService``: the execution stage — the real ``OrderManager`` over a venue driver.

Inputs ``orders.approved`` (requests, progress markers, rejection notices; key: account),
``md.candles.1m`` (the bars that move a simulated venue) and ``control``; outputs ``orders.events``
(``OrderUpdate`` for every stored order change — state, event, owning instance — and ``VenueProgress``),
``fills`` (``AccountFill``) and ``positions``.

One *lane* per account: a ``VenueDriver`` (``meltica.live.venue``: :class:`SimulatedVenueDriver` here, the
emulator driver in ``meltica.live.emulator_driver``), an ``OrderManager`` on the driver's adapter and
clock, the ``LocalOrderEmulator`` for order lists and types the venue lacks, a ``Portfolio`` fed by the
OMS. Requests are carried out by the backtest's own ``RequestExecutor`` (``meltica.sim.executor``), and
the paper venue is stepped by the backtest's own ``BarStep`` (``meltica.sim.step``), so a request and a
bar do here exactly what they do in a backtest.

Lock-step (``meltica/live/README.md``), per account and market: requests are held; a bar is stepped
only when every instance trading the market acknowledged the last step (``StrategyProgress.seq``). A
bar whose open some held request has reached (``request.ts + latency <= bar.ts``): ``open`` step —
driver ``open(bar)`` (clock to the open, open printed), arrived requests sent in order, updates
published, ``VenueProgress(open)``; repeated while reactions arrive in time. Then the ``close`` step:
driver ``path(bar)`` (path, clock to the close, GTD expiry), the emulator sees the bar, updates,
``VenueProgress(close, bar)``. ``EndOfReplayCommand``: once the last bar is closed, one more step is
awaited (the strategies' ``on_stop``), then the end of the data as in a backtest (held cancels are
delivered, held new orders and amendments end ``cancelled`` / ``END_OF_DATA``) and
``VenueProgress(end)``. A ``RejectionNotice`` is carried out in its place in the queue: the order is
stored ``rejected`` (reason from the decision) and reported; for a refused amend, its replacement (the
``replacement_client_order_id`` the strategy was told) is stored ``rejected`` as a child of the order,
which stays as it was — as when the venue refuses an amendment.

Live (``lockstep=False``): requests go to the OMS on arrival; a :class:`SimulatedVenueDriver` is moved by every
bar; a ``LiveDriver`` (``meltica.live.live_driver``: a real venue, the emulator in its own time) feeds
the venue's user stream (and its REST poll when the stream is stale) to the OMS in the background, and
those updates are published through ``emit``. Every bar marks the portfolio (its close): positions are
published with ``mark_price`` and ``unrealized_pnl_at_mark``. With a store, ``start()`` recovers every
order in flight and runs ``on_lane_start`` before any request is taken.

Kill switch ``halt``: the OMS cancels every open order of the scope (updates published) and refuses new
ones while halted. At least once: a request id handled before is dropped, bars by time per market,
commands by id; the OMS refuses a second order with a known client order id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter

from meltica.adapters.base import ExchangeAdapter, UserEvent
from meltica.adapters.in_process import IN_PROCESS_CAPABILITIES
from meltica.domain import (
    Bar,
    Instrument,
    Order,
    OrderCancelled,
    OrderEvent,
    OrderFilled,
    OrderIntent,
    OrderRejected,
    OrderStatus,
    OrderSubmitted,
)
from meltica.domain.orders import CLIENT_ORDER_ID_PREFIX
from meltica.domain.portfolio import Position
from meltica.errors import MelticaError, OrderNotFoundError
from meltica.execution import OrderManager
from meltica.execution.emulation import (
    EmulationStore,
    LocalOrderEmulator,
    ManagedOrder,
    MemoryEmulationStore,
    held_order_view,
)
from meltica.execution.recovery import LOST_AT_RESTART
from meltica.execution.store import OrderStoreProtocol
from meltica.live.config import PipelineConfig
from meltica.live.live_driver import LiveDriver
from meltica.live.processor import Emit, Incoming, Outgoing
from meltica.live.simulated_driver import SimulatedVenueDriver
from meltica.live.venue import VenueDriver
from meltica.messaging.catalogue import account_key, market_key, position_key
from meltica.messaging.schemas import (
    AccountFill,
    AmendRequest,
    ApprovedMessage,
    CancelRequest,
    EndOfReplayCommand,
    KillSwitchCommand,
    OrderListRequest,
    OrderUpdate,
    PipelineRequest,
    RejectionNotice,
    StrategyCommand,
    StrategyProgress,
    SubmitRequest,
    VenueProgress,
)
from meltica.portfolio import Portfolio
from meltica.risk import InMemoryKillSwitchStore, KillSwitch, KillSwitchMode, KillSwitchState
from meltica.sim.executor import HeldRequest, RequestExecutor
from meltica.sim.store import NotifyingEmulationStore, NotifyingOrderStore
from meltica.sim.venue import UserEventHandler

log = logging.getLogger(__name__)

EVENTS, FILLS, POSITIONS = "orders.events", "fills", "positions"
LaneStartHook = Callable[[str, ExchangeAdapter, OrderManager, Portfolio], Awaitable[None]]
"""``hook(account, adapter, oms, portfolio)``: run per account after the driver started and the OMS
recovered its orders, before any request is accepted (e.g. a start-up reconciliation)."""
_KEEP_IDS = 20_000  # request ids remembered (and snapshotted) for dropping redeliveries
_APPROVED: TypeAdapter[Any] = TypeAdapter(ApprovedMessage)


class _KillSwitchView:
    """What the OMS reads of the kill switch (``effective``); its halt cancellations are ours, awaited
    in ``handle`` (the OMS would run them in the background), so ``subscribe`` is a no-op. ``engage``
    is the OMS's fail-closed path (a risk or portfolio hook raised): the lane halts at once."""

    def __init__(self, switch: KillSwitch) -> None:
        self.switch = switch

    def effective(self, account: str, strategy: str) -> tuple[Any, str]:
        return self.switch.effective(account, strategy)

    def engage(
        self,
        mode: Any,
        reason: str,
        actor: str | None = None,
        *,
        scope: str = "global",
        details: Mapping[str, object] | None = None,
    ) -> Any:
        return self.switch.engage(mode, reason, actor, scope=scope, details=details)

    def subscribe(self, callback: Callable[[Any], Any]) -> Callable[[], None]:
        return lambda: None


# --- lanes ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _LockStepMarket:
    """Lock-step state of one market of one account."""

    exchange: str
    symbol: str
    instances: set[str]
    acks: dict[str, int] = dataclasses.field(default_factory=dict)
    seq: int = 0
    held: deque[PipelineRequest] = dataclasses.field(default_factory=deque)
    bars: deque[Bar] = dataclasses.field(default_factory=deque)
    current: Bar | None = None
    last_ts: datetime | None = None  # last bar taken (drop older ones)
    done_ts: datetime | None = None  # last bar closed
    end: EndOfReplayCommand | None = None
    end_seq: int | None = None
    ended: bool = False

    @property
    def key(self) -> str:
        return market_key(self.exchange, self.symbol)

    def all_acked(self) -> bool:
        return all(self.acks.get(i, -1) >= self.seq for i in self.instances)

    def replay_done(self) -> bool:
        end = self.end
        if end is None:
            return False
        if end.last_ts is None or end.count == 0:
            return not self.bars and self.current is None
        return self.done_ts is not None and self.done_ts >= end.last_ts and not self.bars and self.current is None


class _Lane:
    """One account: driver, OMS, emulator, portfolio, kill switch, markets."""

    def __init__(
        self,
        account: str,
        driver: VenueDriver,
        store: Any,
        *,
        latency: timedelta,
        markets: Mapping[str, _LockStepMarket],
        service: ExecutionService,
        emulation_store: EmulationStore,
    ) -> None:
        self.account = account
        self.driver = driver
        self.latency = latency
        self.markets: dict[str, _LockStepMarket] = dict(markets)
        clock = driver.now
        self.portfolio = Portfolio(clock=clock)
        self.kill_switch = KillSwitch(InMemoryKillSwitchStore(), clock=clock)
        self.oms = OrderManager(
            store,
            {account: driver.adapter},
            clock=clock,
            portfolio=self.portfolio,
            kill_switch=_KillSwitchView(self.kill_switch),
        )
        exchange = driver.adapter.exchange_id
        instruments = {
            (exchange, m.symbol): i for m in self.markets.values() if (i := service.instrument(exchange, m.symbol))
        }
        self.emulator = LocalOrderEmulator(
            # every change of a held order (a list leg the venue does not take) is published as its view
            NotifyingEmulationStore(partial(service.on_held_change, account), emulation_store),
            clock,
            self.oms.submit_native,
            self.oms.cancel,
            capabilities={account: getattr(driver.adapter, "capabilities", IN_PROCESS_CAPABILITIES)},
            instruments=instruments,
        )
        self.oms.emulator = self.emulator
        self.requested: dict[str, Order] = {}  # orders known from requests, not (yet) in the store
        # lock-step: client order id -> symbol (which market's queue a cancel or amend joins); an order that
        # ended is forgotten _KEEP_IDS terminal orders later (the OMS still knows it): bounded, as it is in
        # every snapshot
        self.symbol_of: dict[str, str] = {}
        self.ended: dict[str, None] = {}  # terminal orders still in symbol_of, oldest first
        self.emulated_active = False
        self.executor = RequestExecutor(
            self.oms,
            self.emulator,
            store,
            known=self.known,
            local_cancel=service.local_cancel,
            logger=log,
        )

    def known(self, client_order_id: str) -> Order | None:
        try:
            return self.oms.order(client_order_id)
        except OrderNotFoundError:
            return self.requested.get(client_order_id)

    def order_ended(self, client_order_id: str) -> None:
        if client_order_id not in self.symbol_of or client_order_id in self.ended:
            return
        self.ended[client_order_id] = None
        if len(self.ended) > _KEEP_IDS:
            oldest = next(iter(self.ended))
            del self.ended[oldest]
            self.symbol_of.pop(oldest, None)


def _announced(intent: OrderIntent, ts: datetime) -> Order:
    """The order as its strategy announced it (``pending_submit`` at the decision time)."""
    coid = intent.client_order_id
    return Order.from_intent(intent).apply(OrderSubmitted(event_id="submitted", client_order_id=coid, ts=ts))


class ExecutionService:
    """The execution stage (module docstring). ``drivers``: one per account; ``store``: the OMS store
    (default in memory; the PostgreSQL ``meltica.execution.store.OrderStore`` for restart safety — open
    orders are then recovered from it on ``start``); ``kill_switch_at_start``: the persisted kill-switch
    state (``KillSwitchStore.load()``) read when the worker starts — every lane obeys it at once, and a lane
    under ``halt`` cancels its open orders on ``start`` (a command sent while no worker ran is not lost);
    ``emulation_store(account)``: where that account's local order emulation keeps the orders it holds
    (stops and trailing stops a venue does not take, order-list legs; default in memory;
    ``meltica.execution.emulation_store.DurableHeldOrderStore`` keeps the OMS's in PostgreSQL, so that they
    are restored on ``start`` with the rest of the recovery — held in memory, they are lost with the
    process)."""

    name = "execution"
    inputs: tuple[str, ...] = ("orders.approved", "md.candles.1m", "control")

    def __init__(
        self,
        config: PipelineConfig,
        drivers: Mapping[str, VenueDriver],
        *,
        store: OrderStoreProtocol | None = None,
        on_lane_start: LaneStartHook | None = None,
        logger: logging.Logger | None = None,
        kill_switch_at_start: Mapping[str, KillSwitchState] | None = None,
        emulation_store: Callable[[str], EmulationStore] | None = None,
    ) -> None:
        self.config = config
        self.on_lane_start = on_lane_start
        self.lockstep = config.lockstep
        self._log = logger or log
        self._changes: list[tuple[Order, OrderEvent | None, bool]] = []  # (order, event, held)
        self._recover = store is not None
        self.store = NotifyingOrderStore(self._on_stored, store)
        self._instruments = {(i.exchange, i.symbol): i for a in config.account_names() for i in config.instruments(a)}
        self.lanes: dict[str, _Lane] = {}
        for account, driver in drivers.items():
            markets: dict[str, _LockStepMarket] = {}
            for inst in config.instances:
                if inst.account != account:
                    continue
                for symbol in inst.symbols:
                    key = market_key(inst.exchange, symbol)
                    markets.setdefault(key, _LockStepMarket(inst.exchange, symbol, set())).instances.add(
                        inst.instance_id
                    )
            latency = config.account(account).latency if account in config.account_names() else timedelta(0)
            held_store = MemoryEmulationStore() if emulation_store is None else emulation_store(account)
            lane = _Lane(
                account,
                driver,
                self.store,
                latency=latency,
                markets=markets,
                service=self,
                emulation_store=held_store,
            )
            for scope, state in (kill_switch_at_start or {}).items():
                lane.kill_switch.restore(scope, state)  # the durable state, as it was when the worker started
            if hasattr(driver, "on_user_event"):  # the driver owns the user stream (meltica.live.venue)
                driver.on_user_event = self._user_event_handler(lane)
            if isinstance(driver, LiveDriver):  # its REST poll looks up the orders the OMS holds open
                driver.open_orders = lane.oms.open_orders
                driver.watch(m.symbol for m in markets.values())
            self.lanes[account] = lane
        self._handled: deque[str] = deque(maxlen=_KEEP_IDS)
        self._handled_set: set[str] = set()
        self._handled_count = 0  # request ids ever remembered (the last _KEEP_IDS are in _handled)
        # per account: (the numbers and ids of its request ids among _handled, how many remembered ids it has seen),
        # brought up to date at each snapshot from the ids remembered since: a snapshot no longer filters all
        # _KEEP_IDS ids again (its cost grew with the ids remembered, up to 20,000, every checkpoint)
        self._handled_of: dict[str, tuple[deque[int], deque[str], int]] = {}
        self._commands: deque[str] = deque(maxlen=10_000)
        self._emit: Emit | None = None
        self._in_handle = False
        self._flush_task: asyncio.Task[None] | None = None
        self._halt_retries: dict[tuple[str, str], asyncio.Task[None]] = {}  # (account, scope) -> retry loop

    @classmethod
    def simulated(cls, config: PipelineConfig, *, store: OrderStoreProtocol | None = None) -> ExecutionService:
        """A service with a :class:`SimulatedVenueDriver` for every account of ``config``."""
        drivers = {account: SimulatedVenueDriver.from_config(config, account) for account in config.account_names()}
        return cls(config, drivers, store=store)

    def instrument(self, exchange: str, symbol: str) -> Instrument | None:
        return self._instruments.get((exchange, symbol))

    # --- Processor ---------------------------------------------------------------------------
    async def start(self, emit: Emit) -> None:
        """Per account: start the driver (an unreachable venue raises: the stage does not run), recover
        every order in flight from the store against the venue, run ``on_lane_start``; only then are
        requests taken. Any failure raises (fail closed)."""
        self._emit = emit
        for lane in self.lanes.values():
            await lane.driver.start()
            if self._recover:
                self._in_handle = True
                try:
                    report = await lane.oms.recover()
                finally:
                    self._in_handle = False
                for out in self._flush():
                    await emit(out)
                held = lane.emulator.orders()
                if held:  # restored from the emulation store: they watch the market again from the next bar
                    lane.emulated_active = True
                self._log.info(
                    "execution %s: recovery %s; %d order(s) held by the local emulation",
                    lane.account,
                    report.summary(),
                    len(held),
                )
                unresolved = report.outcome("unresolved")
                if unresolved:
                    raise MelticaError(
                        f"execution {lane.account}: {len(unresolved)} order(s) in flight could not be checked "
                        f"against the venue ({', '.join(o.client_order_id for o in unresolved)}): not starting",
                        reason="recovery_incomplete",
                    )
            if self.on_lane_start is not None:
                self._in_handle = True
                try:
                    await self.on_lane_start(lane.account, lane.driver.adapter, lane.oms, lane.portfolio)
                finally:
                    self._in_handle = False
                for out in self._flush():
                    await emit(out)
            await self._halt_at_start(lane, emit)

    async def stop(self) -> None:
        for task in self._halt_retries.values():
            task.cancel()
        await asyncio.gather(*self._halt_retries.values(), return_exceptions=True)
        self._halt_retries.clear()
        for lane in self.lanes.values():
            await lane.driver.stop()
        if self._flush_task is not None:
            await self._flush_task
        self._emit = None

    def health(self) -> dict[str, Any]:
        """Per account, the driver's health (a ``LiveDriver``'s: connection, stream, polls, last error)."""
        out: dict[str, Any] = {}
        for account, lane in self.lanes.items():
            report = getattr(lane.driver, "health", None)
            out[account] = report() if callable(report) else {"driver": type(lane.driver).__name__}
        return out

    def _user_event_handler(self, lane: _Lane) -> UserEventHandler:
        async def handle(event: UserEvent) -> None:
            try:
                await lane.oms.on_user_event(event, account=lane.account)
            except Exception as exc:
                # A venue fact we could not apply (e.g. the database is away): no new order for the
                # account until an operator releases it; the driver records it and delivers it again.
                reason = f"user event could not be applied: {type(exc).__name__}: {exc}"
                self._log.critical("execution %s: %s: account halted", lane.account, reason)
                lane.kill_switch.engage("halt", reason, "execution", scope=f"account:{lane.account}")
                raise

        return handle

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        self._in_handle = True
        try:
            return await self._handle(message.value)
        finally:
            self._in_handle = False

    async def _handle(self, value: BaseModel) -> list[Outgoing]:
        if isinstance(value, StrategyProgress):
            return await self._on_progress(value)
        if isinstance(value, PipelineRequest):
            if value.request_id in self._handled_set:
                return []
            self._remember(value.request_id)
            return await self._on_request(value)
        if isinstance(value, Bar):
            return await self._on_bar(value)
        if isinstance(value, (KillSwitchCommand, EndOfReplayCommand, StrategyCommand)):
            if value.command_id in self._commands:
                return []
            self._commands.append(value.command_id)
            if isinstance(value, KillSwitchCommand):
                return await self._on_kill_switch(value)
            if isinstance(value, EndOfReplayCommand):
                return await self._on_end(value)
        return []

    def _remember(self, request_id: str) -> None:
        if len(self._handled) == self._handled.maxlen:
            self._handled_set.discard(self._handled[0])
        self._handled.append(request_id)
        self._handled_set.add(request_id)
        self._handled_count += 1

    # --- publishing ----------------------------------------------------------------------------
    def _on_stored(self, order: Order, event: OrderEvent | None) -> None:
        lane = self.lanes.get(order.account)
        if lane is not None:
            lane.requested.pop(order.client_order_id, None)
            if order.is_terminal and self.lockstep:
                lane.order_ended(order.client_order_id)
        self._changes.append((order, event, False))
        self._schedule_flush()

    def on_held_change(self, account: str, held: ManagedOrder) -> None:
        """A change of an order ``account``'s local order emulation holds. A leg held here (``mode``
        "emulated") never reaches the OMS or the venue under its own id — its child orders do — so its
        strategy, and the risk gate's reservation, follow the emulation: the leg's view
        (:func:`held_order_view`) is published as an ``OrderUpdate`` with ``held`` set."""
        coid = held.client_order_id
        lane = self.lanes.get(account)
        if lane is None or held.mode != "emulated" or held.list_id is None:
            return  # a native leg (it is the venue order) or an emulated order of the OMS's: the OMS tells
        before = lane.requested.get(coid)
        if before is None:
            return
        view = held_order_view(held, before, lane.known, lane.driver.now())
        if view is None or (view.status is before.status and view.filled_quantity == before.filled_quantity):
            return
        lane.requested[coid] = view  # what a later request about the leg finds (``known``)
        if view.is_terminal and self.lockstep:
            lane.order_ended(coid)
        self._changes.append((view, None, True))
        self._schedule_flush()

    def _end_lost_legs(self, lane: _Lane) -> None:
        """After a restart (or a partition taken over from another worker): the order-list legs this
        lane's emulation held before — their last view is not ``pending_submit`` — that it does not hold
        now (kept in memory, they went with the process) are over. Their strategies, and the risk gate's
        reservations, are told so — cancelled, with why — rather than left waiting on exits nobody
        watches."""
        held = {o.client_order_id for o in lane.emulator.orders()}
        now = lane.driver.now()
        for coid, order in list(lane.requested.items()):
            if order.is_terminal or order.status is OrderStatus.PENDING_SUBMIT or coid in held:
                continue
            if self.store.get(coid) is not None:
                continue  # the OMS's: recovery settled it
            cancelled = order.apply(
                OrderCancelled(event_id="lost-at-restart", client_order_id=coid, ts=now, reason=LOST_AT_RESTART)
            )
            lane.requested[coid] = cancelled
            self._changes.append((cancelled, None, True))
            self._log.error("execution %s: order-list leg %s %s", lane.account, coid, LOST_AT_RESTART)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._in_handle and self._emit is not None and self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        """Changes made by a venue's user stream between messages: published through ``emit``."""
        await asyncio.sleep(0)
        self._flush_task = None
        if self._emit is None:
            return
        for out in self._flush():
            await self._emit(out)

    def local_cancel(self, order: Order, reason: str) -> None:
        lane = self.lanes[order.account]
        coid = order.client_order_id
        event = OrderCancelled(event_id="cancelled", client_order_id=coid, ts=lane.driver.now(), reason=reason)
        cancelled = order.apply(event)
        lane.requested[coid] = cancelled
        if self.lockstep:
            lane.order_ended(coid)
        self._changes.append((cancelled, event, False))

    def _flush(self) -> list[Outgoing]:
        """The buffered order changes as messages: updates and fills in order, then the positions."""
        changes, self._changes = self._changes, []
        out: list[Outgoing] = []
        touched: dict[str, tuple[str, str, str, str]] = {}
        for order, event, held in changes:
            account = order.account
            strategy = order.intent.strategy
            key = account_key(account)
            update = OrderUpdate(account=account, strategy=strategy, order=order, event=event, held=held)
            out.append(Outgoing(EVENTS, key, update))
            if isinstance(event, OrderFilled):
                out.append(Outgoing(FILLS, key, AccountFill(account=account, strategy=strategy, fill=event.fill)))
                fill = event.fill
                touched[position_key(account, fill.exchange, fill.symbol, strategy)] = (
                    account,
                    fill.exchange,
                    fill.symbol,
                    strategy,
                )
        for pkey, (account, exchange, symbol, strategy) in touched.items():
            lane = self.lanes.get(account)
            if lane is not None:
                out.append(Outgoing(POSITIONS, pkey, self._position(lane, exchange, symbol, strategy)))
        return out

    def _position(self, lane: _Lane, exchange: str, symbol: str, strategy: str) -> Position:
        """The strategy's position; live, with the mark price and the unrealized PnL at it."""
        position = lane.portfolio.position(lane.account, exchange, symbol, strategy=strategy)
        mark = None if self.lockstep else lane.portfolio.mark_price(exchange, symbol)
        if mark is None:
            return position
        return position.model_copy(update={"mark_price": mark, "unrealized_pnl_at_mark": position.unrealized_pnl(mark)})

    def _marked(self, lane: _Lane, bar: Bar) -> list[Outgoing]:
        """Live: mark the lane's portfolio with ``bar``'s close; every traded position of that market is
        published again with its new mark."""
        if lane.portfolio.mark_price(bar.exchange, bar.symbol) == bar.close:
            return []
        lane.portfolio.mark(bar.exchange, bar.symbol, bar.close)
        out: list[Outgoing] = []
        for strategy in lane.portfolio.strategies(lane.account):
            position = lane.portfolio.position(lane.account, bar.exchange, bar.symbol, strategy=strategy)
            if position.fill_count == 0:
                continue
            pkey = position_key(lane.account, bar.exchange, bar.symbol, strategy)
            out.append(Outgoing(POSITIONS, pkey, self._position(lane, bar.exchange, bar.symbol, strategy)))
        return out

    def _venue_progress(
        self, lane: _Lane, market: _LockStepMarket, phase: Literal["open", "close", "end"], bar: Bar | None
    ) -> Outgoing:
        progress = VenueProgress(
            account=lane.account,
            exchange=market.exchange,
            symbol=market.symbol,
            seq=market.seq,
            phase=phase,
            bar=bar,
            ts=lane.driver.now(),
        )
        return Outgoing(EVENTS, account_key(lane.account), progress)

    # --- requests ------------------------------------------------------------------------------
    def _market_of(self, lane: _Lane, request: PipelineRequest) -> _LockStepMarket | None:
        symbol: str | None = None
        if isinstance(request, SubmitRequest):
            symbol = request.intent.symbol
        elif isinstance(request, OrderListRequest):
            symbol = request.legs[0].symbol
        elif isinstance(request, RejectionNotice) and not isinstance(request.request, AmendRequest):
            inner = request.request
            symbol = inner.intent.symbol if isinstance(inner, SubmitRequest) else inner.legs[0].symbol
        elif isinstance(request, (CancelRequest, AmendRequest, RejectionNotice)):
            target = request.request if isinstance(request, RejectionNotice) else request
            assert isinstance(target, CancelRequest | AmendRequest)
            symbol = lane.symbol_of.get(target.client_order_id)
            if symbol is None:
                order = lane.known(target.client_order_id)
                symbol = None if order is None else order.intent.symbol
        for market in lane.markets.values():
            if market.symbol == symbol:
                return market
        return next(iter(lane.markets.values()), None)

    def _note(self, lane: _Lane, request: PipelineRequest) -> None:
        """Remember the orders a request announces (they exist for their strategy from now on)."""
        if isinstance(request, SubmitRequest):
            intents: Sequence[OrderIntent] = (request.intent,)
        elif isinstance(request, OrderListRequest):
            intents = request.legs
        else:
            return
        lockstep = self.lockstep
        for intent in intents:
            coid = intent.client_order_id
            if lockstep:  # (live requests go out at once: no market queue to choose)
                lane.symbol_of[coid] = intent.symbol
            if lane.known(coid) is None:
                lane.requested[coid] = _announced(intent, request.ts)

    async def _on_request(self, request: PipelineRequest) -> list[Outgoing]:
        lane = self.lanes.get(request.account)
        if lane is None:
            self._log.warning("request %s for unknown account %s dropped", request.request_id, request.account)
            return []
        untrusted = lane.driver.untrusted()
        if untrusted is not None:
            # Fail closed: nothing more goes to a venue whose account state is unknown. The stage fails, so
            # the worker stops; its restart reconciles the account before it trades again.
            self._log.critical(
                "request %s for %s refused: the venue cannot be trusted: %s",
                request.request_id,
                request.account,
                untrusted,
            )
            raise untrusted
        self._note(lane, request)
        market = self._market_of(lane, request) if self.lockstep else None
        if market is not None:
            market.held.append(request)
            return await self._advance(lane, market)
        await self._carry_out(lane, request)
        await lane.driver.settle()
        return self._flush()

    def _held(self, request: PipelineRequest, arrival: datetime) -> HeldRequest | None:
        if isinstance(request, SubmitRequest):
            return HeldRequest(arrival, "submit", request.intent.client_order_id, intent=request.intent)
        if isinstance(request, OrderListRequest):
            return HeldRequest(
                arrival, "list", intents=request.legs, list_id=request.list_id, list_kind=request.list_kind
            )
        if isinstance(request, CancelRequest):
            return HeldRequest(arrival, "cancel", request.client_order_id)
        if isinstance(request, AmendRequest):
            return HeldRequest(
                arrival, "amend", request.client_order_id, price=request.price, quantity=request.quantity
            )
        return None

    async def _carry_out(self, lane: _Lane, request: PipelineRequest) -> None:
        if isinstance(request, RejectionNotice):
            self._reject(lane, request)
            return
        held = self._held(request, request.ts + lane.latency)
        if held is not None and await lane.executor.execute(held):
            lane.emulated_active = True

    def _reject(self, lane: _Lane, notice: RejectionNotice) -> None:
        inner = notice.request
        decision = notice.decision
        reason = f"risk: {decision.rule}: {decision.reason}"
        if isinstance(inner, AmendRequest):
            self._reject_amend(lane, inner, reason)
            return
        intents = (inner.intent,) if isinstance(inner, SubmitRequest) else inner.legs
        for intent in intents:
            coid = intent.client_order_id
            if lane.oms.store.get(coid) is not None:
                continue
            event = OrderRejected(event_id="rejected", client_order_id=coid, ts=lane.driver.now(), reason=reason)
            self.store.insert_order(Order.from_intent(intent).apply(event), event)

    def _reject_amend(self, lane: _Lane, amend: AmendRequest, reason: str) -> None:
        """A refused amend reaches the strategy as its replacement order ``rejected`` (the OMS records it as
        a child of the order, so the next amend gets the next replacement id); the order is unchanged."""
        coid = amend.client_order_id
        carrier = amend.replacement_client_order_id
        order = lane.oms.store.get(coid)
        if carrier is not None and lane.oms.store.get(carrier) is not None:
            return  # recorded before: a redelivered notice
        if order is None or carrier is None or carrier == coid:
            # nothing the strategy was told to wait for: it still must not be silent
            self._log.warning("amend of %s refused (%s); no replacement to report", coid, reason)
            return
        try:
            rejected = lane.oms.refuse_amend(coid, price=amend.price, quantity=amend.quantity, reason=reason)
        except MelticaError as exc:
            self._log.warning("amend of %s refused (%s); its replacement cannot be recorded: %s", coid, reason, exc)
            return
        if rejected.client_order_id != carrier:
            self._log.warning(
                "amend of %s refused: the strategy expects replacement %s, recorded as %s",
                coid,
                carrier,
                rejected.client_order_id,
            )

    # --- lock-step -----------------------------------------------------------------------------
    async def _on_progress(self, progress: StrategyProgress) -> list[Outgoing]:
        lane = self.lanes.get(progress.account)
        if lane is None:
            return []
        out: list[Outgoing] = []
        for market in list(lane.markets.values()):
            if market.exchange != progress.exchange or progress.symbol not in (None, market.symbol):
                continue
            if progress.strategy not in market.instances:
                # an instance started at run time joins from the current step on
                market.instances.add(progress.strategy)
                market.acks[progress.strategy] = max(progress.seq, market.seq)
            else:
                market.acks[progress.strategy] = max(market.acks.get(progress.strategy, -1), progress.seq)
            if self.lockstep:
                out += await self._advance(lane, market)
        return out

    async def _on_bar(self, bar: Bar) -> list[Outgoing]:
        out: list[Outgoing] = []
        key = market_key(bar.exchange, bar.symbol)
        for lane in self.lanes.values():
            market = lane.markets.get(key)
            if market is None or (market.last_ts is not None and bar.ts <= market.last_ts):
                continue
            market.last_ts = bar.ts
            if self.lockstep:
                market.bars.append(bar)
                out += await self._advance(lane, market)
            else:
                if isinstance(lane.driver, SimulatedVenueDriver):
                    await lane.driver.open(bar)
                    await self._close(lane, bar)
                    out += self._flush()
                elif lane.emulated_active:  # locally held orders (stops, trailing …) watch the market
                    await lane.oms.on_market_data(bar)
                    await lane.driver.settle()
                    lane.emulated_active = bool(lane.emulator.orders())
                    out += self._flush()
                out += self._marked(lane, bar)
        return out

    def _releasable(self, lane: _Lane, market: _LockStepMarket, ts: datetime) -> bool:
        return bool(market.held) and market.held[0].ts + lane.latency <= ts

    async def _release(self, lane: _Lane, market: _LockStepMarket, ts: datetime) -> None:
        held = market.held
        while held and held[0].ts + lane.latency <= ts:
            await self._carry_out(lane, held.popleft())
        await lane.driver.settle()

    async def _close(self, lane: _Lane, bar: Bar) -> None:
        await lane.driver.path(bar)
        await lane.driver.settle()
        if lane.emulated_active:
            await lane.oms.on_market_data(bar)
            await lane.driver.settle()
            lane.emulated_active = bool(lane.emulator.orders())

    async def _advance(self, lane: _Lane, market: _LockStepMarket) -> list[Outgoing]:
        """Take every step the acknowledgements allow (module docstring)."""
        out: list[Outgoing] = []
        while not market.ended and market.all_acked():
            bar = market.current
            if bar is not None:
                if self._releasable(lane, market, bar.ts):  # reactions that reached this open
                    await self._release(lane, market, bar.ts)
                    market.seq += 1
                    out += self._flush()
                    out.append(self._venue_progress(lane, market, "open", bar))
                    continue
                await self._close(lane, bar)
                market.current = None
                market.done_ts = bar.ts
                market.seq += 1
                out += self._flush()
                out.append(self._venue_progress(lane, market, "close", bar))
                continue
            if market.bars:
                bar = market.bars.popleft()
                market.current = bar
                if self._releasable(lane, market, bar.ts):
                    await lane.driver.open(bar)
                    await self._release(lane, market, bar.ts)
                    market.seq += 1
                    out += self._flush()
                    out.append(self._venue_progress(lane, market, "open", bar))
                continue
            if market.replay_done():
                if market.end_seq is None:  # one more step: the strategies' on_stop
                    market.seq += 1
                    market.end_seq = market.seq
                    continue
                await self._end_of_data(lane, market)
                out += self._flush()
                out.append(self._venue_progress(lane, market, "end", None))
                market.ended = True
            break
        return out

    async def _end_of_data(self, lane: _Lane, market: _LockStepMarket) -> None:
        held: deque[HeldRequest] = deque()
        while market.held:
            request = market.held.popleft()
            if isinstance(request, RejectionNotice):
                self._reject(lane, request)
                continue
            converted = self._held(request, request.ts + lane.latency)
            if converted is not None:
                held.append(converted)
        await lane.executor.end_of_data(held)
        await lane.driver.settle()

    async def _on_end(self, command: EndOfReplayCommand) -> list[Outgoing]:
        out: list[Outgoing] = []
        key = market_key(command.exchange, command.symbol)
        for lane in self.lanes.values():
            market = lane.markets.get(key)
            if market is None or market.end is not None:
                continue
            market.end = command
            if self.lockstep:
                out += await self._advance(lane, market)
            else:
                market.seq += 1
                market.ended = True
                out.append(self._venue_progress(lane, market, "end", None))
        return out

    # --- kill switch ---------------------------------------------------------------------------
    async def _halt_at_start(self, lane: _Lane, emit: Emit) -> None:
        """A lane halted by the persisted kill switch cancels the open orders of the halted scopes."""
        for scope, mode in list(lane.kill_switch.active.items()):
            kind, _, name = scope.partition(":")
            if mode is not KillSwitchMode.HALT or (kind == "account" and name != lane.account):
                continue
            filters: dict[str, str] = {"account": lane.account}
            if kind == "strategy" and name:
                filters["strategy"] = name
            self._log.warning("execution %s: kill switch %s is halt at start: cancelling", lane.account, scope)
            self._in_handle = True
            try:
                await lane.oms.cancel_all(reason=f"kill switch halt ({scope})", **filters)
                await lane.driver.settle()
            finally:
                self._in_handle = False
            for out in self._flush():
                await emit(out)

    async def _on_kill_switch(self, command: KillSwitchCommand) -> list[Outgoing]:
        kind, _, name = command.scope.partition(":")
        for lane in self.lanes.values():
            if kind == "account" and name != lane.account:
                continue
            if command.mode == "off":
                lane.kill_switch.release(command.actor, command.reason, scope=command.scope)
                continue
            lane.kill_switch.engage(command.mode, command.reason, command.actor, scope=command.scope)
            if command.mode != "halt":
                continue
            filters: dict[str, str] = {"account": lane.account}
            if kind == "strategy" and name:
                filters["strategy"] = name
            reason = f"kill switch halt ({command.scope})"
            self._log.warning(
                "execution %s: %s by %s: cancelling every open order", lane.account, reason, command.actor
            )
            await self._cancel_scope(lane, reason, filters)
            if self._still_open(lane, filters):
                self._retry_halt(lane, command.scope, reason, filters)
        return self._flush()

    async def _cancel_scope(self, lane: _Lane, reason: str, filters: Mapping[str, str]) -> None:
        await lane.oms.cancel_all(reason=reason, **filters)
        if isinstance(lane.driver, LiveDriver):
            await self._sweep_venue(lane, reason, strategy=filters.get("strategy"))
        await lane.driver.settle()

    @staticmethod
    def _still_open(lane: _Lane, filters: Mapping[str, str]) -> list[Order]:
        return [o for o in lane.oms.open_orders(**filters) if not lane.oms.store.is_emulated(o.client_order_id)]

    def _retry_halt(self, lane: _Lane, scope: str, reason: str, filters: Mapping[str, str]) -> None:
        """Fail closed: a halt whose cancels did not all go through (rate limit, venue outage) is retried with
        back-off until nothing of the scope is open or the halt is released; loudly, every round."""
        key = (lane.account, scope)
        running = self._halt_retries.get(key)
        if running is not None and not running.done():
            return

        async def retry() -> None:
            delay = 0.5
            while True:
                left = self._still_open(lane, filters)
                if not left:
                    self._log.warning("execution %s: %s: every order cancelled", lane.account, reason)
                    return
                mode, _ = lane.kill_switch.effective(lane.account, filters.get("strategy", ""))
                if str(getattr(mode, "value", mode)) != "halt":
                    return
                self._log.critical(
                    "execution %s: %s: %d order(s) still open (%s); cancelling again in %.1f s",
                    lane.account, reason, len(left), ", ".join(o.client_order_id for o in left[:5]), delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                try:
                    await self._cancel_scope(lane, reason, filters)
                except Exception:
                    self._log.exception("execution %s: %s: cancel round failed", lane.account, reason)

        self._halt_retries[key] = asyncio.get_running_loop().create_task(retry())

    async def _sweep_venue(self, lane: _Lane, reason: str, *, strategy: str | None) -> None:
        """A halt on a live venue: every resting order of ours the venue still lists is cancelled too —
        one the OMS did not hold (stored by an earlier process, or its update lost) through the OMS, one
        with our client order id prefix but no row directly on the venue."""
        assert isinstance(lane.driver, LiveDriver)
        for symbol in sorted(lane.driver.symbols):
            try:
                resting = await lane.driver.adapter.fetch_open_orders(symbol)
            except MelticaError as exc:
                self._log.error("execution %s: kill switch: open orders of %s unknown: %s", lane.account, symbol, exc)
                continue
            for vo in resting:
                coid = vo.client_order_id
                if not coid or not coid.startswith(CLIENT_ORDER_ID_PREFIX):
                    continue
                known = lane.oms.store.get(coid)
                if strategy is not None and (known is None or known.intent.strategy != strategy):
                    continue
                try:
                    if known is not None:
                        await lane.oms.sync_order(coid)
                        if not lane.oms.order(coid).is_terminal:
                            await lane.oms.cancel(coid, reason=reason)
                    else:
                        await lane.driver.adapter.cancel_order(vo.symbol, client_order_id=coid)
                        self._log.warning("execution %s: kill switch cancelled unknown order %s", lane.account, coid)
                except MelticaError as exc:
                    self._log.error("execution %s: kill switch could not cancel %s: %s", lane.account, coid, exc)

    # --- state ---------------------------------------------------------------------------------
    def snapshot(self, key: str) -> dict[str, Any] | None:
        """The lock-step state of one account (``key``): markets, held requests, handled request ids.
        Orders themselves live in the store."""
        lane = self.lanes.get(key)
        if lane is None:
            return None
        prefixes = tuple(f"{i}:" for i in self._instances_of(key))  # once, not per remembered id
        return {
            "markets": {
                m.key: {
                    "acks": dict(m.acks),
                    "instances": sorted(m.instances),
                    "seq": m.seq,
                    "held": [r.model_dump(mode="json") for r in m.held],
                    "bars": [b.model_dump(mode="json") for b in m.bars],
                    "current": None if m.current is None else m.current.model_dump(mode="json"),
                    "last_ts": None if m.last_ts is None else m.last_ts.isoformat(),
                    "done_ts": None if m.done_ts is None else m.done_ts.isoformat(),
                    "end": None if m.end is None else m.end.model_dump(mode="json"),
                    "end_seq": m.end_seq,
                    "ended": m.ended,
                }
                for m in lane.markets.values()
            },
            "requested": [o.model_dump(mode="json") for o in lane.requested.values()],
            "symbol_of": dict(lane.symbol_of),
            "ended": list(lane.ended),
            "emulated_active": lane.emulated_active,
            "handled": self._handled_ids(key, prefixes),
        }

    def _handled_ids(self, account: str, prefixes: tuple[str, ...]) -> list[str]:
        """The remembered request ids (of ``_handled``, oldest first) that start with one of ``prefixes``
        (the account's instances): those remembered since the last call are filtered, the forgotten dropped."""
        handled, count = self._handled, self._handled_count
        numbers, ids, seen = self._handled_of.get(account) or (deque(), deque(), 0)
        new = count - seen
        if new > len(handled):  # not called since before the oldest remembered id: all of them
            numbers, ids, new = deque(), deque(), len(handled)
        if new:
            recent = list(itertools.islice(reversed(handled), new))  # the last ``new``, newest first
            first = count - new  # the number of the oldest of them
            for i, request_id in enumerate(reversed(recent)):
                if request_id.startswith(prefixes):
                    numbers.append(first + i)
                    ids.append(request_id)
        oldest = count - len(handled)  # ids numbered below it are forgotten
        while numbers and numbers[0] < oldest:
            numbers.popleft()
            ids.popleft()
        self._handled_of[account] = (numbers, ids, count)
        return list(ids)

    def _instances_of(self, account: str) -> list[str]:
        return [i.instance_id for i in self.config.instances if i.account == account] or [""]

    def restore(self, key: str, state: dict[str, Any]) -> None:
        lane = self.lanes.get(key)
        if lane is None:
            return
        for mkey, data in state["markets"].items():
            market = lane.markets.get(mkey)
            if market is None:
                exchange, _, symbol = mkey.partition(":")
                market = lane.markets[mkey] = _LockStepMarket(exchange, symbol, set())
            market.instances |= set(data["instances"])
            market.acks = {i: int(s) for i, s in data["acks"].items()}
            market.seq = int(data["seq"])
            market.held = deque(_APPROVED.validate_python(r) for r in data["held"])
            market.bars = deque(Bar.model_validate(b) for b in data["bars"])
            market.current = None if data["current"] is None else Bar.model_validate(data["current"])
            market.last_ts = None if data["last_ts"] is None else datetime.fromisoformat(data["last_ts"])
            market.done_ts = None if data["done_ts"] is None else datetime.fromisoformat(data["done_ts"])
            market.end = None if data["end"] is None else EndOfReplayCommand.model_validate(data["end"])
            market.end_seq = data["end_seq"]
            market.ended = bool(data["ended"])
        for order in state["requested"]:
            restored = Order.model_validate(order)
            lane.requested[restored.client_order_id] = restored
        if not self.lockstep:
            self._end_lost_legs(lane)
        lane.symbol_of.update(state["symbol_of"])
        lane.ended.update(dict.fromkeys(state.get("ended", ())))
        lane.emulated_active = bool(state["emulated_active"])
        for request_id in state["handled"]:
            if request_id not in self._handled_set:
                self._remember(request_id)
