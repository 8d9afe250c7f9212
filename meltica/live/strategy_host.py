"""``StrategyHost``: strategy instances as a pipeline stage (Business layer).

Inputs ``md.candles.1m`` (live mode), ``orders.events`` and ``control``; output ``orders.intents``
(key: account). Each configured instance runs on a :class:`LiveStrategyContext` — the strategy half of
the backtest's context (``meltica.backtest.context.OrderTrackingContext``): new orders are announced at
once (``pending_submit``), the instance's open orders and positions follow the ``OrderUpdate``s of the
execution agent, callbacks (``on_fill`` then ``on_order``, timers, ``on_bar``) run one at a time on the
event-time clock, intent ids are ``<instance>:<seq>``. What a callback asks for becomes a
``SubmitRequest`` / ``OrderListRequest`` / ``CancelRequest`` / ``AmendRequest`` (request ids
deterministic: the intent id, the list id, ``<instance>:r<n>``).

Lock-step (``PipelineConfig.lockstep``, ``meltica/live/README.md``): updates are buffered until the
``VenueProgress`` that closes their step; then they are applied (view first, callbacks queued in order),
due timers and — for ``phase="close"`` — ``on_bar(bar)`` are queued, everything runs, the requests are
published, then ``StrategyProgress(seq)``. After ``on_start``: ``StrategyProgress(0)``. On
``EndOfReplayCommand`` (once the replay's last bar was closed) the instance runs ``on_stop`` and
acknowledges the end step (``seq`` + 1); the execution agent then ends the data and publishes
``VenueProgress(phase="end")``. Live: bars come from ``md.candles.1m`` and updates are handled at once.

Control: ``StrategyCommand`` (pause: no market data callbacks; resume; stop: ``on_stop``; start: a new
or stopped instance), ``SetParamsCommand`` (validated by the strategy's ``Params``; refused ones are
logged and counted in ``refused_commands``), ``KillSwitchCommand`` (``halt``: new orders are refused
locally, reported ``rejected``; ``reduce_only``: only orders that reduce the position go out; cancels
always do).

At least once: bars are dropped by time per symbol, updates by ``(client order id, event id)`` (and
anything about an order already terminal), progress markers by ``seq`` (a redelivered one re-publishes
the step's requests and acknowledgement: downstream drops them by request id). ``snapshot(instance_id)``
/ ``restore(instance_id, state)`` carry everything an instance needs to continue exactly.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from meltica.backtest.context import OrderTrackingContext
from meltica.domain import Bar, Instrument, OrderFilled, OrderIntent, OrderRejected, Side
from meltica.errors import ConfigurationError, InvalidOrderError
from meltica.live.config import PipelineConfig, StrategyInstanceConfig
from meltica.live.processor import Emit, Incoming, Outgoing
from meltica.messaging.catalogue import account_key, market_key
from meltica.messaging.schemas import (
    AmendRequest,
    CancelRequest,
    EndOfReplayCommand,
    KillSwitchCommand,
    OrderListRequest,
    OrderUpdate,
    PipelineRequest,
    SetParamsCommand,
    StrategyCommand,
    StrategyMessage,
    StrategyProgress,
    SubmitRequest,
    VenueProgress,
)
from meltica.portfolio import Portfolio
from meltica.sim.clock import ManualClock
from meltica.strategies import Strategy, build_strategy, get_strategy
from meltica.strategies.base import OrderList, OrderListKind

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INTENTS = "orders.intents"
_SEVERITY = {"off": 0, "reduce_only": 1, "halt": 2}
_KEEP_DONE = 2000  # terminal client order ids remembered for dropping late duplicates
_REQUESTS: TypeAdapter[Any] = TypeAdapter(StrategyMessage)
_UPDATE: TypeAdapter[OrderUpdate] = TypeAdapter(OrderUpdate)


class LiveStrategyContext(OrderTrackingContext):
    """The ``StrategyContext`` of one instance in the pipeline (module docstring)."""

    def __init__(
        self,
        config: StrategyInstanceConfig,
        instruments: Mapping[str, Instrument],
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.clock = ManualClock(EPOCH)
        self._instruments = dict(instruments)
        self._account = config.account
        self._instance_id = config.instance_id
        self._log = logger or logging.getLogger(f"meltica.strategy.{config.instance_id}")
        self._state: dict[str, Any] = {}
        self._strategy: Strategy[Any] | None = None
        self._seq = 0
        quote = next(iter(self._instruments.values())).quote if self._instruments else None
        self.init_tracking(Portfolio(clock=self.clock, valuation_currency=quote))
        self.requests: list[PipelineRequest] = []  # made since the last flush, in order
        self.request_seq = 0
        self.kill_modes: dict[str, str] = {}  # scope -> halt | reduce_only
        self.refused_orders = 0

    # --- identity and reads ------------------------------------------------------------------
    @property
    def exchange(self) -> str:
        return self.config.exchange

    def instrument(self, symbol: str) -> Instrument:
        try:
            return self._instruments[symbol]
        except KeyError:
            raise InvalidOrderError(f"unknown symbol {symbol!r} on {self.exchange}", reason="unknown_symbol") from None

    # --- kill switch ---------------------------------------------------------------------------
    def kill_mode(self) -> tuple[str, str]:
        best, where = "off", "global"
        for scope, mode in self.kill_modes.items():
            if _SEVERITY[mode] > _SEVERITY[best]:
                best, where = mode, scope
        return best, where

    def _refusal(self, intents: Sequence[OrderIntent]) -> str | None:
        mode, scope = self.kill_mode()
        if mode == "halt":
            return f"kill switch halt ({scope})"
        if mode == "reduce_only" and not all(self._reduces(i) for i in intents):
            return f"kill switch reduce_only ({scope}): order would not reduce the position"
        return None

    def _reduces(self, intent: OrderIntent) -> bool:
        if intent.reduce_only:
            return True
        held = self.position(intent.symbol).quantity
        if intent.side is Side.SELL:
            return held > 0 and intent.quantity <= held
        return held < 0 and intent.quantity <= -held

    def _reject_locally(self, coid: str, reason: str) -> None:
        order = self.orders[coid]
        rejected = order.apply(
            OrderRejected(event_id="rejected", client_order_id=coid, ts=self.clock.now, reason=reason)
        )
        self._track(rejected)
        self.rejections.append(rejected)
        self.refused_orders += 1
        self._log.warning("order %s refused: %s", coid, reason)
        self._pending.append(partial(self.strategy.on_order, rejected))

    # --- requests ------------------------------------------------------------------------------
    def _base(self, request_id: str) -> dict[str, Any]:
        return {"request_id": request_id, "account": self._account, "strategy": self._instance_id, "ts": self.clock.now}

    def _next_request_id(self) -> str:
        self.request_seq += 1
        if self._id_epoch:
            return f"{self._instance_id}:{self._id_epoch}:r{self.request_seq}"
        return f"{self._instance_id}:r{self.request_seq}"

    def _send_intent(self, intent: OrderIntent) -> str:
        coid = self._hold(intent)
        refusal = self._refusal((intent,))
        if refusal is not None:
            self._reject_locally(coid, refusal)
        else:
            self.requests.append(SubmitRequest(**self._base(intent.intent_id), intent=intent))
        return coid

    def _send_list(self, kind: OrderListKind, list_id: str, legs: tuple[OrderIntent, ...]) -> OrderList:
        for leg in legs:
            self._hold(leg)
        refusal = self._refusal(legs[:1] if kind == "bracket" else legs)
        if refusal is not None:
            for leg in legs:
                self._reject_locally(leg.client_order_id, refusal)
        else:
            self.requests.append(OrderListRequest(**self._base(list_id), list_kind=kind, list_id=list_id, legs=legs))
        return OrderList(list_id=list_id, kind=kind, client_order_ids=tuple(i.client_order_id for i in legs))

    def cancel(self, client_order_id: str) -> None:
        self.requests.append(CancelRequest(**self._base(self._next_request_id()), client_order_id=client_order_id))

    def _send_amend(self, client_order_id: str, price: Decimal | None, quantity: Decimal | None, carrier: str) -> None:
        self.requests.append(
            AmendRequest(
                **self._base(self._next_request_id()),
                client_order_id=client_order_id,
                price=price,
                quantity=quantity,
                replacement_client_order_id=carrier,
            )
        )

    # --- order updates -------------------------------------------------------------------------
    def apply_update(self, update: OrderUpdate) -> None:
        """Track one execution update (a fill is booked first) and queue the callbacks it causes."""
        if update.held:
            self.on_held_view(update.order)  # a leg the emulation holds: its children carry the fills
            return
        event = update.event
        if isinstance(event, OrderFilled):
            self.portfolio.apply_fill(event.fill, account=self._account, strategy=self._instance_id)
        self.on_order_change(update.order, event)

    def take_requests(self) -> list[PipelineRequest]:
        out, self.requests = self.requests, []
        return out


class _Instance:
    """One hosted instance and its delivery bookkeeping."""

    def __init__(self, config: StrategyInstanceConfig, instruments: Mapping[str, Instrument]) -> None:
        self.config = config
        self.ctx = LiveStrategyContext(config, instruments)
        self.strategy: Strategy[Any] = build_strategy(config.strategy, config.params, self.ctx)
        self.ctx.attach(self.strategy)
        self.started = False
        self.stopped = False
        self.paused = False
        self.acked: dict[str, int] = {}  # market -> last acknowledged venue step
        self.last_bar: dict[str, datetime] = {}  # symbol -> last bar handled (live and lock-step closes)
        self.pending_end: dict[str, EndOfReplayCommand] = {}
        self.ended: set[str] = set()
        self.last_out: dict[str, tuple[int, list[PipelineRequest]]] = {}  # market -> last step, its output
        self.buffer: list[OrderUpdate] = []  # lock-step: updates waiting for their step's progress
        self.seen: dict[str, set[str]] = {}  # open order -> event ids handled
        self.done: deque[str] = deque(maxlen=_KEEP_DONE)
        self.done_set: set[str] = set()

    @property
    def instance_id(self) -> str:
        return self.config.instance_id

    def markets(self) -> list[str]:
        return [market_key(self.config.exchange, s) for s in self.config.symbols]

    def trades(self, exchange: str, symbol: str) -> bool:
        return exchange == self.config.exchange and symbol in self.config.symbols

    def duplicate(self, update: OrderUpdate) -> bool:
        """Seen before (or about an order already over): drop. Otherwise remembered."""
        coid = update.order.client_order_id
        if coid in self.done_set:
            return True
        current = self.ctx.orders.get(coid)
        if current is not None and current.is_terminal:
            return True
        event_id = update.event.event_id if update.event is not None else f"state:{update.order.updated_at}"
        if update.event is None:
            event_id += f":{update.order.status.value}:{update.order.filled_quantity}"
        seen = self.seen.setdefault(coid, set())
        if event_id in seen:
            return True
        seen.add(event_id)
        if update.order.is_terminal:
            self.seen.pop(coid, None)
            if len(self.done) == self.done.maxlen:
                self.done_set.discard(self.done[0])  # the oldest falls out of the bounded memory
            self.done.append(coid)
            self.done_set.add(coid)
        return False


class StrategyHost:
    """The strategy stage (module docstring). ``config``: the instances to host (and lock-step or not);
    ``instruments``: by exchange then symbol, default the config's instruments per account;
    ``kill_switch_at_start``: the persisted kill-switch modes by scope (``KillSwitchStore.load()``), read
    when the worker starts: they govern every instance at once; they and every later kill-switch command
    win over restored snapshots. ``id_epoch`` (live deployments): intent and request ids of an instance
    that starts without a snapshot are ``<instance>:<epoch>:<seq>``, so a new deployment, or one whose
    Kafka state was lost, never reuses a client order id the venue or the database already holds (the
    OMS would take the old order for the new one); a restored instance keeps the epoch it had."""

    name = "strategy-host"
    inputs: tuple[str, ...] = ("md.candles.1m", "orders.events", "control")

    def __init__(
        self,
        config: PipelineConfig,
        *,
        instruments: Mapping[str, Mapping[str, Instrument]] | None = None,
        logger: logging.Logger | None = None,
        kill_switch_at_start: Mapping[str, Any] | None = None,
        id_epoch: str = "",
    ) -> None:
        self.config = config
        self.id_epoch = id_epoch
        # scope -> "off" | "halt" | "reduce_only" (a KillSwitchState's mode, or the mode itself)
        self._persisted_kill = {
            scope: str(getattr(state, "mode", state)) for scope, state in (kill_switch_at_start or {}).items()
        }
        self.lockstep = config.lockstep
        self._log = logger or log
        self._instruments: dict[str, dict[str, Instrument]] = {}
        if instruments is not None:
            self._instruments = {ex: dict(by_symbol) for ex, by_symbol in instruments.items()}
        else:
            for account in config.account_names():
                for inst in config.instruments(account):
                    self._instruments.setdefault(inst.exchange, {})[inst.symbol] = inst
        self.instances: dict[str, _Instance] = {}
        for inst_config in config.instances:
            self.instances[inst_config.instance_id] = self._build(inst_config)
        self._emit: Emit | None = None
        self._commands: deque[str] = deque(maxlen=10_000)
        self.refused_commands = 0
        self.errors: list[str] = []

    def _build(self, config: StrategyInstanceConfig) -> _Instance:
        inst = _Instance(config, self._instruments.get(config.exchange, {}))
        inst.ctx.id_epoch = self.id_epoch
        self._apply_persisted_kill(inst)
        return inst

    def _apply_persisted_kill(self, inst: _Instance) -> None:
        for scope, mode in self._persisted_kill.items():
            if scope not in self._scopes_of(inst):
                continue
            if mode == "off":
                inst.ctx.kill_modes.pop(scope, None)
            else:
                inst.ctx.kill_modes[scope] = mode

    @staticmethod
    def _scopes_of(inst: _Instance) -> tuple[str, ...]:
        config = inst.config
        return ("global", f"account:{config.account}", f"strategy:{inst.instance_id}", f"strategy:{config.strategy}")

    # --- Processor ---------------------------------------------------------------------------
    async def start(self, emit: Emit) -> None:
        self._emit = emit

    async def stop(self) -> None:
        self._emit = None

    def instance_keys(self) -> list[str]:
        """The keys ``snapshot`` / ``restore`` take: instance ids."""
        return list(self.instances)

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        value = message.value
        out: list[Outgoing] = []
        if isinstance(value, Bar):
            for inst in self.instances.values():
                if inst.trades(value.exchange, value.symbol):
                    out += self._ensure_started(inst, value.ts)
                    if not self.lockstep:
                        out += self._live_bar(inst, value)
        elif isinstance(value, OrderUpdate):
            owner = self.instances.get(value.strategy)
            if owner is not None and owner.config.account == value.account:
                out += self._ensure_started(owner, value.order.updated_at)
                out += self._on_update(owner, value)
        elif isinstance(value, VenueProgress):
            for inst in self.instances.values():
                if inst.config.account == value.account and inst.trades(value.exchange, value.symbol):
                    out += self._ensure_started(inst, value.ts)
                    out += self._on_progress(inst, value)
        elif isinstance(value, (StrategyCommand, SetParamsCommand, KillSwitchCommand, EndOfReplayCommand)):
            if value.command_id in self._commands and not isinstance(value, EndOfReplayCommand):
                return []
            self._commands.append(value.command_id)
            out += self._on_control(value)
        return out

    # --- lifecycle -----------------------------------------------------------------------------
    def _emit_requests(self, inst: _Instance, requests: Sequence[PipelineRequest]) -> list[Outgoing]:
        key = account_key(inst.config.account)
        return [Outgoing(INTENTS, key, r) for r in requests]

    def _progress(self, inst: _Instance, market: str, seq: int) -> StrategyProgress:
        exchange, _, symbol = market.partition(":")
        return StrategyProgress(
            request_id=f"{inst.instance_id}:p:{market}:{seq}",
            account=inst.config.account,
            strategy=inst.instance_id,
            ts=inst.ctx.clock.now,
            exchange=exchange,
            symbol=symbol,
            seq=seq,
        )

    def _run(self, inst: _Instance) -> None:
        """Run the queued callbacks; a failing strategy is logged and stopped, the host goes on."""
        try:
            inst.ctx.drain()
        except Exception as exc:
            inst.ctx.drop_scheduled()
            inst.stopped = True
            self.errors.append(f"{inst.instance_id}: {exc!r}")
            self._log.exception("strategy instance %s failed and is stopped", inst.instance_id)

    def _ensure_started(self, inst: _Instance, ts: datetime | None) -> list[Outgoing]:
        """``on_start`` and ``StrategyProgress(0)`` once; ``ts``: the event time the first message brings
        (market data, an order update), the clock of ``on_start`` (a control command brings none)."""
        if inst.started:
            return []
        inst.started = True
        ctx = inst.ctx
        if ctx.clock.now == EPOCH and ts is not None:
            ctx.clock.now = ts
        inst.ctx.schedule(inst.strategy.on_start)
        self._run(inst)
        requests = ctx.take_requests()
        acks = []
        for market in inst.markets():
            if market not in inst.acked:
                inst.acked[market] = 0
                acks.append(self._progress(inst, market, 0))
        return self._emit_requests(inst, [*requests, *acks])

    async def start_instances(self) -> list[Outgoing]:
        """Start every instance not started yet (``on_start``, ``StrategyProgress(0)``): what the first
        message would otherwise trigger."""
        out: list[Outgoing] = []
        for inst in self.instances.values():
            out += self._ensure_started(inst, None)
        return out

    # --- market data (live) --------------------------------------------------------------------
    def _live_bar(self, inst: _Instance, bar: Bar) -> list[Outgoing]:
        last = inst.last_bar.get(bar.symbol)
        if last is not None and bar.ts <= last:
            return []
        inst.last_bar[bar.symbol] = bar.ts
        if inst.stopped:
            return []
        ctx = inst.ctx
        ctx.clock.now = bar.close_time
        ctx.queue_due_timers()
        if not inst.paused:
            ctx.schedule(partial(inst.strategy.on_bar, bar))
        self._run(inst)
        return self._emit_requests(inst, ctx.take_requests())

    # --- execution events ----------------------------------------------------------------------
    def _on_update(self, inst: _Instance, update: OrderUpdate) -> list[Outgoing]:
        if inst.duplicate(update):
            return []
        if self.lockstep:
            inst.buffer.append(update)
            return []
        inst.ctx.apply_update(update)
        if inst.stopped:
            inst.ctx.drop_scheduled()
            return []
        self._run(inst)
        return self._emit_requests(inst, inst.ctx.take_requests())

    def _apply_buffer(self, inst: _Instance) -> None:
        buffered, inst.buffer = inst.buffer, []
        for update in buffered:
            inst.ctx.apply_update(update)

    def _on_progress(self, inst: _Instance, progress: VenueProgress) -> list[Outgoing]:
        market = market_key(progress.exchange, progress.symbol)
        ctx = inst.ctx
        if progress.phase == "end":
            if market in inst.ended:
                return []
            inst.ended.add(market)
            ctx.clock.now = progress.ts
            self._apply_buffer(inst)
            self._run(inst)
            late = ctx.take_requests()
            if late:
                self._log.info("%s: %d request(s) after the end of the replay dropped", inst.instance_id, len(late))
            return []
        acked = inst.acked.get(market, 0)
        if progress.seq <= acked:
            last_seq, last_out = inst.last_out.get(market, (-1, []))
            if progress.seq == last_seq:  # redelivered: the step's output again (dropped downstream by id)
                return self._emit_requests(inst, last_out)
            return []
        ctx.clock.now = progress.ts
        self._apply_buffer(inst)
        bar = progress.bar
        if progress.phase == "close":
            ctx.queue_due_timers()
            if bar is not None:
                inst.last_bar[bar.symbol] = bar.ts
                if not inst.paused and not inst.stopped:
                    ctx.schedule(partial(inst.strategy.on_bar, bar))
        if inst.stopped:
            ctx.drop_scheduled()
        self._run(inst)
        requests = ctx.take_requests()
        inst.acked[market] = progress.seq
        out = [*requests, self._progress(inst, market, progress.seq)]
        end = inst.pending_end.get(market)
        if end is not None and self._replay_done(inst, market, end):
            out += self._end(inst, market)
        inst.last_out[market] = (progress.seq, out)
        return self._emit_requests(inst, out)

    # --- control -------------------------------------------------------------------------------
    def _targets(self, name: str) -> list[_Instance]:
        return [i for i in self.instances.values() if name in (i.instance_id, i.config.strategy)]

    def _on_control(self, command: BaseModel) -> list[Outgoing]:
        out: list[Outgoing] = []
        if isinstance(command, StrategyCommand):
            out += self._strategy_command(command)
        elif isinstance(command, SetParamsCommand):
            targets = self._targets(command.strategy)
            if not targets:
                self._refuse(command.command_id, f"set_params: no instance {command.strategy!r}")
            for inst in targets:
                self._set_params(inst, command)
        elif isinstance(command, KillSwitchCommand):
            # The latest word on the scope: a snapshot restored later (a rebalance) must not undo it.
            self._persisted_kill[command.scope] = command.mode
            for inst in self.instances.values():
                if command.scope in self._scopes_of(inst):
                    if command.mode == "off":
                        inst.ctx.kill_modes.pop(command.scope, None)
                    else:
                        inst.ctx.kill_modes[command.scope] = command.mode
        elif isinstance(command, EndOfReplayCommand):
            market = market_key(command.exchange, command.symbol)
            for inst in self.instances.values():
                if not inst.trades(command.exchange, command.symbol) or market in inst.ended:
                    continue
                if market in inst.pending_end:
                    continue
                out += self._ensure_started(inst, None)
                if not self.lockstep:
                    inst.ended.add(market)
                    out += self._stop(inst)
                    continue
                inst.pending_end[market] = command
                if self._replay_done(inst, market, command):
                    out += self._emit_requests(inst, self._end(inst, market))
        return out

    def _replay_done(self, inst: _Instance, market: str, end: EndOfReplayCommand) -> bool:
        symbol = market.partition(":")[2]
        last = inst.last_bar.get(symbol)
        if end.last_ts is None or end.count == 0:
            return True
        return last is not None and last >= end.last_ts

    def _end(self, inst: _Instance, market: str) -> list[PipelineRequest]:
        """The replay of ``market`` is over: ``on_stop`` (once), then acknowledge the end step."""
        ctx = inst.ctx
        requests: list[PipelineRequest] = []
        if not inst.stopped:
            inst.stopped = True
            ctx.schedule(inst.strategy.on_stop)
            self._run(inst)
            requests = ctx.take_requests()
        seq = inst.acked.get(market, 0) + 1
        inst.acked[market] = seq
        inst.pending_end.pop(market, None)
        return [*requests, self._progress(inst, market, seq)]

    def _stop(self, inst: _Instance) -> list[Outgoing]:
        if inst.stopped:
            return []
        inst.stopped = True
        inst.ctx.schedule(inst.strategy.on_stop)
        self._run(inst)
        return self._emit_requests(inst, inst.ctx.take_requests())

    def _refuse(self, command_id: str, why: str) -> None:
        self.refused_commands += 1
        self.errors.append(f"{command_id}: {why}")
        self._log.warning("control %s refused: %s", command_id, why)

    def _strategy_command(self, command: StrategyCommand) -> list[Outgoing]:
        inst = self.instances.get(command.instance)
        if command.action == "start":
            if inst is None or (command.config is not None and inst.stopped):
                if command.config is None:
                    self._refuse(command.command_id, f"start {command.instance}: unknown instance and no config")
                    return []
                try:
                    config = StrategyInstanceConfig.model_validate(command.config)
                    if config.instance_id != command.instance:
                        raise ValueError(f"config is for {config.instance_id}")
                    inst = self._build(config)
                except (ValidationError, ValueError, ConfigurationError) as exc:
                    self._refuse(command.command_id, f"start {command.instance}: {exc}")
                    return []
                self.instances[command.instance] = inst
            elif inst.stopped:
                inst.stopped = False
                inst.started = False  # on_start again
            inst.paused = False
            return self._ensure_started(inst, None)
        if inst is None:
            self._refuse(command.command_id, f"{command.action} {command.instance}: unknown instance")
            return []
        if command.action == "pause":
            inst.paused = True
        elif command.action == "resume":
            inst.paused = False
        else:
            return self._stop(inst)
        return []

    def _set_params(self, inst: _Instance, command: SetParamsCommand) -> None:
        current = inst.strategy.params.model_dump()
        try:
            params = get_strategy(inst.config.strategy).Params.model_validate({**current, **command.params})
        except (ValidationError, ConfigurationError) as exc:
            self._refuse(command.command_id, f"set_params {inst.instance_id}: {exc}")
            return
        inst.strategy.params = params
        self._log.info("instance %s: parameters changed to %s", inst.instance_id, params)

    # --- state ---------------------------------------------------------------------------------
    def snapshot(self, key: str) -> dict[str, Any] | None:
        inst = self.instances.get(key)
        if inst is None:
            return None
        ctx = inst.ctx
        ledgers = [
            [k[2], str(q), str(c), str(r), str(f)]
            for k, q, c, r, f, _mark in ctx.portfolio.ledger_state()
            if k[3] == inst.instance_id
        ]
        return {
            "config": inst.config.model_dump(mode="json"),
            "params": inst.strategy.params.model_dump(mode="json"),
            "strategy": inst.strategy.snapshot_state(),
            "started": inst.started,
            "stopped": inst.stopped,
            "paused": inst.paused,
            "clock": ctx.clock.now.isoformat(),
            **ctx.export_state(),  # seq, id_epoch, timers, open, announced, amends
            "request_seq": ctx.request_seq,
            "ledgers": ledgers,
            "kill": dict(ctx.kill_modes),
            "acked": dict(inst.acked),
            "last_bar": {s: ts.isoformat() for s, ts in inst.last_bar.items()},
            "pending_end": {m: c.model_dump(mode="json") for m, c in inst.pending_end.items()},
            "ended": sorted(inst.ended),
            "last_out": {m: [seq, [r.model_dump(mode="json") for r in rs]] for m, (seq, rs) in inst.last_out.items()},
            "buffer": [u.model_dump(mode="json") for u in inst.buffer],
            "seen": {c: sorted(ids) for c, ids in inst.seen.items()},
            "done": list(inst.done),
        }

    def restore(self, key: str, state: dict[str, Any]) -> None:
        config = StrategyInstanceConfig.model_validate(state["config"])
        inst = self._build(config)
        ctx = inst.ctx
        params = get_strategy(config.strategy).Params.model_validate(state["params"])
        inst.strategy = build_strategy(config.strategy, params, ctx)
        ctx.attach(inst.strategy)
        inst.strategy.restore_state(state["strategy"])
        inst.started = bool(state["started"])
        inst.stopped = bool(state["stopped"])
        inst.paused = bool(state["paused"])
        ctx.clock.now = datetime.fromisoformat(state["clock"])
        ctx.import_state(state)  # seq, id_epoch, timers, open, announced, amends
        ctx.request_seq = int(state["request_seq"])
        for symbol, q, c, r, f in state["ledgers"]:
            ctx.portfolio.restore_ledger(
                config.account,
                config.exchange,
                symbol,
                config.instance_id,
                quantity=Decimal(q),
                cost=Decimal(c),
                realized=Decimal(r),
                fees=Decimal(f),
            )
        ctx.kill_modes.update(state["kill"])
        self._apply_persisted_kill(inst)  # the database at start, and commands since, are later than a snapshot
        inst.acked = {m: int(s) for m, s in state["acked"].items()}
        inst.last_bar = {s: datetime.fromisoformat(ts) for s, ts in state["last_bar"].items()}
        inst.pending_end = {m: EndOfReplayCommand.model_validate(c) for m, c in state["pending_end"].items()}
        inst.ended = set(state["ended"])
        inst.last_out = {
            m: (int(seq), [_REQUESTS.validate_python(r) for r in rs]) for m, (seq, rs) in state["last_out"].items()
        }
        inst.buffer = [_UPDATE.validate_python(u) for u in state["buffer"]]
        inst.seen = {c: set(ids) for c, ids in state["seen"].items()}
        inst.done.extend(state["done"])
        inst.done_set = set(inst.done)
        self.instances[key] = inst
