"""The live execution stage in a process of its own, for the restart tests (``test_live_driver_restart.py``).

    python live_exec_process.py '<json args>'

Runs ``ExecutionService`` (live, not lock-step) with a ``LiveDriver`` over the ccxt adapter pointed at
the emulator, the PostgreSQL ``OrderStore`` (write-ahead; ``start()`` recovers every order in flight)
and the PostgreSQL ``SqlEmulationStore`` (locally held orders come back on ``start()``). json args:
``db_url``, ``emulator_url``, ``api_key``, ``secret``.

Prints ``{"ready": true, "recovery": ...}`` once started, then reads one JSON command per line on
stdin and answers one JSON line each: ``{"op": "submit", "request": <SubmitRequest>}``, ``{"op":
"cancel", "request": <CancelRequest>}``, ``{"op": "halt"}`` (kill switch, the account's scope),
``{"op": "orders"}`` (the OMS's open orders), ``{"op": "held"}`` (the orders the local emulation holds,
with their status), ``{"op": "quit"}``. ``MELTICA_CRASH_POINT`` kills it
(exit 137) inside the OMS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from meltica.adapters.ccxt import RetryPolicy
from meltica.adapters.registry import create_adapter
from meltica.emulator import CCXT_OPTIONS, ccxt_urls_for
from meltica.execution import OrderStore
from meltica.execution.emulation_store import DurableHeldOrderStore, SqlEmulationStore
from meltica.live.config import AccountVenueConfig, PipelineConfig, StrategyInstanceConfig
from meltica.live.execution import ExecutionService
from meltica.live.live_driver import LiveDriver
from meltica.live.processor import Incoming, Outgoing
from meltica.messaging.schemas import CancelRequest, KillSwitchCommand, SubmitRequest
from meltica.storage.engine import make_engine

ACCOUNT, SYMBOL = "main", "BTC/USDT"


def config() -> PipelineConfig:
    return PipelineConfig(
        instances=(
            StrategyInstanceConfig(
                instance_id="s", strategy="manual", account=ACCOUNT, exchange="binance", symbols=(SYMBOL,)
            ),
        ),
        accounts={ACCOUNT: AccountVenueConfig(exchange="binance", venue="emulator")},
    )


def _line(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


async def main(args: dict[str, Any]) -> None:
    engine = make_engine(args["db_url"])
    adapter = create_adapter(
        "binance",
        account=ACCOUNT,
        credentials={"apiKey": args["api_key"], "secret": args["secret"]},
        urls={"api": ccxt_urls_for(args["emulator_url"])},
        options=dict(CCXT_OPTIONS),
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
    )
    driver = LiveDriver(adapter, account=ACCOUNT, poll_interval=0.2, stale_after=1.0)
    service = ExecutionService(
        config(),
        {ACCOUNT: driver},
        store=OrderStore(engine),
        emulation_store=lambda account: DurableHeldOrderStore(SqlEmulationStore(engine, account=account)),
    )
    published: list[Outgoing] = []

    async def emit(out: Outgoing) -> None:
        published.append(out)

    await service.start(emit)
    lane = service.lanes[ACCOUNT]
    _line({"ready": True, "open": [o.client_order_id for o in lane.oms.open_orders()]})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            raw = await reader.readline()
            if not raw:
                break
            command = json.loads(raw)
            op = command["op"]
            if op == "quit":
                _line({"ok": True})
                break
            if op == "submit":
                value: Any = SubmitRequest.model_validate(command["request"])
            elif op == "cancel":
                value = CancelRequest.model_validate(command["request"])
            elif op == "halt":
                value = KillSwitchCommand(
                    command_id=uuid.uuid4().hex,
                    ts=datetime.now(UTC),
                    actor="test",
                    scope=f"account:{ACCOUNT}",
                    mode="halt",
                    reason="restart test",
                )
            elif op == "orders":
                _line({"open": sorted(o.client_order_id for o in lane.oms.open_orders())})
                continue
            elif op == "held":
                _line({"held": {o.client_order_id: o.status.value for o in lane.emulator.orders(active=False)}})
                continue
            else:
                raise ValueError(op)
            await service.handle(Incoming("orders.approved", ACCOUNT, value))
            _line({"ok": True, "open": sorted(o.client_order_id for o in lane.oms.open_orders())})
    finally:
        await service.stop()
        engine.dispose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(json.loads(sys.argv[1])))
