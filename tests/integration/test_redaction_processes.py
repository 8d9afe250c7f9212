"""Secrets resolved in a Meltica process never reach its output: a stream worker whose venue call fails at
DEBUG (ccxt echoes the signed request, the failure escapes as a chained exception) prints neither the API
key nor the secret its settings resolve from ``env:`` references."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meltica.emulator import EmulatorConfig, EmulatorServer
from meltica.infra.kafka import KafkaEndpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KEY, SECRET = "redact-key-0123456789abcdef", "redact-secret-KNOWN-987654321"


@pytest.fixture
def emulator_port() -> Iterator[int]:
    """The emulator knows the key but another secret: every signed call the worker makes is refused."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    emu = EmulatorServer(EmulatorConfig.single(KEY, "the-emulators-own-secret-000"))
    asyncio.run_coroutine_threadsafe(emu.start(), loop).result(30)
    try:
        yield emu.port
    finally:
        asyncio.run_coroutine_threadsafe(emu.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_worker_process_scrubs_resolved_credentials_from_debug_logs_and_chained_tracebacks(
    tmp_path: Path, emulator_port: int, kafka_endpoint: KafkaEndpoint
) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        "environment: dev\n"
        "accounts:\n"
        "  - name: emu\n"
        "    exchange: binance\n"
        f"    emulator_url: http://127.0.0.1:{emulator_port}\n"
        "    api_key: env:REDACT_TEST_KEY\n"
        "    api_secret: env:REDACT_TEST_SECRET\n"
    )
    config = tmp_path / "worker.json"
    config.write_text(
        json.dumps(
            {
                "bootstrap": kafka_endpoint.bootstrap_servers,
                "topic_prefix": "redact.",
                "factory": "redaction_worker_factory:factory",
                "params": {"settings": str(settings)},
            }
        )
    )
    env = {**os.environ, "REDACT_TEST_KEY": KEY, "REDACT_TEST_SECRET": SECRET}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "streams.worker", "--config", str(config), "--log-level", "DEBUG"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    # The failure really happened and was logged: ccxt's request echo, the logged and the uncaught chain.
    assert "X-MBX-APIKEY" in output, output[-3000:]
    assert "venue call failed" in output
    assert "The above exception was the direct cause of the following exception" in output
    assert "RuntimeError: the venue refused the account" in output
    assert KEY not in output
    assert SECRET not in output
    assert "****" in output
