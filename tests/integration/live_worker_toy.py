"""A toy :class:`~meltica.live.processor.Processor` for the worker tests (``test_live_worker.py``).

``RunningSum`` reads trades (``md.trades``, key ``exchange:symbol``) and keeps, per key, the running sum
of the quantities and the trade ids it has counted (its dedupe: a redelivered trade changes nothing and
publishes nothing). For each new trade it publishes a ``RiskDecisionMessage`` on ``risk.decisions``
(``intent_id`` = trade id, ``details`` = the sum after it), so a test sees every effect exactly.

The worker subprocess imports it as ``live_worker_toy:factory`` (``PYTHONPATH=tests/integration``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from meltica.domain import TopOfBook, Trade
from meltica.live.processor import Emit, Incoming, Outgoing
from meltica.messaging import RiskDecisionMessage

NAME = "toy-sum"


class RunningSum:
    name = NAME
    inputs: tuple[str, ...] = ("md.trades",)

    def __init__(
        self,
        delay: float = 0.0,
        stop_marker: str | None = None,
        hang_on_stop: bool = False,
        stall_after: int = 0,
        pad: int = 0,
    ) -> None:
        self.delay = delay
        self.pad = pad  # > 0: each key's state carries that many more bytes (the large-state tests)
        self.stall_after = stall_after  # > 0: the handle after that many new trades never returns (stall test)
        self.handled = 0
        self.hang_on_stop = hang_on_stop  # a stop that never returns (blocks the event loop): the watchdog test
        self.stop_marker = stop_marker
        self.sums: dict[str, Decimal] = {}
        self.seen: dict[str, set[str]] = {}
        self.restored: list[str] = []
        self.emit: Emit | None = None

    async def start(self, emit: Emit) -> None:
        self.emit = emit

    async def stop(self) -> None:
        if self.hang_on_stop:
            time.sleep(3600)
        if self.stop_marker:  # proves stop() ran on a graceful shutdown
            Path(self.stop_marker).write_text(json.dumps({"pid": os.getpid(), "keys": len(self.sums)}))

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        trade = message.value
        assert isinstance(trade, Trade)
        key = message.key or ""
        seen = self.seen.setdefault(key, set())
        if trade.trade_id in seen:
            return []
        if self.delay:
            await asyncio.sleep(self.delay)
        self.handled += 1
        if self.stall_after and self.handled > self.stall_after:
            await asyncio.Event().wait()  # like an output send whose acknowledgement never comes
        seen.add(trade.trade_id)
        total = self.sums[key] = self.sums.get(key, Decimal(0)) + trade.quantity
        decision = RiskDecisionMessage(
            intent_id=trade.trade_id,
            approved=True,
            ts=trade.ts,
            details={"key": key, "sum": str(total), "count": len(seen)},
        )
        return [Outgoing("risk.decisions", key, decision)]

    def snapshot(self, key: str) -> dict[str, Any] | None:
        if key not in self.sums:
            return None
        state: dict[str, Any] = {"sum": str(self.sums[key]), "seen": sorted(self.seen[key])}
        if self.pad:
            state["pad"] = "x" * self.pad
        return state

    def restore(self, key: str, state: Mapping[str, Any]) -> None:
        if self.pad:
            assert len(state["pad"]) == self.pad, "the state was restored cut"
        self.sums[key] = Decimal(state["sum"])
        self.seen[key] = set(state["seen"])
        self.restored.append(key)


def factory(config: Mapping[str, Any]) -> list[RunningSum]:
    params = dict(config.get("params") or {})
    return [
        RunningSum(
            delay=float(params.get("delay", 0.0)),
            stop_marker=params.get("stop_marker"),
            hang_on_stop=bool(params.get("hang_on_stop", False)),
            stall_after=int(params.get("stall_after", 0)),
            pad=int(params.get("pad", 0)),
        )
    ]


# --- two stages in one worker (the batch lanes' in-process hand-over) ---------------------------------

RELAY_EPOCH = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def relayed_trade_id(ts: datetime) -> str:
    """The relay keeps a trade's identity in its ticker's time: trade ``t<i>`` is stamped epoch + i µs."""
    return f"t{(ts - RELAY_EPOCH) // timedelta(microseconds=1)}"


def top_of_book(trade: Trade) -> TopOfBook:
    """The ticker the relay makes of a trade: bid and ask at its price and quantity, at its time."""
    return TopOfBook(
        exchange=trade.exchange,
        symbol=trade.symbol,
        bid=trade.price,
        bid_quantity=trade.quantity,
        ask=trade.price,
        ask_quantity=trade.quantity,
        ts=trade.ts,
    )


class TickerRelay:
    """Stage one: each trade becomes a ``TopOfBook`` on ``md.ticker`` (same key: same partition count)."""

    name = "toy-relay"
    inputs: tuple[str, ...] = ("md.trades",)

    async def start(self, emit: Emit) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        trade = message.value
        assert isinstance(trade, Trade)
        return [Outgoing("md.ticker", message.key or "", top_of_book(trade))]

    def snapshot(self, key: str) -> dict[str, Any] | None:
        return None  # stateless

    def restore(self, key: str, state: Mapping[str, Any]) -> None:
        return None


class TickerSum(RunningSum):
    """Stage two: :class:`RunningSum` over the relayed tickers (trade id and quantity carried through)."""

    name = "toy-ticker-sum"
    inputs: tuple[str, ...] = ("md.ticker",)

    async def handle(self, message: Incoming) -> Sequence[Outgoing]:
        top = message.value
        assert isinstance(top, TopOfBook)
        trade = Trade(
            exchange=top.exchange,
            symbol=top.symbol,
            trade_id=relayed_trade_id(top.ts),
            price=top.bid,
            quantity=top.bid_quantity,
            ts=top.ts,
        )
        return await super().handle(dataclasses.replace(message, value=trade))


def two_stage_factory(config: Mapping[str, Any]) -> list[Any]:
    params = dict(config.get("params") or {})
    return [TickerRelay(), TickerSum(delay=float(params.get("delay", 0.0)))]
