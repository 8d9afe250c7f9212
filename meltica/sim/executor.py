"""``HeldRequest`` and ``RequestExecutor``: a strategy's request on its way to a simulated venue.

A request (submit, cancel, amend, order list) is held with an *arrival time* — decision time + latency —
and carried out, in the order made, once the simulation reaches it (the backtest at a bar's open or the
next event, the live pipeline's lock-step mode at the open of the bar it reached). ``RequestExecutor``
carries it out through the real ``OrderManager`` and ``LocalOrderEmulator``, so a request does the same
thing in a backtest and in a paper run.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from meltica.domain import Order, OrderIntent, OrderStatus, OrderType
from meltica.errors import MelticaError
from meltica.execution import OrderManager
from meltica.execution.emulation import LocalOrderEmulator

END_OF_DATA = "end of data: never sent"
"""The reason an order a simulated context still held when the data ended is cancelled with (never sent)."""


@dataclass(slots=True)
class HeldRequest:
    """A strategy's request on its way to the venue: sent once ``arrival`` is reached (module docstring)."""

    arrival: datetime
    kind: str  # submit | cancel | amend | list
    client_order_id: str = ""
    intent: OrderIntent | None = None
    intents: tuple[OrderIntent, ...] = ()
    list_id: str = ""
    list_kind: str = ""
    price: Decimal | None = None
    quantity: Decimal | None = None


class RequestExecutor:
    """The venue half of a simulated context: hands released requests to the OMS / the emulator.

    Shared by ``BacktestContext`` and the live pipeline's execution agent
    (``meltica.live.execution.ExecutionService``), so a request does the same thing in both. ``known``
    returns the order as the requester knows it (held orders included: built from the intent, status
    ``pending_submit``); ``local_cancel`` reports an order cancelled before it ever reached the OMS.
    """

    def __init__(
        self,
        oms: OrderManager,
        emulator: LocalOrderEmulator,
        store: Any,
        *,
        known: Callable[[str], Order | None],
        local_cancel: Callable[[Order, str], None],
        logger: logging.Logger,
    ) -> None:
        self.oms = oms
        self.emulator = emulator
        self.store = store
        self.known = known
        self.local_cancel = local_cancel
        self._log = logger

    async def execute(self, request: HeldRequest) -> bool:
        """Send one request; ``True`` when it involved the local emulation (order lists, emulated types)."""
        kind = request.kind
        oms = self.oms
        if kind == "submit":
            assert request.intent is not None
            await oms.submit(request.intent)
            return request.intent.type not in (OrderType.MARKET, OrderType.LIMIT)
        if kind == "cancel":
            await self.cancel_now(request.client_order_id)
        elif kind == "amend":
            order = self.known(request.client_order_id)
            if order is None or order.status not in (OrderStatus.OPEN, OrderStatus.PARTIALLY_FILLED):
                self._log.debug("amend %s: not open any more", request.client_order_id)
                return False
            try:
                await oms.amend(request.client_order_id, price=request.price, quantity=request.quantity)
            except MelticaError as exc:
                self._log.debug("amend %s refused: %s", request.client_order_id, exc)
        else:
            kind_name: Literal["oco", "bracket"] = "oco" if request.list_kind == "oco" else "bracket"
            await self.emulator.add_list(kind_name, request.intents, request.list_id)
            return True
        return False

    async def cancel_now(self, client_order_id: str) -> None:
        order = self.known(client_order_id)
        if order is None or order.is_terminal:
            return
        if self.store.get(client_order_id) is None:
            # never sent, or an order list's leg the local order emulation holds (a bracket exit waiting for
            # its entry, a leg waiting for its trigger or working through a child order)
            with contextlib.suppress(KeyError):
                await self.emulator.cancel(client_order_id)
            now = self.known(client_order_id)
            if now is None or not now.is_terminal:  # the requester's view does not follow the emulation
                self.local_cancel(order, "cancelled before it was sent")
            return
        try:
            await self.oms.cancel(client_order_id)
        except MelticaError as exc:  # closed meanwhile: a no-op for the strategy
            self._log.debug("cancel %s: %s", client_order_id, exc)

    async def end_of_data(self, outbox: deque[HeldRequest]) -> None:
        """Held cancels are delivered; held new orders and amendments never reach the venue."""
        while outbox:
            request = outbox.popleft()
            if request.kind == "cancel":
                await self.cancel_now(request.client_order_id)
                continue
            if request.kind == "amend":
                continue
            coids = (
                [i.client_order_id for i in request.intents] if request.kind == "list" else [request.client_order_id]
            )
            for coid in coids:
                order = self.known(coid)
                if order is not None and not order.is_terminal and self.store.get(coid) is None:
                    self.local_cancel(order, END_OF_DATA)
