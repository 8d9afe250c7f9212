"""The candle-file import as a real Prefect flow run (ephemeral API) against real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _stored_parameters(flow_run_id: object) -> dict[str, object]:
    import asyncio

    from prefect.client.orchestration import get_client

    async def fetch() -> dict[str, object]:
        async with get_client() as client:
            return dict((await client.read_flow_run(flow_run_id)).parameters)

    return asyncio.run(fetch())


def test_import_flow_loads_file_once_and_reports_an_artifact(
    prefect_api: None, migrated_database: Engine, tmp_path: Path
) -> None:
    from prefect.client.schemas.objects import StateType

    from flows.candles import import_candle_file

    data = tmp_path / "eth.csv"
    data.write_text(
        "timestamp,open,high,low,close,volume\n"
        "2022-01-01T00:00:00Z,3676.0,3680.5,3670.1,3675.2,12.5\n"
        "2022-01-01T00:01:00Z,3675.2,3690.0,3675.0,3689.9,7.25\n"
        "2022-01-01T00:02:00Z,3689.9,3689.9,3660.0,3661.0,30\n"
    )
    url = migrated_database.url.render_as_string(hide_password=False)

    state = import_candle_file(str(data), "binance", "ETH/USDT", "1m", database=url, return_state=True)
    assert state.type == StateType.COMPLETED
    first = state.result()
    assert (first["read"], first["inserted"]) == (3, 3)

    # The database URL's password is not kept in Prefect's database (nor shown in the UI).
    password = migrated_database.url.password
    assert password
    stored = _stored_parameters(state.state_details.flow_run_id)
    assert str(password) not in str(stored)
    assert ":***@" in str(stored["database"]) and stored["symbol"] == "ETH/USDT"

    again = import_candle_file(str(data), "binance", "ETH/USDT", "1m", database=url)
    assert (again["read"], again["inserted"], again["already_stored"]) == (3, 0, 3)

    with migrated_database.connect() as conn:
        closes = conn.execute(text("SELECT close FROM candles WHERE symbol = 'ETH/USDT' ORDER BY ts")).scalars().all()
    assert [str(c) for c in closes] == ["3675.2", "3689.9", "3661.0"]


def test_import_flow_fails_on_malformed_file_without_retrying(
    prefect_api: None, migrated_database: Engine, tmp_path: Path
) -> None:
    from prefect.client.schemas.objects import StateType

    from flows.candles import import_candle_file

    data = tmp_path / "broken.csv"
    data.write_text("timestamp,open,high,low,close,volume\n2022-01-01T00:00:00Z,1,2,3,1.5,1\n")
    url = migrated_database.url.render_as_string(hide_password=False)
    state = import_candle_file(str(data), "binance", "BROKEN/USDT", "1m", database=url, return_state=True)
    assert state.type == StateType.FAILED
    with pytest.raises(Exception, match=r"broken\.csv:2: malformed row"):
        state.result()
    # A malformed file is terminal: the task ran once, its retries were not used.
    assert _task_run_counts(state.state_details.flow_run_id) == [1]


def _task_run_counts(flow_run_id: object) -> list[int]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch() -> list[int]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [run.run_count for run in runs]

    return asyncio.run(fetch())


def test_import_flow_names_a_database_refusal_in_one_line_without_retrying(
    prefect_api: None, fresh_database: Engine, tmp_path: Path
) -> None:
    """A refusal by the server (here: the candles table is gone) is terminal and said in one line."""
    from prefect.client.schemas.objects import StateType

    from flows.candles import import_candle_file
    from meltica.errors import StorageError

    data = tmp_path / "two.csv"
    data.write_text(
        "timestamp,open,high,low,close,volume\n"
        "2022-01-01T11:05:00Z,3676.0,3680.5,3670.1,3675.2,12.5\n"
        "2022-01-01T11:06:00Z,3675.2,3690.0,3675.0,3689.9,7.25\n"
    )
    with fresh_database.begin() as conn:
        conn.execute(text("ALTER TABLE candles RENAME TO candles_elsewhere"))
    url = fresh_database.url.render_as_string(hide_password=False)
    state = import_candle_file(str(data), "binance", "ETH/USDT", "1m", database=url, return_state=True)
    assert state.type == StateType.FAILED
    with pytest.raises(StorageError) as info:
        state.result()
    assert str(info.value) == (
        'storing binance ETH/USDT 1m candles: the database refused it: relation "candles" does not exist'
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no SQL chain behind it
    assert _task_run_counts(state.state_details.flow_run_id) == [1]
