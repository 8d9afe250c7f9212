"""Message schemas that the domain does not already define: control commands, risk decisions on the
wire, rejected intents and dead letters. Same conventions as ``meltica.domain``: frozen pydantic v2,
``extra="forbid"``, Decimals exact, times aware UTC.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from meltica.domain.orders import OrderIntent
from meltica.domain.values import DomainModel, UtcDatetime
from meltica.risk.engine import RiskDecision

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
    channels: tuple[Literal["trades", "book", "candles.1m"], ...] = ("trades",)
    subscribe: bool = True


class SetParamsCommand(ControlMessage):
    """Change a running strategy's parameters (validated by the strategy, not here)."""

    command: Literal["set_params"] = "set_params"
    strategy: Name
    params: dict[str, str | int | bool | None]


ControlCommand = Annotated[
    KillSwitchCommand | SubscribeCommand | SetParamsCommand,
    Field(discriminator="command"),
]


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
