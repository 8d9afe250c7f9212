"""A worker factory (``python -m streams.worker --config``) whose venue call fails for real: the account's
credentials come from its ``env:`` references, the emulator refuses the signature, ccxt's DEBUG log echoes
the signed request (API key header included) and the failure escapes ``main`` as a chained exception."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from meltica.adapters.factory import adapter_for_account
from meltica.config import load_settings


def factory(config: dict[str, Any]) -> list[Any]:
    settings = load_settings(config_file=config["params"]["settings"])
    failures: list[BaseException] = []

    async def fetch_balances() -> None:
        adapter = adapter_for_account(settings, "emu")
        try:
            await adapter.connect()
            await adapter.fetch_balances()
        finally:
            await adapter.close()

    def call() -> None:  # the factory runs inside the worker's event loop: the venue call gets its own
        try:
            asyncio.run(fetch_balances())
        except Exception as exc:
            failures.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(60)
    if not failures:
        return []
    logging.getLogger("redaction_worker_factory").error("venue call failed", exc_info=failures[0])
    raise RuntimeError("the venue refused the account") from failures[0]
