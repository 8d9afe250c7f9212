"""Reconciliation against the Binance emulator and real PostgreSQL: planted discrepancies are found,
classified, acted on by the policy and stored; the Prefect flow runs it from configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import Engine, select, text

from meltica.adapters.ccxt import CcxtAdapter
from meltica.adapters.registry import create_adapter
from meltica.domain import OrderCancelled, OrderIntent, OrderStatus, OrderType, Side
from meltica.emulator import CCXT_OPTIONS, EmulatorConfig, EmulatorServer
from meltica.emulator.config import EmulatorAccount
from meltica.execution import OrderManager, OrderStore
from meltica.matching import EngineOrderType, EngineTimeInForce, NewOrder
from meltica.portfolio import Portfolio, PortfolioStore
from meltica.reconciliation import Case, DiscrepancyKind, ReconcilePolicy, markdown, reconcile_account
from meltica.risk import KillSwitch, KillSwitchMode, KillSwitchStore
from meltica.storage import tables as t

pytestmark = pytest.mark.integration


DATA = Path(__file__).resolve().parents[1] / "data" / "binance"
KEY, SECRET = "rec-key-0123456789", "rec-secret-abcdef-987654"
MM_KEY, MM_SECRET = "rec-mm-key-0123456789", "rec-mm-secret-abcdef"
SYMBOL, VENUE_SYMBOL = "BTC/USDT", "BTCUSDT"


def now() -> datetime:
    return datetime.now(UTC)


def emulator() -> EmulatorServer:
    return EmulatorServer(
        EmulatorConfig(
            accounts=[EmulatorAccount("main", KEY, SECRET), EmulatorAccount("mm", MM_KEY, MM_SECRET)],
            data=[DATA / "btcusdt-trades.parquet"],
        )
    )


async def connected_adapter(emu: EmulatorServer) -> CcxtAdapter:
    adapter = create_adapter(
        "binance",
        account="main",
        credentials={"apiKey": KEY, "secret": SECRET},
        urls={"api": emu.ccxt_urls()},
        options=dict(CCXT_OPTIONS),
    )
    assert isinstance(adapter, CcxtAdapter)
    await adapter.connect()
    return adapter


def intent(n: int, price: Decimal, strategy: str, quantity: str = "0.001") -> OrderIntent:
    return OrderIntent(
        intent_id=f"rec-{n}",
        account="main",
        strategy=strategy,
        exchange="binance",
        symbol=SYMBOL,
        side=Side.BUY,
        type=OrderType.LIMIT,
        quantity=Decimal(quantity),
        price=price,
        created_at=now(),
    )


def stored(db: Engine, run_id: object) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with db.connect() as conn:
        run = conn.execute(select(t.reconciliation_runs).where(t.reconciliation_runs.c.run_id == run_id)).mappings()
        rows = conn.execute(
            select(t.reconciliation_discrepancies).where(t.reconciliation_discrepancies.c.run_id == run_id)
        ).mappings()
        return dict(run.one()), [dict(r) for r in rows]


def test_planted_order_and_fill_discrepancies_are_found_adopted_or_halted_and_stored(fresh_database: Engine) -> None:
    db = fresh_database
    store = OrderStore(db)
    switch = KillSwitch(KillSwitchStore(db))

    async def body() -> None:
        emu = emulator()
        await emu.start()
        adapter = await connected_adapter(emu)
        try:
            await emu.step(20)
            book = emu.engine.book(VENUE_SYMBOL, 1)
            mid = ((book.bids[0][0] + book.asks[0][0]) / 2).quantize(Decimal("0.01"))
            far = (book.bids[0][0] * Decimal("0.9")).quantize(Decimal("0.01"))
            # The OMS without its user stream (never started): what happens on the venue now is unseen.
            oms = OrderManager(store, {"main": adapter}, clock=now)
            cancelled = await oms.submit(intent(1, far, "s1"))
            filled = await oms.submit(intent(2, mid, "s1"))
            believed_closed = await oms.submit(intent(3, far - 1, "s2"))
            for order in (cancelled, filled, believed_closed):
                assert order.status is OrderStatus.OPEN, order.reason

            # 1. cancelled on the venue behind Meltica's back
            emu.engine.cancel("main", VENUE_SYMBOL, client_order_id=cancelled.client_order_id)
            # 2. filled on the venue (another account sells into it) while no user stream runs
            mm_sell = NewOrder(
                account="mm", symbol=VENUE_SYMBOL, side=Side.SELL, type=EngineOrderType.LIMIT,
                quantity=Decimal("0.001"), price=mid, time_in_force=EngineTimeInForce.GTC,
            )  # fmt: skip
            assert sorted(f.account for f in emu.engine.submit(mm_sell).fills if f.price == mid) == ["main", "mm"]
            # 3. someone else trades the account: a foreign sell that fills, and a foreign resting order
            foreign_fill = NewOrder(
                account="main", symbol=VENUE_SYMBOL, side=Side.SELL, type=EngineOrderType.MARKET,
                quantity=Decimal("0.002"), client_order_id="manual-sell-1",
            )  # fmt: skip
            assert emu.engine.submit(foreign_fill).fills
            foreign_rest = NewOrder(
                account="main", symbol=VENUE_SYMBOL, side=Side.BUY, type=EngineOrderType.LIMIT,
                quantity=Decimal("0.001"), price=far - 5, time_in_force=EngineTimeInForce.GTC,
                client_order_id="manual-bid-1",
            )  # fmt: skip
            emu.engine.submit(foreign_rest)
            # 4. Meltica wrongly believes an order closed that is live on the venue
            store.append_event(
                believed_closed.apply(
                    OrderCancelled(event_id="cancelled", client_order_id=believed_closed.client_order_id, ts=now())
                ),
                OrderCancelled(event_id="cancelled", client_order_id=believed_closed.client_order_id, ts=now()),
            )

            report = await reconcile_account(
                db, adapter, account="main", policy=ReconcilePolicy(), kill_switch=switch, trigger="on_demand"
            )
            assert report.status == "completed"
            by_subject = {d.subject: d for d in report.discrepancies}

            # the cancel is adopted: an appended event, the order closed locally
            d = by_subject[f"order:{cancelled.client_order_id}"]
            assert (d.kind, d.case, d.outcome) == (DiscrepancyKind.STATE_MISMATCH, Case.VENUE_CLOSED, "adopted")
            assert store.get(cancelled.client_order_id).status is OrderStatus.CANCELLED  # type: ignore[union-attr]
            assert [e["event_type"] for e in store.events_of(cancelled.client_order_id)][-2:] == [
                "cancelled",
                "reconciled",
            ]

            # the missed fill is recorded through the order: filled, with its fills row
            missed = [d for d in report.of_case(Case.FILL_MISSING_LOCALLY)]
            assert len(missed) == 1
            assert (missed[0].kind, missed[0].outcome, missed[0].strategy) == (
                DiscrepancyKind.MISSING_LOCALLY, "adopted", "s1",
            )  # fmt: skip
            after = store.get(filled.client_order_id)
            assert after is not None
            assert (after.status, after.filled_quantity) == (OrderStatus.FILLED, Decimal("0.001"))
            assert len(store.fills_of(filled.client_order_id)) == 1

            # the foreign trade: recorded (a venue fact) and the account halted; the foreign order too
            foreign = report.of_case(Case.FILL_UNKNOWN_ORDER)
            assert foreign and all(d.outcome == "halted account:main" for d in foreign)
            assert report.of_case(Case.ORDER_UNKNOWN_LOCALLY)[0].subject == "order:manual-bid-1"
            # the order Meltica thinks closed but is live: its strategy is halted
            live = by_subject[f"order:{believed_closed.client_order_id}"]
            assert (live.case, live.outcome) == (Case.VENUE_OPEN_LOCAL_CLOSED, "halted strategy:s2")
            assert switch.state_of("account:main").mode is KillSwitchMode.HALT
            assert switch.state_of("strategy:s2").mode is KillSwitchMode.HALT
            assert switch.state_of("strategy:s1").mode is KillSwitchMode.OFF
            assert KillSwitch(KillSwitchStore(db)).state_of("account:main").mode is KillSwitchMode.HALT  # persisted
            assert sorted(report.halted_scopes) == ["account:main", "strategy:s2"]

            # the run and its discrepancies are stored
            run, rows = stored(db, report.run_id)
            assert (run["status"], run["trigger"], run["account"], run["exchange"]) == (
                "completed", "on_demand", "main", "binance",
            )  # fmt: skip
            assert run["summary"]["discrepancies"] == len(report.discrepancies) == len(rows)
            kinds = {r["kind"] for r in rows}
            assert {"state_mismatch", "missing_locally"} <= kinds
            assert any(r["action"] == "adopted (venue_closed)" for r in rows)

            md = markdown(report)
            assert "venue_closed" in md and "fill_unknown_order" in md and "`account:main`" in md

            # a second run: what was adopted is settled; the live unexplained exposure is still reported
            again = await reconcile_account(db, adapter, account="main", kill_switch=switch, trigger="schedule")
            assert {d.case for d in again.discrepancies} == {Case.ORDER_UNKNOWN_LOCALLY, Case.VENUE_OPEN_LOCAL_CLOSED}
        finally:
            await adapter.close()
            await emu.stop()

    asyncio.run(asyncio.wait_for(body(), 90))
    with db.connect() as conn:
        orphan = conn.execute(
            text("SELECT strategy, client_order_id FROM fills WHERE client_order_id = 'manual-sell-1'")
        )
        assert [tuple(r) for r in orphan] == [(None, "manual-sell-1")]


def test_deposit_is_reported_as_balance_drift_and_the_venue_snapshot_stored(fresh_database: Engine) -> None:
    db = fresh_database

    async def body() -> None:
        emu = emulator()
        await emu.start()
        adapter = await connected_adapter(emu)
        try:
            # no local view yet: nothing to compare, the venue's balances are still stored
            first = await reconcile_account(db, adapter, account="main", kill_switch=None, trigger="startup")
            assert (first.balances_compared, first.discrepancies) == (False, [])

            portfolio = Portfolio()
            portfolio.set_balances("main", "binance", await adapter.fetch_balances())
            PortfolioStore(db).save_snapshot(portfolio, ts=now())
            async with aiohttp.ClientSession() as http:
                response = await http.post(
                    f"{emu.rest_url}/_emulator/deposit",
                    json={"account": "main", "asset": "USDT", "amount": "250.5"},
                    headers=emu.admin_headers(),
                )
                assert response.status == 200
            policy = ReconcilePolicy(balance_tolerance={"BTC": Decimal("0.01")})
            report = await reconcile_account(db, adapter, account="main", policy=policy, kill_switch=None, trigger="x")
            assert report.balances_compared and report.balance_baseline is not None
            assert report.balance_baseline.startswith("snapshot")
            [drift] = report.discrepancies
            assert (drift.kind, drift.subject, drift.outcome) == (
                DiscrepancyKind.BALANCE_DRIFT,
                "balance:USDT",
                "reported",
            )
            assert drift.venue is not None and drift.venue["drift"] == "250.5"

            # within tolerance: not a discrepancy (a tolerance per asset)
            loose = ReconcilePolicy(balance_tolerance={"USDT": Decimal(300)})
            quiet = await reconcile_account(db, adapter, account="main", policy=loose, trigger="x", portfolio=portfolio)
            assert quiet.discrepancies == [] and quiet.balance_baseline == "portfolio"

            _, rows = stored(db, report.run_id)
            assert [(r["kind"], r["subject"], r["action"]) for r in rows] == [
                ("balance_drift", "balance:USDT", "reported (balance_drift)")
            ]
        finally:
            await adapter.close()
            await emu.stop()

    asyncio.run(asyncio.wait_for(body(), 60))
    with db.connect() as conn:
        venue_usdt = conn.execute(
            text("SELECT total FROM balance_snapshots WHERE source = 'venue' AND asset = 'USDT' ORDER BY ts")
        ).scalars()
        assert [str(v) for v in venue_usdt][-1] == "10250.5"


# --- the flow ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "paper.yaml"
    config.write_text(
        "environment: paper\n"
        "trading_mode: paper\n"
        "accounts:\n"
        "  - name: main\n"
        "    exchange: binance\n"
        f"    emulator_url: http://127.0.0.1:{port}\n"
        "    api_key: env:REC_TEST_KEY\n"
        "    api_secret: env:REC_TEST_SECRET\n"
    )
    return config


class _EmulatorThread:
    """The emulator on its own event loop thread: the flow runs its own loops (``asyncio.run``)."""

    def __init__(self) -> None:
        import threading

        self.emu = emulator()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _EmulatorThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.emu.start(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self.emu.step(20), self.loop).result(30)  # a book to trade against
        return self

    def call(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.emu.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_flow_reconciles_configured_account_and_publishes_artifact(
    prefect_api: None, fresh_database: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.schemas.objects import StateType

    from flows.reconcile import reconcile

    monkeypatch.setenv("REC_TEST_KEY", KEY)
    monkeypatch.setenv("REC_TEST_SECRET", SECRET)
    url = fresh_database.url.render_as_string(hide_password=False)
    with _EmulatorThread() as running:
        config = write_config(tmp_path, running.emu.port)
        # an unexplained trade on the account: the flow must halt it
        foreign = NewOrder(
            account="main", symbol=VENUE_SYMBOL, side=Side.SELL, type=EngineOrderType.MARKET,
            quantity=Decimal("0.001"), client_order_id="manual-sell-9",
        )  # fmt: skip
        assert running.call(lambda: running.emu.engine.submit(foreign)).fills
        state = reconcile(
            accounts=["main"],
            trigger="on_demand",
            config_file=str(config),
            database=url,
            policy=ReconcilePolicy(symbols=(SYMBOL,)),
            return_state=True,
        )
        assert state.type == StateType.COMPLETED, state.message
        [result] = state.result()
    assert result["status"] == "completed"
    assert result["by_kind"] == {"missing_locally": 1}
    assert result["halted_scopes"] == ["account:main"]
    assert "fill_unknown_order" in result["markdown"]
    assert KillSwitch(KillSwitchStore(fresh_database)).state_of("account:main").mode is KillSwitchMode.HALT
    with fresh_database.connect() as conn:
        runs = conn.execute(text("SELECT trigger, status FROM reconciliation_runs")).all()
    assert [tuple(r) for r in runs] == [("on_demand", "completed")]
    artifact = _artifact_markdown(state.state_details.flow_run_id)
    assert "Reconciliation of `main`" in artifact and "fill_unknown_order" in artifact


def test_flow_fails_with_taxonomy_error_when_venue_is_unreachable(
    prefect_api: None, fresh_database: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_port: Any
) -> None:
    from prefect.client.schemas.objects import StateType

    from flows.reconcile import reconcile
    from meltica.errors import RetryableError

    monkeypatch.setenv("REC_TEST_KEY", KEY)
    monkeypatch.setenv("REC_TEST_SECRET", SECRET)
    config = write_config(tmp_path, free_port())  # nothing listens there
    url = fresh_database.url.render_as_string(hide_password=False)
    monkeypatch.setattr("flows.reconcile.reconcile_one.retry_delay_seconds", [0, 0, 0], raising=False)
    state = reconcile(accounts=["main"], config_file=str(config), database=url, return_state=True)
    assert state.type == StateType.FAILED
    with pytest.raises(RetryableError):
        state.result()
    # retryable: the task ran once and then its three retries
    assert _task_run_counts(state.state_details.flow_run_id) == [4]


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
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
            return "\n".join(str(a.data) for a in artifacts)

    return asyncio.run(fetch())


def test_flow_fails_retryably_when_database_is_unreachable_and_terminally_for_unknown_account(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_port: Any
) -> None:
    from prefect.client.schemas.objects import StateType

    from flows.reconcile import reconcile
    from meltica.errors import ConfigurationError, InfrastructureUnavailableError

    monkeypatch.setenv("REC_TEST_KEY", KEY)
    monkeypatch.setenv("REC_TEST_SECRET", SECRET)
    monkeypatch.setattr("flows.reconcile.reconcile_one.retry_delay_seconds", [0, 0, 0], raising=False)
    config = str(write_config(tmp_path, free_port()))
    nowhere = f"postgresql://meltica:x@127.0.0.1:{free_port()}/meltica"
    state = reconcile(accounts=["main"], config_file=config, database=nowhere, return_state=True)
    assert state.type == StateType.FAILED
    with pytest.raises(InfrastructureUnavailableError):
        state.result()
    assert _task_run_counts(state.state_details.flow_run_id) == [4]

    unknown = reconcile(accounts=["nope"], config_file=config, database=nowhere, return_state=True)
    with pytest.raises(ConfigurationError, match="no account named 'nope'"):
        unknown.result()
    assert _task_run_counts(unknown.state_details.flow_run_id) == [1]  # terminal: no retry
