"""The backtest and sweep flows as real Prefect flow runs (ephemeral API) on real bars and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "meltica" / "data" / "btc-perp-20211231-20220201_1m.csv.gz"
START = datetime(2022, 1, 1, 0, 0, tzinfo=UTC)
END = datetime(2022, 1, 3, 0, 0, tzinfo=UTC)  # 2,880 one-minute bars
BASE: dict[str, Any] = {"quantity": "0.01", "stop": "percent", "stop_pct": "49"}


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifacts(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def fetch() -> list[Any]:
        async with get_client() as client:
            return list(
                await client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
                )
            )

    return asyncio.run(fetch())


def _embedded_pngs(markdown: str) -> list[bytes]:
    """The images a markdown artifact embeds as data: URIs, decoded (each one a PNG)."""
    images = [base64.b64decode(m) for m in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)]
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    return images


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_backtest_flow_stores_the_run_and_publishes_artifacts(
    prefect_api: None, fresh_database: Engine, tmp_path: Path
) -> None:
    from prefect.client.schemas.objects import StateType

    from flows.backtest import backtest

    state = backtest(
        "momentum",
        {**BASE, "fast": 10, "slow": 40},
        symbol="BTC/USDT",
        start=START,
        end=END,
        data_file=str(DATA),
        fill_model={"taker_fee_bps": "5", "slippage_bps": "1", "latency_ms": 500},
        output_dir=str(tmp_path),
        database=_url(fresh_database),
        return_state=True,
    )
    assert state.type == StateType.COMPLETED
    summary = state.result()
    with fresh_database.connect() as conn:
        run = conn.execute(text("SELECT * FROM backtest_runs")).mappings().one()
        n_metrics = conn.execute(text("SELECT count(*) FROM backtest_metrics")).scalar_one()
        n_equity = conn.execute(text("SELECT count(*) FROM backtest_equity")).scalar_one()
        n_trades = conn.execute(text("SELECT count(*) FROM backtest_trades")).scalar_one()
    assert str(run["run_id"]) == summary["run_id"]
    assert run["status"] == "finished" and run["strategy"] == "momentum" and run["sweep_id"] is None
    assert run["params"]["fast"] == 10 and run["fill_model"]["taker_fee_bps"] == "5"
    assert run["fill_model"]["latency_ms"] == 500
    assert run["data_start"] == START and run["data_end"] == END
    assert n_metrics > 20 and n_equity == 2880 and n_trades == summary["metrics"].trades > 0
    report_dir = tmp_path / summary["run_id"]
    for name in ("report.html", "equity.png", "drawdown.png", "positions.png", "metrics.json"):
        assert (report_dir / name).stat().st_size > 0

    artifacts = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}
    assert {"backtest-metrics", "backtest-charts"} <= set(artifacts)
    assert artifacts["backtest-metrics"].type == "markdown"
    assert "Sharpe ratio" in artifacts["backtest-metrics"].data or "sharpe" in artifacts["backtest-metrics"].data
    assert summary["run_id"] in artifacts["backtest-metrics"].data
    # The charts are in the artifact itself (the UI shows them); no link points at the worker's disk.
    charts = _embedded_pngs(artifacts["backtest-charts"].data)
    assert len(charts) == 3 and charts[0] == (report_dir / "equity.png").read_bytes()
    assert not any("file://" in str(a.data) for a in artifacts.values())
    # The full report is stored in the database and linked under reports_url (default: loopback port 8765).
    with fresh_database.connect() as conn:
        stored = dict(
            conn.execute(
                text("SELECT name, body FROM report_files WHERE report_id = CAST(:r AS uuid)"), {"r": summary["run_id"]}
            ).all()
        )
    assert set(stored) >= {"report.html", "equity.png", "drawdown.png", "positions.png", "metrics.json"}
    assert stored["report.html"] == (report_dir / "report.html").read_bytes()
    link = f"(http://127.0.0.1:8765/reports/{summary['run_id']}/report.html)"
    assert link in artifacts["backtest-charts"].data

    # A rerun repeats no work: the same run id, still one stored row.
    again = backtest(
        "momentum",
        {**BASE, "fast": 10, "slow": 40},
        symbol="BTC/USDT",
        start=START,
        end=END,
        data_file=str(DATA),
        fill_model={"taker_fee_bps": "5", "slippage_bps": "1", "latency_ms": 500},
        output_dir=str(tmp_path),
        database=_url(fresh_database),
        return_state=True,
    )
    assert again.result()["run_id"] == summary["run_id"]
    with fresh_database.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM backtest_runs")).scalar_one() == 1
    # A cached rerun whose stored report is gone (and whose files were cleaned) links nothing, embeds nothing.
    with fresh_database.begin() as conn:
        conn.execute(text("DELETE FROM reports"))
    import shutil

    shutil.rmtree(report_dir)
    gone = backtest(
        "momentum",
        {**BASE, "fast": 10, "slow": 40},
        symbol="BTC/USDT",
        start=START,
        end=END,
        data_file=str(DATA),
        fill_model={"taker_fee_bps": "5", "slippage_bps": "1", "latency_ms": 500},
        output_dir=str(tmp_path),
        database=_url(fresh_database),
        return_state=True,
    )
    rerun = {a.key: a for a in _artifacts(gone.state_details.flow_run_id)}["backtest-charts"].data
    assert "/reports/" not in rerun and "not stored in the database: no link" in rerun, rerun
    assert not _embedded_pngs(rerun) and "no longer on the worker" in rerun


def test_sweep_flow_stores_and_ranks_a_2x2_grid(prefect_api: None, fresh_database: Engine, tmp_path: Path) -> None:
    from flows.backtest import sweep

    result = sweep(
        "momentum",
        {"fast": [5, 10], "slow": [20, 40]},
        base_params=BASE,
        symbol="BTC/USDT",
        start=START,
        end=END,
        data_file=str(DATA),
        objective="total_return",
        workers=4,
        output_dir=str(tmp_path),
        database=_url(fresh_database),
    )
    assert len(result["runs"]) == 4 and [r["rank"] for r in result["runs"]] == [1, 2, 3, 4]
    with fresh_database.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT r.run_id::text, r.sweep_id::text, r.params, m.value FROM backtest_runs r "
                "JOIN backtest_metrics m ON m.run_id = r.run_id AND m.name = 'total_return'"
            )
        ).all()
    assert len(rows) == 4 and {r[1] for r in rows} == {result["sweep_id"]}
    assert {(r[2]["fast"], r[2]["slow"]) for r in rows} == {(5, 20), (5, 40), (10, 20), (10, 40)}
    # The ranking is the stored total returns, best first.
    stored = sorted(rows, key=lambda r: -r[3])
    assert [r["run_id"] for r in result["runs"]] == [r[0] for r in stored]
    assert result["best"]["run_id"] == stored[0][0]
    assert result["best"]["params"]["fast"] == stored[0][2]["fast"]

    flow_run_id = _latest_flow_run("backtest-sweep")
    artifacts = {a.key: a for a in _artifacts(flow_run_id)}
    table = artifacts["sweep-results"].data
    assert "Best parameters" in table and result["sweep_id"] in table
    assert table.count("\n| ") >= 5  # header + four ranked rows
    assert len(_embedded_pngs(artifacts["sweep-best-charts"].data)) == 3
    assert result["best"]["run_id"] in artifacts["sweep-best-charts"].data and "file://" not in table
    assert f"/reports/{result['best']['run_id']}/report.html)" in artifacts["sweep-best-charts"].data
    # Only the best run's report is stored (each is ~5 MB: plotly.js inlined).
    with fresh_database.connect() as conn:
        reports = conn.execute(text("SELECT report_id::text FROM reports")).scalars().all()
    assert reports == [result["best"]["run_id"]]


def _latest_flow_run(flow_name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async def fetch() -> Any:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                sort=FlowRunSort.START_TIME_DESC,
                limit=1,
            )
            return runs[0].id

    return asyncio.run(fetch())


class FlakyDatabaseProxy:
    """A TCP proxy in front of PostgreSQL whose first ``drop`` connections are closed at once (a database
    outage as the client sees it); later connections are forwarded."""

    def __init__(self, target: tuple[str, int], drop: int) -> None:
        self.target, self.drop, self.dropped = target, drop, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.dropped < self.drop:
                self.dropped += 1
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_database_outage_during_a_sweep_is_retried_and_the_sweep_completes(
    prefect_api: None, fresh_database: Engine, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.backtest import sweep

    url = fresh_database.url
    proxy = FlakyDatabaseProxy((url.host or "127.0.0.1", url.port or 5432), drop=2)
    try:
        # One TCP connection per attempt (no SSL/GSS negotiation retried on a second connection).
        through_proxy = url.set(port=proxy.port, query={**url.query, "sslmode": "disable", "gssencmode": "disable"})
        state = sweep(
            "momentum",
            {"fast": [5, 10], "slow": [40]},
            base_params=BASE,
            start=START,
            end=END,
            data_file=str(DATA),
            workers=2,
            output_dir=str(tmp_path),
            database=through_proxy.render_as_string(hide_password=False),
            return_state=True,
        )
    finally:
        proxy.close()
    assert proxy.dropped == 2
    assert state.is_completed(), state.message
    assert len(state.result()["runs"]) == 2

    async def task_runs() -> list[Any]:
        async with get_client() as client:
            return list(
                await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
            )

    runs = asyncio.run(task_runs())
    assert max(r.run_count for r in runs) >= 2  # a task hit the outage, was retried and then completed
    # Each backtest task run is named by its grid point; then the best run's report is stored and linked.
    assert sorted(r.name for r in runs) == [
        "backtest momentum BTC/USDT fast=10 slow=40",
        "backtest momentum BTC/USDT fast=5 slow=40",
        "report links sweep-best",
        f"store report {state.result()['best']['run_id']}",
    ]
    with fresh_database.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM backtest_runs")).scalar_one() == 2
