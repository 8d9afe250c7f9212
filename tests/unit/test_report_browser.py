"""report.html in a real headless Chromium (the system's ``chromium``, driven by Playwright): it renders its
interactive charts offline, without console errors, and hovering a trade marker shows the trade."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from test_backtest_report import SYMBOL, _simulated

from meltica.backtest import BacktestResult, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Skipped on a developer's machine without chromium; in CI (CI=true) a missing browser fails the test instead.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="needs the system's chromium (infra/bootstrap.sh installs it: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result, prices = _simulated(3000)
    return write_report(result, tmp_path_factory.mktemp("report"), prices={SYMBOL: prices})


def _open(page_path: Path, check: object) -> None:
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        pytest.fail("no chromium on this machine: infra/bootstrap.sh installs it (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            errors: list[str] = []
            outside: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # Offline: any request that is not the file itself (or inline data) fails the test.
            page.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(("file:", "data:", "blob:"))
                    else (outside.append(route.request.url), route.abort())
                ),
            )
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            page.wait_for_selector("#meltica-charts .main-svg", timeout=30_000)
            check(page)  # type: ignore[operator]
            assert errors == [], errors
            assert outside == [], outside
        finally:
            browser.close()


def test_report_opens_in_headless_chromium_with_interactive_charts(report: Path) -> None:
    def check(page: object) -> None:
        from playwright.sync_api import Page

        assert isinstance(page, Page)
        # Equity, drawdown, price and position panels, each a plotly subplot on one shared time axis.
        assert page.locator("#meltica-charts .cartesianlayer .subplot").count() == 4
        traces = page.evaluate("document.getElementById('meltica-charts').data.map(t => t.name)")
        assert {"equity", "drawdown (%)", f"{SYMBOL} price", f"{SYMBOL} exit", f"{SYMBOL} position"} <= set(traces)
        assert page.locator("#meltica-charts .modebar-btn[data-title='Zoom']").count() >= 1
        assert page.locator("#meltica-charts .modebar-btn[data-title='Pan']").count() >= 1
        # Hover the first exit marker: the tooltip names the round trip.
        point = page.locator("#meltica-charts .scatterlayer .trace .points path").first
        point.hover(force=True)
        page.wait_for_selector("#meltica-charts .hoverlayer .hovertext", timeout=10_000)
        tooltip = page.locator("#meltica-charts .hoverlayer").text_content() or ""
        assert "entry" in tooltip and "PnL" in tooltip, tooltip

    _open(report, check)


def test_report_without_data_opens_cleanly(tmp_path: Path) -> None:
    empty = BacktestResult.from_run(strategy="idle", symbols=[], equity=[], code_version="x")
    prices: dict[str, list[tuple[datetime, Decimal]]] = {}
    page_path = write_report(empty, tmp_path, prices=prices)

    def check(page: object) -> None:
        from playwright.sync_api import Page

        assert isinstance(page, Page)
        text = page.locator("#meltica-charts").text_content() or ""
        assert "equity (total return" in text and "drawdown (max" in text, text

    _open(page_path, check)
