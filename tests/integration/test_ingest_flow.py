"""The ingestion flow as real Prefect flow runs (ephemeral API) against real PostgreSQL and the local
Binance emulator, whose ``/api/v3/klines`` serves replayed recorded history."""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, text

from meltica.emulator import EmulatorConfig, EmulatorServer
from meltica.errors import AuthenticationError, ExchangeUnavailableError, InfrastructureUnavailableError, NetworkError
from meltica.marketdata.ingest import Gap, find_gaps

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
KEY, SECRET = "ingest-key", "ingest-secret"
BARS = 2500  # replayed into the emulator: 3 pages of 1000
SYMBOL = "BTC/USDT"
T = TypeVar("T")


class BackgroundEmulator:
    """An emulator serving from its own event loop thread, so synchronous flow runs can call it."""

    def __init__(self, emu: EmulatorServer) -> None:
        self.emu = emu
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def close(self) -> None:
        self.run(self.emu.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    bg = BackgroundEmulator(EmulatorServer(EmulatorConfig.single(KEY, SECRET, data=[DATA])))
    try:
        bg.run(bg.emu.start())
        assert bg.run(bg.emu.step(BARS)) == BARS
        yield bg.emu
    finally:
        bg.close()


def recorded_bars(n: int) -> list[tuple[datetime, Decimal]]:
    """(open time, close) of the first ``n`` bars of the recorded file."""
    out: list[tuple[datetime, Decimal]] = []
    with gzip.open(DATA, "rt") as fh:
        next(fh)
        for line in fh:
            cells = line.strip().split(",")
            out.append((datetime.fromisoformat(cells[0]).replace(tzinfo=UTC), Decimal(cells[4])))
            if len(out) == n:
                break
    return out


def stored(engine: Engine) -> list[tuple[datetime, Decimal]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT ts, close FROM candles WHERE exchange = 'binance' AND symbol = :s AND timeframe = '1m' "
                "ORDER BY ts"
            ),
            {"s": SYMBOL},
        ).all()
    return [(r.ts, r.close) for r in rows]


def run_ingest(engine: Engine, emulator_url: str, **kwargs: Any) -> Any:
    from flows.ingest import ingest

    kwargs.setdefault("database", engine.url.render_as_string(hide_password=False))
    return ingest("binance", [SYMBOL], ["1m"], emulator_url=emulator_url, return_state=True, **kwargs)


def test_ingest_loads_the_venue_history_once(
    prefect_api: None, emulator: EmulatorServer, fresh_database: Engine
) -> None:
    from prefect.client.schemas.objects import StateType

    state = run_ingest(fresh_database, emulator.rest_url)
    assert state.type == StateType.COMPLETED, state.message
    [first] = state.result()
    assert (first["fetched"], first["inserted"], first["pages"], first["gaps"]) == (BARS, BARS, 3, [])

    expected = recorded_bars(BARS)
    assert [(ts, Decimal(close)) for ts, close in stored(fresh_database)] == expected

    # Second run resumes after the newest stored bar: one page, nothing new, nothing missing.
    [again] = run_ingest(fresh_database, emulator.rest_url).result()
    assert (again["fetched"], again["inserted"], again["gaps"], again["unfilled"]) == (0, 0, [], [])
    assert len(stored(fresh_database)) == BARS
    assert _artifact_markdown(state.state_details.flow_run_id).count(f"| {SYMBOL} 1m | {BARS} | {BARS} |") == 1


def test_a_planted_gap_is_found_and_refetched(
    prefect_api: None, emulator: EmulatorServer, fresh_database: Engine
) -> None:
    start = recorded_bars(1)[0][0]
    [loaded] = run_ingest(fresh_database, emulator.rest_url, start=start.isoformat()).result()
    assert loaded["inserted"] == BARS

    hole_from, hole_to = start + timedelta(minutes=1200), start + timedelta(minutes=1290)
    with fresh_database.begin() as conn:
        deleted = conn.execute(
            text("DELETE FROM candles WHERE symbol = :s AND ts >= :a AND ts < :b"),
            {"s": SYMBOL, "a": hole_from, "b": hole_to},
        ).rowcount
    assert deleted == 90
    end = start + timedelta(minutes=BARS)
    assert find_gaps(fresh_database, "binance", SYMBOL, "1m", start, end) == [Gap(hole_from, hole_to, 90)]

    [repaired] = run_ingest(fresh_database, emulator.rest_url, start=start.isoformat()).result()
    assert repaired["gaps"] == [str(Gap(hole_from, hole_to, 90))]
    assert (repaired["refetched"], repaired["inserted"], repaired["unfilled"]) == (90, 90, [])
    assert find_gaps(fresh_database, "binance", SYMBOL, "1m", start, end) == []
    assert [(ts, Decimal(c)) for ts, c in stored(fresh_database)] == recorded_bars(BARS)


def test_unreachable_venue_fails_the_flow_with_the_taxonomy_error(
    prefect_api: None, fresh_database: Engine, free_port: Callable[[], int]
) -> None:
    from prefect.client.schemas.objects import StateType

    state = run_ingest(fresh_database, f"http://127.0.0.1:{free_port()}", retries=1, retry_delay_seconds=0)
    assert state.type == StateType.FAILED
    with pytest.raises((ExchangeUnavailableError, NetworkError)) as caught:
        state.result()
    assert caught.value.retryable
    # Retryable: the task's one retry was used.
    assert _task_run_counts(state.state_details.flow_run_id) == [2]
    assert "failed" in _artifact_markdown(state.state_details.flow_run_id)


def test_unreachable_database_fails_the_flow_with_the_taxonomy_error(
    prefect_api: None, emulator: EmulatorServer, free_port: Callable[[], int], fresh_database: Engine
) -> None:
    from prefect.client.schemas.objects import StateType

    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    state = run_ingest(fresh_database, emulator.rest_url, database=url, retries=0)
    assert state.type == StateType.FAILED
    with pytest.raises(InfrastructureUnavailableError, match=r"the database is unavailable.*(refused|failed)"):
        state.result()


def test_a_wrong_database_password_is_not_retried_and_says_so(
    prefect_api: None, emulator: EmulatorServer, fresh_database: Engine
) -> None:
    """A refused login is terminal (retrying the same password cannot help): one attempt, and the message
    keeps the server's reason, so it does not read like an outage."""
    from prefect.client.schemas.objects import StateType

    url = fresh_database.url.set(password="not-the-password").render_as_string(hide_password=False)
    state = run_ingest(fresh_database, emulator.rest_url, database=url, retries=2, retry_delay_seconds=0.1)
    assert state.type == StateType.FAILED
    with pytest.raises(AuthenticationError, match="password authentication failed") as failure:
        state.result()
    assert "not-the-password" not in str(failure.value)
    assert _task_run_counts(state.state_details.flow_run_id) == [1]


def _task_run_counts(flow_run_id: object) -> list[int]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch() -> list[int]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [run.run_count for run in runs]

    return asyncio.run(fetch())


def _artifact_markdown(flow_run_id: object) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            return "\n".join(str(a.data) for a in found)

    return asyncio.run(fetch())
