"""The topic catalogue: every Kafka topic of the live pipeline, its key, partitions, retention and
its one value schema (DESIGN.md §3). Nothing else in the code base spells a topic name.

Names are logical (``md.trades``); the physical name is ``<prefix><logical>`` where the prefix comes
from ``MELTICA_TOPIC_PREFIX`` (e.g. ``paper.``), so environments and test runs never share topics.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from meltica.domain.market_data import Bar, OrderBookSnapshot, TopOfBook, Trade
from meltica.domain.portfolio import Position
from meltica.messaging.schemas import (
    AccountFill,
    ApprovedMessage,
    ControlCommand,
    ControlMessage,
    DeadLetter,
    ExecutionEvent,
    ExecutionMessage,
    PipelineRequest,
    RejectedIntent,
    RiskDecisionMessage,
    StrategyMessage,
)

PREFIX_ENV = "MELTICA_TOPIC_PREFIX"

# What the message key is, i.e. what decides ordering (one key → one partition → in order).
KeyKind = Literal["exchange:symbol", "account", "account:exchange:symbol:strategy", "scope", "topic"]

DAY_MS = 86_400_000
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic. ``value_schema`` is the model class an encoder accepts (for a union topic, the
    common base class); ``value_type`` is what a decoder validates against (the discriminated
    union itself for ``orders.events`` and ``control``), by default ``value_schema``."""

    name: str  # logical name, no prefix
    key: KeyKind
    partitions: int
    value_schema: type[BaseModel]
    retention_ms: int | None = None  # None with compacted=True: keep the latest per key forever
    compacted: bool = False
    value_type: Any = None
    schema_version: int = 1
    description: str = ""
    accepts: tuple[type[BaseModel], ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"{self.name}: partitions must be >= 1")
        if not self.compacted and self.retention_ms is None:
            raise ValueError(f"{self.name}: give retention_ms, or compacted=True")
        if self.value_type is None:
            object.__setattr__(self, "value_type", self.value_schema)
        object.__setattr__(self, "accepts", _members(self.value_type))

    @property
    def schema_name(self) -> str:
        """The name written into every envelope: ``Trade``, ``OrderEvent``, ``ControlMessage``…"""
        return self.value_schema.__name__

    def topic_configs(self) -> dict[str, str]:
        """Broker-side topic configuration (``cleanup.policy``, ``retention.ms``)."""
        if self.compacted:
            configs = {"cleanup.policy": "compact"}
            if self.retention_ms is not None:
                configs = {"cleanup.policy": "compact,delete", "retention.ms": str(self.retention_ms)}
            return configs
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}


def _members(value_type: Any) -> tuple[type[BaseModel], ...]:
    """The concrete model classes a (possibly ``Annotated``) union admits."""
    if get_origin(value_type) is typing.Annotated:
        return _members(get_args(value_type)[0])
    if get_origin(value_type) in (typing.Union, types.UnionType):
        return tuple(m for arg in get_args(value_type) for m in _members(arg))
    if isinstance(value_type, type) and issubclass(value_type, BaseModel):
        return (value_type,)
    raise TypeError(f"not a pydantic model or a union of them: {value_type!r}")


SPECS: tuple[TopicSpec, ...] = (
    TopicSpec("md.trades", "exchange:symbol", 6, Trade, retention_ms=7 * DAY_MS, description="public trades"),
    TopicSpec(
        "md.book", "exchange:symbol", 6, OrderBookSnapshot, retention_ms=1 * DAY_MS, description="order book snapshots"
    ),
    TopicSpec("md.candles.1m", "exchange:symbol", 6, Bar, retention_ms=30 * DAY_MS, description="closed 1-minute bars"),
    TopicSpec(
        "md.ticker",
        "exchange:symbol",
        6,
        TopOfBook,
        retention_ms=1 * DAY_MS,
        description="top of book (best bid/ask, Binance bookTicker)",
    ),
    TopicSpec(
        "orders.intents",
        "account",
        6,
        PipelineRequest,
        value_type=StrategyMessage,
        retention_ms=30 * DAY_MS,
        description="strategy requests (submit, order list, cancel, amend, progress) → risk gate",
    ),
    TopicSpec(
        "orders.approved",
        "account",
        6,
        PipelineRequest,
        value_type=ApprovedMessage,
        retention_ms=30 * DAY_MS,
        description="requests the risk gate let through (and rejection notices, in order) → execution",
    ),
    TopicSpec(
        "orders.rejected",
        "account",
        6,
        RejectedIntent,
        retention_ms=30 * DAY_MS,
        description="intents the risk gate refused, with the decision",
    ),
    TopicSpec(
        "orders.events",
        "account",
        6,
        ExecutionMessage,
        value_type=ExecutionEvent,
        retention_ms=30 * DAY_MS,
        description="order updates (state + event) and venue progress from the execution agent",
    ),
    TopicSpec("fills", "account", 6, AccountFill, retention_ms=90 * DAY_MS, description="executions"),
    TopicSpec(
        "positions",
        "account:exchange:symbol:strategy",
        6,
        Position,
        compacted=True,
        description="latest position per account/exchange/symbol/strategy",
    ),
    TopicSpec(
        "risk.decisions",
        "account",
        6,
        RiskDecisionMessage,
        retention_ms=30 * DAY_MS,
        description="every risk decision, approved or not (audit)",
    ),
    TopicSpec(
        "control",
        "scope",
        1,
        ControlMessage,
        value_type=ControlCommand,
        retention_ms=30 * DAY_MS,
        description="kill switch, subscriptions, strategy parameters, market-data status (one partition: total order)",
    ),
    TopicSpec(
        "dlq",
        "topic",
        3,
        DeadLetter,
        retention_ms=14 * DAY_MS,
        description="messages an agent could not decode, with the reason",
    ),
)
DLQ = "dlq"


# --- keys ------------------------------------------------------------------------------------------


def _part(value: str, what: str) -> str:
    if not value or (":" in value and what != "symbol"):
        raise ValueError(f"{what} {value!r} must be non-empty and contain no ':'")
    return value


def market_key(exchange: str, symbol: str) -> str:
    """``binance:BTC/USDT`` — market data is keyed by ``exchange:symbol``."""
    return f"{_part(exchange, 'exchange')}:{_part(symbol, 'symbol')}"


def market_status_key(exchange: str, symbol: str) -> str:
    """``market:binance:BTC/USDT`` — the ``control`` key of a ``MarketStatus``: a scope of its own, never
    the bare market key (stages that also read market-keyed topics keep per-market state under that)."""
    return f"market:{market_key(exchange, symbol)}"


def account_key(account: str) -> str:
    """Intents, approvals, events, fills and decisions are keyed by account."""
    return _part(account, "account")


def position_key(account: str, exchange: str, symbol: str, strategy: str) -> str:
    """Key of the compacted ``positions`` topic: one record per position survives compaction."""
    return f"{_part(account, 'account')}:{_part(exchange, 'exchange')}:{_part(strategy, 'strategy')}:{symbol}"


# --- the catalogue ---------------------------------------------------------------------------------


class Catalogue:
    """The specs with a physical-name prefix. ``Catalogue()`` reads ``MELTICA_TOPIC_PREFIX``."""

    def __init__(self, prefix: str | None = None, specs: tuple[TopicSpec, ...] = SPECS) -> None:
        self.prefix = os.environ.get(PREFIX_ENV, "") if prefix is None else prefix
        self._specs = {spec.name: spec for spec in specs}
        for spec in specs:
            if not _TOPIC_NAME.match(self.topic_name(spec.name)):
                raise ValueError(f"invalid Kafka topic name {self.topic_name(spec.name)!r}")
        self._by_physical = {self.topic_name(name): spec for name, spec in self._specs.items()}

    def __iter__(self) -> Iterator[TopicSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def topic_name(self, name: str) -> str:
        """Logical → physical name."""
        return f"{self.prefix}{name}"

    def spec(self, topic: str | TopicSpec) -> TopicSpec:
        """The spec for a logical name, a physical name or a spec; ``KeyError`` when unknown."""
        if isinstance(topic, TopicSpec):
            return topic
        found = self._by_physical.get(topic) or self._specs.get(topic)
        if found is None:
            raise KeyError(f"unknown topic {topic!r} (prefix {self.prefix!r})")
        return found

    @property
    def dlq(self) -> TopicSpec:
        return self._specs[DLQ]

    def physical_names(self) -> list[str]:
        return [self.topic_name(name) for name in self._specs]


def default_catalogue() -> Catalogue:
    return Catalogue()
