"""Message schemas that the domain does not already define: control commands, risk decisions on the
wire, rejected intents and dead letters. Same conventions as ``meltica.domain``: frozen pydantic v2,
``extra="forbid"``, Decimals exact, times aware UTC.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from meltica.domain.market_data import Bar
from meltica.domain.orders import AnyOrderEvent, Fill, Order, OrderIntent
from meltica.domain.risk import RiskDecision
from meltica.domain.values import DomainModel, PositiveDecimal, UtcDatetime

Name = Annotated[str, Field(min_length=1, max_length=128)]


# --- control ---------------------------------------------------------------------------------------


class ControlMessage(DomainModel):
    """Base of every command on the ``control`` topic (key: the scope it addresses)."""

    command_id: Name
    actor: Name
    ts: UtcDatetime


class KillSwitchCommand(ControlMessage):
    """Engage or release the kill switch for a scope (``global``, ``account:<name>``, ``strategy:<name>``)."""

    command: Literal["kill_switch"] = "kill_switch"
    scope: Name = "global"
    mode: Literal["off", "halt", "reduce_only"]
    reason: Annotated[str, Field(min_length=1, max_length=1000)]


class SubscribeCommand(ControlMessage):
    """Start (or stop, with ``subscribe=False``) market data for ``exchange:symbol`` channels."""

    command: Literal["subscribe"] = "subscribe"
    exchange: Name
    symbol: Name
    channels: tuple[Literal["trades", "book", "candles.1m", "ticker"], ...] = ("trades",)
    subscribe: bool = True


class SetParamsCommand(ControlMessage):
    """Change a running strategy's parameters (validated by the strategy, not here)."""

    command: Literal["set_params"] = "set_params"
    strategy: Name
    params: dict[str, str | int | bool | None]


class StrategyCommand(ControlMessage):
    """Pause, resume, start or stop one strategy instance. ``start`` of an instance the worker does not
    know yet needs ``config`` (a ``meltica.live.config.StrategyInstanceConfig`` as a mapping)."""

    command: Literal["strategy"] = "strategy"
    instance: Name
    action: Literal["pause", "resume", "start", "stop"]
    config: dict[str, Any] | None = None


class EndOfReplayCommand(ControlMessage):
    """A replay source published its last bar for ``exchange:symbol`` (paper runs end by themselves)."""

    command: Literal["end_of_replay"] = "end_of_replay"
    exchange: Name
    symbol: Name
    last_ts: UtcDatetime | None = None
    count: int = Field(ge=0)


class MarketStatus(ControlMessage):
    """Health of one market-data stream, published by the ingest (key ``market:<exchange>:<symbol>``):
    at once when the stream goes stale (silent for the ingest's ``stale_after_s``) or recovers, and as a
    heartbeat every ``heartbeat_s`` seconds. ``stream`` is ``trades``, ``candles.1m``, ``ticker`` or
    ``book``. ``last_event_ts``: the venue's time of the newest item received (``None``: nothing yet);
    ``last_received_ts``: when the ingest received it (its clock; staleness is measured on this);
    ``ts``: when this status was made. The risk gate refuses new orders on a market while its trades or
    1-minute bars stream is stale, and also when the market's statuses stop (older than three heartbeats)."""

    command: Literal["market_status"] = "market_status"
    exchange: Name
    symbol: Name
    stream: Literal["trades", "book", "candles.1m", "ticker"]
    stale: bool
    subscribed: bool = True  # False: the stream was unsubscribed (its last status; forget it)
    last_event_ts: UtcDatetime | None = None
    last_received_ts: UtcDatetime | None = None
    stale_after_s: float = Field(gt=0)
    heartbeat_s: float = Field(gt=0)


ControlCommand = Annotated[
    KillSwitchCommand | SubscribeCommand | SetParamsCommand | StrategyCommand | EndOfReplayCommand | MarketStatus,
    Field(discriminator="command"),
]


# --- strategy → risk gate → execution (orders.intents, orders.approved) -----------------------------


class PipelineRequest(DomainModel):
    """Base of what a strategy instance sends on ``orders.intents`` (key: account) and the risk gate
    forwards on ``orders.approved``. ``request_id`` is deterministic per instance (``<instance>:<seq>``
    for a submit: the intent id) so a redelivered request is recognised and dropped; ``ts`` is the
    decision time (event time: the simulated clock in a replay)."""

    request_id: Name
    account: Name
    strategy: Name
    ts: UtcDatetime


class SubmitRequest(PipelineRequest):
    kind: Literal["submit"] = "submit"
    intent: OrderIntent


class OrderListRequest(PipelineRequest):
    """OCO ``(take_profit, stop)`` or bracket ``(entry, take_profit, stop)``."""

    kind: Literal["order_list"] = "order_list"
    list_kind: Literal["oco", "bracket"]
    list_id: Name
    legs: tuple[OrderIntent, ...]


class CancelRequest(PipelineRequest):
    kind: Literal["cancel"] = "cancel"
    client_order_id: Name


class AmendRequest(PipelineRequest):
    """Change price and/or quantity; ``replacement_client_order_id`` is the id the strategy was told
    (a venue without native amend cancels and replaces under that id)."""

    kind: Literal["amend"] = "amend"
    client_order_id: Name
    price: PositiveDecimal | None = None
    quantity: PositiveDecimal | None = None
    replacement_client_order_id: Name | None = None


class StrategyProgress(PipelineRequest):
    """Watermark of one strategy instance: it has handled every venue step up to ``seq`` (0: it has
    started; its ``on_start`` requests precede this). Everything it asked for in reaction to those steps
    precedes this message on the same partition. Used by lock-step replays (DESIGN.md §2 parity)."""

    kind: Literal["progress"] = "progress"
    exchange: Name
    symbol: Name | None = None
    seq: int = Field(ge=0)


class RejectionNotice(PipelineRequest):
    """The risk gate refused a submit, an order list or an amend; forwarded on ``orders.approved`` in order
    so the execution agent reports the refusal to the strategy (``orders.events``): the orders of a submit
    or list as rejected; for an amend, its replacement (``replacement_client_order_id``, the id the
    strategy was told) as rejected, the order itself unchanged."""

    kind: Literal["risk_rejected"] = "risk_rejected"
    request: SubmitRequest | OrderListRequest | AmendRequest
    decision: RiskDecisionMessage


StrategyMessage = Annotated[
    SubmitRequest | OrderListRequest | CancelRequest | AmendRequest | StrategyProgress,
    Field(discriminator="kind"),
]
ApprovedMessage = Annotated[
    SubmitRequest | OrderListRequest | CancelRequest | AmendRequest | StrategyProgress | RejectionNotice,
    Field(discriminator="kind"),
]


# --- execution → strategies, risk gate, sinks (orders.events, fills) -------------------------------


class ExecutionMessage(DomainModel):
    """Base of what the execution agent publishes on ``orders.events`` (key: account)."""

    account: Name


class OrderUpdate(ExecutionMessage):
    """An order changed: its new state and the event that changed it (``None``: state re-published,
    e.g. after recovery). ``strategy`` is the instance that owns the order.

    ``held``: the order is one the local order emulation holds (a leg of an OCO or bracket list the venue
    does not take as it is). It never reaches the venue under its own client order id — its child orders
    do, and carry the fills — so it has no event of its own: its state follows the emulation (``new`` while
    held, open while a child works, then how it ended). Strategies track it; the risk gate releases its
    reservation when it ends; the database sink does not store it as a venue order."""

    kind: Literal["order"] = "order"
    strategy: Name
    order: Order
    event: AnyOrderEvent | None = None
    held: bool = False


class VenueProgress(ExecutionMessage):
    """Watermark of a lock-step replay venue: step ``seq`` of ``exchange:symbol`` is done and every
    update it caused precedes this message. ``phase`` ``open``: the bar's open was printed and held
    requests were sent; ``close``: the bar's path ran (strategies then get ``on_bar(bar)``)."""

    kind: Literal["venue_progress"] = "venue_progress"
    exchange: Name
    symbol: Name
    seq: int = Field(ge=1)
    phase: Literal["open", "close", "end"]
    bar: Bar | None = None
    ts: UtcDatetime


ExecutionEvent = Annotated[OrderUpdate | VenueProgress, Field(discriminator="kind")]


class AccountFill(DomainModel):
    """A fill with the account and strategy instance it belongs to (``fills`` topic, key: account)."""

    account: Name
    strategy: Name
    fill: Fill


# --- risk ------------------------------------------------------------------------------------------


class RiskDecisionMessage(DomainModel):
    """``meltica.risk.RiskDecision`` (a dataclass) on the wire. ``details`` values come back as JSON
    values: a Decimal inside ``details`` is carried as a string."""

    intent_id: Name
    approved: bool
    rule: str | None = None
    reason: str | None = None
    ts: UtcDatetime
    details: dict[str, Any] = Field(default_factory=dict)
    account: str | None = None
    strategy: str | None = None
    exchange: str | None = None
    symbol: str | None = None

    @classmethod
    def from_decision(cls, decision: RiskDecision) -> RiskDecisionMessage:
        return cls(
            intent_id=decision.intent_id,
            approved=decision.approved,
            rule=decision.rule,
            reason=decision.reason,
            ts=decision.ts,
            details=dict(decision.details),
            account=decision.account,
            strategy=decision.strategy,
            exchange=decision.exchange,
            symbol=decision.symbol,
        )

    def to_decision(self) -> RiskDecision:
        return RiskDecision(
            intent_id=self.intent_id,
            approved=self.approved,
            rule=self.rule,
            reason=self.reason,
            ts=self.ts,
            details=dict(self.details),
            account=self.account,
            strategy=self.strategy,
            exchange=self.exchange,
            symbol=self.symbol,
        )


class RejectedIntent(DomainModel):
    """An intent the risk gate refused, with the decision that refused it (``orders.rejected``)."""

    intent: OrderIntent
    decision: RiskDecisionMessage


# --- dead letters ----------------------------------------------------------------------------------


class DeadLetter(DomainModel):
    """A message an agent could not decode, parked on the ``dlq`` topic with why.

    ``original`` is the raw value, base64; ``key`` the raw key decoded as UTF-8 (undecodable bytes
    escaped), ``None`` when the message had none.
    """

    topic: Annotated[str, Field(min_length=1, max_length=255)]
    partition: int
    offset: int
    key: str | None = None
    original: str
    reason: Annotated[str, Field(min_length=1)]
    error_type: Name
    ts: UtcDatetime

    @classmethod
    def build(
        cls,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        raw: bytes,
        reason: str,
        error_type: str,
        ts: datetime,
    ) -> DeadLetter:
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            key=None if key is None else key.decode("utf-8", errors="backslashreplace"),
            original=base64.b64encode(raw).decode("ascii"),
            reason=reason,
            error_type=error_type,
            ts=ts,
        )

    def original_bytes(self) -> bytes:
        return base64.b64decode(self.original)
