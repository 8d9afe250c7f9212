"""Uncaught exceptions — main thread and other threads, causes and contexts — are printed without the
registered secrets once ``install_log_redaction`` ran; a record whose traceback held one keeps no
``exc_info`` a formatter could print again."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from meltica.secrets.redaction import RedactingFilter, SecretRegistry, redact_record

SECRET = "uncaught-secret-value-4242"

PROGRAM = textwrap.dedent(
    f"""
    import threading
    from meltica.secrets import install_log_redaction, register_secret

    install_log_redaction()
    register_secret({SECRET!r})

    def inner():
        raise KeyError("context carries {SECRET}")

    def in_thread():
        try:
            inner()
        except KeyError:
            raise ValueError("thread failure")

    thread = threading.Thread(target=in_thread, name="t1")
    thread.start()
    thread.join()
    try:
        try:
            inner()
        except KeyError as exc:
            raise OSError("cause carries {SECRET}") from exc
    except OSError:
        raise RuntimeError("main failure")
    """
)


def test_uncaught_exception_chains_are_scrubbed_in_the_main_thread_and_other_threads() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    err = done.stderr
    assert "RuntimeError: main failure" in err
    assert "ValueError: thread failure" in err
    assert "Exception in thread t1" in err
    assert "The above exception was the direct cause of the following exception" in err
    assert "During handling of the above exception, another exception occurred" in err
    assert "cause carries ****" in err
    assert "context carries ****" in err
    assert SECRET not in err


def test_a_scrubbed_traceback_drops_exc_info() -> None:
    secrets = SecretRegistry()
    secrets.add(SECRET)
    try:
        try:
            raise KeyError(SECRET)
        except KeyError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    redact_record(record, secrets)
    assert record.exc_info is None
    assert record.exc_text is not None
    assert SECRET not in logging.Formatter().format(record)
    assert "KeyError: '****'" in record.exc_text


def test_ccxt_verbose_echo_goes_through_logging_and_is_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from meltica.adapters.registry import create_adapter
    from meltica.secrets.redaction import registry

    key = "verbose-echo-api-key-5555"
    adapter = create_adapter("binance", account="a", credentials={"apiKey": key, "secret": SECRET})
    registry.add(key)
    caplog.handler.addFilter(RedactingFilter())
    try:
        with caplog.at_level(logging.INFO, logger="ccxt.verbose"):
            # ccxt's verbose mode calls exchange.log(...) with the request's headers
            adapter.exchange.log("\nfetch Request:", "binance", "GET", {"X-MBX-APIKEY": key})  # type: ignore[attr-defined]
    finally:
        registry.discard(key)
        asyncio.run(adapter.close())
    assert "fetch Request:" in caplog.text
    assert "X-MBX-APIKEY" in caplog.text
    assert key not in caplog.text
