"""The live execution stage killed and restarted: exactly one order on the venue, the database agrees.

The emulator (Binance, ccxt's own classes) runs in this test process; the execution stage —
``ExecutionService`` + ``LiveDriver`` + the PostgreSQL ``OrderStore`` — runs in a plain subprocess
(``live_exec_process.py``) that ``MELTICA_CRASH_POINT`` kills (``os._exit(137)``, as SIGKILL) inside
the OMS: after a new order was sent and before its acknowledgement was stored, and the same for a
cancel. A new process on the same database then recovers on start, before it takes a request; the
request, handed over again (at-least-once delivery), sends nothing twice. After a restart the kill
switch cancels every resting order on the venue, including the ones only the database knew.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from meltica.adapters.ccxt import CcxtAdapter, RetryPolicy
from meltica.adapters.registry import create_adapter
from meltica.domain import OrderIntent, OrderType, Side
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.execution import CRASH_POINT_ENV
from meltica.messaging.schemas import CancelRequest, SubmitRequest
from meltica.storage import migrate
from meltica.storage.engine import make_engine
from tests.integration.databases import drop_test_database

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
TRADES = DATA / "btcusdt-trades.parquet"
KEY, SECRET = "restart-key", "restart-secret"
PROCESS = Path(__file__).with_name("live_exec_process.py")
SYMBOL = "BTC/USDT"


@pytest.fixture
def database(postgres_endpoint: Any) -> Iterator[tuple[Engine, str]]:
    name = f"meltica_t_{uuid.uuid4().hex[:10]}"
    admin = make_engine(postgres_endpoint.url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_endpoint.url_for(name)
    engine = make_engine(url)
    migrate.upgrade(engine)
    try:
        yield engine, url
    finally:
        engine.dispose()
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            drop_test_database(conn, name)
        admin.dispose()


class ExecutionProcess:
    """One ``live_exec_process.py``: JSON commands in on stdin, one JSON answer line each."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def _read(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=60)
        return json.loads(line) if line else None

    async def command(self, op: str, **body: Any) -> dict[str, Any] | None:
        """The answer, or ``None`` when the process died on the way (a crash point)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **body}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._read()

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout=30)

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()[-3000:]


@asynccontextmanager
async def execution_process(
    emu: EmulatorServer, db_url: str, *, crash: str | None = None
) -> AsyncIterator[ExecutionProcess]:
    env = dict(os.environ)
    env.pop(CRASH_POINT_ENV, None)
    if crash is not None:
        env[CRASH_POINT_ENV] = crash
    args = {"db_url": db_url, "emulator_url": f"http://127.0.0.1:{emu.port}", "api_key": KEY, "secret": SECRET}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROCESS),
        json.dumps(args),
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    process = ExecutionProcess(proc)
    try:
        ready = await process._read()
        if ready is None or not ready.get("ready"):
            raise AssertionError(f"the execution process did not start: {await process.stderr()}")
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def started_emulator() -> EmulatorServer:
    emu = EmulatorServer(
        EmulatorConfig.single(
            KEY, SECRET, data=[TRADES], default_balances={"USDT": Decimal(100_000), "BTC": Decimal(2)}
        )
    )
    await emu.start()
    await emu.step(20)  # a last price
    return emu


def checker(emu: EmulatorServer) -> CcxtAdapter:
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
    )
    assert isinstance(adapter, CcxtAdapter)
    return adapter


def submit_request(prefix: str, side: Side, kind: OrderType, **fields: Any) -> SubmitRequest:
    """A request for 0.01 BTC of ``main``/``s`` on Binance, with a new intent id."""
    now = datetime.now(UTC)
    intent = OrderIntent(
        intent_id=f"{prefix}-{uuid.uuid4().hex[:12]}",
        account="main",
        strategy="s",
        exchange="binance",
        symbol=SYMBOL,
        side=side,
        type=kind,
        quantity=Decimal("0.01"),
        created_at=now,
        **fields,
    )
    return SubmitRequest(request_id=intent.intent_id, account="main", strategy="s", ts=now, intent=intent)


def resting_buy(price: Decimal) -> SubmitRequest:
    return submit_request("restart", Side.BUY, OrderType.LIMIT, price=price)


def cancel_of(submit: SubmitRequest) -> CancelRequest:
    coid = submit.intent.client_order_id
    return CancelRequest(
        request_id=f"cancel-{coid}", account="main", strategy="s", ts=datetime.now(UTC), client_order_id=coid
    )


async def venue_orders(adapter: CcxtAdapter) -> Counter[str]:
    """How many orders of each client order id the venue has (open or not), asked with ccxt's own call."""
    raw = await adapter.exchange.fetch_orders(SYMBOL)
    return Counter(str(o["clientOrderId"]) for o in raw)


async def venue_status(adapter: CcxtAdapter, coid: str) -> str:
    return (await adapter.fetch_order(SYMBOL, client_order_id=coid)).status.value


def db_status(engine: Engine, coid: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT status FROM orders WHERE client_order_id = :c"), {"c": coid}
        ).scalar_one_or_none()


def run(body: Any) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=200))


def test_sigkill_before_an_acknowledgement_is_stored_then_restart(database: tuple[Engine, str]) -> None:
    engine, db_url = database

    async def body() -> None:
        emu = await started_emulator()
        venue = checker(emu)
        try:
            await venue.connect()
            last = (await venue.fetch_ticker(SYMBOL)).last
            assert last is not None
            price = (last * Decimal("0.95")).quantize(Decimal("0.01"))
            submit = resting_buy(price)
            coid = submit.intent.client_order_id

            # 1. killed after the venue took the order, before its acknowledgement was stored
            async with execution_process(emu, db_url, crash="after_send") as proc:
                assert await proc.command("submit", request=submit.model_dump(mode="json")) is None
                assert await proc.exit_code() == 137
            assert db_status(engine, coid) == "pending_submit"
            assert (await venue_orders(venue))[coid] == 1

            # 2. restarted: recovered before any request; the redelivered request sends nothing
            async with execution_process(emu, db_url) as proc:
                assert db_status(engine, coid) == "open"
                answer = await proc.command("submit", request=submit.model_dump(mode="json"))
                assert answer is not None and answer["open"] == [coid]
                await proc.command("quit")
                assert await proc.exit_code() == 0
            assert (await venue_orders(venue))[coid] == 1
            assert await venue_status(venue, coid) == "open"

            # 3. killed after the venue cancelled it, before the answer was stored
            async with execution_process(emu, db_url, crash="after_cancel_send") as proc:
                assert await proc.command("cancel", request=cancel_of(submit).model_dump(mode="json")) is None
                assert await proc.exit_code() == 137
            assert db_status(engine, coid) == "pending_cancel"
            assert await venue_status(venue, coid) == "cancelled"

            # 4. a second order: killed after its cancel was stored, before it was sent
            second = resting_buy(price - Decimal(1))
            coid2 = second.intent.client_order_id
            async with execution_process(emu, db_url, crash="after_cancel_request") as proc:
                assert db_status(engine, coid) == "cancelled"  # step 3 settled by the recovery
                answer = await proc.command("submit", request=second.model_dump(mode="json"))
                assert answer is not None and answer["open"] == [coid2]
                assert await proc.command("cancel", request=cancel_of(second).model_dump(mode="json")) is None
                assert await proc.exit_code() == 137
            assert db_status(engine, coid2) == "pending_cancel"
            assert await venue_status(venue, coid2) == "open"

            # 5. restarted: the cancel requested before the crash is carried out by the recovery
            async with execution_process(emu, db_url) as proc:
                await proc.command("quit")
                assert await proc.exit_code() == 0
            assert db_status(engine, coid2) == "cancelled"
            assert await venue_status(venue, coid2) == "cancelled"
            counts = await venue_orders(venue)
            assert counts == Counter({coid: 1, coid2: 1})
            assert await venue.fetch_open_orders(SYMBOL) == []
        finally:
            await venue.close()
            await emu.stop()

    run(body)


def test_after_a_restart_the_kill_switch_cancels_every_resting_order(database: tuple[Engine, str]) -> None:
    engine, db_url = database

    async def body() -> None:
        emu = await started_emulator()
        venue = checker(emu)
        try:
            await venue.connect()
            last = (await venue.fetch_ticker(SYMBOL)).last
            assert last is not None
            submits = [resting_buy((last * Decimal("0.95")).quantize(Decimal("0.01")) - i) for i in range(3)]
            coids = sorted(s.intent.client_order_id for s in submits)
            async with execution_process(emu, db_url) as proc:
                for submit in submits:
                    await proc.command("submit", request=submit.model_dump(mode="json"))
                proc.proc.send_signal(signal.SIGKILL)
                assert await proc.exit_code() == -signal.SIGKILL
            resting = sorted(str(o.client_order_id) for o in await venue.fetch_open_orders(SYMBOL))
            assert resting == coids

            async with execution_process(emu, db_url) as proc:
                answer = await proc.command("halt")
                assert answer is not None and answer["open"] == []
                await proc.command("quit")
                assert await proc.exit_code() == 0
            assert await venue.fetch_open_orders(SYMBOL) == []
            assert [db_status(engine, c) for c in coids] == ["cancelled"] * 3
            assert [await venue_status(venue, c) for c in coids] == ["cancelled"] * 3
        finally:
            await venue.close()
            await emu.stop()

    run(body)


def held_trailing_stop() -> SubmitRequest:
    """A sell trailing stop with an absolute offset: Binance trails in bps only, so the execution stage's
    local emulation holds it and watches the market (it is on no venue until it fires)."""
    return submit_request("trail", Side.SELL, OrderType.TRAILING_STOP, trailing_offset=Decimal("250"))


def test_a_stop_held_by_the_local_emulation_survives_a_kill_and_the_halt_after_it_ends_it(
    database: tuple[Engine, str],
) -> None:
    """A protective stop that only this process holds is the one order a crash must not lose: the
    venue has no trace of it. After SIGKILL the new process restores it from PostgreSQL before it takes a
    request, still held (not sent); the kill switch then ends it like any open order."""
    engine, db_url = database

    async def body() -> None:
        emu = await started_emulator()
        venue = checker(emu)
        try:
            await venue.connect()
            stop = held_trailing_stop()
            coid = stop.intent.client_order_id
            async with execution_process(emu, db_url) as proc:
                await proc.command("submit", request=stop.model_dump(mode="json"))
                held = await proc.command("held")
                assert held is not None and held["held"] == {coid: "pending"}
                proc.proc.send_signal(signal.SIGKILL)
                assert await proc.exit_code() == -signal.SIGKILL
            assert await venue_orders(venue) == Counter()  # on no venue: only the database knows it

            async with execution_process(emu, db_url) as proc:
                held = await proc.command("held")
                assert held is not None and held["held"] == {coid: "pending"}
                await proc.command("halt")
                held = await proc.command("held")
                assert held is not None and held["held"] == {coid: "cancelled"}
                await proc.command("quit")
                assert await proc.exit_code() == 0
            assert await venue_orders(venue) == Counter()
            with engine.connect() as conn:
                active = conn.execute(
                    text("SELECT active FROM emulated_orders WHERE client_order_id = :c"), {"c": coid}
                ).scalar_one()
            assert active is False
            assert db_status(engine, coid) == "cancelled"
        finally:
            await venue.close()
            await emu.stop()

    run(body)
