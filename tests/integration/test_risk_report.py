"""The daily risk report against real PostgreSQL: figures vs an independent hand computation from the fills,
VaR/ES vs numpy on the same returns, and the flow as a real Prefect run with its artifacts."""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, insert, text

from meltica.domain.market_data import CandleRow
from meltica.reporting.risk_report import build_risk_report, load_stored_report, store_report
from meltica.risk.limits import RiskConfig
from meltica.storage.candles import load_candles
from meltica.storage.tables import fills, reconciliation_discrepancies, reconciliation_runs, risk_events

pytestmark = pytest.mark.integration

DAY = date(2024, 3, 5)
START = datetime(2024, 3, 5, tzinfo=UTC)
END = START + timedelta(days=1)
MARKS = {"BTC/USDT": "130", "ETH/USDT": "40"}
D = Decimal


def _closes(seed: int, level: float) -> dict[datetime, Decimal]:
    rng = np.random.default_rng(seed)
    first = datetime(2024, 3, 1, tzinfo=UTC)
    walk = level * np.exp(np.cumsum(rng.normal(0, 0.01, 120)))
    return {first + timedelta(hours=i): D(f"{x:.2f}") for i, x in enumerate(walk)}


BTC = _closes(1, 100.0)
ETH = _closes(2, 50.0)


def _fill(
    trade_id: str, strategy: str, symbol: str, side: str, price: str, qty: str, fee: str, ts: datetime
) -> dict[str, Any]:
    return {
        "exchange": "binance",
        "account": "acc1",
        "trade_id": trade_id,
        "client_order_id": f"c-{trade_id}",
        "strategy": strategy,
        "symbol": symbol,
        "side": side,
        "price": D(price),
        "quantity": D(qty),
        "fee": D(fee),
        "fee_currency": "USDT",
        "liquidity": "taker",
        "ts": ts,
    }


def _seed(engine: Engine) -> None:
    for symbol, closes in (("BTC/USDT", BTC), ("ETH/USDT", ETH)):
        rows = [CandleRow(ts, c, c, c, c, D(1), i + 1) for i, (ts, c) in enumerate(closes.items())]
        load_candles(engine, rows, exchange="binance", symbol=symbol, timeframe="1h")
    h = timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(
            insert(fills),
            [
                _fill("1", "alpha", "BTC/USDT", "buy", "100", "1", "0.1", START - 12 * h),  # the day before
                _fill("2", "alpha", "BTC/USDT", "buy", "110", "1", "0.11", START + 10 * h),
                _fill("3", "alpha", "BTC/USDT", "sell", "120", "1.5", "0.18", START + 15 * h),
                _fill("4", "beta", "ETH/USDT", "sell", "50", "2", "0.05", START + 9 * h),
                _fill("5", "beta", "ETH/USDT", "buy", "45", "1", "0.045", START + 20 * h),
                _fill("6", "beta", "ETH/USDT", "buy", "44", "1", "0.04", END + h),  # the day after: ignored
            ],
        )
        events = [
            ("breach", "daily_loss_limit", None),
            ("rejected", "max_order_notional", None),
            ("rejected", "max_order_notional", None),
            ("kill_switch_on", "kill_switch", {"scope": "account:acc1", "mode": "halt"}),
            ("approved", None, None),
        ]
        conn.execute(
            insert(risk_events),
            [
                {
                    "event_id": uuid.uuid4(),
                    "ts": START + timedelta(hours=11 + i),
                    "account": "acc1",
                    "strategy": "alpha",
                    "decision": d,
                    "rule": rule,
                    "reason": f"{d} reason",
                    "details": details or {},
                    "actor": "risk",
                }
                for i, (d, rule, details) in enumerate(events)
            ],
        )
        run_id = uuid.uuid4()
        conn.execute(
            insert(reconciliation_runs).values(
                run_id=run_id, account="acc1", exchange="binance", status="finished", started_at=START + 2 * h
            )
        )
        conn.execute(
            insert(reconciliation_discrepancies),
            [
                {"discrepancy_id": uuid.uuid4(), "run_id": run_id, "kind": k, "subject": s, "ts": START + 2 * h}
                for k, s in (("missing_locally", "o-1"), ("balance_drift", "USDT"))
            ],
        )


@pytest.fixture
def seeded(fresh_database: Engine) -> Engine:
    _seed(fresh_database)
    return fresh_database


def test_figures_match_a_hand_computation_from_the_fills(seeded: Engine) -> None:
    report = build_risk_report(seeded, DAY, limits=RiskConfig(max_gross_exposure=D(50)), marks=MARKS)
    start_mark = BTC[START - timedelta(hours=1)]  # the last candle opened before the day
    # alpha (BTC): 1 @ 100 carried in; +1 @ 110 (avg 105); −1.5 @ 120 realizes 1.5 × 15; 0.5 left, cost 52.5.
    alpha_unrealized_start = 1 * (start_mark - 100)
    alpha = {"realized": D("22.5"), "unrealized": D("0.5") * 130 - D("52.5"), "fees": D("0.29")}
    # beta (ETH): short 2 @ 50; buy 1 @ 45 realizes 5; −1 left, cost −50; at 40 unrealized +10.
    beta = {"realized": D(5), "unrealized": D(10), "fees": D("0.095")}
    by_strategy = {line.strategy: line for line in report.by_strategy}
    assert set(by_strategy) == {"alpha", "beta"}
    for name, want, u0 in (("alpha", alpha, alpha_unrealized_start), ("beta", beta, D(0))):
        line = by_strategy[name]
        assert (line.realized, line.unrealized, line.fees) == (want["realized"], want["unrealized"], want["fees"])
        assert line.unrealized_change == want["unrealized"] - u0
        assert line.pnl == want["realized"] + want["unrealized"] - u0 - want["fees"]
    by_symbol = {line.symbol: line for line in report.by_symbol}
    assert by_symbol["BTC/USDT"].quantity == D("0.5") and by_symbol["ETH/USDT"].quantity == D(-1)
    assert by_symbol["BTC/USDT"].realized == D("22.5")
    (account,) = report.by_account
    total = sum((by_strategy[s].pnl for s in ("alpha", "beta")), D(0))
    assert account.account == "acc1" and account.pnl == total
    assert report.fills == 4

    (exposure,) = [e for e in report.exposure if e.strategy == "*"]
    assert (exposure.gross, exposure.net) == (D(65) + D(40), D(65) - D(40))
    (gross,) = [u for u in report.limits if u.limit == "max_gross_exposure"]
    assert gross.value == D(105) and gross.breached and gross.utilisation == pytest.approx(2.1)

    # Drawdown of the day's PnL curve: the same curve rebuilt by hand at each fill (that market marked at
    # the fill price, the other at its last price) — start of day 0.
    def book(
        btc_q: D, btc_cost: D, btc_real: D, eth_q: D, eth_cost: D, eth_real: D, btc_px: D, eth_px: D, fees: D
    ) -> D:
        return btc_real + btc_q * btc_px - btc_cost + eth_real + eth_q * eth_px - eth_cost - fees

    base = book(D(1), D(100), D(0), D(0), D(0), D(0), start_mark, D(1), D("0.1"))
    curve = [
        D(0),
        book(D(1), D(100), D(0), D(-2), D(-100), D(0), start_mark, D(50), D("0.15")) - base,
        book(D(2), D(210), D(0), D(-2), D(-100), D(0), D(110), D(50), D("0.26")) - base,
        book(D("0.5"), D("52.5"), D("22.5"), D(-2), D(-100), D(0), D(120), D(50), D("0.44")) - base,
        book(D("0.5"), D("52.5"), D("22.5"), D(-1), D(-50), D(5), D(120), D(45), D("0.485")) - base,
        total,
    ]
    assert [v for _, v in report.curve["acc1"]] == curve
    peak, worst = curve[0], D(0)
    for v in curve:
        peak = max(peak, v)
        worst = max(worst, peak - v)
    assert report.drawdown["acc1"] == worst == report.drawdown["*"]

    # VaR / ES: numpy on the same hourly returns of the day-end positions.
    times = sorted(BTC)
    btc = np.array([float(BTC[t]) for t in times])
    eth = np.array([float(ETH[t]) for t in times])
    pnl = 0.5 * 130 * (btc[1:] / btc[:-1] - 1) + (-1) * 40 * (eth[1:] / eth[:-1] - 1)
    assert np.allclose(report.scenarios["*"], pnl, rtol=0, atol=1e-12)
    (var,) = [v for v in report.var if v.scope == "*"]
    assert var.observations == 119
    for c, a in (("95", 0.95), ("99", 0.99)):
        q = np.quantile(pnl, 1 - a)
        assert var.var[c] == pytest.approx(-q, abs=1e-12)
        assert var.es[c] == pytest.approx(-pnl[pnl <= q].mean(), abs=1e-12)

    assert report.risk_events == {"approved": 1, "breach": 1, "kill_switch_on": 1, "rejected": 2}
    assert [b["rule"] for b in report.breaches] == ["daily_loss_limit"]
    assert report.rejections_by_rule == {"max_order_notional": 2}
    assert [(k["scope"], k["mode"]) for k in report.kill_switch] == [("account:acc1", "halt")]
    (recon,) = report.reconciliation
    assert recon["discrepancies"] == 2 and report.discrepancies_by_kind == {"balance_drift": 1, "missing_locally": 1}

    key = store_report(seeded, report)
    stored = load_stored_report(seeded, DAY)
    assert key == "risk_report:2024-03-05" and stored is not None
    assert {s["strategy"]: s["pnl"] for s in stored["by_strategy"]} == {k: str(v.pnl) for k, v in by_strategy.items()}
    assert store_report(seeded, report) == key  # a rerun replaces the row


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_publishes_markdown_and_chart(prefect_api: None, seeded: Engine, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.objects import StateType

    from flows.risk_report import daily_risk_report

    url = seeded.url.render_as_string(hide_password=False)
    state = daily_risk_report(
        DAY, database=url, output_dir=str(tmp_path), limits={"max_gross_exposure": "50"}, marks=MARKS, return_state=True
    )
    assert state.type == StateType.COMPLETED
    summary = state.result()
    png = tmp_path / "risk-report-2024-03-05.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "risk-report-2024-03-05.md").read_text().startswith("### Daily risk report 2024-03-05")
    with seeded.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM risk_state WHERE key = 'risk_report:2024-03-05'")).scalar() == 1

    async def fetch() -> list[Any]:
        async with get_client() as client:
            return list(
                await client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
                    )
                )
            )

    artifacts = {a.key: a for a in asyncio.run(fetch())}
    assert (
        "Limit utilisation" in artifacts["risk-report"].data and "max_gross_exposure" in artifacts["risk-report"].data
    )
    # The chart is embedded in the artifact (the UI shows it), not a link to the worker's disk.
    [encoded] = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", artifacts["risk-report"].data)
    assert base64.b64decode(encoded) == png.read_bytes()
    assert "file://" not in artifacts["risk-report"].data
    assert summary["breaches"] >= 2
    # The files are stored as a report and linked under reports_url (served by `meltica reports serve`).
    json_url = f"http://127.0.0.1:8765/reports/{summary['report_id']}/risk-report-2024-03-05.json"
    assert f"({json_url})" in artifacts["risk-report"].data, artifacts["risk-report"].data[-400:]
    with seeded.connect() as conn:
        stored = dict(
            conn.execute(
                text("SELECT name, body FROM report_files WHERE report_id = CAST(:r AS uuid)"),
                {"r": summary["report_id"]},
            ).all()
        )
    assert stored["risk-report-2024-03-05.png"] == png.read_bytes()
    assert stored["risk-report-2024-03-05.json"] == (tmp_path / "risk-report-2024-03-05.json").read_bytes()


def test_flow_without_limits_uses_the_configured_limits(prefect_api: None, seeded: Engine, tmp_path: Path) -> None:
    """The scheduled report passes no `limits`: the limits are the configuration's `risk` section."""
    from flows.risk_report import daily_risk_report

    config = tmp_path / "risk.yaml"
    config.write_text("environment: dev\nrisk:\n  max_gross_exposure: '50'\n")
    url = seeded.url.render_as_string(hide_password=False)
    summary = daily_risk_report(DAY, database=url, output_dir=str(tmp_path), marks=MARKS, config_file=str(config))
    assert f"Limits: the `risk` section of {config}." in summary["markdown"]
    assert "| max_gross_exposure |" in summary["markdown"] and "no limits given" not in summary["markdown"]
    assert summary["breaches"] >= 1
