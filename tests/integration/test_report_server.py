"""Stored reports served over HTTP (`meltica reports serve`): the runtime role stores and reads them and cannot
change them; the server answers GET with the stored bytes and their type, 404 for an unknown id, a name that is
not a plain file name or a path that tries to leave the report, 405 for anything but GET/HEAD, and refuses to
listen beyond loopback without being told to."""

from __future__ import annotations

import asyncio
import http.client
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from meltica.errors import ConfigurationError, DataValidationError
from meltica.reporting.server import ReportServer
from meltica.reporting.stored import list_reports, read_report_file, report_url, store_report

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
HTML = b"<!DOCTYPE html><html><body><img src='equity.png'></body></html>"


@pytest.fixture
def runtime(module_database: Engine, runtime_engine: Callable[[Engine], Engine]) -> Engine:
    return runtime_engine(module_database)


@pytest.fixture
def served(runtime: Engine) -> Iterator[tuple[str, int]]:
    """A ReportServer on a free loopback port, in a thread of its own; yields (host, port)."""
    loop = asyncio.new_event_loop()
    server = ReportServer(runtime, "127.0.0.1", 0)
    port = loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _request(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One raw request: the path is sent exactly as given (no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_the_runtime_role_stores_a_report_once_and_cannot_change_it(runtime: Engine) -> None:
    report_id = uuid.uuid4()
    assert store_report(runtime, report_id, "backtest", "a run", {"report.html": HTML, "equity.png": PNG})
    # Written once: storing the same id again changes nothing.
    assert not store_report(runtime, report_id, "backtest", "other", {"report.html": b"changed"})
    stored = read_report_file(runtime, report_id, "report.html")
    assert stored is not None and stored.body == HTML and stored.content_type.startswith("text/html")
    assert read_report_file(runtime, report_id, "equity.png").content_type == "image/png"  # type: ignore[union-attr]
    assert any(r.report_id == report_id and r.files == ("equity.png", "report.html") for r in list_reports(runtime))
    for sql in (
        "UPDATE report_files SET body = 'x'::bytea",
        "DELETE FROM report_files",
        "DELETE FROM reports",
        "TRUNCATE reports CASCADE",
    ):
        with pytest.raises(DBAPIError) as refused, runtime.begin() as conn:
            conn.execute(text(sql))
        assert getattr(refused.value.orig, "sqlstate", "") == "42501", sql  # insufficient privilege
    # A name with a directory part never gets in.
    with pytest.raises(DataValidationError):
        store_report(runtime, uuid.uuid4(), "backtest", "bad", {"../report.html": HTML})


def test_the_server_serves_stored_files_and_nothing_else(runtime: Engine, served: tuple[str, int]) -> None:
    report_id = uuid.uuid4()
    store_report(runtime, report_id, "backtest", "served run", {"report.html": HTML, "equity.png": PNG})
    base = f"http://{served[0]}:{served[1]}"

    status, headers, body = _request(served, f"/reports/{report_id}/report.html")
    assert (status, body) == (200, HTML)
    assert headers["content-type"].startswith("text/html") and headers["x-content-type-options"] == "nosniff"
    assert report_url(base, report_id) == f"{base}/reports/{report_id}/report.html"
    status, headers, body = _request(served, f"/reports/{report_id}/equity.png")
    assert (status, headers["content-type"], body) == (200, "image/png", PNG)
    status, _, body = _request(served, f"/reports/{report_id}/")
    assert status == 200 and b'href="equity.png"' in body and b'href="report.html"' in body
    status, _, body = _request(served, "/")
    assert status == 200 and str(report_id).encode() in body
    assert _request(served, f"/reports/{report_id}/report.html", "HEAD")[0] == 200

    for path in (
        f"/reports/{uuid.uuid4()}/report.html",  # unknown report
        f"/reports/{report_id}/trades.csv",  # unknown file
        "/reports/not-a-uuid/report.html",
        f"/reports/{report_id}/../../../../etc/passwd",
        f"/reports/{report_id}/..%2F..%2F..%2Fetc%2Fpasswd",
        f"/reports/{report_id}/%2e%2e",
        f"/reports/{report_id}/.env",
        "/etc/passwd",
    ):
        status, _, body = _request(served, path)
        assert status == 404, (path, status, body)
        assert b"root:" not in body
    for method in ("POST", "PUT", "DELETE"):
        assert _request(served, f"/reports/{report_id}/report.html", method)[0] == 405, method
    # Still there, unchanged.
    assert _request(served, f"/reports/{report_id}/report.html")[2] == HTML


def test_the_server_listens_on_loopback_unless_told_otherwise(runtime: Engine) -> None:
    with pytest.raises(ConfigurationError, match="loopback"):
        ReportServer(runtime, "0.0.0.0", 0)  # noqa: S104 - the address being refused
    ReportServer(runtime, "0.0.0.0", 0, allow_remote=True)  # noqa: S104 - allowed when asked (not started)


def test_reports_serve_command_serves_the_configured_database(
    module_database: Engine, free_port: Callable[[], int], tmp_path: Path
) -> None:
    """`meltica reports serve --port` as a user runs it, on the configured database (MELTICA_DATABASE_URL)."""
    import os
    import urllib.request

    from tests.integration.conftest import runtime_url_of

    report_id = uuid.uuid4()
    store_report(module_database, report_id, "backtest", "cli run", {"report.html": HTML})
    port = free_port()
    env = {**os.environ, "MELTICA_DATABASE_URL": runtime_url_of(module_database)}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meltica", "reports", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/reports/{report_id}/report.html", timeout=5
                ) as resp:
                    assert resp.read() == HTML
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert f"serving stored reports at http://127.0.0.1:{port}/" in log.read_text()
        remote = subprocess.run(
            [sys.executable, "-m", "meltica", "reports", "serve", "--host", "0.0.0.0", "--port", "0"],  # noqa: S104
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert remote.returncode == 2 and "--allow-remote" in remote.stderr, remote.stderr
        # `reports list` prints each stored report with its link under reports_url.
        listed = subprocess.run(
            [sys.executable, "-m", "meltica", "reports", "list"],
            env={**env, "MELTICA_REPORTS_URL": f"http://127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert f"cli run  http://127.0.0.1:{port}/reports/{report_id}/report.html" in listed.stdout, listed.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_served_report_renders_in_headless_chromium_under_its_content_policy(
    runtime: Engine, served: tuple[str, int], tmp_path: Path
) -> None:
    """The served report.html is the real one (interactive plotly charts inlined, PNGs linked beside it): the
    server's Content-Security-Policy lets it render, with no console error, and its relative links resolve."""
    import shutil

    from meltica.backtest import write_report
    from meltica.reporting.stored import store_report_directory
    from tests.unit.test_backtest_report import SYMBOL, _simulated

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("no chromium on this machine: infra/bootstrap.sh installs it (apt-get install chromium)")
    result, prices = _simulated(600)
    write_report(result, tmp_path, prices={SYMBOL: prices})
    report_id = uuid.uuid4()
    names = ("report.html", "equity.png", "drawdown.png", "positions.png")
    assert store_report_directory(runtime, report_id, "backtest", "browser", tmp_path, names)
    url = f"http://{served[0]}:{served[1]}/reports/{report_id}/report.html"

    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
            page.on("response", lambda r: errors.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
            response = page.goto(url, wait_until="load")
            assert response is not None and response.status == 200
            assert "default-src 'none'" in (response.headers.get("content-security-policy") or "")
            page.wait_for_selector("#meltica-charts .main-svg", timeout=30_000)
            assert page.locator("#meltica-charts .cartesianlayer .subplot").count() == 4
            for name in names[1:]:
                href = page.evaluate(f"new URL('{name}', document.baseURI).href")
                image = page.request.get(href)
                assert image.status == 200 and image.body() == (tmp_path / name).read_bytes(), name
            assert errors == [], errors
        finally:
            browser.close()
