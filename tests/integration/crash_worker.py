"""A separate OMS process for the crash-safety tests (``tests/integration/test_oms_crash.py``).

    python crash_worker.py submit  '<json args>'   # submit one intent (MELTICA_CRASH_POINT may kill it)
    python crash_worker.py amend   '<json args>'   # amend the stored order of ``intent`` to ``price``/``quantity``
    python crash_worker.py cancel_all '<json args>'  # cancel every open order
    python crash_worker.py recover '<json args>'   # a fresh process: OrderManager.recover()

json args: ``db_url``, ``emulator_url``, ``api_key``, ``secret``, ``intent`` (OrderIntent as JSON),
``resend_unsent`` (bool); for ``amend``: ``price`` / ``quantity`` (strings). Prints one JSON line with
the result on stdout and exits 0; a crash point ends it with exit code 137 and prints nothing.
``amend`` and ``cancel_all`` run ``recover()`` first, as a restarted process does, to load the open orders.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from meltica.adapters.ccxt import RetryPolicy as AdapterRetry
from meltica.adapters.registry import create_adapter
from meltica.domain import OrderIntent
from meltica.emulator import CCXT_OPTIONS, ccxt_urls_for
from meltica.execution import OrderManager, OrderStore, RetryPolicy
from meltica.storage.engine import make_engine


def _now() -> datetime:
    return datetime.now(UTC)


async def main(mode: str, args: dict[str, Any]) -> dict[str, Any]:
    engine = make_engine(args["db_url"])
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": args["api_key"], "secret": args["secret"]},
        urls={"api": ccxt_urls_for(args["emulator_url"])},
        options=dict(CCXT_OPTIONS),
        retry=AdapterRetry(max_attempts=3, base_delay=0.01, max_delay=0.05),
    )
    await adapter.connect()
    oms = OrderManager(
        OrderStore(engine),
        {"main": adapter},
        clock=_now,
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
        resend_unsent=bool(args.get("resend_unsent", False)),
    )
    try:
        if mode == "submit":
            order = await oms.submit(OrderIntent.model_validate(args["intent"]))
            return {"status": order.status.value, "filled": str(order.filled_quantity)}
        if mode in ("amend", "cancel_all"):
            await oms.recover()  # a fresh process loads its open orders on start, as a restart does
        if mode == "amend":
            intent = OrderIntent.model_validate(args["intent"])
            price = args.get("price")
            quantity = args.get("quantity")
            order = await oms.amend(
                intent.client_order_id,
                price=None if price is None else Decimal(price),
                quantity=None if quantity is None else Decimal(quantity),
            )
            return {"client_order_id": order.client_order_id, "status": order.status.value}
        if mode == "cancel_all":
            orders = await oms.cancel_all(reason="crash test")
            return {"statuses": [o.status.value for o in orders]}
        report = await oms.recover()
        return report.summary()
    finally:
        await adapter.close()
        engine.dispose()


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
    print(json.dumps(result, default=str))
